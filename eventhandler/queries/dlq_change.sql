-- The operators' changes to the DLQ, each with its audit row in the same transaction
-- (see `eventhandler.dlq.operators`), and the audit row itself.

-- name: set_status
-- Not a row a live replay claim names (the change holds `lock_claims`, so none can appear meanwhile):
-- that replay is publishing it, and its mark keeps a status an operator gave meanwhile, so a discarded
-- row's copy would be applied by the worker with the row still saying discarded.
UPDATE dlq SET status = %(status)s, resolved_at = now(), resolved_by = %(actor)s,
       resolution_note = %(note)s, updated_at = now()
WHERE dlq_id = ANY(%(ids)s) AND status = ANY(%(from_statuses)s)
  AND dlq_id NOT IN (
      SELECT unnest(c.dlq_ids) FROM dlq_replay_claim c
      WHERE c.until >= now() AND EXISTS (
          SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
            AND classid = %(lease_class)s::oid AND objid = c.lease::oid))
RETURNING dlq_id;

-- name: delete_rows
-- A delete returns what the row was, for its audit row: its identity, status and digests of its bytes.
DELETE FROM dlq WHERE dlq_id = ANY(%(ids)s)
RETURNING dlq_id, consumer, source_topic AS topic, source_partition AS partition, source_offset AS offset,
          event_id, status, encode(sha256(coalesce(event_payload, '')), 'hex') AS payload_sha256,
          event_payload IS NULL AS tombstone, encode(sha256(coalesce(message_key, '')), 'hex') AS key_sha256;

-- name: purge
DELETE FROM dlq
WHERE status IN ('resolved', 'discarded') AND updated_at < now() - %(older_than)s::interval
  AND (%(consumer)s::text IS NULL OR consumer = %(consumer)s)
RETURNING dlq_id, consumer, source_topic AS topic, source_partition AS partition, source_offset AS offset,
          event_id, status, encode(sha256(coalesce(event_payload, '')), 'hex') AS payload_sha256,
          event_payload IS NULL AS tombstone, encode(sha256(coalesce(message_key, '')), 'hex') AS key_sha256;

-- name: edit_payload
-- Only a pending row is edited: a replayed one is on its way through the worker, a parked one waits
-- for its key's turn, a closed one is done. The original bytes are never touched.
UPDATE dlq SET edited_payload = %(payload)s, edited_at = now(), edited_by = %(actor)s, updated_at = now()
-- Nor a row a live replay claim names (dlq_replay.sql; the edit holds `lock_claims`, so none can
-- appear meanwhile): that replay may be publishing the bytes it read a moment ago.
WHERE dlq_id = %(id)s AND status = 'pending'
  AND NOT EXISTS (
      SELECT 1 FROM dlq_replay_claim c
      WHERE %(id)s = ANY(c.dlq_ids) AND c.until >= now() AND EXISTS (
          SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
            AND classid = %(lease_class)s::oid AND objid = c.lease::oid))
RETURNING dlq_id;

-- name: record_audit
INSERT INTO dlq_audit (actor, action, dlq_ids, detail, request_id, client)
VALUES (%(actor)s, %(action)s, %(ids)s, %(detail)s, %(request_id)s, %(client)s);
