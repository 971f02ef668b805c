-- list?sort=-updated_at&limit=20 for a random seeded user.
\set u random(0, 99)
\set limit 21
\set offset 0
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = 'bench-user-' || :u), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = 'bench-user-' || :u
           ORDER BY updated_at DESC, id DESC LIMIT :limit OFFSET :offset) AS t ON true
ORDER BY t.updated_at DESC, t.id DESC;
