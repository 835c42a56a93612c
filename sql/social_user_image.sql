-- social_user_image: per (user, image, stratum), how many events of each kind the user left,
-- over accepted events that count: not by the image's creator ($exclude_self) and not by a bot.
-- Inputs: ev_classified, bots(user_id).
SELECT
    user_id,
    image_id,
    prompt_group,
    stratum,
    count_if(event = 'impression')::INTEGER AS c_impression,
    count_if(event = 'click')::INTEGER AS c_click,
    count_if(event = 'like')::INTEGER AS c_like,
    count_if(event = 'save')::INTEGER AS c_save,
    count_if(event = 'share')::INTEGER AS c_share,
    count_if(event = 'remix')::INTEGER AS c_remix
FROM ev_classified
WHERE reason IS NULL
  AND NOT (is_self AND $exclude_self)
  AND user_id NOT IN (SELECT user_id FROM bots)
GROUP BY user_id, image_id, prompt_group, stratum
