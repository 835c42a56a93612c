-- social_event_rejects: the rejected event rows with a human-readable detail, in input order.
-- Input: ev_classified (the view social_events_classified).
SELECT
    _file || ':' || CAST(_row AS VARCHAR) AS source,
    reason,
    CASE reason
        WHEN 'unparsable timestamp' THEN 'ts=' || coalesce(ts_raw, 'NULL')
        WHEN 'unknown event' THEN 'event=' || coalesce(event, 'NULL')
        WHEN 'missing user id' THEN 'user_id is empty'
        WHEN 'image rejected' THEN 'image_id=' || image_id || ' (its images row was rejected)'
        WHEN 'unknown image' THEN 'image_id=' || coalesce(image_id, 'NULL')
        WHEN 'event before image created' THEN 'image_id=' || image_id || ' ts=' || CAST(ts AS VARCHAR)
        WHEN 'duplicate event id' THEN 'event_id=' || event_id
        WHEN 'removed on request' THEN 'a removal request applies to this user'
    END AS detail
FROM ev_classified
WHERE reason IS NOT NULL
ORDER BY _file, _row
