-- Running as a cluster: node membership, shard leases with fencing epochs, handover history.
-- Lease times are the database's clock (clock_timestamp()), never a node's.

CREATE TABLE cluster_nodes (
    node_id      TEXT PRIMARY KEY,
    -- The node's internal base URL, where other nodes forward work it owns.
    address      TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    left_at      TIMESTAMPTZ
);

CREATE TABLE shard_leases (
    shard       TEXT PRIMARY KEY,
    holder      TEXT,
    -- Bumped by every takeover: the fencing token every write of the shard checks.
    epoch       BIGINT NOT NULL DEFAULT 0,
    expires_at  TIMESTAMPTZ NOT NULL,
    acquired_at TIMESTAMPTZ,
    released_at TIMESTAMPTZ
);

CREATE TABLE shard_handovers (
    id        BIGSERIAL PRIMARY KEY,
    shard     TEXT NOT NULL,
    from_node TEXT,
    to_node   TEXT NOT NULL,
    epoch     BIGINT NOT NULL,
    -- first (never held), released (graceful stop) or expired (the holder stopped renewing)
    reason    TEXT NOT NULL,
    at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX shard_handovers_at ON shard_handovers (at DESC);

-- Fencing. A connection opened for a shard's owner carries `shers.fence = '<shard>@<epoch>'`
-- (a startup option). The first write of each of its transactions checks that the shard is
-- still held at that epoch and not expired; a node that lost its lease (paused, partitioned)
-- therefore cannot write, whatever its own clock says. Connections without the setting (a
-- single node, the standby front, migrations, `shers token`) are not fenced.
CREATE FUNCTION shers_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    fence TEXT := current_setting('shers.fence', true);
BEGIN
    IF fence IS NULL OR fence = '' THEN
        RETURN NULL;
    END IF;
    -- Checked once per transaction.
    IF current_setting('shers.fence_tx', true) = txid_current()::text THEN
        RETURN NULL;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM shard_leases
        WHERE shard = split_part(fence, '@', 1)
          AND epoch = split_part(fence, '@', 2)::bigint
          AND released_at IS NULL
          AND expires_at > clock_timestamp()
    ) THEN
        RAISE EXCEPTION 'fenced: shard lease % is no longer held', fence
            USING ERRCODE = 'P0001', HINT = 'this node lost its shard lease';
    END IF;
    PERFORM set_config('shers.fence_tx', txid_current()::text, true);
    RETURN NULL;
END
$$;

-- Every table the shards write. A table added later needs the same trigger (a test checks).
DO $$
DECLARE
    t TEXT;
BEGIN
    FOR t IN
        SELECT tablename FROM pg_tables
        WHERE schemaname = current_schema()
          AND tablename NOT IN ('cluster_nodes', 'shard_leases', 'shard_handovers',
                                '__diesel_schema_migrations')
    LOOP
        -- The WHEN clause keeps unfenced connections (a single node) from calling the
        -- function at all: the check costs them nothing.
        EXECUTE format(
            'CREATE TRIGGER shers_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I '
            'FOR EACH STATEMENT WHEN (current_setting(''shers.fence'', true) <> '''') '
            'EXECUTE FUNCTION shers_fence()', t);
    END LOOP;
END
$$;
