-- The worker's writes to the DLQ, inside its batch transaction (see `eventhandler.dlq.writer`).
-- A batch's failures are copied (binary COPY) straight into `dlq`, with dlq_ids reserved from its
-- sequence in one statement: a failure storm pays the DLQ write per message, and one INSERT per
-- failure costs three times the server time (benchmarks/README.md). When a message of the batch already has a row (its
-- consumer's position was reset, or another worker got to it first), the copy is rolled back to a
-- savepoint and the batch goes through a temporary staging table and one upsert instead.
-- The COPY column order is the order of `dlq.writer.copy_row`; a test holds the two together.

-- name: reserve_ids
-- MATERIALIZED: a plain subquery is pulled up and its expression looked up again for every id
-- (2.7 ms for 1,000 ids instead of 0.6).
WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence('dlq', 'dlq_id')::regclass AS seq)
SELECT array_agg(nextval(s.seq)) FROM s, generate_series(1, %s);

-- name: copy_rows
COPY dlq (dlq_id, consumer, event_id, event_type, event_source, event_payload, message_key,
          header_keys, header_values, header_keys_raw,
          source_topic, source_partition, source_offset, message_timestamp, stage, error_type,
          error_message, error_traceback, fingerprint, worker_version, event_key)
FROM STDIN (FORMAT BINARY);

-- name: copy_headerless_rows
-- Most bad messages carry no headers: the header columns keep their defaults (no arrays to encode).
COPY dlq (dlq_id, consumer, event_id, event_type, event_source, event_payload, message_key,
          source_topic, source_partition, source_offset, message_timestamp, stage, error_type,
          error_message, error_traceback, fingerprint, worker_version, event_key)
FROM STDIN (FORMAT BINARY);

-- name: create_staging
-- Lives as long as the session and is emptied at every commit; creating it "if not exists" in the
-- batch's own transaction also works behind a transaction-pooling proxy.
CREATE TEMPORARY TABLE IF NOT EXISTS dlq_incoming (
    consumer text, event_id text, event_type text, event_source text, event_payload bytea,
    message_key bytea, header_keys text[], header_values bytea[], header_keys_raw bytea[],
    source_topic text, source_partition int4, source_offset int8, message_timestamp timestamptz,
    stage text, error_type text, error_message text, error_traceback text, fingerprint text,
    worker_version text, event_key uuid
) ON COMMIT DELETE ROWS;

-- name: clear_staging
-- rows an earlier call of the same transaction staged
DELETE FROM dlq_incoming;

-- name: copy_staging
COPY dlq_incoming (consumer, event_id, event_type, event_source, event_payload, message_key,
                   header_keys, header_values, header_keys_raw,
                   source_topic, source_partition, source_offset, message_timestamp, stage, error_type,
                   error_message, error_traceback, fingerprint, worker_version, event_key)
FROM STDIN (FORMAT BINARY);

-- name: upsert_staged
-- A redelivered message updates the row of its (consumer, topic, partition, offset).
INSERT INTO dlq (consumer, event_id, event_type, event_source, event_payload, message_key,
                 header_keys, header_values, header_keys_raw, source_topic, source_partition,
                 source_offset, message_timestamp, stage, error_type, error_message, error_traceback,
                 fingerprint, worker_version, event_key)
SELECT consumer, event_id, event_type, event_source, event_payload, message_key,
       header_keys, header_values, header_keys_raw, source_topic, source_partition,
       source_offset, message_timestamp, stage, error_type, error_message, error_traceback,
       fingerprint, worker_version, event_key
FROM dlq_incoming
ON CONFLICT ON CONSTRAINT dlq_message_identity DO UPDATE SET
    failure_count = dlq.failure_count + 1,
    status = CASE WHEN dlq.status = 'replayed' THEN 'pending' ELSE dlq.status END,
    stage = EXCLUDED.stage,
    error_type = EXCLUDED.error_type,
    error_message = EXCLUDED.error_message,
    error_traceback = EXCLUDED.error_traceback,
    fingerprint = EXCLUDED.fingerprint,
    last_failed_at = now(),
    worker_version = EXCLUDED.worker_version,
    updated_at = now()
RETURNING dlq_id, consumer, source_topic, source_partition, source_offset;

