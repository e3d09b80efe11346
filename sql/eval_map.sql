-- mAP (App. B.2): the mean of the per-class APs over classes with a positive; with
-- legacy = true, a class without a positive counts as AP 0 (the older papers' convention).
-- Variables: legacy (BOOLEAN), seen_only (BOOLEAN: the seen classes of the table only).
-- Needs the per-class query as `ap_per_class`.
SELECT CASE WHEN getvariable('legacy') THEN avg(coalesce(ap, 0)) ELSE avg(ap) END AS map,
       count(ap) AS classes_with_positives,
       count(*) AS classes
FROM ap_per_class
WHERE NOT (getvariable('seen_only') AND unseen);
