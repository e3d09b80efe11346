-- The review list: the most suspicious (image, class) pairs, at most `per_class_cap` per class so
-- that one class cannot fill the list, most suspicious first. Expects a relation
--   pair_scores(shard, image_id, class_index, label, p, suspicion)
-- (sql/audit_calibrated.sql, or the cleanlab scores dart_core/audit.py registers under that name).
-- A pair is a candidate when suspicion >= min_suspicion and its label is known, or it is unlabelled
-- and p >= 0.5 (the model says present). kind: 'likely wrong' (labelled present, the model says
-- absent) or 'likely missing' (labelled absent or unlabelled, the model says present);
-- suggested_label: the flip. Joins the sample's original file (scores.file / source), its split
-- (the shard id's folder part), the class's rank in the image, and the patches behind the tag
-- (tags: only for the classes annotate tagged, its --top-m and thresholded ones).
-- Variables: min_suspicion (DOUBLE), per_class_cap (INTEGER), max_rows (INTEGER).
WITH candidates AS (
    SELECT *, row_number() OVER (PARTITION BY class_index ORDER BY suspicion DESC, shard, image_id) AS class_position
    FROM pair_scores
    WHERE suspicion >= getvariable('min_suspicion') AND (label <> 0 OR p >= 0.5)
), top AS (
    SELECT * FROM candidates WHERE class_position <= getvariable('per_class_cap')
    ORDER BY suspicion DESC, shard, image_id, class_index
    LIMIT getvariable('max_rows')
)
SELECT t.shard, regexp_extract(t.shard, '^(.*)-[0-9]+$', 1) AS split, t.image_id, s.file, s.source,
       v.class_index, v.class_id, v.class_name, v.unseen, t.label,
       CASE WHEN t.label = 1 THEN -1 ELSE 1 END AS suggested_label,
       CASE WHEN t.label = 1 THEN 'likely wrong' ELSE 'likely missing' END AS kind,
       t.suspicion, t.p, s.scores[v.class_index + 1]::DOUBLE AS score,
       list_count(list_filter(s.scores, lambda x: x > s.scores[v.class_index + 1])) + 1 AS rank,
       len(s.scores) AS classes,
       printf('%s; calibrated p(present) = %.3f; rank %d of %d classes in the image',
              CASE t.label WHEN 1 THEN 'labelled present' WHEN -1 THEN 'labelled absent' ELSE 'not labelled' END,
              t.p, list_count(list_filter(s.scores, lambda x: x > s.scores[v.class_index + 1])) + 1,
              len(s.scores)) AS reason,
       tg.patches, tg.patch_scores
FROM top t
JOIN vocab v USING (class_index)
JOIN scores s ON s.shard = t.shard AND s.image_id = t.image_id
LEFT JOIN tags tg ON tg.shard = t.shard AND tg.image_id = t.image_id AND tg.class_id = v.class_id
ORDER BY t.suspicion DESC, t.shard, t.image_id, v.class_index;
