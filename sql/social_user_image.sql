-- social_user_image: per (user, image, stratum), how many events of each kind the user left, over
-- all accepted events (bots included: the bot rules read this table; is_self marks a creator's
-- events on their own image). What counts for the pairs is filtered downstream
-- (social_image_stratum_counts.sql, social_user_pairs.sql). Input: ev_classified.
SELECT
    user_id,
    image_id,
    prompt_group,
    stratum,
    bool_or(is_self) AS is_self,
    count_if(event = 'impression')::INTEGER AS c_impression,
    count_if(event = 'click')::INTEGER AS c_click,
    count_if(event = 'like')::INTEGER AS c_like,
    count_if(event = 'save')::INTEGER AS c_save,
    count_if(event = 'share')::INTEGER AS c_share,
    count_if(event = 'remix')::INTEGER AS c_remix
FROM ev_classified
WHERE reason IS NULL
GROUP BY user_id, image_id, prompt_group, stratum
