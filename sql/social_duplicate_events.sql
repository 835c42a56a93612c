-- social_duplicate_events: the event rows (_file, _row) whose event_id already appeared in an
-- earlier row (by file name, then row number); the first row of each event_id is kept.
-- Two steps: group by a 64-bit hash of event_id (cheap on 10 M rows), then rank only the rows
-- whose hash repeats by the event_id itself (exact: hash collisions drop out here).
-- Input: events_src (see social_events_classified.sql).
WITH dup_hashes AS (
    SELECT hash(event_id) AS h FROM events_src WHERE event_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1
),
ranked AS (
    SELECT _file, _row, event_id,
           row_number() OVER (PARTITION BY event_id ORDER BY _file, _row) AS rn
    FROM events_src
    WHERE event_id IS NOT NULL AND hash(event_id) IN (SELECT h FROM dup_hashes)
)
SELECT _file, _row, event_id FROM ranked WHERE rn > 1 ORDER BY _file, _row
