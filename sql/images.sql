-- images: one row per distinct image, from the partition that owns it (see image_copies.sql).
SELECT * EXCLUDE (copy) FROM image_copies WHERE copy = 1
