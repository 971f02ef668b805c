-- An up-to-date changes poll of a random feed user (20 changes so far, cursor at 20):
-- the counter is read, and is not above the cursor, so nothing else is.
\set u random(0, 99)
SELECT counter FROM user_changes WHERE user_id = 'bench-feed-' || :u;
