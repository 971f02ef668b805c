-- The service's list statement for a random seeded user (limit=20: 21 rows are read, the
-- last only to tell whether a next page follows): the user's change counter (the list's
-- ETag) and the page, in one snapshot.
\set u random(0, 99)
\set limit 21
\set offset 0
SELECT marker.counter AS marker, t.*
FROM (SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = 'bench-user-' || :u), 0)
      AS counter) AS marker
LEFT JOIN (SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks
           WHERE user_id = 'bench-user-' || :u
           ORDER BY id ASC LIMIT :limit OFFSET :offset) AS t ON true
ORDER BY t.id ASC;
