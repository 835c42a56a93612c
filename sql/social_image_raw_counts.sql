-- social_image_raw_counts: per accepted image, raw counts over all accepted events (bots and
-- creators included, no exposure normalisation): what the naive baseline rule looks at, and the
-- accepted events per image that social_images.events_accepted records (the events_reconcile
-- check adds them up against the input files' row counts).
SELECT
    i.image_id,
    count(e.image_id)::BIGINT AS events_accepted,
    count_if(e.event = 'impression')::BIGINT AS raw_impressions,
    count_if(e.event = 'like')::BIGINT AS raw_likes,
    count_if(e.event = 'remix')::BIGINT AS raw_remixes
FROM images_ok i
LEFT JOIN ev_classified e ON e.image_id = i.image_id AND e.reason IS NULL
GROUP BY i.image_id
ORDER BY i.image_id
