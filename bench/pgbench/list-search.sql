-- list?q=1&limit=20 for a random seeded user (pgbench -D q=1; the service folds q, and
-- '1' is its own folding).
\set u random(0, 99)
\set limit 21
\set offset 0
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = 'bench-user-' || :u), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = 'bench-user-' || :u
             AND folded_version = version AND (strpos(title_folded, :q) > 0 OR strpos(description_folded, :q) > 0)
           ORDER BY id ASC LIMIT :limit OFFSET :offset) AS t ON true
ORDER BY t.id ASC;
