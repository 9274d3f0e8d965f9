-- Open rows written before 0006 have no ledger key, so the pruner could forget their events and a
-- replay could apply one twice. Their key is the worker's digest (ledger.digest): MD5 of consumer,
-- event source and event id, each as UTF-8, separated by a NUL byte.
UPDATE dlq
SET event_key = md5(
        convert_to(consumer, 'UTF8') || '\x00'::bytea
        || convert_to(event_source, 'UTF8') || '\x00'::bytea
        || convert_to(event_id, 'UTF8')
    )::uuid
WHERE event_key IS NULL
  AND event_id IS NOT NULL AND event_source IS NOT NULL
  AND status IN ('pending', 'replayed');
