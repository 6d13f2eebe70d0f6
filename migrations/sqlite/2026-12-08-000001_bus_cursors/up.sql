-- How far each outbound relay of the event store has got (the AMQP publish relay is `amqp`):
-- every event up to `seq` was confirmed by the broker. Advanced only forwards, after the
-- broker confirmed, so a relay that stops (or dies) carries on from here and republishes at
-- most the events it published but had not stored yet. Mirrors migrations/postgres.
CREATE TABLE bus_cursors (
    name       TEXT PRIMARY KEY NOT NULL,
    seq        BIGINT NOT NULL CHECK (seq >= 0),
    updated_at TIMESTAMP NOT NULL
);
