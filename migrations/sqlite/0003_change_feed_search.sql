-- The change feed, list sorting and keyset pages, Unicode search, and the key that signs
-- cursors. (See migrations/postgres/0004 for the reasoning; this is the same schema in
-- SQLite.)

CREATE TABLE task_tombstones (
    user_id TEXT NOT NULL,
    change_seq INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    deleted_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, change_seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX task_tombstones_deleted_at ON task_tombstones (deleted_at);

ALTER TABLE user_changes ADD COLUMN purged_through INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER task_tombstones_note_purge AFTER DELETE ON task_tombstones
BEGIN
    UPDATE user_changes SET purged_through = max(purged_through, OLD.change_seq)
    WHERE user_id = OLD.user_id;
END;

-- A task's id and owner never change.
CREATE TRIGGER tasks_keep_identity BEFORE UPDATE OF id, user_id ON tasks
WHEN NEW.id <> OLD.id OR NEW.user_id <> OLD.user_id
BEGIN
    SELECT RAISE(ABORT, 'a task''s id and user_id never change');
END;

CREATE INDEX tasks_user_change_seq ON tasks (user_id, change_seq);
CREATE INDEX tasks_user_updated_at ON tasks (user_id, updated_at, id);

ALTER TABLE tasks ADD COLUMN title_folded TEXT;
ALTER TABLE tasks ADD COLUMN description_folded TEXT;
ALTER TABLE tasks ADD COLUMN folded_version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_unfolded ON tasks (id) WHERE folded_version <> version;

-- Deletes leave a tombstone numbered by the counter the delete just bumped, stamped in
-- microseconds since the Unix epoch like every instant here.
DROP TRIGGER tasks_delete_counts_change;
CREATE TRIGGER tasks_delete_counts_change AFTER DELETE ON tasks
BEGIN
    INSERT INTO user_changes (user_id, counter) VALUES (OLD.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET counter = counter + 1;
    INSERT INTO task_tombstones (user_id, change_seq, task_id, deleted_at)
    VALUES (OLD.user_id, (SELECT counter FROM user_changes WHERE user_id = OLD.user_id), OLD.id,
            CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER));
END;

CREATE TABLE service_secrets (
    name TEXT PRIMARY KEY,
    secret BLOB NOT NULL
) STRICT, WITHOUT ROWID;
