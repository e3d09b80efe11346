-- The dense scores of every scored image, in a fixed order (for scoring in Python: cleanlab, `dart calibrate`).
-- Columns: shard, image_id, scores (vocabulary order). No variables.
SELECT shard, image_id, scores FROM scores ORDER BY shard, image_id;
