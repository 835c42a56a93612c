-- A per-partition face table (faces, face_scan, face_expressions) restricted to the rows of the
-- partition that owns each image (image_copies.sql): a duplicate photo in a later partition adds
-- no second copy of its faces. {source}: the table's files, read with filename = true.
SELECT t.* EXCLUDE (filename)
FROM {source} t
SEMI JOIN image_copies o
    ON o.copy = 1 AND o.uid = t.uid
   AND o."partition" = regexp_extract(t.filename, '([^/\\]+)\.parquet$', 1)
