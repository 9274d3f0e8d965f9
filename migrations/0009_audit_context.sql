-- Who did what from where: the request a change came with (the API's X-Request-ID, or the CLI run's
-- id) and the client (the API caller's address, or the CLI's user and host).
ALTER TABLE dlq_audit ADD COLUMN request_id text, ADD COLUMN client text;
