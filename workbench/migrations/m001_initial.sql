-- m001: the catalog's base tables and the views SQL users query.
CREATE SEQUENCE IF NOT EXISTS runs_seq START 1;
CREATE SEQUENCE IF NOT EXISTS path_seq START 1;

-- One row per distinct content (SHA-256 of the bytes). Files whose bytes cannot
-- be read at all are keyed by SHA-256 of 'unreadable:' + their path.
CREATE TABLE images (
    image_id      VARCHAR PRIMARY KEY,
    bytes         BIGINT,
    width         INTEGER,          -- after EXIF orientation
    height        INTEGER,
    format        VARCHAR,          -- Pillow's format name of the content (JPEG, PNG, ...)
    mode          VARCHAR,          -- Pillow mode (RGB, L, CMYK, I;16, P, ...)
    n_frames      INTEGER,
    exif_orientation INTEGER,
    status        VARCHAR NOT NULL, -- 'ok' or 'error'
    error         VARCHAR,          -- human-readable reason when status = 'error'
    role          VARCHAR NOT NULL DEFAULT 'instance',  -- 'instance' or 'class_prior'
    -- cheap quality statistics from the same small grayscale decode
    brightness    DOUBLE,           -- mean luminance, 0..255
    contrast      DOUBLE,           -- std of luminance
    blur          DOUBLE,           -- variance of the Laplacian (low = blurry)
    entropy       DOUBLE,           -- Shannon entropy of the 256-bin histogram, bits
    is_grayscale  BOOLEAN,
    first_seen    TIMESTAMP DEFAULT current_timestamp,
    updated_at    TIMESTAMP DEFAULT current_timestamp
);

-- Every path a content was found at. A content may live at several paths.
CREATE TABLE paths (
    path          VARCHAR PRIMARY KEY, -- display path (undecodable bytes shown as \xNN)
    path_bytes    BLOB NOT NULL,       -- exact bytes, for opening the file again
    image_id      VARCHAR NOT NULL,
    size          BIGINT,
    mtime_ns      BIGINT,
    sidecar_mtime_ns BIGINT,           -- mtime of the caption sidecar seen beside it (null: none)
    seq           BIGINT NOT NULL,     -- order first seen; "first path" = lowest seq
    missing       BOOLEAN NOT NULL DEFAULT false,
    first_seen    TIMESTAMP DEFAULT current_timestamp,
    last_seen     TIMESTAMP DEFAULT current_timestamp
);
CREATE INDEX paths_image ON paths(image_id);

-- 64-bit perceptual hashes, stored as unsigned integers.
CREATE TABLE hashes (
    image_id VARCHAR PRIMARY KEY,
    phash    UBIGINT NOT NULL,
    dhash    UBIGINT NOT NULL
);

-- Captions side by side by source: 'sidecar', 'manual', or 'model:<name>'.
CREATE TABLE captions (
    image_id   VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,
    text       VARCHAR NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (image_id, source)
);
-- The user's explicit choice of caption source for an image (overrides the rule).
CREATE TABLE caption_choice (
    image_id VARCHAR PRIMARY KEY,
    source   VARCHAR NOT NULL
);

-- Near-duplicate evidence: one row per matched pair (a < b). Each dedup method replaces its own
-- rows; groups below are recomputed from all pairs together, so methods merge into the same groups.
CREATE TABLE duplicate_pairs (
    image_a  VARCHAR NOT NULL,
    image_b  VARCHAR NOT NULL,
    method   VARCHAR NOT NULL,       -- 'phash' (distance = Hamming bits) or 'embedding' (distance = cosine similarity)
    distance DOUBLE NOT NULL,
    PRIMARY KEY (image_a, image_b, method)
);

-- Duplicate groups: every member of a group, which one is kept and why.
CREATE TABLE duplicates (
    image_id    VARCHAR PRIMARY KEY,
    group_id    BIGINT NOT NULL,     -- numbered by the first-seen path of the group's members
    keeper_id   VARCHAR NOT NULL,
    is_keeper   BOOLEAN NOT NULL,
    method      VARCHAR NOT NULL,    -- how this member joined: 'exact', 'phash', 'embedding'
    distance    DOUBLE,              -- of the pair that joined it: Hamming bits (phash) or cosine similarity (embedding)
    keep_reason VARCHAR              -- for the keeper: why it won
);
-- A keeper chosen by hand wins over the keep policy.
CREATE TABLE keeper_choice (
    image_id VARCHAR PRIMARY KEY
);

-- Exclusions are rows with a reason; files on disk are never touched.
CREATE TABLE exclusions (
    image_id   VARCHAR NOT NULL,
    step       VARCHAR NOT NULL,     -- which step excluded it: 'dedup', 'filter:<rule>', 'manual'
    reason     VARCHAR NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (image_id, step)
);

-- Provenance: every step run with its parameters, counts and time.
CREATE TABLE runs (
    run_id      BIGINT PRIMARY KEY DEFAULT nextval('runs_seq'),
    step        VARCHAR NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    seconds     DOUBLE,
    status      VARCHAR NOT NULL,    -- 'running', 'ok', 'failed', 'cancelled'
    params      JSON,
    counts      JSON,
    error       VARCHAR
);
