-- The demo's localization metric (flows/demo.py: localization, the world's boxes in
-- dart_core/world): for every known positive (image, class) pair with a tag row, the class's best
-- patch (the tags table stores patches best first). Both `?` are bound to the prediction folder.
-- Reads the parquet parts directly (no views.sql): the demo's folders are local and complete.
SELECT t.image_id, t.class_id, t.patches[1]
FROM read_parquet(? || '/tags/*/*.parquet', hive_partitioning = true) t
JOIN read_parquet(? || '/labels/*/*.parquet', hive_partitioning = true) l
  ON l.shard = t.shard AND l.image_id = t.image_id AND l.class_id = t.class_id
WHERE l.label = 1
