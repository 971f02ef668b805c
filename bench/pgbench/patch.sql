-- The service's patch statement (complete only, no If-Match), scoped to the task's owner.
\set id random(1, 2000)
UPDATE tasks
SET title = COALESCE(NULL::text, title),
    description = CASE WHEN false THEN NULL::text ELSE description END,
    complete = COALESCE(true, complete),
    version = version + 1,
    updated_at = GREATEST(now(), updated_at + interval '1 microsecond'),
    title_folded = CASE WHEN NULL::text IS NULL THEN title_folded ELSE NULL::text END,
    description_folded = CASE WHEN false THEN NULL::text ELSE description_folded END,
    folded_version = CASE WHEN folded_version = version OR (NULL::text IS NOT NULL AND false)
                          THEN version + 1 ELSE folded_version END
WHERE id = :id AND user_id = 'bench-user-' || ((:id - 1) / 20)
  AND (NULL::int8[] IS NULL OR version = ANY(NULL::int8[]))
RETURNING id, user_id, title, description, complete, created_at, updated_at, version;
