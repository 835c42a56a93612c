-- social_boosters: candidate boosters, accounts that engage with nearly everything one creator
-- posts. Per (user, creator): how many of the creator's images the user was shown (seen) and
-- engaged with (any positive event), the user's engagement rate on everyone else's images, the
-- creator's engagement rate among everyone else, and the overall rate. Rows with at least
-- $min_images engaged images and a coverage (engaged / seen) of at least $min_coverage are
-- returned; build.py then asks how unlikely that many engaged images are if the user's
-- propensity and the creator's appeal acted independently (a binomial tail), and flags users who
-- are very unlikely alone, or unlikely together with others who give the same creator a large
-- share of all its engagement (creator_engaged_total). Accounts already flagged by the other
-- rules (flagged(user_id)) are left out of every rate: a farm's likes are not a creator's appeal.
-- Inputs: user_image (social_user_image.sql), images_ok(image_id, creator_id), flagged(user_id).
WITH per_image AS (
    SELECT
        u.user_id,
        i.creator_id,
        u.image_id,
        bool_or(u.c_click + u.c_like + u.c_save + u.c_share + u.c_remix > 0) AS engaged
    FROM user_image u
    JOIN images_ok i ON i.image_id = u.image_id
    WHERE NOT u.is_self AND i.creator_id IS NOT NULL
      AND u.user_id NOT IN (SELECT user_id FROM flagged)
    GROUP BY u.user_id, i.creator_id, u.image_id
),
per_pair AS (
    SELECT user_id, creator_id, count(*) AS seen, count_if(engaged) AS engaged
    FROM per_image
    GROUP BY user_id, creator_id
),
per_user AS (
    SELECT user_id, sum(engaged) AS engaged, sum(seen) AS seen FROM per_pair GROUP BY user_id
),
per_creator AS (
    SELECT creator_id, sum(engaged) AS engaged, sum(seen) AS seen FROM per_pair GROUP BY creator_id
),
overall AS (
    SELECT sum(engaged) / greatest(sum(seen), 1) AS rate FROM per_pair
)
SELECT
    p.user_id,
    p.creator_id AS boosted_creator,
    p.seen::BIGINT AS seen_images,
    p.engaged::BIGINT AS engaged_images,
    -- rates elsewhere, with one pseudo-engagement in two pseudo-views (never 0 or 1)
    (u.engaged - p.engaged + 1) / (u.seen - p.seen + 2) AS user_rate_elsewhere,
    (c.engaged - p.engaged + 1) / (c.seen - p.seen + 2) AS creator_rate_elsewhere,
    o.rate AS overall_rate,
    c.engaged::BIGINT AS creator_engaged_total
FROM per_pair p
JOIN per_user u ON u.user_id = p.user_id
JOIN per_creator c ON c.creator_id = p.creator_id
CROSS JOIN overall o
WHERE p.engaged >= $min_images AND p.engaged >= $min_coverage * p.seen
ORDER BY p.user_id, p.creator_id
