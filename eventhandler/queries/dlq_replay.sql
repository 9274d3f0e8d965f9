-- A replay's hold on the rows it publishes (see `eventhandler.dlq.replays`). A replay run holds a
-- lease: a session advisory lock (migration 0005) whose first key is `%(lease_class)s` and whose second
-- is the lease itself. Each chunk it takes is a claim (migration 0015): the lease and the chunk's ids.
-- A claim is live while its lease's lock is held and its time bound has not passed; a row is free when
-- no live claim names it.

-- name: take_lease
SELECT pg_try_advisory_lock(%(lease_class)s, %(lease)s);

-- name: release_lease
SELECT pg_advisory_unlock(%(lease_class)s, %(lease)s);

-- name: lease_held
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
               AND classid = %(lease_class)s::oid AND objid = %(lease)s::oid);

-- name: lock_claims
-- Takers (and a payload edit) one at a time, to the end of the transaction: the statements after this
-- one see every claim committed before (READ COMMITTED takes a snapshot per statement), and no other
-- claim can appear until this transaction ends. Lease 0 is never a replay's (leases start at 1).
SELECT pg_advisory_xact_lock(%(lease_class)s, 0);

-- name: drop_dead_claims
-- The claims of replayers that died (their session, and its lock, are gone) or overran their bound.
DELETE FROM dlq_replay_claim c
WHERE c.until < now() OR NOT EXISTS (
    SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND classid = %(lease_class)s::oid AND objid = c.lease::oid);

-- name: claim_free
-- A filter fragment, after `drop_dead_claims` under `lock_claims`: no claim names the row. (NOT IN over
-- the claims' ids is one hashed set, not a scan of every claim per row.)
dlq_id NOT IN (SELECT unnest(dlq_ids) FROM dlq_replay_claim)

-- name: claim_rows
-- After `drop_dead_claims` under `lock_claims`. The WHERE clause is the replay's filter with
-- `claim_free`; the columns what a replay publishes (`models.OutgoingRow`), not a whole row: a replay
-- reads hundreds of thousands. The claim is made from the same rows in the same statement, with each
-- row's updated_at for the mark; every row returned carries its id (no row: no claim).
WITH free AS (
    SELECT dlq_id, source_topic, source_partition, source_offset, message_key, event_payload,
           edited_payload, header_keys, header_values, header_keys_raw, replay_count, updated_at
    FROM dlq {where} ORDER BY dlq_id LIMIT %(limit)s
), claim AS (
    INSERT INTO dlq_replay_claim (lease, dlq_ids, taken, until)
    SELECT %(lease)s, array_agg(dlq_id ORDER BY dlq_id), array_agg(updated_at ORDER BY dlq_id),
           now() + %(lease_seconds)s * interval '1 second'
    FROM free HAVING count(*) > 0
    RETURNING claim_id
)
SELECT (SELECT claim_id FROM claim), dlq_id, source_topic, source_partition, source_offset, message_key,
       event_payload, edited_payload, header_keys, header_values, header_keys_raw, replay_count
FROM free ORDER BY dlq_id;

-- name: mark_replayed
-- Ends the claim, and marks the rows the broker confirmed (`ids`, sent to `topics`) if the claim was
-- still this lease's (one that outlived its bound may have been dropped, and its rows taken by another
-- replayer, which marks them). A row the worker or an operator changed since it was claimed (its
-- replayed copy already succeeded or failed: updated_at moved) keeps the status it was given; the
-- replay is counted either way. The rows not confirmed are free again with the claim.
WITH claim AS (
    DELETE FROM dlq_replay_claim WHERE claim_id = %(claim)s AND lease = %(lease)s RETURNING dlq_ids, taken
), confirmed AS (
    SELECT r.dlq_id, r.topic, t.taken
    FROM claim, unnest(claim.dlq_ids, claim.taken) AS t(dlq_id, taken)
    JOIN unnest(%(ids)b::bigint[], %(topics)b::text[]) AS r(dlq_id, topic) USING (dlq_id)
)
UPDATE dlq SET
    status = CASE WHEN dlq.updated_at = c.taken THEN 'replayed' ELSE status END,
    updated_at = CASE WHEN dlq.updated_at = c.taken THEN now() ELSE dlq.updated_at END,
    replay_count = replay_count + 1, last_replayed_at = now(), replayed_to_topic = c.topic,
    -- a row replayed again is no longer resolved (the audit keeps who resolved it before)
    resolved_at = CASE WHEN dlq.updated_at = c.taken THEN NULL ELSE resolved_at END,
    resolved_by = CASE WHEN dlq.updated_at = c.taken THEN NULL ELSE resolved_by END,
    resolution_note = CASE WHEN dlq.updated_at = c.taken THEN NULL ELSE resolution_note END
FROM confirmed c
WHERE dlq.dlq_id = c.dlq_id;
