-- Consumed positions, written in the same transaction as the projection writes and DLQ rows of a
-- batch: the worker resumes from here after a crash, so no event takes effect twice.
CREATE TABLE consumer_positions (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- Events whose effect has been applied, so a duplicate (from a producer retry or a replay whose
-- delivery outcome was unknown) is recognised and skipped. event_key is an MD5 digest of
-- (consumer, CloudEvents source, CloudEvents id), computed by the worker.
CREATE TABLE applied_events (
    event_key  uuid        PRIMARY KEY,
    consumer   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX applied_events_applied_at_idx ON applied_events (applied_at);
