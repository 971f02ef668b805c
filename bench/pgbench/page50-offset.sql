-- (pgbench -D big=bench-big: the user is a parameter, as the service sends it.)
-- Page 50 (limit=20) of the user with 10,000 tasks, by OFFSET 980.
\set limit 21
\set offset 980
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = :big), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = :big
           ORDER BY id ASC LIMIT :limit OFFSET :offset) AS t ON true
ORDER BY t.id ASC;
