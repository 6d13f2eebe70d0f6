ALTER TABLE devices DROP COLUMN fall_deadline;
ALTER TABLE devices DROP COLUMN fall_at;
