-- list?q=task%201&limit=20 for a random seeded user (the service folds q; 'task 1' is
-- its own folding).
\set u random(0, 99)
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = 'bench-user-' || :u), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = 'bench-user-' || :u
             AND folded_version = version AND (strpos(title_folded, 'task 1') > 0 OR strpos(description_folded, 'task 1') > 0)
           ORDER BY id ASC LIMIT 21 OFFSET 0) AS t ON true
ORDER BY t.id ASC;
