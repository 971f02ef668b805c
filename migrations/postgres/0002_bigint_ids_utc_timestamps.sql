-- Runs in one transaction: interrupted half-way, it leaves the table as it was.

-- Ids are 64-bit. The SERIAL sequence was created `AS integer`; changing its type also
-- lifts its maximum to the bigint one.
ALTER TABLE tasks ALTER COLUMN id TYPE BIGINT;
DO $$
DECLARE
    seq text := pg_get_serial_sequence('tasks', 'id');
BEGIN
    IF seq IS NOT NULL THEN
        EXECUTE format('ALTER SEQUENCE %s AS BIGINT', seq);
    END IF;
END
$$;

-- The naive timestamps always meant UTC; store instants.
ALTER TABLE tasks
    ALTER COLUMN created_at TYPE TIMESTAMPTZ USING created_at AT TIME ZONE 'UTC',
    ALTER COLUMN updated_at TYPE TIMESTAMPTZ USING updated_at AT TIME ZONE 'UTC',
    ALTER COLUMN complete SET DEFAULT false;

-- Every query is scoped to one user and ordered by id: one index serves them all,
-- and makes the old single-column one redundant.
CREATE INDEX IF NOT EXISTS tasks_user_id_id ON tasks (user_id, id);
DROP INDEX IF EXISTS ix_tasks_user_id;
