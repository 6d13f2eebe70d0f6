-- A wearable's running fall watch (a fall without movement yet), so the escalation survives
-- the device actor: a restart, an idle stop, or its shard moving to another cluster node.
ALTER TABLE devices ADD COLUMN fall_at TIMESTAMP;
ALTER TABLE devices ADD COLUMN fall_deadline TIMESTAMP;
-- Start-up and every device shard's takeover look for the running watches: a handful of rows.
CREATE INDEX devices_fall_watch ON devices (id) WHERE fall_deadline IS NOT NULL;
