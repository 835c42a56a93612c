-- social_user_pairs: per-user preference pairs. The user engaged with the winner (weighted score
-- >= $min_score, a user counts once per event kind) and was shown the loser, from the same prompt
-- group, without any positive event on it. At most $max_per_group pairs per user and group
-- (lowest winner/loser ids). Input: user_image (bots and self-engagement already removed).
-- Only (user, group)s that have a winner are regrouped, which keeps this cheap on large logs.
WITH pos AS (
    SELECT
        user_id,
        image_id,
        prompt_group,
        sum(c_impression) AS impressions,
        least(sum(c_click), 1) * $w_click + least(sum(c_like), 1) * $w_like + least(sum(c_save), 1) * $w_save
            + least(sum(c_share), 1) * $w_share + least(sum(c_remix), 1) * $w_remix AS score
    FROM user_image
    WHERE c_click + c_like + c_save + c_share + c_remix > 0
    GROUP BY user_id, image_id, prompt_group
),
winners AS (SELECT * FROM pos WHERE score >= $min_score),
winner_groups AS (SELECT DISTINCT user_id, prompt_group FROM winners),
shown AS (
    SELECT u.user_id, u.image_id, u.prompt_group, sum(u.c_impression) AS impressions
    FROM user_image u
    SEMI JOIN winner_groups g ON g.user_id = u.user_id AND g.prompt_group = u.prompt_group
    GROUP BY u.user_id, u.image_id, u.prompt_group
),
losers AS (
    SELECT s.* FROM shown s
    ANTI JOIN pos p ON p.user_id = s.user_id AND p.image_id = s.image_id
    WHERE s.impressions > 0
),
pairs AS (
    SELECT
        w.user_id,
        w.prompt_group,
        w.image_id AS winner_image_id,
        l.image_id AS loser_image_id,
        w.score AS winner_score,
        w.impressions AS winner_impressions,
        l.impressions AS loser_impressions,
        row_number() OVER (PARTITION BY w.user_id, w.prompt_group ORDER BY w.image_id, l.image_id) AS rn
    FROM winners w
    JOIN losers l ON l.user_id = w.user_id AND l.prompt_group = w.prompt_group
)
SELECT * EXCLUDE (rn)
FROM pairs
WHERE rn <= $max_per_group
ORDER BY user_id, prompt_group, winner_image_id, loser_image_id
