-- Per-key parking (EVENTHANDLER_PARKING): while a key has an open failure, later events of that key
-- are stored as `parked` rows behind it, and released in order once it is closed.
-- park_key: the key's digest (consumer group, topic, key) on rows of parking topics; blocked_by: the
-- row a parked row waits behind.
ALTER TABLE dlq ADD COLUMN park_key uuid, ADD COLUMN blocked_by bigint;
-- Swapped under this migration's lock: the new check admits one more status, so every existing row
-- passes it (NOT VALID: no scan while the exclusive lock is held; new and updated rows are checked).
ALTER TABLE dlq DROP CONSTRAINT dlq_status_check;
ALTER TABLE dlq ADD CONSTRAINT dlq_status_check
    CHECK (status IN ('pending', 'replayed', 'resolved', 'discarded', 'parked')) NOT VALID;
-- A batch asks, for its keys, which are open; a release asks for a key's parked rows in order. Only
-- rows of parking topics are in it (none when the migration runs).
CREATE INDEX dlq_open_park_key_idx ON dlq (consumer, park_key, dlq_id)
    WHERE park_key IS NOT NULL AND status IN ('pending', 'replayed', 'parked');
-- What operators see of a blocker: how many rows are parked behind it.
CREATE INDEX dlq_parked_blocked_by_idx ON dlq (blocked_by) WHERE status = 'parked';
