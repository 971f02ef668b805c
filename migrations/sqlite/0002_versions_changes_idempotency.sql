-- Versions for conditional requests, the per-user change counter, and idempotent create.
-- (See migrations/postgres/0003 for the reasoning; this is the same schema in SQLite.)

ALTER TABLE tasks ADD COLUMN version INTEGER NOT NULL DEFAULT 1;

-- The per-user change counter. SQLite has one writer at a time, so numbers are handed
-- out in commit order.
CREATE TABLE user_changes (
    user_id TEXT PRIMARY KEY,
    counter INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
ALTER TABLE tasks ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;

UPDATE tasks SET change_seq = numbered.n
FROM (SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY id) AS n FROM tasks) AS numbered
WHERE tasks.id = numbered.id;
INSERT INTO user_changes (user_id, counter)
SELECT user_id, max(change_seq) FROM tasks GROUP BY user_id;

-- Every insert, update and delete of a task bumps its user's counter, and every update
-- its version. (SQLite's BEFORE triggers cannot set NEW, so the numbers are written to
-- the row right after; the service's statements set the version themselves, so that
-- RETURNING shows it, and the trigger only bumps it for an update that did not.) The
-- update trigger fires on the task's fields, which the trigger's own writes do not touch;
-- SQLite does not run triggers from inside triggers unless told to.
CREATE TRIGGER tasks_insert_counts_change AFTER INSERT ON tasks
BEGIN
    INSERT INTO user_changes (user_id, counter) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET counter = counter + 1;
    UPDATE tasks SET change_seq = (SELECT counter FROM user_changes WHERE user_id = NEW.user_id)
    WHERE id = NEW.id;
END;
CREATE TRIGGER tasks_update_counts_change
AFTER UPDATE OF title, description, complete, created_at, updated_at, version ON tasks
BEGIN
    INSERT INTO user_changes (user_id, counter) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET counter = counter + 1;
    UPDATE tasks SET change_seq = (SELECT counter FROM user_changes WHERE user_id = NEW.user_id),
                     version = CASE WHEN NEW.version = OLD.version THEN OLD.version + 1
                                    ELSE NEW.version END
    WHERE id = NEW.id;
END;
CREATE TRIGGER tasks_delete_counts_change AFTER DELETE ON tasks
BEGIN
    INSERT INTO user_changes (user_id, counter) VALUES (OLD.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET counter = counter + 1;
END;

-- Idempotency-Key: the request as validated and the task it created.
CREATE TABLE idempotency_keys (
    user_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    title TEXT NOT NULL,
    description TEXT,
    task_id INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
) STRICT, WITHOUT ROWID;
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
