-- Likely missing labels: the model puts the class at the top of the image (rank <= top, or above
-- the class's calibrated threshold) but the dataset does not say it is there (unknown) or says
-- it is not (negative). Most confident first. Variables: top (INTEGER), max_rows (INTEGER).
SELECT t.shard, t.image_id, t.class_id, t.class_name, t.unseen, t.score, t.rank,
       coalesce(l.label, 0) AS label,
       CASE WHEN l.label = -1 THEN 'labelled negative' ELSE 'not labelled' END AS issue,
       t.patches, t.patch_scores
FROM tags t
LEFT JOIN labels l ON l.shard = t.shard AND l.image_id = t.image_id AND l.class_id = t.class_id
WHERE (t.rank <= getvariable('top') OR coalesce(t.above_threshold, false))
  AND coalesce(l.label, 0) <> 1
ORDER BY t.rank, t.score DESC, t.shard, t.image_id
LIMIT getvariable('max_rows');
