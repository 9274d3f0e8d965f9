-- Repair (eventhandler dlq edit, PUT /dlq/{id}/payload): an operator's edit of a payload is kept beside
-- the original bytes, which are never overwritten. A replay publishes the edited payload when there is
-- one; the audit log has who changed what (the diff, as views show it).
ALTER TABLE dlq
    ADD COLUMN edited_payload bytea,
    ADD COLUMN edited_at      timestamptz,
    ADD COLUMN edited_by      text;
