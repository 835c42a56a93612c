-- social_user_activity: per user, accepted events, impressions, positive events, active days and
-- the bot flag. Parameters: $min_events, $max_per_day, $max_positive_ratio. A creator's events on
-- their own images are counted apart (n_self_events) and left out of the bot metrics: they are
-- excluded anyway and would make creators look like bots (every self-engagement is positive).
WITH per_user AS (
    SELECT
        user_id,
        count_if(NOT is_self) AS n_events,
        count_if(NOT is_self AND event = 'impression') AS n_impressions,
        count_if(NOT is_self AND event <> 'impression') AS n_positive,
        count(DISTINCT CASE WHEN NOT is_self THEN CAST(ts AS DATE) END) AS active_days,
        count_if(is_self) AS n_self_events
    FROM ev_classified
    WHERE reason IS NULL
    GROUP BY user_id
)
SELECT
    *,
    n_events / greatest(active_days, 1) AS events_per_day,
    n_positive / greatest(n_impressions, 1) AS positive_ratio,
    n_events >= $min_events
        AND (n_events / greatest(active_days, 1) > $max_per_day
             OR n_positive / greatest(n_impressions, 1) > $max_positive_ratio)
        AS is_bot
FROM per_user
ORDER BY user_id
