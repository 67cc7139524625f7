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
           -- the first path seen that still exists (else the last one it was seen at): the file to open
           coalesce(arg_min(path, seq) FILTER (WHERE NOT missing), arg_max(path, (last_seen, seq))) AS path,
           coalesce(arg_min(path_bytes, seq) FILTER (WHERE NOT missing), arg_max(path_bytes, (last_seen, seq))) AS path_bytes,
           list(path ORDER BY seq) AS paths,
           list(path ORDER BY seq) FILTER (WHERE missing) AS missing_paths,
           bool_and(missing) AS all_missing
    FROM paths GROUP BY image_id
), x AS (
    SELECT image_id, string_agg(reason, '; ' ORDER BY step) AS exclusion_reason, list(step ORDER BY step) AS exclusion_steps
    FROM exclusions GROUP BY image_id
), cs AS (
    -- CLIP score (cosine, -1..1) against the CURRENT caption (a class prior's: its prompt); a score of an older
    -- caption is not shown
    SELECT s.image_id, arg_max(s.score, s.created_at) AS clip_score
    FROM clip_scores s
    LEFT JOIN current_captions c ON c.image_id = s.image_id
    LEFT JOIN class_priors cp ON cp.image_id = s.image_id
    WHERE s.caption_md5 = md5(coalesce(cp.class_prompt, c.caption))
    GROUP BY s.image_id
), t AS (
    SELECT image_id, list(tag ORDER BY tag) AS tags FROM image_tags GROUP BY image_id
)
SELECT i.image_id, p.path, p.paths, coalesce(p.missing_paths, []) AS missing_paths, p.path_bytes, i.width, i.height, i.format, i.mode, i.bytes,
       CASE WHEN NOT coalesce(p.all_missing, true) THEN i.status
            WHEN i.replaced_by IS NOT NULL THEN 'replaced'
            ELSE 'missing' END AS status,
       CASE WHEN NOT coalesce(p.all_missing, true) THEN i.error
            WHEN i.replaced_by IS NOT NULL THEN 'edited in place: ' || coalesce(i.replaced_path,
                (SELECT arg_min(r.path, r.seq) FROM paths r WHERE r.image_id = i.replaced_by), 'its file')
                || ' now holds image ' || left(i.replaced_by, 12)
            ELSE 'file no longer found at any known path' END AS error,
       i.role,
       -- a class prior trains with its class prompt, whatever caption file it came with
       CASE WHEN i.role = 'class_prior' AND cp.class_prompt IS NOT NULL THEN cp.class_prompt ELSE cc.caption END AS caption,
       CASE WHEN i.role = 'class_prior' AND cp.class_prompt IS NOT NULL THEN 'class_prompt' ELSE cc.caption_source END AS caption_source,
       d.group_id AS duplicate_group,
       d.is_keeper,
       x.image_id IS NOT NULL AS excluded,
       x.exclusion_reason,
       x.exclusion_steps,
       h.phash, h.dhash,
       i.brightness, i.contrast, i.blur, i.entropy, i.is_grayscale, i.n_frames,
       ci.concept, co.trigger_token AS concept_trigger, co.class_noun AS concept_class,
       co.repeats AS concept_repeats,
       ab.bucket_width, ab.bucket_height, ab.resized_width AS bucket_resized_width,
       ab.resized_height AS bucket_resized_height, ab.crop_left AS bucket_crop_left,
       ab.crop_top AS bucket_crop_top,
       cs.clip_score,
       coalesce(t.tags, []) AS tags
FROM images i
LEFT JOIN p ON p.image_id = i.image_id
LEFT JOIN current_captions cc ON cc.image_id = i.image_id
LEFT JOIN class_priors cp ON cp.image_id = i.image_id
LEFT JOIN duplicates d ON d.image_id = i.image_id
LEFT JOIN x ON x.image_id = i.image_id
LEFT JOIN hashes h ON h.image_id = i.image_id
LEFT JOIN concept_images ci ON ci.image_id = i.image_id
LEFT JOIN concepts co ON co.name = ci.concept
LEFT JOIN aspect_buckets ab ON ab.image_id = i.image_id
LEFT JOIN cs ON cs.image_id = i.image_id
LEFT JOIN t ON t.image_id = i.image_id;

CREATE OR REPLACE VIEW dataset AS
SELECT * FROM images_view WHERE status = 'ok' AND NOT excluded;

-- Duplicate groups for review, one row per member: the copy kept, how each copy joined (exact, phash, mirror,
-- embedding) and at what distance, and why the keeper won.
CREATE OR REPLACE VIEW duplicate_groups AS
SELECT d.group_id, d.image_id, v.path, d.is_keeper, d.method, d.distance,
       d.keeper_id, kp.path AS keeper_path, k.keep_reason,
       v.width, v.height, v.format, v.bytes, v.excluded, v.exclusion_reason
FROM duplicates d
JOIN images_view v ON v.image_id = d.image_id
LEFT JOIN duplicates k ON k.image_id = d.keeper_id
-- the keeper's path as images_view gives it: the first that still exists (a renamed folder's old path is gone)
LEFT JOIN (SELECT image_id, coalesce(arg_min(path, seq) FILTER (WHERE NOT missing), arg_max(path, (last_seen, seq))) AS path
           FROM paths GROUP BY image_id) kp ON kp.image_id = d.keeper_id;

