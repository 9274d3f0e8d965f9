-- A header key is bytes on the wire; most are UTF-8 and live in header_keys as text. When one of a
-- message's keys is not, the whole list is kept here byte for byte (replay publishes these), and
-- header_keys holds a readable form (bytes that are not UTF-8 written as \xNN).
ALTER TABLE dlq ADD COLUMN header_keys_raw bytea[];
-- NOT VALID: every existing row has NULL here, so there is nothing to check, and validating would scan
-- the table while this migration's transaction holds its exclusive lock. New rows are checked.
ALTER TABLE dlq ADD CONSTRAINT dlq_raw_header_keys_parallel
    CHECK (header_keys_raw IS NULL OR cardinality(header_keys_raw) = cardinality(header_keys)) NOT VALID;
