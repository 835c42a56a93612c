-- social_boosters: accounts that engage with nearly every image one creator posts, far more than
-- the user's own habits and those images' appeal to the rest of their audience explain.
--
-- 1. suspects: (user, creator) where the user engaged (any positive event) with >= $min_images of
--    the creator's images and with >= $min_coverage of those they were shown.
-- 2. each image's appeal among the people who are NOT suspects of its creator (with one
--    pseudo-engagement in two pseudo-views): a booster group inflates the image's engagement, so
--    the group itself is left out of the yardstick. This judges the images, not the creator: a
--    creator everyone likes gives no cover to the few poor images their boosters push.
-- 3. evidence per suspect: n images seen, k engaged, expected p_bar = mean over the seen images of
--    (user's rate on everyone else's images) x (image appeal) / (overall rate): the engagement if
--    the user's propensity and the images' appeal acted independently. log_tail is the Chernoff
--    bound of P(X >= k), X ~ Binomial(n, p_bar): -n KL(k/n || p_bar) (0 when k/n <= p_bar); it
--    never understates the tail, so a flag is never easier than the exact binomial test.
-- 4. flagged: log_tail < ln($max_tail) alone, or < ln($suspect_tail) when >= $min_group users are
--    suspects of the same creator at that level (a group acting together) and that many is itself
--    unlikely (below $max_tail) among all the creator's suspects.
-- Accounts already flagged by the other rules (flagged(user_id)) are left out of every rate.
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
suspects AS (
    SELECT user_id, creator_id FROM per_pair
    WHERE engaged >= $min_images AND engaged >= $min_coverage * seen
),
per_user AS (
    SELECT user_id, sum(engaged) AS engaged, sum(seen) AS seen FROM per_pair GROUP BY user_id
),
overall AS (
    SELECT sum(engaged) / greatest(sum(seen), 1) AS rate FROM per_pair
),
appeal AS (
    SELECT p.image_id, (count_if(p.engaged) + 1) / (count(*) + 2) AS rate
    FROM per_image p
    ANTI JOIN suspects s ON s.user_id = p.user_id AND s.creator_id = p.creator_id
    GROUP BY p.image_id
),
evidence AS (
    SELECT
        s.user_id,
        s.creator_id,
        count(*) AS n,
        count_if(p.engaged) AS k,
        avg(
            least(
                (u.engaged - pp.engaged + 1) / (u.seen - pp.seen + 2) * coalesce(a.rate, 0.5)
                / greatest(o.rate, 1e-12),
                1 - 1e-9
            )
        ) AS p_bar,
        any_value((u.engaged - pp.engaged + 1) / (u.seen - pp.seen + 2)) AS user_rate_elsewhere
    FROM suspects s
    JOIN per_image p ON p.user_id = s.user_id AND p.creator_id = s.creator_id
    JOIN per_pair pp ON pp.user_id = s.user_id AND pp.creator_id = s.creator_id
    JOIN per_user u ON u.user_id = s.user_id
    LEFT JOIN appeal a ON a.image_id = p.image_id
    CROSS JOIN overall o
    GROUP BY s.user_id, s.creator_id
),
scored AS (
    SELECT
        *,
        CASE
            WHEN k >= n THEN n * ln(p_bar)
            WHEN k::DOUBLE / n <= p_bar THEN 0.0
            ELSE -n * ((k::DOUBLE / n) * ln((k::DOUBLE / n) / p_bar)
                       + (1 - k::DOUBLE / n) * ln((1 - k::DOUBLE / n) / (1 - p_bar)))
        END AS log_tail
    FROM evidence
),
groups AS (
    -- members: the creator's suspects below $suspect_tail, out of all its suspects. If each suspect
    -- fell below it with probability $suspect_tail by chance, that many members or more has a
    -- binomial tail (Chernoff bound again): a creator with a large audience has many suspects, and
    -- a few of them are expected below the level without any coordination.
    SELECT
        creator_id,
        members,
        CASE
            WHEN members::DOUBLE / suspects <= $suspect_tail THEN 0.0
            WHEN members >= suspects THEN suspects * ln($suspect_tail)
            ELSE -suspects * ((members::DOUBLE / suspects) * ln((members::DOUBLE / suspects) / $suspect_tail)
                 + (1 - members::DOUBLE / suspects) * ln((1 - members::DOUBLE / suspects) / (1 - $suspect_tail)))
        END AS group_log_tail
    FROM (
        SELECT creator_id, count(*) AS suspects, count_if(log_tail < ln($suspect_tail)) AS members
        FROM scored
        GROUP BY creator_id
    )
)
SELECT
    sc.user_id,
    sc.creator_id AS boosted_creator,
    sc.n::BIGINT AS seen_images,
    sc.k::BIGINT AS engaged_images,
    sc.user_rate_elsewhere,
    sc.p_bar AS expected_rate,
    exp(sc.log_tail) AS tail,
    coalesce(g.members, 0)::BIGINT AS group_members
FROM scored sc
LEFT JOIN groups g ON g.creator_id = sc.creator_id
WHERE sc.log_tail < ln($max_tail)
   OR (sc.log_tail < ln($suspect_tail) AND g.members >= $min_group AND g.group_log_tail < ln($max_tail))
ORDER BY sc.user_id, sc.creator_id
