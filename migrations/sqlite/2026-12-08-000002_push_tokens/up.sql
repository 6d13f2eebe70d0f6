-- Crews' phones for offers pushed through Firebase Cloud Messaging when no crew WebSocket is
-- open. A token is one app install and belongs to one unit: registered again for another unit,
-- it moves. Tokens FCM calls unregistered are deleted. Mirrors migrations/postgres.
CREATE TABLE push_tokens (
    token      TEXT PRIMARY KEY NOT NULL,
    unit_id    TEXT NOT NULL,
    platform   TEXT NOT NULL CHECK (platform IN ('android', 'ios', 'web')),
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX push_tokens_unit_idx ON push_tokens (unit_id, created_at);
