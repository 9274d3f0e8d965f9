-- The flood guard's circuits (see `eventhandler.flood` and `eventhandler.circuits`).

-- name: open_circuits
-- What a worker treats as open when it starts.
SELECT fingerprint, event_types FROM flood_circuit WHERE consumer = %(consumer)s AND state = 'open';

-- name: dead_letter_until
-- Circuits an operator closed, choosing to dead-letter their failure: for how many seconds more.
SELECT fingerprint, extract(epoch FROM dead_letter_until - now())::float8
FROM flood_circuit
WHERE consumer = %(consumer)s AND fingerprint = ANY(%(fingerprints)s) AND dead_letter_until > now();

-- name: hold
-- A worker holds a batch for a circuit: open it (or keep it open) with the figures that judged it.
-- Returns whether it was open already; nothing when an operator closed it meanwhile.
INSERT INTO flood_circuit AS c (consumer, fingerprint, state, stage, error_type, error_message, event_types,
                                failures, messages, distinct_keys, sample_topic, sample_partition,
                                sample_offset, opened_at, opened_by, tried_at)
VALUES (%(consumer)s, %(fingerprint)s, 'open', %(stage)s, %(error_type)s, %(error_message)s, %(event_types)s,
        %(failures)s, %(messages)s, %(keys)s, %(topic)s, %(partition)s, %(offset)s, now(), %(worker)s, now())
ON CONFLICT (consumer, fingerprint) DO UPDATE SET
    opened_at = CASE WHEN c.state = 'open' THEN c.opened_at ELSE now() END,
    opened_by = CASE WHEN c.state = 'open' THEN c.opened_by ELSE EXCLUDED.opened_by END,
    trials = CASE WHEN c.state = 'open' THEN c.trials + 1 ELSE 1 END,
    state = 'open',
    stage = EXCLUDED.stage, error_type = EXCLUDED.error_type, error_message = EXCLUDED.error_message,
    event_types = EXCLUDED.event_types, failures = EXCLUDED.failures, messages = EXCLUDED.messages,
    distinct_keys = EXCLUDED.distinct_keys, sample_topic = EXCLUDED.sample_topic,
    sample_partition = EXCLUDED.sample_partition, sample_offset = EXCLUDED.sample_offset,
    tried_at = now(), closed_at = NULL, closed_by = NULL, close_note = NULL, dead_letter_until = NULL
-- an operator's close that is still in force wins over a worker that had not seen it: no row comes back
WHERE c.dead_letter_until IS NULL OR c.dead_letter_until <= now()
RETURNING trials > 1 AS was_open;

-- name: close_tried
-- A worker's trial passed: the circuits it held close.
UPDATE flood_circuit SET state = 'closed', closed_at = now(), closed_by = %(worker)s,
       close_note = 'a trial batch went through: the failure is no longer systemic'
WHERE consumer = %(consumer)s AND fingerprint = ANY(%(fingerprints)s) AND state = 'open'
RETURNING fingerprint;

-- name: close_untried
-- Circuits a worker found open at start and whose events it applied since: closed when no worker
-- has held a batch for them lately (one that does is still failing).
UPDATE flood_circuit SET state = 'closed', closed_at = now(), closed_by = %(worker)s,
       close_note = 'events of its types applied, and no worker held a batch for it since ' || tried_at
WHERE consumer = %(consumer)s AND fingerprint = ANY(%(fingerprints)s) AND state = 'open'
  AND tried_at < now() - make_interval(secs => %(untried_for)s)
RETURNING fingerprint;

-- name: circuits
-- What operators see: open circuits first, then the latest closed ones.
SELECT consumer, fingerprint, state, stage, error_type, error_message, event_types, failures, messages,
       distinct_keys, sample_topic, sample_partition, sample_offset, opened_at, opened_by, tried_at, trials,
       closed_at, closed_by, close_note, dead_letter_until
FROM flood_circuit
WHERE (%(consumer)s::text IS NULL OR consumer = %(consumer)s)
ORDER BY state = 'open' DESC, coalesce(closed_at, opened_at) DESC
LIMIT %(limit)s;

-- name: close_by_operator
-- An operator closes a circuit: its failure is dead-lettered until `dead_letter_until`.
UPDATE flood_circuit SET state = 'closed', closed_at = now(), closed_by = %(actor)s, close_note = %(note)s,
       dead_letter_until = now() + make_interval(secs => %(seconds)s)
WHERE consumer = %(consumer)s AND fingerprint = %(fingerprint)s
RETURNING consumer, fingerprint, state, stage, error_type, error_message, event_types, failures, messages,
          distinct_keys, sample_topic, sample_partition, sample_offset, opened_at, opened_by, tried_at, trials,
          closed_at, closed_by, close_note, dead_letter_until;
