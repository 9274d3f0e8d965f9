-- The flood guard's circuits (eventhandler.flood): one row per consumer group and failure fingerprint
-- that was judged systemic. Workers write it when they hold a batch and when a trial closes it;
-- operators read it and close it (eventhandler circuit close), which the workers read back.
CREATE TABLE flood_circuit (
    consumer          text        NOT NULL,
    fingerprint       text        NOT NULL,
    state             text        NOT NULL CHECK (state IN ('open', 'closed')),
    stage             text        NOT NULL,
    error_type        text        NOT NULL,
    error_message     text        NOT NULL,  -- the first failure's, cut to 2,000 characters
    event_types       text[]      NOT NULL DEFAULT '{}',
    failures          bigint      NOT NULL,  -- what judged it: failures of the fingerprint,
    messages          bigint      NOT NULL,  -- of how many messages read,
    distinct_keys     integer     NOT NULL,  -- with at least this many keys
    sample_topic      text        NOT NULL,  -- where the first failure was read
    sample_partition  integer     NOT NULL,
    sample_offset     bigint      NOT NULL,
    opened_at         timestamptz NOT NULL,
    opened_by         text        NOT NULL,  -- the worker
    tried_at          timestamptz NOT NULL,  -- the last time a worker held a batch for it
    trials            bigint      NOT NULL DEFAULT 1,
    closed_at         timestamptz,
    closed_by         text,                  -- a worker whose trial passed, or the operator
    close_note        text,
    dead_letter_until timestamptz,           -- an operator's close: the failure is dead-lettered until then
    PRIMARY KEY (consumer, fingerprint)
);
