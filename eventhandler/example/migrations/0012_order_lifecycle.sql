-- The example's order lifecycle projection (eventhandler/example/orders.py), where the order of an
-- order's events matters: run it with per-key parking.
CREATE TABLE order_lifecycle (
    order_id   text        PRIMARY KEY,
    status     text        NOT NULL CHECK (status IN ('placed', 'paid', 'shipped', 'cancelled')),
    total      float8      NOT NULL,
    currency   text        NOT NULL,
    paid       float8,
    history    text[]      NOT NULL DEFAULT '{}',  -- the event types applied, in the order they took effect
    event_ids  text[]      NOT NULL DEFAULT '{}',  -- and their ids
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The currencies the shop accepts: a payment in another one is refused (a handler failure) until it is added.
CREATE TABLE order_currencies (code text PRIMARY KEY);
INSERT INTO order_currencies (code) VALUES ('EUR'), ('USD');
