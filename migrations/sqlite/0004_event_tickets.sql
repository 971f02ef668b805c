-- Tickets that open an event stream (see migrations/postgres/0005; the same schema in
-- SQLite, instants as microseconds since the Unix epoch).
CREATE TABLE event_tickets (
    user_id TEXT NOT NULL,
    ticket BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    token_valid_until INTEGER NOT NULL,
    PRIMARY KEY (user_id, ticket)
) STRICT, WITHOUT ROWID;
CREATE INDEX event_tickets_expires_at ON event_tickets (expires_at);
