-- social_remix_rings: accounts that remix each other's images in a ring. An edge u -> c: user u
-- remixed at least $min_remixes distinct images posted by creator c (never their own). The edge is
-- mutual when c -> u is an edge too. A user with mutual edges to at least $min_partners creators
-- is flagged: three or more accounts that keep remixing each other. People remix what they are
-- shown, spread over many creators; they rarely remix the same creator again and again, and
-- rarely is that returned. Inputs: user_image (social_user_image.sql), images_ok(image_id, creator_id).
WITH edges AS (
    SELECT u.user_id, i.creator_id
    FROM user_image u
    JOIN images_ok i ON i.image_id = u.image_id
    WHERE u.c_remix > 0 AND NOT u.is_self AND i.creator_id IS NOT NULL
    GROUP BY u.user_id, i.creator_id
    HAVING count(DISTINCT u.image_id) >= $min_remixes
),
mutual AS (
    SELECT a.user_id, a.creator_id AS partner
    FROM edges a
    JOIN edges b ON b.user_id = a.creator_id AND b.creator_id = a.user_id
)
SELECT
    user_id,
    count(*)::BIGINT AS ring_partners,
    string_agg(partner, ',' ORDER BY partner) AS partners
FROM mutual
GROUP BY user_id
HAVING count(*) >= $min_partners
ORDER BY user_id
