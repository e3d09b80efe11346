-- Likely wrong labels: labelled positive, but the model ranks the class far down the image
-- (rank > top) and below its threshold when one is calibrated. Least supported first.
-- Variables: top (INTEGER), max_rows (INTEGER).
SELECT j.shard, j.image_id, j.class_id, j.class_name, j.unseen, j.score, j.rank, j.label,
       'labelled positive, low score' AS issue
FROM judged j JOIN vocab v USING (class_index)
WHERE j.label = 1 AND j.rank > getvariable('top')
  AND (v.threshold IS NULL OR j.score < v.threshold)
ORDER BY j.rank DESC, j.score, j.shard, j.image_id
LIMIT getvariable('max_rows');
