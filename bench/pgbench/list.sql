-- The service's list statement for a random seeded user (20 tasks each): the user's
-- change counter (the list's ETag) and the page, in one snapshot.
\set u random(0, 99)
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = 'bench-user-' || :u), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = 'bench-user-' || :u AND (NULL::boolean IS NULL OR complete = NULL::boolean)
           ORDER BY id LIMIT 20 OFFSET 0) AS t ON true
ORDER BY t.id;
