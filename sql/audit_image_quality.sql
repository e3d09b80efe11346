-- Per-image label-quality score in the spirit of cleanlab's multilabel label_quality_scores:
-- each known label gets a self-confidence in [0, 1] — the percentile of the image's score among
-- all images for that class (a rank-based stand-in for a calibrated probability), p for a
-- positive and 1 - p for a negative — and the image's score is their softmin (temperature
-- `temperature`), so one badly supported label pulls the image down. Lowest quality first.
-- Variables: temperature (DOUBLE), max_rows (INTEGER).
WITH pct AS (  -- over every image, labelled or not (windows run after joins, so join later)
    SELECT shard, image_id, class_id,
           percent_rank() OVER (PARTITION BY class_index ORDER BY score) AS p
    FROM scores_long JOIN vocab USING (class_index)
), conf AS (
    SELECT pct.*, l.label FROM pct JOIN labels l USING (shard, image_id, class_id)
), self AS (
    SELECT shard, image_id, class_id, label, CASE WHEN label = 1 THEN p ELSE 1 - p END AS sc FROM conf
)
SELECT shard, image_id,
       sum(sc * exp(-sc / getvariable('temperature'))) / sum(exp(-sc / getvariable('temperature'))) AS label_quality,
       count(*) AS known_labels,
       arg_min(class_id, sc) AS worst_class, min(sc) AS worst_self_confidence
FROM self GROUP BY shard, image_id
ORDER BY label_quality, shard, image_id
LIMIT getvariable('max_rows');
