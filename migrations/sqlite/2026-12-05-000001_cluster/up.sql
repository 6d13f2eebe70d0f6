-- Running as a cluster needs PostgreSQL: on SQLite one node holds every shard. The tables
-- exist so that both schemas carry the same migrations; they stay empty here.
CREATE TABLE cluster_nodes (
    node_id      TEXT PRIMARY KEY NOT NULL,
    address      TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   TIMESTAMP NOT NULL,
    heartbeat_at TIMESTAMP NOT NULL,
    left_at      TIMESTAMP
);
CREATE TABLE shard_leases (
    shard       TEXT PRIMARY KEY NOT NULL,
    holder      TEXT,
    epoch       BIGINT NOT NULL DEFAULT 0,
    expires_at  TIMESTAMP NOT NULL,
    acquired_at TIMESTAMP,
    released_at TIMESTAMP
);
CREATE TABLE shard_handovers (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    shard     TEXT NOT NULL,
    from_node TEXT,
    to_node   TEXT NOT NULL,
    epoch     BIGINT NOT NULL,
    reason    TEXT NOT NULL,
    at        TIMESTAMP NOT NULL
);
