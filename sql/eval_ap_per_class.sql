-- Average precision per class (paper App. B.1; docs/design.md, "Metrics"): rank the images whose label
-- for the class is known by score (ties: shard, image_id), AP = mean over the positives of the
-- precision at that positive's rank, no interpolation. NULL for a class without a positive.
-- Variables: zsl (BOOLEAN: unseen classes only).
WITH ordered AS (
    SELECT class_index, label,
           row_number() OVER w AS k,
           sum(CASE WHEN label = 1 THEN 1 ELSE 0 END) OVER (w ROWS UNBOUNDED PRECEDING) AS tp
    FROM judged
    WHERE unseen OR NOT getvariable('zsl')
    WINDOW w AS (PARTITION BY class_index ORDER BY score DESC, shard, image_id)
), per_class AS (
    SELECT class_index,
           count(*) FILTER (WHERE label = 1) AS positives,
           count(*) FILTER (WHERE label = -1) AS negatives,
           avg(tp / k) FILTER (WHERE label = 1) AS ap
    FROM ordered GROUP BY class_index
)
SELECT v.class_index, v.class_id, v.class_name, v.unseen,
       coalesce(p.positives, 0) AS positives, coalesce(p.negatives, 0) AS negatives, p.ap
FROM vocab v LEFT JOIN per_class p USING (class_index)
WHERE v.unseen OR NOT getvariable('zsl')
ORDER BY v.class_index;
