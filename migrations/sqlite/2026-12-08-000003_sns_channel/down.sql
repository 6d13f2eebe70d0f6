CREATE TABLE notifications_new (
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
INSERT INTO notifications_new
    SELECT id, incident_id, recipient_name, channel, address, template, idempotency_key, status,
           attempts, next_attempt_at, last_error, created_at, updated_at
    FROM notifications WHERE channel <> 'sns';
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_due_idx ON notifications (status, next_attempt_at);
CREATE INDEX notifications_incident_idx ON notifications (incident_id);
