-- The Amazon SNS topic channel: one outbox row per incident and template publishes to the
-- configured topic (`notify.sns_topic_arn`). SQLite cannot alter a CHECK: the table is
-- rebuilt with the same columns and indexes. Mirrors migrations/postgres.
CREATE TABLE notifications_new (
    id              TEXT PRIMARY KEY NOT NULL,
    incident_id     TEXT NOT NULL,
    recipient_name  TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('sms', 'email', 'webhook', 'sns')),
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
INSERT INTO notifications_new
    SELECT id, incident_id, recipient_name, channel, address, template, idempotency_key, status,
           attempts, next_attempt_at, last_error, created_at, updated_at
    FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_due_idx ON notifications (status, next_attempt_at);
CREATE INDEX notifications_incident_idx ON notifications (incident_id);
