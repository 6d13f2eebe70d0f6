-- Fleet: ambulance units, hospitals and dispatch offers (PostgreSQL). Mirrors migrations/sqlite.

CREATE TABLE units (
    id                  TEXT PRIMARY KEY,
    call_sign           TEXT NOT NULL,
    capability          TEXT NOT NULL CHECK (capability IN ('als', 'bls')),
    status              TEXT NOT NULL,
    lat                 DOUBLE PRECISION NOT NULL,
    lng                 DOUBLE PRECISION NOT NULL,
    fix_at              TIMESTAMP NOT NULL,
    base_lat            DOUBLE PRECISION,
    base_lng            DOUBLE PRECISION,
    current_incident_id TEXT,
    created_at          TIMESTAMP NOT NULL,
    updated_at          TIMESTAMP NOT NULL
);

CREATE TABLE hospitals (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    lat          DOUBLE PRECISION NOT NULL,
    lng          DOUBLE PRECISION NOT NULL,
    capabilities TEXT NOT NULL,
    capacity     INTEGER NOT NULL CHECK (capacity >= 0),
    occupied     INTEGER NOT NULL CHECK (occupied >= 0),
    created_at   TIMESTAMP NOT NULL
);

CREATE TABLE offers (
    id             TEXT PRIMARY KEY,
    incident_id    TEXT NOT NULL,
    unit_id        TEXT NOT NULL,
    round          INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'declined', 'expired', 'withdrawn')),
    eta_s          INTEGER NOT NULL,
    reason         TEXT NOT NULL,
    offered_at     TIMESTAMP NOT NULL,
    expires_at     TIMESTAMP NOT NULL,
    responded_at   TIMESTAMP,
    decline_reason TEXT
);
CREATE INDEX offers_incident_idx ON offers (incident_id);
CREATE INDEX offers_unit_idx ON offers (unit_id, status);
