ALTER TABLE offers DROP COLUMN eta_source;
