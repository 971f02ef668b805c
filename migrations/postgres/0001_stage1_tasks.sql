-- The table as the first (Python) release of the service created it. On a database that
-- already holds it this is a no-op and the rows are adopted as they are; on a new
-- database it creates the same starting point, so every database takes the same path.
CREATE TABLE IF NOT EXISTS tasks (
    id SERIAL PRIMARY KEY,
    user_id VARCHAR NOT NULL,
    title VARCHAR(200) NOT NULL,
    description VARCHAR(1000),
    complete BOOLEAN NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_tasks_user_id ON tasks (user_id);
