-- m002: CLIP image embeddings and CLIP scores (pipelines/score.py).

-- One L2-normalised open_clip image embedding per image and CLIP model. The width depends on the
-- model (tiny 32, ViT-B/32 512, ViT-L/14 768), so the column is a list and `dim` says its length;
-- cast it to a fixed-size array for DuckDB's array functions, e.g.
--   SELECT image_id, array_cosine_similarity(embedding::FLOAT[512], ?::FLOAT[512]) AS similarity
--   FROM clip_embeddings WHERE model = 'ViT-B-32/laion2b_s34b_b79k' ORDER BY similarity DESC LIMIT 20
CREATE TABLE clip_embeddings (
    image_id   VARCHAR NOT NULL,
    model      VARCHAR NOT NULL,        -- model label: a preset's CLIP ('ViT-B-32/laion2b_s34b_b79k'), 'tiny', ...
    dim        INTEGER NOT NULL,
    embedding  FLOAT[] NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (image_id, model)
);

-- CLIP score of an image against the caption it had when scored: cosine similarity of the
-- normalised image and text embeddings, in [-1, 1] (not torchmetrics' 100 x max(cos, 0)).
-- `caption_md5` = md5(caption text), so a score whose caption has since changed is recognisably stale.
CREATE TABLE clip_scores (
    image_id       VARCHAR NOT NULL,
    model          VARCHAR NOT NULL,
    caption_md5    VARCHAR NOT NULL,
    caption_source VARCHAR,
    score          DOUBLE NOT NULL,
    created_at     TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (image_id, model)
);
