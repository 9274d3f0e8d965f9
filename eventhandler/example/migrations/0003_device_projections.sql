-- The built-in projections of the example domain: devices that report readings.
CREATE TABLE devices (
    device_id      text        PRIMARY KEY CHECK (char_length(device_id) BETWEEN 1 AND 64),
    name           text        NOT NULL,
    site           text,
    status         text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'decommissioned')),
    reading_count  bigint      NOT NULL DEFAULT 0,
    registered_at  timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);  -- room on each page for HOT updates: every reading updates its device

CREATE TABLE device_latest_readings (
    device_id    text             NOT NULL REFERENCES devices (device_id),
    metric       text             NOT NULL,
    value        double precision NOT NULL,
    unit         text,
    observed_at  timestamptz      NOT NULL,
    event_id     text             NOT NULL,
    PRIMARY KEY (device_id, metric)
) WITH (fillfactor = 70);  -- the latest reading is overwritten in place (HOT) where it can be
