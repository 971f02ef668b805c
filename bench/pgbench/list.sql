-- The service's list statement for a random seeded user (20 tasks each).
\set u random(0, 99)
SELECT id, user_id, title, description, complete, created_at, updated_at
FROM tasks
WHERE user_id = 'bench-user-' || :u AND (NULL::boolean IS NULL OR complete = NULL::boolean)
ORDER BY id LIMIT 20 OFFSET 0;
