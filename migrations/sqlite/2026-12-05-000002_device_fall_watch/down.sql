DROP INDEX devices_fall_watch;
ALTER TABLE devices DROP COLUMN fall_deadline;
ALTER TABLE devices DROP COLUMN fall_at;
