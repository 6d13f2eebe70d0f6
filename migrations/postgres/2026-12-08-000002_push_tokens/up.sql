-- Crews' phones for offers pushed through Firebase Cloud Messaging when no crew WebSocket is
-- open. A token is one app install and belongs to one unit: registered again for another unit,
-- it moves. Tokens FCM calls unregistered are deleted. Mirrors migrations/sqlite.
CREATE TABLE push_tokens (
    token      TEXT PRIMARY KEY,
    unit_id    TEXT NOT NULL,
    platform   TEXT NOT NULL CHECK (platform IN ('android', 'ios', 'web')),
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX push_tokens_unit_idx ON push_tokens (unit_id, created_at);
-- Written by the dispatch holder (the crew API runs there): a node that lost the lease cannot
-- write, like every table of the dispatch shard.
CREATE TRIGGER shers_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON push_tokens
    FOR EACH STATEMENT WHEN (current_setting('shers.fence', true) <> '')
    EXECUTE FUNCTION shers_fence();
