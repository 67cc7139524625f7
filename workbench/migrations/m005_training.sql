-- m005: class-prior images and training runs (issue 4).

-- Generated DreamBooth class images: which prompt, seed and base model made each one.
-- The image itself is a normal catalog image with images.role = 'class_prior'.
CREATE TABLE class_priors (
    image_id     VARCHAR PRIMARY KEY,
    class_prompt VARCHAR NOT NULL,
    seed         BIGINT NOT NULL,      -- the per-image seed; index i uses base seed + i
    model        VARCHAR NOT NULL,     -- base model that generated it (priors must match the trained model)
    concept      VARCHAR,              -- the concept it was generated for, when per concept
    created_at   TIMESTAMP DEFAULT current_timestamp
);

-- One row per training run, linked to its provenance row in `runs`.
CREATE SEQUENCE IF NOT EXISTS training_runs_seq START 1;
CREATE TABLE training_runs (
    train_id     BIGINT PRIMARY KEY DEFAULT nextval('training_runs_seq'),
    run_id       BIGINT,               -- runs.run_id of the step run
    mode         VARCHAR NOT NULL,     -- 'lora', 'dreambooth', 'finetune'
    model        VARCHAR NOT NULL,
    status       VARCHAR NOT NULL,     -- 'running', 'ok', 'failed', 'cancelled'
    config       JSON,                 -- the full TrainConfig
    image_ids    VARCHAR[],            -- dataset snapshot: instance images trained on
    class_image_ids VARCHAR[],         -- class-prior images used (dreambooth)
    output_dir   VARCHAR,
    outputs      JSON,                 -- name -> path of every file written
    steps        INTEGER,
    final_loss   DOUBLE,
    seconds      DOUBLE,
    clip_score   DOUBLE,               -- mean CLIP score (100 × cosine) of samples vs their prompts
    cmmd         DOUBLE,               -- CLIP-embedding MMD between samples and training images
    fid          DOUBLE,               -- only when Inception weights are present locally
    metrics      JSON,                 -- everything the evaluation measured
    error        VARCHAR,
    started_at   TIMESTAMP DEFAULT current_timestamp,
    finished_at  TIMESTAMP
);
