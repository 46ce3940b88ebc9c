-- Events this service has consumed from other services' topics: recorded in the same
-- transaction as their effect, so re-delivery and replay never apply an event twice.
CREATE TABLE IF NOT EXISTS {schema}.inbox (
    event_id     uuid PRIMARY KEY,
    event_type   text NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