-- name: insert_replay_failure
-- A replayed message that fails again updates the row it came from, if that row belongs to this
-- consumer, is still open and matches the message's origin and event; when the row or the message
-- knows no event, the message must be the very bytes a replay of the row publishes (else a message with
-- forged headers would take the row over, and its own bytes be kept nowhere). Otherwise the message
-- gets a row of its own.
WITH replayed AS (
    UPDATE dlq SET
        status = 'pending',
        retry_count = retry_count + 1,
        failure_count = failure_count + 1,
        stage = %(stage)s,
        error_type = %(error_type)s,
        error_message = %(error_message)s,
        error_traceback = %(traceback)s,
        fingerprint = %(fingerprint)s,
        last_failed_at = now(),
        worker_version = %(worker_version)s,
        updated_at = now()
    WHERE dlq_id = %(replay_of)s AND consumer = %(consumer)s AND status IN ('pending', 'replayed')
      AND source_topic = %(origin_topic)s AND source_partition = %(origin_partition)s
      AND source_offset = %(origin_offset)s
      AND ((event_id = %(event_id)s::text AND event_source = %(event_source)s::text)
           OR ((event_id IS NULL OR %(event_id)s::text IS NULL)
               AND coalesce(edited_payload, event_payload) IS NOT DISTINCT FROM %(value)s::bytea))
    RETURNING dlq_id
), inserted AS (
    INSERT INTO dlq (consumer, event_id, event_type, event_source, event_payload, message_key,
                     header_keys, header_values, header_keys_raw, source_topic, source_partition,
                     source_offset, message_timestamp, stage, error_type, error_message,
                     error_traceback, fingerprint, worker_version, event_key)
    SELECT %(consumer)s, %(event_id)s, %(event_type)s, %(event_source)s, %(value)s, %(key)s,
           %(header_keys)s::text[], %(header_values)s::bytea[], %(header_keys_raw)s::bytea[],
           %(topic)s, %(partition)s, %(offset)s, %(timestamp)s, %(stage)s, %(error_type)s,
           %(error_message)s, %(traceback)s, %(fingerprint)s, %(worker_version)s, %(event_key)s
    WHERE NOT EXISTS (SELECT 1 FROM replayed)
    ON CONFLICT ON CONSTRAINT dlq_message_identity DO UPDATE SET
        failure_count = dlq.failure_count + 1,
        status = CASE WHEN dlq.status = 'replayed' THEN 'pending' ELSE dlq.status END,
        stage = EXCLUDED.stage,
        error_type = EXCLUDED.error_type,
        error_message = EXCLUDED.error_message,
        error_traceback = EXCLUDED.error_traceback,
        fingerprint = EXCLUDED.fingerprint,
        last_failed_at = now(),
        worker_version = EXCLUDED.worker_version,
        updated_at = now()
    RETURNING dlq_id
)
SELECT dlq_id FROM replayed UNION ALL SELECT dlq_id FROM inserted;

-- name: resolve_replayed
-- Only rows the replayed message matches: its origin (the original coordinates) and the same event;
-- a row that knows no event (its message did not deserialize; an operator repaired it) only by the
-- very bytes its replay publishes (compared by digest: a batch's copies could be large). A forged or stale `eventhandler-dlq-id` (after a restore, or
-- TRUNCATE … RESTART IDENTITY) matches nothing.
UPDATE dlq SET status = 'resolved', resolved_at = now(), resolved_by = 'replay',
       resolution_note = 'processed successfully after replay', updated_at = now()
FROM unnest(%(ids)s::bigint[], %(topics)s::text[], %(partitions)s::int[], %(offsets)s::bigint[],
            %(sources)s::text[], %(event_ids)s::text[], %(digests)s::bytea[])
     AS r(dlq_id, topic, part, off, source, event_id, digest)
WHERE dlq.dlq_id = r.dlq_id AND dlq.consumer = %(consumer)s AND dlq.status IN ('pending', 'replayed')
  AND dlq.source_topic = r.topic AND dlq.source_partition = r.part AND dlq.source_offset = r.off
  AND ((dlq.event_id = r.event_id AND dlq.event_source = r.source)
       OR (dlq.event_id IS NULL
           AND sha256(coalesce(dlq.edited_payload, dlq.event_payload)) IS NOT DISTINCT FROM r.digest))
RETURNING dlq.dlq_id;

-- name: open_replays
-- Which failed messages (their positions, from 1) are replays of an open row of this consumer, matched
-- as `insert_replay_failure` matches them (origin, and event or bytes: a digest of them here): the
-- flood guard leaves those out (an operator replaying a group before its fix), and judges a message
-- whose replay headers were copied or forged like any other.
SELECT r.n
FROM dlq JOIN unnest(%(ids)s::bigint[], %(topics)s::text[], %(partitions)s::int[], %(offsets)s::bigint[],
                     %(sources)s::text[], %(event_ids)s::text[], %(digests)s::bytea[]) WITH ORDINALITY
         AS r(dlq_id, topic, part, off, source, event_id, digest, n) ON dlq.dlq_id = r.dlq_id
WHERE dlq.consumer = %(consumer)s AND dlq.status IN ('pending', 'replayed')
  AND dlq.source_topic = r.topic AND dlq.source_partition = r.part AND dlq.source_offset = r.off
  AND ((dlq.event_id = r.event_id AND dlq.event_source = r.source)
       OR ((dlq.event_id IS NULL OR r.event_id IS NULL)
           AND sha256(coalesce(dlq.edited_payload, dlq.event_payload)) IS NOT DISTINCT FROM r.digest));
