-- social_image_raw_counts: per image, raw counts over all accepted events (bots and creators
-- included, no exposure normalisation): what the naive baseline rule looks at.
SELECT
    image_id,
    count_if(event = 'impression')::BIGINT AS raw_impressions,
    count_if(event = 'like')::BIGINT AS raw_likes,
    count_if(event = 'remix')::BIGINT AS raw_remixes
FROM ev_classified
WHERE reason IS NULL
GROUP BY image_id
ORDER BY image_id
