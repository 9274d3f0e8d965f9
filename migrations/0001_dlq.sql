-- The dead letter queue: one row per failed Kafka message, identified by
-- (consumer, source_topic, source_partition, source_offset).
CREATE TABLE dlq (
    dlq_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer           text        NOT NULL,             -- the consumer group
    event_id           text,                              -- CloudEvents id, when it could be read
    event_type         text,
    event_source       text,
    event_payload      bytea,                             -- the original value, byte for byte; NULL = tombstone
    message_key        bytea,
    header_keys        text[]      NOT NULL DEFAULT '{}',
    header_values      bytea[]     NOT NULL DEFAULT '{}', -- parallel to header_keys; elements may be NULL
    source_topic       text        NOT NULL,
    source_partition   integer     NOT NULL,
    source_offset      bigint      NOT NULL,
    message_timestamp  timestamptz,
    stage              text        NOT NULL,
    error_type         text        NOT NULL,
    error_message      text        NOT NULL,
    error_traceback    text,
    fingerprint        text        NOT NULL,
    status             text        NOT NULL DEFAULT 'pending',
    retry_count        integer     NOT NULL DEFAULT 0,    -- replays that failed again
    failure_count      integer     NOT NULL DEFAULT 1,    -- every failure, first one included
    replay_count       integer     NOT NULL DEFAULT 0,    -- times republished
    failed_at          timestamptz NOT NULL DEFAULT now(),-- first failure
    last_failed_at     timestamptz NOT NULL DEFAULT now(),
    last_replayed_at   timestamptz,
    replayed_to_topic  text,
    resolved_at        timestamptz,
    resolved_by        text,
    resolution_note    text,
    worker_version     text        NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dlq_message_identity UNIQUE (consumer, source_topic, source_partition, source_offset),
    CONSTRAINT dlq_stage_check CHECK (stage IN ('deserialize', 'handler', 'projection')),
    CONSTRAINT dlq_status_check CHECK (status IN ('pending', 'replayed', 'resolved', 'discarded')),
    CONSTRAINT dlq_headers_parallel CHECK (cardinality(header_keys) = cardinality(header_values))
);

-- Depth by consumer/status (metrics) and the default list order.
CREATE INDEX dlq_consumer_status_idx ON dlq (consumer, status, dlq_id);
-- Oldest pending per consumer.
CREATE INDEX dlq_pending_failed_at_idx ON dlq (consumer, failed_at) WHERE status = 'pending';
CREATE INDEX dlq_status_id_idx ON dlq (status, dlq_id);
CREATE INDEX dlq_event_type_idx ON dlq (event_type, dlq_id);
CREATE INDEX dlq_fingerprint_idx ON dlq (fingerprint, dlq_id);
CREATE INDEX dlq_last_failed_at_idx ON dlq (last_failed_at);

-- Who changed what in the DLQ, for audit: every CLI and API change writes here.
CREATE TABLE dlq_audit (
    audit_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL,
    action    text        NOT NULL,
    dlq_ids   bigint[]    NOT NULL DEFAULT '{}',
    detail    jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX dlq_audit_at_idx ON dlq_audit (at);
