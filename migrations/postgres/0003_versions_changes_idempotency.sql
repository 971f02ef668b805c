-- Versions for conditional requests, the per-user change counter, and idempotent create.
-- Runs in one transaction: interrupted half-way, it leaves the database as it was.

-- A task's version: 1 on creation, +1 on every update (the trigger below sets it, so an
-- update from anywhere — an older instance during a rolling upgrade, a script — moves
-- it; the service's own statements check If-Match in the same UPDATE). Adopted tasks
-- start at 1.
ALTER TABLE tasks ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- The per-user change counter. Every write to a user's tasks takes the next number from
-- the user's row here, inside the write's own transaction: the row stays locked until
-- that transaction ends, so for one user the numbers are handed out in commit order.
-- (A global sequence or a clock could commit out of order.) The counter is the list's
-- ETag, and a task's `change_seq` is the number of its last change.
CREATE TABLE user_changes (
    user_id VARCHAR PRIMARY KEY,
    counter BIGINT NOT NULL
);
ALTER TABLE tasks ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;

-- Adopted tasks: each user's get the numbers 1..n in id order.
UPDATE tasks SET change_seq = numbered.n
FROM (SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY id) AS n FROM tasks) AS numbered
WHERE tasks.id = numbered.id;
INSERT INTO user_changes (user_id, counter)
SELECT user_id, max(change_seq) FROM tasks GROUP BY user_id;

-- The database enforces the counter and the version: every insert, update and delete of a
-- task bumps the counter, and every update the version, whoever sends the statement.
CREATE FUNCTION tasks_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed_user VARCHAR := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
    number BIGINT;
BEGIN
    INSERT INTO user_changes AS c (user_id, counter) VALUES (changed_user, 1)
    ON CONFLICT (user_id) DO UPDATE SET counter = c.counter + 1
    RETURNING c.counter INTO number;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.version := OLD.version + 1;
    END IF;
    NEW.change_seq := number;
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_count_change BEFORE INSERT OR UPDATE OR DELETE ON tasks
FOR EACH ROW EXECUTE FUNCTION tasks_count_change();

-- A create with an Idempotency-Key draws the task's id from the id column's sequence
-- (found with pg_get_serial_sequence): it must be owned by the column, as SERIAL makes it.
DO $$
BEGIN
    IF pg_get_serial_sequence('tasks', 'id') IS NULL THEN
        RAISE EXCEPTION 'tasks.id has no owned sequence; run ALTER SEQUENCE <its sequence> OWNED BY tasks.id';
    END IF;
END
$$;

-- Idempotency-Key: one row per (user, key), written in the same statement as the task it
-- created. It holds the request as validated (a repeat must match it) and the answer
-- given: the task as created, which fixes the replayed body, Location and ETag (a new
-- task is always incomplete, version 1, updated_at = created_at).
CREATE TABLE idempotency_keys (
    user_id VARCHAR NOT NULL,
    idempotency_key VARCHAR(255) NOT NULL,
    title VARCHAR(200) NOT NULL,
    description VARCHAR(1000),
    task_id BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
-- The purge deletes the oldest keys first.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
