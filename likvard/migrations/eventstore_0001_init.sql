-- Event store of one service: append-only events with a per-stream hash chain, and an outbox.
CREATE TABLE IF NOT EXISTS {schema}.streams (
    stream_id   text PRIMARY KEY,
    version     integer NOT NULL,
    last_hash   bytea NOT NULL
);

CREATE TABLE IF NOT EXISTS {schema}.events (
    global_position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id          text NOT NULL,
    stream_version     integer NOT NULL,
    event_id           uuid NOT NULL UNIQUE,
    event_type         text NOT NULL,
    schema_fingerprint bytea NOT NULL,
    data               bytea NOT NULL,
    payload            jsonb NOT NULL,
    metadata           jsonb NOT NULL,
    occurred_at        timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL,
    prev_hash          bytea NOT NULL,
    hash               bytea NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TABLE IF NOT EXISTS {schema}.outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    global_position bigint NOT NULL,
    stream_id       text NOT NULL,
    stream_version  integer NOT NULL,
    key             text NOT NULL,
    event_id        uuid NOT NULL,
    event_type      text NOT NULL,
    topic           text NOT NULL,
    value           bytea NOT NULL,
    traceparent     text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- History is append-only: an UPDATE or DELETE of an event is refused by the database itself.
CREATE OR REPLACE FUNCTION {schema}.refuse_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP;
END $$;

DROP TRIGGER IF EXISTS events_append_only ON {schema}.events;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON {schema}.events
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_event_change();

DROP TRIGGER IF EXISTS events_no_truncate ON {schema}.events;
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {schema}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_event_change();
