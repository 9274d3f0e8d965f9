-- The ledger forgets applied events after a retention (7 days by default) while a pending DLQ row may
-- wait for months: a copy of its event applied meanwhile, then forgotten, would let the row's replay
-- apply the event a second time. Each row of a decoded event keeps its ledger key, and the pruner
-- never forgets a key an open (pending or replayed) row holds.
ALTER TABLE dlq ADD COLUMN event_key uuid;
CREATE INDEX dlq_open_event_key_idx ON dlq (event_key)
    WHERE event_key IS NOT NULL AND status IN ('pending', 'replayed');
