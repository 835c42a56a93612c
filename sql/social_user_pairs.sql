-- social_user_pairs: per-user preference pairs from images the user was shown together.
-- A session of a prompt group: one user's counted events on that group's images, split wherever
-- more than $session_gap_s seconds pass without one. Within a session, the winner has a weighted
-- score >= $min_score (each event kind once) and the loser was shown (an impression) and left no
-- positive event. An image the user engaged with in any session is never their loser, so one
-- user's pairs never contradict each other. One row per (user, winner, loser) with the number of
-- sessions that showed them together; at most $max_per_group rows per user and group (most
-- sessions first, then lowest image ids).
-- Inputs: ev_classified, bots(user_id), engaged_groups(user_id, prompt_group): the (user, group)s
-- where the user left a counted positive event (only those can have a winner; keeps this cheap).
WITH ev AS (
    SELECT e.user_id, e.prompt_group, e.image_id, e.event, e.ts
    FROM ev_classified e
    SEMI JOIN engaged_groups g ON g.user_id = e.user_id AND g.prompt_group = e.prompt_group
    WHERE e.reason IS NULL AND NOT (e.is_self AND $exclude_self)
),
marked AS (
    SELECT
        *,
        coalesce(
            epoch(ts) - epoch(lag(ts) OVER (PARTITION BY user_id, prompt_group ORDER BY ts, image_id, event))
                > $session_gap_s,
            true
        )::INTEGER AS starts_session
    FROM ev
),
sessions AS (
    SELECT
        *,
        sum(starts_session) OVER (
            PARTITION BY user_id, prompt_group ORDER BY ts, image_id, event ROWS UNBOUNDED PRECEDING
        ) AS session
    FROM marked
),
per_image AS (
    SELECT
        user_id,
        prompt_group,
        session,
        image_id,
        count_if(event = 'impression') AS impressions,
        count_if(event <> 'impression') AS positives,
        (count_if(event = 'click') > 0)::INTEGER * $w_click + (count_if(event = 'like') > 0)::INTEGER * $w_like
            + (count_if(event = 'save') > 0)::INTEGER * $w_save + (count_if(event = 'share') > 0)::INTEGER * $w_share
            + (count_if(event = 'remix') > 0)::INTEGER * $w_remix AS score
    FROM sessions
    GROUP BY user_id, prompt_group, session, image_id
),
ever_engaged AS (
    SELECT DISTINCT user_id, image_id FROM per_image WHERE positives > 0
),
together AS (
    SELECT
        w.user_id,
        w.prompt_group,
        w.image_id AS winner_image_id,
        l.image_id AS loser_image_id,
        w.score,
        w.impressions AS w_impressions,
        l.impressions AS l_impressions
    FROM per_image w
    JOIN per_image l
      ON l.user_id = w.user_id AND l.prompt_group = w.prompt_group AND l.session = w.session
    ANTI JOIN ever_engaged x ON x.user_id = l.user_id AND x.image_id = l.image_id
    WHERE w.score >= $min_score AND l.impressions > 0
),
pairs AS (
    SELECT
        user_id,
        prompt_group,
        winner_image_id,
        loser_image_id,
        count(*)::BIGINT AS sessions,
        max(score) AS winner_score,
        sum(w_impressions)::BIGINT AS winner_impressions,
        sum(l_impressions)::BIGINT AS loser_impressions
    FROM together
    GROUP BY user_id, prompt_group, winner_image_id, loser_image_id
),
ranked AS (
    SELECT
        *,
        row_number() OVER (
            PARTITION BY user_id, prompt_group ORDER BY sessions DESC, winner_image_id, loser_image_id
        ) AS rn
    FROM pairs
)
SELECT * EXCLUDE (rn)
FROM ranked
WHERE rn <= $max_per_group
ORDER BY user_id, prompt_group, winner_image_id, loser_image_id
