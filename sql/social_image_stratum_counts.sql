-- social_image_stratum_counts: per (image, stratum) the exposures and the count of each positive
-- event. With $dedupe a user counts once per image, stratum and event (exposed = left any event);
-- without it every event counts and exposures are impressions (at least one per engaged user).
-- Integer counts only: the float arithmetic happens in numpy, in a fixed order (deterministic).
SELECT
    image_id,
    stratum,
    sum(CASE WHEN $dedupe THEN 1 ELSE greatest(c_impression, 1) END)::BIGINT AS n_exposed,
    sum(CASE WHEN $dedupe THEN least(c_click, 1) ELSE c_click END)::BIGINT AS n_click,
    sum(CASE WHEN $dedupe THEN least(c_like, 1) ELSE c_like END)::BIGINT AS n_like,
    sum(CASE WHEN $dedupe THEN least(c_save, 1) ELSE c_save END)::BIGINT AS n_save,
    sum(CASE WHEN $dedupe THEN least(c_share, 1) ELSE c_share END)::BIGINT AS n_share,
    sum(CASE WHEN $dedupe THEN least(c_remix, 1) ELSE c_remix END)::BIGINT AS n_remix
FROM user_image
GROUP BY image_id, stratum
ORDER BY image_id, stratum
