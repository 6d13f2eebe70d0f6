CREATE TABLE deadlines (
    incident_id TEXT NOT NULL,
    kind        TEXT NOT NULL,
    due_at      TIMESTAMP NOT NULL,
    data        TEXT NOT NULL,
    PRIMARY KEY (incident_id, kind)
);
