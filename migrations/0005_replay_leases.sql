-- Replay claims rows with a lease instead of a lock held across the publish: a replayer takes rows in
-- a short transaction, publishes with no transaction open (however slow its rate or its broker), and
-- marks them in another. A lease names the session advisory lock its replayer holds while it runs, so
-- the rows of a replayer that died (kill -9, lost connection) can be taken again at once; the time
-- bound covers connection poolers that hide the lock's session.
ALTER TABLE dlq
    ADD COLUMN replay_lease integer,
    ADD COLUMN replay_lease_until timestamptz;
