-- Foundation: the event store and API tokens (SQLite). Mirrors migrations/postgres.
-- Times are UTC in TIMESTAMP columns; ids are TEXT; JSON payloads are TEXT.

CREATE TABLE events (
    -- Global, gap-free sequence, assigned from event_sequence inside the append transaction.
    seq         INTEGER PRIMARY KEY NOT NULL,
    stream_id   TEXT    NOT NULL,
    version     BIGINT  NOT NULL CHECK (version > 0),
    kind        TEXT    NOT NULL,
    incident_id TEXT,
    unit_id     TEXT,
    device_id   TEXT,
    payload     TEXT    NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);
CREATE INDEX events_incident_idx ON events (incident_id) WHERE incident_id IS NOT NULL;

-- One row: the last assigned seq. Updating it first in every append serialises appenders,
-- which makes the sequence gap-free and commits visible in seq order.
CREATE TABLE event_sequence (
    id       INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    last_seq BIGINT  NOT NULL
);
INSERT INTO event_sequence (id, last_seq) VALUES (1, 0);

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    -- SHA-256 of the token, hex. The token itself is never stored.
    token_hash  TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'console', 'crew', 'gateway', 'patient')),
    unit_id     TEXT,
    patient_id  TEXT,
    name        TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    revoked_at  TIMESTAMP,
    CHECK (role <> 'crew' OR unit_id IS NOT NULL),
    CHECK (role <> 'patient' OR patient_id IS NOT NULL)
);
