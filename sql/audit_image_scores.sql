-- Per image: a label-quality score from the calibrated pair scores (pair_scores, see
-- sql/audit_suspicious.sql): each known label's self-confidence 1 - suspicion, aggregated by softmin
-- (temperature `temperature`) so that one badly supported label pulls the image down, as in
-- cleanlab's multilabel label_quality_scores. Lowest quality first.
-- Variables: temperature (DOUBLE), max_rows (INTEGER).
WITH self AS (
    SELECT ps.shard, ps.image_id, v.class_name, 1 - ps.suspicion AS sc
    FROM pair_scores ps JOIN vocab v USING (class_index) WHERE ps.label <> 0
)
SELECT s.shard, s.image_id, sc.file,
       sum(s.sc * exp(-s.sc / getvariable('temperature'))) / sum(exp(-s.sc / getvariable('temperature'))) AS label_quality,
       count(*) AS known_labels,
       arg_min(s.class_name, s.sc) AS worst_class,
       min(s.sc) AS worst_self_confidence
FROM self s JOIN scores sc ON sc.shard = s.shard AND sc.image_id = s.image_id
GROUP BY s.shard, s.image_id, sc.file
ORDER BY label_quality, s.shard, s.image_id
LIMIT getvariable('max_rows');
