-- Timestamps are microseconds since the Unix epoch, UTC.
-- AUTOINCREMENT: an id is never reused, even after the newest task is deleted.
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    description TEXT,
    complete INTEGER NOT NULL DEFAULT 0 CHECK (complete IN (0, 1)),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

-- Every query is scoped to one user and ordered by id.
CREATE INDEX tasks_user_id_id ON tasks (user_id, id);
