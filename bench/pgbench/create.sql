-- The service's create statement (the trigger bumps the user's change counter).
\set u random(0, 99)
INSERT INTO tasks (user_id, title, description, complete, created_at, updated_at,
                   title_folded, description_folded, folded_version)
VALUES ('bench-user-' || :u, 'benchmark task', 'made by pgbench', false, now(), now(),
        'benchmark task', 'made by pgbench', 1)
RETURNING id, user_id, title, description, complete, created_at, updated_at, version;
