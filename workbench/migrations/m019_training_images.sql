-- What each training run trained on, image by image: the caption as trained (before tag shuffle and dropout), the
-- concept, repeats and bucket. The catalog's captions and buckets move on (edits, a re-ingest of a changed sidecar,
-- `workbench buckets` again); these rows keep what the run used, so runs can be compared and reproduced in SQL.
CREATE TABLE training_images (
    train_id      INTEGER NOT NULL,
    image_id      VARCHAR NOT NULL,
    role          VARCHAR NOT NULL,           -- 'instance', or 'class_prior' (DreamBooth class images)
    caption       VARCHAR,                    -- class images: their class prompt
    concept       VARCHAR,
    repeats       INTEGER,
    bucket_width  INTEGER,
    bucket_height INTEGER,
    PRIMARY KEY (train_id, image_id, role)
);
