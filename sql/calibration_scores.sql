-- Every scored image's score vector, in a fixed order: the rows of the (images x classes) matrix
-- that `dart calibrate` fits per-class thresholds on (dart_core/thresholds.py).
SELECT shard, image_id, scores
FROM scores
ORDER BY shard, image_id;
