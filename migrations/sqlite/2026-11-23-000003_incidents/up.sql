-- Incidents (SQLite). Mirrors migrations/postgres. The incidents table is a projection of the
-- incident streams in `events`, written in the same transaction as the events it follows.

CREATE TABLE incidents (
    id               TEXT PRIMARY KEY NOT NULL,
    reference        TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL,
    priority         TEXT NOT NULL,
    source           TEXT NOT NULL,
    patient_id       TEXT,
    -- Equals patient_id while the incident is open, NULL once closed or cancelled: the unique
    -- constraint enforces one open incident per patient, also across nodes.
    open_patient_id  TEXT UNIQUE,
    lat              DOUBLE NOT NULL,
    lng              DOUBLE NOT NULL,
    description      TEXT,
    escalated        BOOLEAN NOT NULL,
    assigned_unit_id TEXT,
    hospital_id      TEXT,
    dispatch_round   INTEGER NOT NULL,
    evidence_count   INTEGER NOT NULL,
    cancel_reason    TEXT,
    call_received    TIMESTAMP,
    unit_notified    TIMESTAMP,
    unit_enroute     TIMESTAMP,
    unit_on_scene    TIMESTAMP,
    unit_left_scene  TIMESTAMP,
    at_destination   TIMESTAMP,
    closed_at        TIMESTAMP,
    created_at       TIMESTAMP NOT NULL,
    updated_at       TIMESTAMP NOT NULL,
    version          BIGINT NOT NULL
);
CREATE INDEX incidents_open_idx ON incidents (status, created_at);
CREATE INDEX incidents_created_idx ON incidents (created_at, id);

CREATE TABLE incident_evidence (
    id          TEXT PRIMARY KEY NOT NULL,
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    added_at    TIMESTAMP NOT NULL,
    evidence    TEXT NOT NULL
);
CREATE INDEX incident_evidence_incident_idx ON incident_evidence (incident_id, added_at);

-- Human-readable references INC-<year>-<number>, numbered per year.
CREATE TABLE incident_references (
    year        INTEGER PRIMARY KEY NOT NULL,
    last_number BIGINT NOT NULL
);

-- Timers that must survive restarts (offer expiry, escalation, retries).
CREATE TABLE deadlines (
    incident_id TEXT NOT NULL,
    kind        TEXT NOT NULL,
    due_at      TIMESTAMP NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (incident_id, kind)
);

-- Idempotency-Key replay store: the first response to a key is returned for its retries.
CREATE TABLE idempotency_keys (
    principal   TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    route       TEXT NOT NULL,
    status      INTEGER,
    body        TEXT,
    created_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (principal, idem_key)
);

-- Notification outbox: at-least-once delivery, one row per (incident, recipient, template).
CREATE TABLE notifications (
    id              TEXT PRIMARY KEY NOT NULL,
    incident_id     TEXT NOT NULL,
    recipient_name  TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('sms', 'email', 'webhook')),
    address         TEXT NOT NULL,
    template        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    attempts        INTEGER NOT NULL,
    next_attempt_at TIMESTAMP NOT NULL,
    last_error      TEXT,
    created_at      TIMESTAMP NOT NULL,
    updated_at      TIMESTAMP NOT NULL
);
CREATE INDEX notifications_due_idx ON notifications (status, next_attempt_at);
CREATE INDEX notifications_incident_idx ON notifications (incident_id);
