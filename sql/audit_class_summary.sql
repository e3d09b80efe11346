-- Per class: its known labels, how many of them the audit finds suspicious (suspicion >=
-- min_suspicion, before any per-class cap), and the mean suspicion of its labels. Expects
-- pair_scores (see sql/audit_suspicious.sql); classes the calibration left out (no positive or no
-- negative label) show calibrated = false. Most flagged share first.
-- Variables: min_suspicion (DOUBLE).
SELECT v.class_index, v.class_id, v.class_name, v.unseen,
       count(ps.class_index) > 0 AS calibrated,
       count(*) FILTER (WHERE ps.label = 1) AS positives,
       count(*) FILTER (WHERE ps.label = -1) AS negatives,
       count(*) FILTER (WHERE ps.label = 1 AND ps.suspicion >= getvariable('min_suspicion')) AS likely_wrong,
       count(*) FILTER (WHERE ps.label <> 1 AND ps.p >= 0.5 AND ps.suspicion >= getvariable('min_suspicion')) AS likely_missing,
       avg(ps.suspicion) FILTER (WHERE ps.label <> 0) AS mean_suspicion,
       (count(*) FILTER (WHERE ps.label <> 0 AND ps.suspicion >= getvariable('min_suspicion')))::DOUBLE
           / nullif(count(*) FILTER (WHERE ps.label <> 0), 0) AS flagged_share
FROM vocab v LEFT JOIN pair_scores ps USING (class_index)
GROUP BY ALL
ORDER BY flagged_share DESC NULLS LAST, v.class_index;
