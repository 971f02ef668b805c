-- The service's get statement for a random seeded task (ids 1–2000 on a fresh table);
-- also the whole of a GET answered 304 (the version is compared in the service).
\set id random(1, 2000)
SELECT id, user_id, title, description, complete, created_at, updated_at, version FROM tasks WHERE id = :id;
