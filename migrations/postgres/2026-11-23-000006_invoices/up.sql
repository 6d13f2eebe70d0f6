-- Invoices and their billing saga (PostgreSQL). Mirrors migrations/sqlite.
CREATE TABLE invoices (
    id                TEXT PRIMARY KEY,
    -- One invoice per incident.
    incident_id       TEXT NOT NULL UNIQUE,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'insurance_verified', 'paid', 'failed', 'voided')),
    amount_cents      BIGINT NOT NULL CHECK (amount_cents >= 0),
    covered_cents     BIGINT NOT NULL CHECK (covered_cents >= 0),
    patient_due_cents BIGINT NOT NULL CHECK (patient_due_cents >= 0),
    currency          TEXT NOT NULL,
    provider          TEXT NOT NULL,
    -- The saga state (JSON): steps done, payment and claim references, failure.
    saga              TEXT NOT NULL,
    done              BOOLEAN NOT NULL,
    created_at        TIMESTAMP NOT NULL,
    updated_at        TIMESTAMP NOT NULL
);
