-- social_events_classified: every raw event row with its reject reason (NULL = accepted).
-- Inputs (views/tables registered by pipeline/social/build.py):
--   events_src(_file, _row, ts TIMESTAMP, ts_raw, user_id, image_id, event, event_id, stratum)
--   images_ok(image_id, prompt_group, creator_id, created_at)   accepted images
--   images_rejected(image_id)                                    image ids whose row was rejected
--   dup_rows(_file, _row, event_id)                              social_duplicate_events
--   removed_users(user_hash)                                     sha256 of user ids removed on request
--   reposts(image_id, canonical_id, creator_id)                  copies of an accepted image (same
--       bytes): their events count for canonical_id; the copy's creator's events are self-engagement
-- The first failing check names the reason. Used as a view: each consumer scans the Parquet
-- once (cheaper than materialising 10 M rows); only the duplicate check is precomputed.
SELECT
    e._file,
    e._row,
    e.ts,
    e.user_id,
    coalesce(rp.canonical_id, e.image_id) AS image_id,
    e.event,
    e.stratum,
    i.prompt_group,
    coalesce(e.user_id = i.creator_id, false) OR coalesce(e.user_id = rp.creator_id, false) AS is_self,
    CASE
        WHEN e.ts IS NULL THEN 'unparsable timestamp'
        WHEN e.event IS NULL OR e.event NOT IN ('impression', 'click', 'like', 'save', 'share', 'remix')
            THEN 'unknown event'
        WHEN e.user_id IS NULL OR e.user_id = '' THEN 'missing user id'
        WHEN sha256(e.user_id) IN (SELECT user_hash FROM removed_users) THEN 'removed on request'
        WHEN i.image_id IS NULL AND r.image_id IS NOT NULL THEN 'image rejected'
        WHEN i.image_id IS NULL THEN 'unknown image'
        WHEN i.created_at IS NOT NULL AND e.ts < i.created_at THEN 'event before image created'
        WHEN d._row IS NOT NULL THEN 'duplicate event id'
    END AS reason,
    e.ts_raw,
    e.event_id
FROM events_src e
LEFT JOIN reposts rp ON rp.image_id = e.image_id
LEFT JOIN images_ok i ON i.image_id = coalesce(rp.canonical_id, e.image_id)
LEFT JOIN images_rejected r ON r.image_id = e.image_id
LEFT JOIN dup_rows d ON d._file = e._file AND d._row = e._row AND d.event_id = e.event_id
