-- When a wearable was last heard (a reading arrived), so its silence is noticed even if no
-- actor of the device is running: after a restart, or when its shard moved to another cluster
-- node. Stored at or after the reading's arrival (refreshed at most every twentieth of the
-- silence limit, so a device's `device.offline` may come a little late, never early); NULL
-- when never heard, and again once its `device.offline` is recorded.
ALTER TABLE devices ADD COLUMN heard_at TIMESTAMP;
-- The offline sweep reads the devices not heard for the silence limit: one range of this index.
CREATE INDEX devices_heard_at ON devices (heard_at) WHERE heard_at IS NOT NULL;
