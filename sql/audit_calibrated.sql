-- Every (image, class) pair with a per-class calibrated probability that the class is present, in
-- plain SQL (`dart audit --method sql`; the default, --method cleanlab, fits the same kind of
-- per-class curve in Python and scores it with cleanlab: dart_core/audit.py, docs/audit.md).
-- Raw scores are not comparable across classes (each class has its own scale and base rate; the
-- demo's unseen `snowman` scores high on images without one), so per class the known labels fit a
-- two-Gaussian model of the scores with a pooled variance (linear discriminant analysis), whose
-- posterior is logistic in the score:
--     logit p = (m1 - m0) / var * (score - (m1 + m0) / 2) + ln(n1 / n0)
-- m1, m0: mean score of the class's known positives / negatives, n1, n0 their counts, var the pooled
-- variance. suspicion = how strongly the model disagrees with the label: 1 - p for a positive label,
-- p for a negative or unknown one. Classes without both a positive and a negative label get no
-- probability and are left out. Columns: shard, image_id, class_index, label (1, -1, 0), p, suspicion.
-- Creates the table pair_scores (read by audit_suspicious.sql, audit_class_summary.sql,
-- audit_image_scores.sql). No variables.
CREATE OR REPLACE TABLE pair_scores AS
WITH known AS (
    SELECT s.class_index, s.score, l.label
    FROM scores_long s JOIN vocab v USING (class_index)
    JOIN labels l ON l.shard = s.shard AND l.image_id = s.image_id AND l.class_id = v.class_id
), fit AS (
    SELECT class_index,
           count(*) FILTER (WHERE label = 1) AS n1, count(*) FILTER (WHERE label = -1) AS n0,
           avg(score) FILTER (WHERE label = 1) AS m1, avg(score) FILTER (WHERE label = -1) AS m0,
           (coalesce(var_pop(score) FILTER (WHERE label = 1), 0) * count(*) FILTER (WHERE label = 1)
            + coalesce(var_pop(score) FILTER (WHERE label = -1), 0) * count(*) FILTER (WHERE label = -1))
               / greatest(count(*) - 2, 1) AS var
    FROM known GROUP BY class_index
), model AS (
    SELECT class_index, (m1 - m0) / greatest(var, 1e-9) AS slope, (m1 + m0) / 2 AS mid,
           ln(n1::DOUBLE / n0) AS prior
    FROM fit WHERE n1 > 0 AND n0 > 0
), prob AS (
    SELECT s.shard, s.image_id, s.class_index, coalesce(l.label, 0)::INTEGER AS label,
           1 / (1 + exp(-greatest(least(m.slope * (s.score - m.mid) + m.prior, 50), -50))) AS p
    FROM scores_long s JOIN model m USING (class_index) JOIN vocab v USING (class_index)
    LEFT JOIN labels l ON l.shard = s.shard AND l.image_id = s.image_id AND l.class_id = v.class_id
)
SELECT shard, image_id, class_index, label, p, CASE WHEN label = 1 THEN 1 - p ELSE p END AS suspicion
FROM prob;
