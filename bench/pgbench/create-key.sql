-- The service's create with an Idempotency-Key: claim the key and insert in one
-- statement; a fresh random key each time, as the wrk scenario sends.
\set u random(0, 99)
\set k random(1, 9000000000000000000)
WITH claim AS (
    INSERT INTO idempotency_keys AS k
        (user_id, idempotency_key, title, description, task_id, created_at)
    VALUES ('bench-user-' || :u, 'pgbench-' || :k, 'benchmark task', 'made by pgbench',
            nextval(pg_get_serial_sequence('tasks', 'id')), now())
    ON CONFLICT (user_id, idempotency_key) DO UPDATE
        SET title = EXCLUDED.title, description = EXCLUDED.description,
            task_id = EXCLUDED.task_id, created_at = EXCLUDED.created_at
        WHERE k.created_at <= now() - interval '24 hours'
    RETURNING task_id
)
INSERT INTO tasks (id, user_id, title, description, complete, created_at, updated_at,
                   title_folded, description_folded, folded_version)
SELECT task_id, 'bench-user-' || :u, 'benchmark task', 'made by pgbench', false, now(), now(),
       'benchmark task', 'made by pgbench', 1 FROM claim
RETURNING id, user_id, title, description, complete, created_at, updated_at, version;
