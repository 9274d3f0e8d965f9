-- Per-key parking (see `eventhandler.parking` and `eventhandler.dlq.parking`), inside the worker's
-- batch transaction.

-- name: anything_open
-- Whether the consumer has any open row on a parking topic at all: when not, a batch parks nothing
-- and releases nothing (the partial index answers it without a scan).
SELECT EXISTS (
    SELECT 1 FROM dlq
    WHERE consumer = %(consumer)s AND park_key IS NOT NULL AND status IN ('pending', 'replayed', 'parked')
);

-- name: open_keys
-- For a batch's keys, those with open rows: the ids of their blockers (pending or replayed rows), and
-- the row new parked rows link to (the oldest blocker, else what the parked rows already link to).
SELECT park_key,
       array_remove(array_agg(dlq_id) FILTER (WHERE status IN ('pending', 'replayed')), NULL) AS blockers,
       coalesce(min(dlq_id) FILTER (WHERE status IN ('pending', 'replayed')),
                max(blocked_by) FILTER (WHERE status = 'parked')) AS blocked_by
FROM dlq
WHERE consumer = %(consumer)s AND park_key = ANY(%(keys)s::uuid[])
  AND status IN ('pending', 'replayed', 'parked')
GROUP BY park_key;

-- name: set_park_state
-- The rows this batch wrote on parking topics: their key, and for parked rows their status and link.
UPDATE dlq SET park_key = r.park_key,
               status = coalesce(r.status, dlq.status),
               blocked_by = r.blocked_by,
               updated_at = now()
FROM unnest(%(ids)s::bigint[], %(keys)s::uuid[], %(statuses)s::text[], %(blocked_by)s::bigint[])
     AS r(dlq_id, park_key, status, blocked_by)
WHERE dlq.dlq_id = r.dlq_id;

-- name: take_release_lock
-- One releaser per consumer group at a time, so a key's parked rows are released in order.
SELECT pg_try_advisory_xact_lock(%(lock_class)s, hashtext(%(consumer)s));

-- name: freed_keys
-- Keys with parked rows and nothing left that blocks them.
SELECT DISTINCT p.park_key
FROM dlq p
WHERE p.consumer = %(consumer)s AND p.status = 'parked' AND p.park_key IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM dlq b
      WHERE b.consumer = p.consumer AND b.park_key = p.park_key AND b.status IN ('pending', 'replayed'))
LIMIT %(limit)s;

-- name: parked_rows
-- The parked rows of freed keys, oldest first (their partition order), locked for the release.
SELECT {columns}, park_key FROM dlq
WHERE consumer = %(consumer)s AND park_key = ANY(%(keys)s::uuid[]) AND status = 'parked'
ORDER BY dlq_id LIMIT %(limit)s
FOR UPDATE;

-- name: mark_released
UPDATE dlq SET status = 'resolved', resolved_at = now(), resolved_by = 'release',
       resolution_note = %(note)s, updated_at = now()
WHERE dlq_id = ANY(%(ids)s) AND status = 'parked'
RETURNING dlq_id;

-- name: reblock
-- A released row failed and blocks its key now: the rows still parked behind the old blocker wait for it.
UPDATE dlq SET blocked_by = r.blocker, updated_at = now()
FROM unnest(%(keys)s::uuid[], %(blockers)s::bigint[]) AS r(park_key, blocker)
WHERE dlq.consumer = %(consumer)s AND dlq.park_key = r.park_key AND dlq.status = 'parked'
  AND dlq.dlq_id > r.blocker;
