-- Reference data for vitals ingest: patients, next of kin, registered wearables, and retained
-- raw readings (PostgreSQL). Mirrors migrations/sqlite.

CREATE TABLE patients (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    date_of_birth       TEXT,
    home_lat            DOUBLE PRECISION,
    home_lng            DOUBLE PRECISION,
    insurance_provider  TEXT,
    insurance_member_id TEXT,
    created_at          TIMESTAMP NOT NULL
);

CREATE TABLE next_of_kin (
    id         TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    name       TEXT NOT NULL,
    relation   TEXT,
    phone      TEXT,
    email      TEXT,
    UNIQUE (patient_id, position)
);

CREATE TABLE devices (
    id            TEXT PRIMARY KEY,
    patient_id    TEXT NOT NULL REFERENCES patients (id),
    model         TEXT,
    registered_at TIMESTAMP NOT NULL,
    -- Projection of the last vitals.status_changed, so a restarted device actor resumes from it.
    last_status   TEXT CHECK (last_status IN ('normal', 'abnormal', 'emergency')),
    last_seen_at  TIMESTAMP
);
CREATE INDEX devices_patient_idx ON devices (patient_id);

-- Raw readings kept per triage.raw_retention ('evidence': those behind a status change;
-- 'all': every accepted reading, written in batches).
CREATE TABLE readings (
    id          BIGSERIAL PRIMARY KEY,
    device_id   TEXT NOT NULL,
    patient_id  TEXT NOT NULL,
    measured_at TIMESTAMP NOT NULL,
    received_at TIMESTAMP NOT NULL,
    status      TEXT NOT NULL,
    news2_score INTEGER,
    reading     TEXT NOT NULL
);
CREATE INDEX readings_device_time_idx ON readings (device_id, measured_at);
