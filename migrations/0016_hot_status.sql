-- Marking a row `replayed` changes no indexed value, so PostgreSQL keeps the new version of the row on
-- its page with no new index entries (a HOT update), instead of a new entry in each of dlq's B-trees:
-- 1.0 s instead of 3.6 s of PostgreSQL time to mark 200,000 rows (benchmarks/README.md).
--
-- * The status is indexed only through `indexed_status`: 1 for `pending` and `replayed` alike, 2
--   `parked`, 3 `resolved`, 4 `discarded`. Any index naming `status` itself, even in a partial index's
--   predicate, makes every status change a non-HOT update. Queries that want an index name
--   `indexed_status` beside their `status` condition (see `dlq.rows.INDEXED_STATUS`); pending and
--   replayed rows are told apart on the heap, among the open rows of their consumer.
-- * Pages are filled half (fillfactor 50): a HOT update needs room on the row's page for its new
--   version, and a replay marks every row of the pages it takes. The table takes about twice the pages.
--   A replayed copy that fails again with the same fingerprint is a HOT update too.
--
-- Adding the stored column rewrites the table (with the new fillfactor), holding an ACCESS EXCLUSIVE
-- lock on dlq for as long as that takes: 2.5 s for 200,000 rows (121 MB, 259 MB after) on 2 cores.
ALTER TABLE dlq SET (fillfactor = 50);

ALTER TABLE dlq ADD COLUMN indexed_status smallint GENERATED ALWAYS AS (
    CASE status WHEN 'pending' THEN 1 WHEN 'replayed' THEN 1 WHEN 'parked' THEN 2 WHEN 'resolved' THEN 3
                WHEN 'discarded' THEN 4 END
) STORED;

DROP INDEX dlq_consumer_status_idx;
DROP INDEX dlq_status_id_idx;
DROP INDEX dlq_open_event_key_idx;
DROP INDEX dlq_open_park_key_idx;
DROP INDEX dlq_parked_blocked_by_idx;

-- Oldest pending per consumer (one probe); the depth by consumer (from the index alone, but for
-- pending and replayed rows).
CREATE INDEX dlq_consumer_status_idx ON dlq (consumer, indexed_status, dlq_id);
-- A filter on the status alone, oldest first.
CREATE INDEX dlq_status_id_idx ON dlq (indexed_status, dlq_id);
-- The ledger keeps the events open rows hold (0006).
CREATE INDEX dlq_open_event_key_idx ON dlq (event_key) WHERE event_key IS NOT NULL AND indexed_status = 1;
-- Per-key parking (0010).
CREATE INDEX dlq_open_park_key_idx ON dlq (consumer, park_key, dlq_id)
    WHERE park_key IS NOT NULL AND indexed_status IN (1, 2);
CREATE INDEX dlq_parked_blocked_by_idx ON dlq (blocked_by) WHERE indexed_status = 2;
