-- Tickets that open an event stream (the browser's EventSource cannot send a bearer
-- header). A ticket is signed for its user by the service; this table makes it
-- single-use and lets any instance accept it. The signed ticket itself is never stored,
-- only its random id; a row is deleted when its stream opens, and expired rows are
-- purged.
CREATE TABLE event_tickets (
    user_id TEXT NOT NULL,
    ticket BYTEA NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    -- When the token that asked for the ticket stops being valid: the stream ends then.
    token_valid_until TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, ticket)
);
CREATE INDEX event_tickets_expires_at ON event_tickets (expires_at);
