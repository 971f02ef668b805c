-- The change feed (deletions remembered as tombstones, changes found by an index range
-- scan), list sorting and keyset pages, Unicode search, and the key that signs cursors.
-- Runs in one transaction: interrupted half-way, it leaves the database as it was.

-- A deleted task leaves a tombstone numbered by the user's change counter, like any
-- other change. Ids are never reused, so a task has at most one. Purged after
-- SYNC_RETENTION (oldest first, hence the index on deleted_at).
CREATE TABLE task_tombstones (
    user_id VARCHAR NOT NULL,
    change_seq BIGINT NOT NULL,
    task_id BIGINT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (user_id, change_seq)
);
CREATE INDEX task_tombstones_deleted_at ON task_tombstones (deleted_at);

-- The highest change number whose tombstone has been purged, per user: a cursor from
-- before it may have missed a deletion, so it is refused (410) whatever the clocks and
-- settings of the instances. Kept by the purge's own statement, through this trigger.
ALTER TABLE user_changes ADD COLUMN purged_through BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION task_tombstones_note_purge() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE user_changes AS c SET purged_through = GREATEST(c.purged_through, gone.last)
    FROM (SELECT user_id, max(change_seq) AS last FROM purged GROUP BY user_id) AS gone
    WHERE c.user_id = gone.user_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER task_tombstones_note_purge AFTER DELETE ON task_tombstones
REFERENCING OLD TABLE AS purged FOR EACH STATEMENT EXECUTE FUNCTION task_tombstones_note_purge();

-- "Changes since N for user U" and "U's tasks by updated_at": index range scans.
-- (Sorting by created_at or title sorts the user's tasks: one index per sort order would
-- tax every write for orders that a todo list of a few hundred tasks sorts quickly.)
CREATE INDEX tasks_user_change_seq ON tasks (user_id, change_seq);
CREATE INDEX tasks_user_updated_at ON tasks (user_id, updated_at, id);

-- Search compares Unicode case-folded copies of the title and description, folded by the
-- service (PostgreSQL's lower() depends on the database's locale and SQLite's is ASCII
-- only; the service folds the same way on both). `folded_version` is the version the
-- copies were made for: a row written by anything else (an older instance during a
-- rolling upgrade, a script, an adopted table) has folded_version <> version, is left out
-- of searches, and is folded again by the service's background upkeep (partial index).
ALTER TABLE tasks
    ADD COLUMN title_folded VARCHAR,
    ADD COLUMN description_folded VARCHAR,
    ADD COLUMN folded_version BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tasks_unfolded ON tasks (id) WHERE folded_version <> version;

-- Deletes now leave a tombstone, with the number the counter gave them. Only writes to
-- the task's own fields count as changes: refreshing the folded copies does not. A task's
-- id and owner never change (the feed and the counters are per owner): an update that
-- tries is refused.
CREATE OR REPLACE FUNCTION tasks_count_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed_user VARCHAR := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
    number BIGINT;
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.id <> OLD.id OR NEW.user_id <> OLD.user_id) THEN
        RAISE EXCEPTION 'a task''s id and user_id never change' USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO user_changes AS c (user_id, counter) VALUES (changed_user, 1)
    ON CONFLICT (user_id) DO UPDATE SET counter = c.counter + 1
    RETURNING c.counter INTO number;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO task_tombstones (user_id, change_seq, task_id, deleted_at)
        VALUES (OLD.user_id, number, OLD.id, now());
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.version := OLD.version + 1;
    END IF;
    NEW.change_seq := number;
    RETURN NEW;
END
$$;
DROP TRIGGER tasks_count_change ON tasks;
CREATE TRIGGER tasks_count_change
BEFORE INSERT OR DELETE
    OR UPDATE OF id, user_id, title, description, complete, created_at, updated_at, version
ON tasks FOR EACH ROW EXECUTE FUNCTION tasks_count_change();

-- Secrets the service makes for itself, shared by every instance: the key that signs
-- list and feed cursors. Written once by whichever instance starts first.
CREATE TABLE service_secrets (
    name VARCHAR PRIMARY KEY,
    secret BYTEA NOT NULL
);
