-- Views over one prediction folder. The folder is bound, never pasted:  SET VARIABLE pred = ?
-- (a local folder, or s3://bucket/prefix with DuckDB's httpfs loaded; dart_core.evaluate.connect
-- reads s3:// without httpfs through a local mirror of the finished shards).
-- Tables are hive-partitioned by shard (…/scores/shard=val-000000/part.parquet). Only shards with a
-- done marker (PRED/_done/<shard>.json, written after all their tables) count: a shard whose run
-- stopped half-way is not seen until a rerun finishes it.
CREATE OR REPLACE VIEW done AS
    SELECT regexp_extract(file, '([^/]+)\.json$', 1) AS shard FROM glob(getvariable('pred') || '/_done/*.json');
-- scores: image_id, scores, shard, and where the sample came from: file (the original file path, the
-- shard sample's source.file) and source (that source object as JSON); NULL in folders written before
-- annotate recorded them (the empty relation after UNION ALL BY NAME supplies the two columns then).
CREATE OR REPLACE VIEW scores AS
    SELECT * FROM read_parquet(getvariable('pred') || '/scores/*/*.parquet', hive_partitioning = true,
                               union_by_name = true)
    WHERE shard IN (SELECT shard FROM done)
    UNION ALL BY NAME SELECT NULL::VARCHAR AS file, NULL::VARCHAR AS source WHERE false;
CREATE OR REPLACE VIEW tags AS
    SELECT * FROM read_parquet(getvariable('pred') || '/tags/*/*.parquet', hive_partitioning = true)
    WHERE shard IN (SELECT shard FROM done);
-- shard_labels: the known ±1 labels as the shards hold them; labels: the labels every query uses,
-- the same unless sql/corrections.sql redefines it with a corrections file applied on top.
CREATE OR REPLACE VIEW shard_labels AS
    SELECT * FROM read_parquet(getvariable('pred') || '/labels/*/*.parquet', hive_partitioning = true)
    WHERE shard IN (SELECT shard FROM done);
CREATE OR REPLACE VIEW labels AS SELECT * FROM shard_labels;
CREATE OR REPLACE VIEW errors AS
    SELECT * FROM read_parquet(getvariable('pred') || '/errors/*/*.parquet', hive_partitioning = true)
    WHERE shard IN (SELECT shard FROM done);
CREATE OR REPLACE VIEW vocab AS
    SELECT * FROM read_parquet(getvariable('pred') || '/vocab/vocab.parquet');

-- The dense scores in long form: one row per (image, class). class_index is 0-based.
CREATE OR REPLACE VIEW scores_long AS
    SELECT shard, image_id, generate_subscripts(scores, 1) - 1 AS class_index, unnest(scores)::DOUBLE AS score
    FROM scores;

-- Every (image, class) with its rank among all classes of the image (1 = best; ties by class).
CREATE OR REPLACE VIEW ranked AS
    SELECT s.*, row_number() OVER (PARTITION BY s.shard, s.image_id ORDER BY s.score DESC, s.class_index) AS rank
    FROM scores_long s;

-- Scores of the (image, class) pairs whose label is known (+1 / -1); unknown labels are absent.
CREATE OR REPLACE VIEW judged AS
    SELECT r.shard, r.image_id, r.class_index, v.class_id, v.class_name, v.unseen, r.score, r.rank, l.label
    FROM ranked r
    JOIN vocab v USING (class_index)
    JOIN labels l ON l.shard = r.shard AND l.image_id = r.image_id AND l.class_id = v.class_id;
