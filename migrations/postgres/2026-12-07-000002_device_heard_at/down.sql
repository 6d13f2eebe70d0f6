DROP INDEX devices_heard_at;
ALTER TABLE devices DROP COLUMN heard_at;
