-- How far each outbound relay of the event store has got (the AMQP publish relay is `amqp`):
-- every event up to `seq` was confirmed by the broker. Advanced only forwards, after the
-- broker confirmed, so a relay that stops (or dies) carries on from here and republishes at
-- most the events it published but had not stored yet. Mirrors migrations/sqlite.
CREATE TABLE bus_cursors (
    name       TEXT PRIMARY KEY,
    seq        BIGINT NOT NULL CHECK (seq >= 0),
    updated_at TIMESTAMP NOT NULL
);
-- The relay runs with the dispatch shard and writes its cursor on the holder's fenced
-- connections: a node that lost the lease cannot move the cursor.
CREATE TRIGGER shers_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON bus_cursors
    FOR EACH STATEMENT WHEN (current_setting('shers.fence', true) <> '')
    EXECUTE FUNCTION shers_fence();
