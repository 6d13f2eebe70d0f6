DROP TABLE notifications;
DROP TABLE idempotency_keys;
DROP TABLE deadlines;
DROP TABLE incident_references;
DROP TABLE incident_evidence;
DROP TABLE incidents;
