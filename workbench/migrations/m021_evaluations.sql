-- Every evaluation of a training run, oldest first: `workbench evaluate` again (another CLIP model, FID once the
-- Inception weights are there) adds a row; training_runs' clip_score, cmmd, fid and metrics hold the newest.
CREATE SEQUENCE evaluations_seq;
CREATE TABLE evaluations (
    evaluation_id BIGINT PRIMARY KEY DEFAULT nextval('evaluations_seq'),
    train_id      BIGINT NOT NULL,
    clip_model    VARCHAR,                  -- the CLIP model that scored
    clip_score    DOUBLE,                   -- 100 × cosine of samples vs their prompts, as in training_runs
    cmmd          DOUBLE,
    fid           DOUBLE,
    metrics       JSON,                     -- everything measured
    evaluated_at  TIMESTAMP DEFAULT current_timestamp
);
-- evaluations made before this table: the one each run kept (its time is not known; the run's end stands in); a
-- failed one, which left only its error in metrics, is no evaluation
INSERT INTO evaluations (train_id, clip_model, clip_score, cmmd, fid, metrics, evaluated_at)
SELECT train_id, metrics->>'clip_model', clip_score, cmmd, fid, metrics, finished_at
FROM training_runs WHERE metrics IS NOT NULL AND metrics->>'error' IS NULL ORDER BY train_id;
