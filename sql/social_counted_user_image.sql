-- social_counted_user_image: per (user, image, stratum) that counts for the population test (not a
-- bot's, not the creator's own with $exclude_self), whether the user left each positive event
-- (0/1: one vote per user, image, stratum and event kind). pipeline/social/taste.py groups users by
-- taste from these rows and weighs the images' engagement within each group.
-- Inputs: user_image (social_user_image.sql), bots(user_id).
SELECT
    user_id,
    image_id,
    stratum,
    least(c_click, 1)::TINYINT AS click,
    least(c_like, 1)::TINYINT AS "like",
    least(c_save, 1)::TINYINT AS save,
    least(c_share, 1)::TINYINT AS share,
    least(c_remix, 1)::TINYINT AS remix
FROM user_image
WHERE NOT (is_self AND $exclude_self)
  AND user_id NOT IN (SELECT user_id FROM bots)
ORDER BY image_id, user_id, stratum
