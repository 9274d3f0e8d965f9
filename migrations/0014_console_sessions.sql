-- The operator's console (eventhandler api, /ui): one row per signed-in browser. The cookie holds a
-- random value; only its SHA-256 is kept here, so a read of this table signs nobody in. A session names
-- the role its token gave and a digest of that token: when the token is rotated, its sessions end.
CREATE TABLE console_session (
    session_digest bytea       PRIMARY KEY,
    role           text        NOT NULL CHECK (role IN ('admin', 'reader')),
    token_digest   bytea       NOT NULL,
    csrf_token     text        NOT NULL,
    client         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX console_session_expires_idx ON console_session (expires_at);

-- A row's history (the console's row page): the audit rows that name it.
CREATE INDEX dlq_audit_ids_idx ON dlq_audit USING gin (dlq_ids);
