-- A replay's hold on the rows it publishes (see `eventhandler.dlq.replays`). A replay run holds a
-- lease: a session advisory lock (migration 0005) whose first key is `%(lease_class)s` and whose second
-- is the lease itself, stored in the rows it took. A row is free when no live lease holds it.

-- name: take_lease
SELECT pg_try_advisory_lock(%(lease_class)s, %(lease)s);

-- name: release_lease
SELECT pg_advisory_unlock(%(lease_class)s, %(lease)s);

-- name: lease_held
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
               AND classid = %(lease_class)s::oid AND objid = %(lease)s::oid);

-- name: lease_free
-- A filter fragment: no lease holds the row, its lease expired, or its replayer's session is gone.
(replay_lease IS NULL OR replay_lease_until < now() OR NOT EXISTS (
    SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND classid = %(lease_class)s::oid AND objid = dlq.replay_lease::oid))

-- name: free_rows
-- The WHERE clause is the replay's filter with `lease_free`; the columns what a replay publishes
-- (`models.OutgoingRow`), not a whole row: a replay reads hundreds of thousands.
SELECT dlq_id, source_topic, source_partition, source_offset, message_key, event_payload, edited_payload,
       header_keys, header_values, header_keys_raw, replay_count
FROM dlq {where} ORDER BY dlq_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED;

-- name: take_rows
UPDATE dlq SET replay_lease = %(lease)s, replay_lease_until = now() + %(lease_seconds)s * interval '1 second',
       updated_at = now()
WHERE dlq_id = ANY(%(ids)s)
RETURNING now();

-- name: mark_replayed
-- A row the worker changed since it was taken (its replayed copy already succeeded or failed:
-- updated_at moved) keeps the status the worker gave it; the replay is counted either way.
UPDATE dlq SET
    status = CASE WHEN updated_at = %(taken_at)s THEN 'replayed' ELSE status END,
    updated_at = CASE WHEN updated_at = %(taken_at)s THEN now() ELSE updated_at END,
    replay_count = replay_count + 1, last_replayed_at = now(), replayed_to_topic = %(topic)s,
    replay_lease = NULL, replay_lease_until = NULL,
    -- a row replayed again is no longer resolved (the audit keeps who resolved it before)
    resolved_at = CASE WHEN updated_at = %(taken_at)s THEN NULL ELSE resolved_at END,
    resolved_by = CASE WHEN updated_at = %(taken_at)s THEN NULL ELSE resolved_by END,
    resolution_note = CASE WHEN updated_at = %(taken_at)s THEN NULL ELSE resolution_note END
WHERE dlq_id = ANY(%(ids)s) AND replay_lease = %(lease)s;

-- name: release_rows
UPDATE dlq SET replay_lease = NULL, replay_lease_until = NULL
WHERE dlq_id = ANY(%(ids)s) AND replay_lease = %(lease)s;
