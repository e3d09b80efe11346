-- Labels with a corrections file applied on top of the shard labels (dart audit --export → review →
-- dart corrections → --corrections of dart eval / dart train). Expects a relation
--   corrections(image_id VARCHAR, class_id VARCHAR, label INTEGER)   label: 1, -1, or 0 (unknown)
-- (dart_core.corrections.read validates the file and creates it; from the duckdb CLI:
--   CREATE TABLE corrections AS SELECT * FROM read_csv('corrections.csv');)
-- and redefines the view `labels` (sql/views.sql) so that every query after it sees the corrected
-- labels: a corrected (image, class) replaces its shard label, 1 / -1 on a pair the shard left
-- unknown adds it, 0 removes it. Sample keys are unique within a dataset, so rows match on
-- (image_id, class_id). No variables.
CREATE OR REPLACE VIEW labels AS
    SELECT sl.image_id, sl.class_id, sl.label, sl.shard
    FROM shard_labels sl
    ANTI JOIN corrections c ON c.image_id = sl.image_id AND c.class_id = sl.class_id
    UNION ALL
    SELECT c.image_id, c.class_id, c.label::TINYINT AS label, s.shard
    FROM corrections c JOIN (SELECT DISTINCT shard, image_id FROM scores) s USING (image_id)
    WHERE c.label <> 0;
