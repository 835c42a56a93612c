-- image_copies: every accepted image row of every partition, with its copy number among the rows
-- holding the same bytes (uid). Copy 1 owns the image: the partition registered first (its seq in
-- the partition registry), then partition key and source; later copies are duplicates (reported as
-- rejects, left out of the collection). The rule does not depend on the order partitions finished in.
-- {source}: the images files, read with filename = true; {registry}: (key, seq) of every partition.
SELECT i.* EXCLUDE (filename),
       row_number() OVER (PARTITION BY i.uid ORDER BY r.seq NULLS LAST, i."partition", i.source) AS copy
FROM {source} i
LEFT JOIN {registry} r ON r.key = i."partition"