-- What `SELECT view_name, comment FROM duckdb_views() WHERE NOT internal` and
-- `SELECT column_name, comment FROM duckdb_columns() WHERE table_name = 'images_view'` show (CREATE OR REPLACE drops
-- comments, so they follow the views).
COMMENT ON VIEW images_view IS 'Every image: its file, status, current caption, duplicate group, exclusion, quality stats, concept, bucket and CLIP score';
COMMENT ON VIEW dataset IS 'The images training uses: images_view rows with status ok that are not excluded';
COMMENT ON VIEW duplicate_groups IS 'One row per member of a duplicate group: the kept copy, how each copy joined and why the keeper won';
COMMENT ON VIEW current_captions IS 'The caption each image trains with, and its source (a choice, then manual, sidecar, duplicate, the newest model)';
COMMENT ON VIEW caption_candidates IS 'Every caption an image could train with, by source (its own and one carried from a duplicate)';
COMMENT ON VIEW carried_captions IS 'A caption a kept copy takes from a duplicate that dedup excluded, when it has none of its own';
COMMENT ON COLUMN images_view.image_id IS 'SHA-256 of the file bytes';
COMMENT ON COLUMN images_view.path IS 'The first path seen that still exists (else the last one it was seen at)';
COMMENT ON COLUMN images_view.paths IS 'Every path this image was seen at, in the order first seen';
COMMENT ON COLUMN images_view.missing_paths IS 'Those of its paths where the last ingest found no file (moved or deleted)';
COMMENT ON COLUMN images_view.status IS 'ok, error (unreadable), missing (no known path exists), replaced (edited in place)';
COMMENT ON COLUMN images_view.role IS 'instance (training image) or class_prior (a DreamBooth class image: generated, or supplied with priors --from)';
COMMENT ON COLUMN images_view.caption_source IS 'sidecar, manual, duplicate, model:NAME (auto-caption), or class_prompt (a class prior: its prompt)';
COMMENT ON COLUMN images_view.duplicate_group IS 'Duplicate group id (duplicate_groups view; renumbered by each dedup run: its keeper_id names the group across runs); NULL when unique';
COMMENT ON COLUMN images_view.is_keeper IS 'The copy of its duplicate group that is kept';
COMMENT ON COLUMN images_view.excluded IS 'Out of the dataset: see exclusion_reason (the rows are in exclusions)';
COMMENT ON COLUMN images_view.exclusion_reason IS 'Why, from every step that excluded it (dedup, filter:RULE, manual)';
COMMENT ON COLUMN images_view.exclusion_steps IS 'The steps that excluded it (dedup, filter:RULE, manual), to group by: exclusion_reason names the keeper or value';
COMMENT ON COLUMN images_view.blur IS 'Variance of the Laplacian (low: blurry)';
COMMENT ON COLUMN images_view.entropy IS 'Grey-level entropy in bits (low: flat, little information)';
COMMENT ON COLUMN images_view.brightness IS 'Mean grey level, 0-255';
COMMENT ON COLUMN images_view.contrast IS 'Standard deviation of the grey levels';
COMMENT ON COLUMN images_view.concept_repeats IS 'How many times an epoch repeats the image (kohya repeats)';
COMMENT ON COLUMN images_view.clip_score IS 'CLIP cosine of the image and its current caption (-1..1); NULL until scored for this caption';
COMMENT ON COLUMN images_view.path_bytes IS 'The exact bytes of path (a file name that is not UTF-8 shows \xNN escapes in path)';
COMMENT ON COLUMN images_view.width IS 'Width in pixels, after EXIF rotation (as trained and shown)';
COMMENT ON COLUMN images_view.height IS 'Height in pixels, after EXIF rotation';
COMMENT ON COLUMN images_view.format IS 'File format as Pillow reads it (JPEG, PNG, WEBP, ...)';
COMMENT ON COLUMN images_view.mode IS 'Pillow pixel mode (RGB, RGBA, L, I;16, ...)';
COMMENT ON COLUMN images_view.bytes IS 'File size in bytes';
COMMENT ON COLUMN images_view.error IS 'Why the file could not be read (status error)';
COMMENT ON COLUMN images_view.caption IS 'The caption it trains with: the current source by the caption rule (caption_source)';
COMMENT ON COLUMN images_view.phash IS 'Perceptual hash, 64 bits (Hamming distance: bit_count(xor(a.phash, b.phash)))';
COMMENT ON COLUMN images_view.dhash IS 'Difference hash, 64 bits';
COMMENT ON COLUMN images_view.is_grayscale IS 'No colour: its channels agree';
COMMENT ON COLUMN images_view.n_frames IS 'Frames in the file (animated GIF/WEBP: the first one is used)';
COMMENT ON COLUMN images_view.concept IS 'The concept it belongs to (at most one, as a file sits in one kohya folder)';
COMMENT ON COLUMN images_view.concept_trigger IS 'Its concept''s trigger token';
COMMENT ON COLUMN images_view.concept_class IS 'Its concept''s class noun (DreamBooth class prompt: a photo of a CLASS)';
COMMENT ON COLUMN images_view.bucket_width IS 'Aspect bucket width of the last workbench buckets run (kohya''s)';
COMMENT ON COLUMN images_view.bucket_height IS 'Aspect bucket height of the last workbench buckets run';
COMMENT ON COLUMN images_view.bucket_resized_width IS 'Width it is resized to before the crop to its bucket';
COMMENT ON COLUMN images_view.bucket_resized_height IS 'Height it is resized to before the crop to its bucket';
COMMENT ON COLUMN images_view.bucket_crop_left IS 'Left edge of the centre crop to its bucket, in the resized image';
COMMENT ON COLUMN images_view.tags IS 'Your own labels (workbench tag): they neither exclude nor put in a concept';
COMMENT ON COLUMN images_view.bucket_crop_top IS 'Top edge of the centre crop to its bucket, in the resized image';
