-- The operators' reads of the DLQ (see `eventhandler.dlq.operators`). `{where}` is a filter's WHERE
-- clause, composed with psycopg.sql from fixed fragments with bound parameters (`dlq.rows.where`);
-- `{columns}` the summary's columns, or those and the detail's (a whole row).

-- name: summary_columns
dlq_id, consumer, event_id, event_type, source_topic, source_partition, source_offset, stage,
error_type, error_message, fingerprint, status, retry_count, failure_count, replay_count,
failed_at, last_failed_at, last_replayed_at, resolved_at, resolved_by, octet_length(event_payload) AS payload_size,
blocked_by,
(SELECT count(*) FROM dlq parked WHERE parked.blocked_by = dlq.dlq_id AND parked.status = 'parked')
    AS parked_behind

-- name: detail_columns
-- A whole row is the summary's columns and these.
event_source, event_payload, message_key, header_keys, header_values, header_keys_raw,
message_timestamp, error_traceback, replayed_to_topic, resolution_note, worker_version,
updated_at, edited_payload, edited_at, edited_by

-- name: list_rows
SELECT {columns} FROM dlq {where} ORDER BY dlq_id LIMIT %(limit)s;

-- name: matching_ids
SELECT dlq_id FROM dlq {where} ORDER BY dlq_id LIMIT %(limit)s;

-- name: count
SELECT count(*) FROM dlq {where};

-- name: get
SELECT {columns} FROM dlq WHERE dlq_id = %(id)s;

-- name: entries
-- With `max_bytes`, only rows whose payload and repair are each at most that long.
SELECT {columns} FROM dlq
WHERE dlq_id = ANY(%(ids)s)
  AND (%(max_bytes)s::int IS NULL OR (coalesce(octet_length(event_payload), 0) <= %(max_bytes)s::int
                                      AND coalesce(octet_length(edited_payload), 0) <= %(max_bytes)s::int));

-- name: fingerprints
SELECT DISTINCT fingerprint FROM dlq {where};

-- name: count_by
-- The grouping column is an identifier (psycopg.sql.Identifier) from a fixed list.
SELECT {column} AS key, status, count(*) AS count FROM dlq {where} GROUP BY 1, 2 ORDER BY 1, 2;

-- name: fingerprint_groups
-- The sample message is the oldest row's, so that a view can redact it with that row's payload.
SELECT g.fingerprint, g.stage, g.error_type, sample.error_message AS sample_message, g.sample_id,
       g.count, g.first_seen, g.last_seen
FROM (
    SELECT fingerprint, min(stage) AS stage, min(error_type) AS error_type, min(dlq_id) AS sample_id,
           count(*) AS count, min(failed_at) AS first_seen, max(last_failed_at) AS last_seen
    FROM dlq {where}
    GROUP BY fingerprint ORDER BY count(*) DESC, fingerprint LIMIT %(limit)s
) g
JOIN dlq sample ON sample.dlq_id = g.sample_id
ORDER BY g.count DESC, g.fingerprint;

-- name: depth
SELECT consumer, status, count(*) AS count FROM dlq GROUP BY consumer, status;

-- name: oldest_pending
-- The lowest pending dlq_id of a consumer is its oldest first failure (ids and failed_at both come at
-- insert time; concurrent transactions blur that by one batch at most): one index probe per consumer.
SELECT consumer, extract(epoch FROM now() - (
    SELECT failed_at FROM dlq WHERE dlq.consumer = c.consumer AND status = 'pending' ORDER BY dlq_id LIMIT 1
))::float8 AS age
FROM unnest(%(consumers)s::text[]) AS c(consumer);

-- name: oldest_replayed
-- Rows stay `replayed` until a worker processes their copy; one that never comes back (replayed to a
-- topic no worker reads) is reported by its age. Replayed rows are few: the status index finds them.
SELECT consumer, extract(epoch FROM now() - min(last_replayed_at))::float8 AS age
FROM dlq WHERE status = 'replayed' AND consumer = ANY(%(consumers)s::text[])
GROUP BY consumer;

-- name: oldest_parked
-- How long the oldest parked row of each consumer has waited (parked rows are few: the status index).
SELECT consumer, extract(epoch FROM now() - min(failed_at))::float8 AS age
FROM dlq WHERE status = 'parked' AND consumer = ANY(%(consumers)s::text[])
GROUP BY consumer;

-- name: circuits
-- The flood guard's circuits for `eventhandler_circuit_open`: the open ones, and those closed in the
-- last day (so that their gauge reads 0 on every worker, not the 1 a worker last set).
SELECT consumer, fingerprint, state = 'open' AS open FROM flood_circuit
WHERE state = 'open' OR closed_at > now() - interval '1 day';

-- name: history
-- The audit rows that name a row, oldest first (the GIN index on dlq_ids), at most the newest 200.
SELECT at, actor, action, detail, request_id, client FROM (
    SELECT * FROM dlq_audit WHERE dlq_ids @> ARRAY[%(id)s]::bigint[] ORDER BY audit_id DESC LIMIT 200
) newest ORDER BY at, audit_id;

-- name: group_trends
-- How many rows of each group last failed in each of the last 24 hours (slot 23: the latest hour).
SELECT fingerprint, 23 - floor(extract(epoch FROM now() - last_failed_at) / 3600)::int AS slot, count(*) AS count
FROM dlq WHERE fingerprint = ANY(%(fingerprints)s) AND last_failed_at > now() - interval '24 hours'
GROUP BY 1, 2;

-- name: open_changes
-- Rows that failed first, and rows resolved or discarded, in each of the last `hours` hours; with the
-- rows open now, they give the open count at the end of each hour (rows purged since are not counted).
SELECT 23 - floor(extract(epoch FROM now() - moment) / 3600)::int AS slot, sum(opened) AS opened,
       sum(closed) AS closed
FROM (
    SELECT failed_at AS moment, 1 AS opened, 0 AS closed FROM dlq WHERE failed_at > now() - interval '24 hours'
    UNION ALL
    SELECT resolved_at, 0, 1 FROM dlq WHERE resolved_at > now() - interval '24 hours'
) changes
GROUP BY 1;

-- name: open_now
SELECT count(*) FROM dlq WHERE status IN ('pending', 'parked', 'replayed');
