-- What a corrections file changes in this prediction folder (run after sql/corrections.sql):
-- rows = corrections in the file; matched = of them, on an image scored here; changed = of those,
-- with a label other than the shard's. No variables.
SELECT count(*) AS rows,
       count(s.image_id) AS matched,
       count(*) FILTER (WHERE s.image_id IS NOT NULL AND c.label IS DISTINCT FROM coalesce(sl.label, 0)) AS changed
FROM corrections c
LEFT JOIN (SELECT DISTINCT image_id FROM scores) s USING (image_id)
LEFT JOIN shard_labels sl ON sl.image_id = c.image_id AND sl.class_id = c.class_id;
