-- The known labels with the class's position in the vocabulary (for scoring in Python: cleanlab).
-- Columns: shard, image_id, class_index, label. No variables.
SELECT l.shard, l.image_id, v.class_index, l.label FROM labels l JOIN vocab v USING (class_id);
