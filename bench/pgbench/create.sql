-- The service's create statement (the trigger bumps the user's change counter).
\set u random(0, 99)
INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at)
VALUES ('bench-user-' || :u, 'benchmark task', 'made by pgbench', false, now(), now())
RETURNING id, user_id, title, description, complete, created_at, updated_at, version;
