-- Changes since a cursor 20 changes behind (a feed user's cursor from before its 20
-- creates): the counter, then the changes with the counter again, in one snapshot.
\set u random(0, 99)
\set since 0
\set limit 501
\set deletions 1
SELECT counter FROM user_changes WHERE user_id = 'bench-feed-' || :u;
WITH marker AS MATERIALIZED (
    SELECT COALESCE(c.counter, 0) AS counter, COALESCE(c.purged_through, 0) AS purged_through
    FROM (SELECT 1) AS one LEFT JOIN user_changes AS c ON c.user_id = 'bench-feed-' || :u)
SELECT marker.counter AS marker, marker.purged_through, c.*
FROM marker LEFT JOIN (
    SELECT * FROM (
        SELECT * FROM (
            SELECT change_seq, id, user_id, title, description, complete, created_at, updated_at,
                   version, NULL::timestamptz AS deleted_at
            FROM tasks
            WHERE user_id = 'bench-feed-' || :u AND change_seq > :since
              AND (SELECT counter FROM marker) > :since
            ORDER BY change_seq LIMIT :limit) AS live
        UNION ALL
        SELECT * FROM (
            SELECT change_seq, task_id, NULL::text, NULL::text, NULL::text, NULL::boolean,
                   NULL::timestamptz, NULL::timestamptz, NULL::int8, deleted_at
            FROM task_tombstones
            WHERE user_id = 'bench-feed-' || :u AND change_seq > :since AND :deletions
              AND (SELECT counter FROM marker) > :since
            ORDER BY change_seq LIMIT :limit) AS dead
    ) AS u ORDER BY change_seq LIMIT :limit
) AS c ON true
ORDER BY c.change_seq;
