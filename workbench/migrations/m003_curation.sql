-- m003: curation: concepts (trigger, class noun, repeats), manual includes, aspect buckets.

-- A concept is what kohya calls a subset folder `N_trigger class`: a trigger token the
-- model learns, the class noun it belongs to (DreamBooth class priors), and how many
-- times each of its images is repeated per epoch.
CREATE TABLE concepts (
    name          VARCHAR PRIMARY KEY,
    trigger_token VARCHAR NOT NULL,
    class_noun    VARCHAR,                     -- NULL: no class (style or plain captions)
    repeats       INTEGER NOT NULL DEFAULT 1 CHECK (repeats >= 1),
    where_sql     VARCHAR,                     -- condition on images_view it was added with, if any
    folder        VARCHAR,                     -- folder it was added with, if any
    created_at    TIMESTAMP DEFAULT current_timestamp
);

-- Which concept an image belongs to (at most one, like a file in one kohya folder).
CREATE TABLE concept_images (
    image_id   VARCHAR PRIMARY KEY,
    concept    VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,               -- 'where', 'folder', 'folder_name' (kohya N_name), 'manual'
    created_at TIMESTAMP DEFAULT current_timestamp
);

-- A manual include wins over filter exclusions (`workbench include`).
CREATE TABLE manual_includes (
    image_id   VARCHAR PRIMARY KEY,
    created_at TIMESTAMP DEFAULT current_timestamp
);

-- kohya-style aspect bucket of each dataset image for the settings of the last
-- `workbench buckets` run (the table is cleared per run; settings kept per row).
CREATE TABLE aspect_buckets (
    image_id          VARCHAR PRIMARY KEY,
    bucket_width      INTEGER NOT NULL,
    bucket_height     INTEGER NOT NULL,
    resized_width     INTEGER NOT NULL,        -- image scaled to cover the bucket
    resized_height    INTEGER NOT NULL,
    crop_left         INTEGER NOT NULL,        -- centre crop of the resized image to the bucket
    crop_top          INTEGER NOT NULL,
    resolution_width  INTEGER NOT NULL,
    resolution_height INTEGER NOT NULL,
    min_bucket_reso   INTEGER NOT NULL,
    max_bucket_reso   INTEGER NOT NULL,
    bucket_reso_steps INTEGER NOT NULL,
    no_upscale        BOOLEAN NOT NULL,
    created_at        TIMESTAMP DEFAULT current_timestamp
);
