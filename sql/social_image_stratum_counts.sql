-- social_image_stratum_counts: per (image, stratum) the exposures and the count of each positive
-- event, over the events that count: not by a bot (bots(user_id)) and, with $exclude_self, not by
-- the image's creator. With $dedupe a user counts once per image, stratum and event (exposed =
-- left any event); without it every event counts and exposures are impressions (at least one per
-- engaged user). Integer counts only: the float arithmetic happens in numpy, in a fixed order.
-- Each row also names an audience half: users are split in two by a hash of their id (the same
-- half for every image), so each image's audience falls into two disjoint random halves that
-- pipeline/social/calibrate.py judges against each other (split-half calibration).
-- Inputs: user_image (social_user_image.sql), bots(user_id).
WITH halves AS (
    SELECT user_id, (md5_number(user_id) % 2)::INTEGER AS half
    FROM (SELECT DISTINCT user_id FROM user_image)
)
SELECT
    image_id,
    stratum,
    half,
    sum(CASE WHEN $dedupe THEN 1 ELSE greatest(c_impression, 1) END)::BIGINT AS n_exposed,
    sum(c_impression)::BIGINT AS n_impressions,
    sum(CASE WHEN $dedupe THEN least(c_click, 1) ELSE c_click END)::BIGINT AS n_click,
    sum(CASE WHEN $dedupe THEN least(c_like, 1) ELSE c_like END)::BIGINT AS n_like,
    sum(CASE WHEN $dedupe THEN least(c_save, 1) ELSE c_save END)::BIGINT AS n_save,
    sum(CASE WHEN $dedupe THEN least(c_share, 1) ELSE c_share END)::BIGINT AS n_share,
    sum(CASE WHEN $dedupe THEN least(c_remix, 1) ELSE c_remix END)::BIGINT AS n_remix
FROM user_image
JOIN halves USING (user_id)
WHERE NOT (is_self AND $exclude_self)
  AND user_id NOT IN (SELECT user_id FROM bots)
GROUP BY image_id, stratum, half
ORDER BY image_id, stratum, half
