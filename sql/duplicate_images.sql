-- duplicate_images: image rows whose bytes another partition owns (image_copies.sql), in the
-- columns of the rejects table: they are rejected as "duplicate image" at the collection level.
SELECT d.source, 'ingest' AS stage, 'duplicate image' AS reason,
       'same bytes as ' || o.source || ' (partition ' || o."partition" || ')' AS detail,
       d."partition", d.uid
FROM image_copies d
JOIN image_copies o ON o.uid = d.uid AND o.copy = 1
WHERE d.copy > 1
