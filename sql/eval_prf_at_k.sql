-- Micro P/R/F1 over every image's top-k classes (App. B.3-B.4; docs/design.md, "Metrics"):
-- TP = positives among the top-k, P = TP / (N*k), R = TP / #positives, F1 = 2PR/(P+R).
-- All images count (also those without a positive). Ranking within the setting's classes
-- (ZSL: unseen only), ties broken by class order. Variables: zsl (BOOLEAN), k (INTEGER).
WITH setting AS (
    SELECT s.shard, s.image_id, s.class_index, s.score, v.class_id
    FROM scores_long s JOIN vocab v USING (class_index)
    WHERE v.unseen OR NOT getvariable('zsl')
), top AS (
    SELECT *, row_number() OVER (PARTITION BY shard, image_id ORDER BY score DESC, class_index) AS r
    FROM setting
), tp AS (
    SELECT count(*) AS tp
    FROM top t JOIN labels l ON l.shard = t.shard AND l.image_id = t.image_id AND l.class_id = t.class_id
    WHERE t.r <= getvariable('k') AND l.label = 1
), totals AS (
    SELECT (SELECT count(*) FROM scores) AS n_images,
           (SELECT count(*) FROM labels l JOIN vocab v USING (class_id)
             WHERE l.label = 1 AND (v.unseen OR NOT getvariable('zsl'))) AS positives
)
SELECT p, r, CASE WHEN p + r > 0 THEN 2 * p * r / (p + r) ELSE 0.0 END AS f1, tp, n_images, positives
FROM (
    SELECT CASE WHEN n_images > 0 THEN tp / (n_images * getvariable('k'))::DOUBLE ELSE 0.0 END AS p,
           CASE WHEN positives > 0 THEN tp / positives::DOUBLE ELSE 0.0 END AS r,
           tp, n_images, positives
    FROM tp, totals
);
