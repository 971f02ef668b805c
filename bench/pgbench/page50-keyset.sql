-- (pgbench -D big=bench-big: the user is a parameter, as the service sends it.)
-- Page 50 (limit=20) of the user with 10,000 tasks, by keyset: after the 980th task's id
-- (pgbench -D after=<id>).
\set limit 21
\set offset 0
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = :big), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = :big
             AND id > :after
           ORDER BY id ASC LIMIT :limit OFFSET :offset) AS t ON true
ORDER BY t.id ASC;
