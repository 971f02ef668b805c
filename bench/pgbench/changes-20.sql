-- Changes since a cursor 20 changes behind (a feed user's cursor from before its 20
-- creates): the counter, then the changes with the counter again, in one snapshot.
\set u random(0, 99)
SELECT counter FROM user_changes WHERE user_id = 'bench-feed-' || :u;
WITH marker AS MATERIALIZED (
    SELECT COALESCE((SELECT counter FROM user_changes WHERE user_id = 'bench-feed-' || :u), 0)
    AS counter)
SELECT marker.counter AS marker, c.*
FROM marker LEFT JOIN (
    SELECT * FROM (
        SELECT change_seq, id, user_id, title, description, complete, created_at, updated_at, version,
               NULL AS deleted_at FROM tasks
        WHERE user_id = 'bench-feed-' || :u AND change_seq > 0
          AND (SELECT counter FROM marker) > 0
        UNION ALL
        SELECT change_seq, task_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, deleted_at
        FROM task_tombstones
        WHERE user_id = 'bench-feed-' || :u AND change_seq > 0 AND true
          AND (SELECT counter FROM marker) > 0
    ) AS u ORDER BY change_seq LIMIT 501
) AS c ON true
ORDER BY c.change_seq;
