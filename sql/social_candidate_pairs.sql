-- social_candidate_pairs: every unordered pair of images in the same prompt group where both have
-- at least $min_exposure real exposures (distinct counted users shown the image) and are among
-- the group's $max_per_group most exposed images.
-- Input: img_stats(idx, image_id, prompt_group, exposed, group_rank).
SELECT a.idx AS ia, b.idx AS ib
FROM img_stats a
JOIN img_stats b ON a.prompt_group = b.prompt_group AND a.image_id < b.image_id
WHERE a.exposed >= $min_exposure AND b.exposed >= $min_exposure
  AND a.group_rank <= $max_per_group AND b.group_rank <= $max_per_group
ORDER BY a.prompt_group, a.image_id, b.image_id
