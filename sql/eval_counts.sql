-- What a setting's numbers rest on: the images scored (P/R/F1@K count every one) and the images
-- with a known (+1 / -1) label for at least one of the setting's classes (the ones mAP ranks).
-- Variables: zsl (BOOLEAN: unseen classes only), seen_only (BOOLEAN: seen classes only).
SELECT (SELECT count(*) FROM scores) AS images,
       (SELECT count(*) FROM (
            SELECT DISTINCT l.shard, l.image_id
            FROM labels l JOIN vocab v USING (class_id)
            WHERE (v.unseen OR NOT getvariable('zsl')) AND NOT (v.unseen AND getvariable('seen_only'))
       )) AS labelled_images;
