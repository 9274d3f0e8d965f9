-- A replay claims its rows in a table of its own: one row per chunk (the lease and the chunk's ids)
-- instead of writing the lease into each of the chunk's DLQ rows. That write made a new version of
-- every row, with an entry in each of dlq's indexes, before the mark made another: 4.4 s of PostgreSQL
-- time per 200,000 rows (benchmarks/README.md). A claim lives while its lease's advisory lock is held
-- and its time bound has not passed; replayers take rows one at a time under a transaction-level
-- advisory lock, so two never claim the same row (see queries/dlq_replay.sql).
--
-- A new table: nothing waits on dlq. Its replay_lease columns (0005) are no longer written or read;
-- let replays of the previous version finish before running this version's replays beside them.
CREATE TABLE dlq_replay_claim (
    claim_id bigint        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lease    integer       NOT NULL,
    dlq_ids  bigint[]      NOT NULL,
    taken    timestamptz[] NOT NULL, -- each row's updated_at when it was claimed (parallel to dlq_ids)
    until    timestamptz   NOT NULL
);
