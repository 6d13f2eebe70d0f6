-- The insurance verification service's own tables (SQLite). Mirrors migrations/postgres.

CREATE TABLE insurance_policies (
    id              TEXT PRIMARY KEY NOT NULL,
    patient_id      TEXT NOT NULL UNIQUE,
    provider        TEXT NOT NULL,
    member_id       TEXT NOT NULL,
    -- Coverage still available, in minor units; claim holds are taken from it.
    remaining_cents BIGINT NOT NULL CHECK (remaining_cents >= 0),
    created_at      TIMESTAMP NOT NULL
);

CREATE TABLE insurance_claims (
    id            TEXT PRIMARY KEY NOT NULL,
    policy_id     TEXT,
    patient_id    TEXT NOT NULL,
    -- One claim per incident: verifying again returns the same decision.
    incident_id   TEXT NOT NULL UNIQUE,
    amount_cents  BIGINT NOT NULL CHECK (amount_cents > 0),
    covered_cents BIGINT NOT NULL CHECK (covered_cents >= 0),
    status        TEXT NOT NULL CHECK (status IN ('held', 'released')),
    created_at    TIMESTAMP NOT NULL,
    released_at   TIMESTAMP
);
