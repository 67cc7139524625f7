-- Views are recreated after every migration so they always match the schema.

-- A kept copy with no sidecar or manual caption of its own takes the one of a copy dedup excluded (source
-- 'duplicate'): the .txt is often beside the JPEG while the PNG wins on quality. A view, so it follows the copy's
-- caption as that changes. Of several copies: a manual caption first, then the closest copy (pHash, then
-- mirrored, then CLIP; fewest bits, or for CLIP the highest cosine).
CREATE OR REPLACE VIEW carried_captions AS
SELECT image_id, source, text, created_at FROM (
    SELECT d.keeper_id AS image_id, 'duplicate' AS source, c.text, c.created_at,
           row_number() OVER (
               PARTITION BY d.keeper_id
               ORDER BY c.source = 'manual' DESC,
                        CASE d.method WHEN 'phash' THEN 0 WHEN 'mirror' THEN 1 ELSE 2 END,
                        CASE WHEN d.method = 'embedding' THEN -d.distance ELSE d.distance END NULLS LAST,
                        d.image_id
           ) AS pick
    FROM duplicates d JOIN captions c ON c.image_id = d.image_id AND c.source IN ('manual', 'sidecar')
    WHERE NOT d.is_keeper
      AND NOT EXISTS (SELECT 1 FROM captions own WHERE own.image_id = d.keeper_id AND own.source IN ('manual', 'sidecar'))
) WHERE pick = 1;

-- Every caption an image can train with: its own, by source, and a carried one.
CREATE OR REPLACE VIEW caption_candidates AS
SELECT image_id, source, text, created_at FROM captions
UNION ALL
SELECT image_id, source, text, created_at FROM carried_captions;

CREATE OR REPLACE VIEW current_captions AS
SELECT image_id, source AS caption_source, text AS caption FROM (
    SELECT c.*, row_number() OVER (
        PARTITION BY c.image_id
        ORDER BY (ch.source IS NOT NULL) DESC,
                 CASE WHEN c.source = 'manual' THEN 0
                      WHEN c.source = 'sidecar' THEN 1
                      WHEN c.source = 'duplicate' THEN 2
                      ELSE 3 END,
                 c.created_at DESC, c.source
    ) AS rank
    FROM caption_candidates c
    LEFT JOIN caption_choice ch ON ch.image_id = c.image_id AND ch.source = c.source
) WHERE rank = 1;

CREATE OR REPLACE VIEW images_view AS
WITH p AS (
    SELECT image_id,
           -- the first path seen that still exists (else the first seen): the file to open
           coalesce(arg_min(path, seq) FILTER (WHERE NOT missing), arg_min(path, seq)) AS path,
           coalesce(arg_min(path_bytes, seq) FILTER (WHERE NOT missing), arg_min(path_bytes, seq)) AS path_bytes,
           list(path ORDER BY seq) AS paths,
           bool_and(missing) AS all_missing
    FROM paths GROUP BY image_id
), x AS (
    SELECT image_id, string_agg(reason, '; ' ORDER BY step) AS exclusion_reason
    FROM exclusions GROUP BY image_id
), cs AS (
    -- CLIP score (cosine, -1..1) against the CURRENT caption; a score of an older caption is not shown
    SELECT s.image_id, arg_max(s.score, s.created_at) AS clip_score
    FROM clip_scores s JOIN current_captions c ON c.image_id = s.image_id AND s.caption_md5 = md5(c.caption)
    GROUP BY s.image_id
)
SELECT i.image_id, p.path, p.paths, p.path_bytes, i.width, i.height, i.format, i.mode, i.bytes,
       CASE WHEN NOT coalesce(p.all_missing, true) THEN i.status
            WHEN i.replaced_by IS NOT NULL THEN 'replaced'
            ELSE 'missing' END AS status,
       CASE WHEN NOT coalesce(p.all_missing, true) THEN i.error
            WHEN i.replaced_by IS NOT NULL THEN 'edited in place: ' || coalesce(
                (SELECT arg_min(r.path, r.seq) FROM paths r WHERE r.image_id = i.replaced_by), 'its file')
                || ' now holds image ' || left(i.replaced_by, 12)
            ELSE 'file no longer found at any known path' END AS error,
       i.role,
       cc.caption, cc.caption_source,
       d.group_id AS duplicate_group,
       d.is_keeper,
       x.image_id IS NOT NULL AS excluded,
       x.exclusion_reason,
       h.phash, h.dhash,
       i.brightness, i.contrast, i.blur, i.entropy, i.is_grayscale, i.n_frames,
       ci.concept, co.trigger_token AS concept_trigger, co.class_noun AS concept_class,
       co.repeats AS concept_repeats,
       ab.bucket_width, ab.bucket_height, ab.resized_width AS bucket_resized_width,
       ab.resized_height AS bucket_resized_height, ab.crop_left AS bucket_crop_left,
       ab.crop_top AS bucket_crop_top,
       cs.clip_score
FROM images i
LEFT JOIN p ON p.image_id = i.image_id
LEFT JOIN current_captions cc ON cc.image_id = i.image_id
LEFT JOIN duplicates d ON d.image_id = i.image_id
LEFT JOIN x ON x.image_id = i.image_id
LEFT JOIN hashes h ON h.image_id = i.image_id
LEFT JOIN concept_images ci ON ci.image_id = i.image_id
LEFT JOIN concepts co ON co.name = ci.concept
LEFT JOIN aspect_buckets ab ON ab.image_id = i.image_id
LEFT JOIN cs ON cs.image_id = i.image_id;

CREATE OR REPLACE VIEW dataset AS
SELECT * FROM images_view WHERE status = 'ok' AND NOT excluded;
