-- The known labels (1 / -1) of the scored images, with the column of their class in the score
-- vectors (vocab.class_index): the label matrix beside calibration_scores.sql.
SELECT l.shard, l.image_id, v.class_index, l.label
FROM labels l
JOIN vocab v USING (class_id)
JOIN scores s ON s.shard = l.shard AND s.image_id = l.image_id;
