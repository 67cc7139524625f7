-- Tags: labels of the user's own ("to review", "maybe", "hands wrong") that neither exclude an image nor put it in a
-- concept, to mark and find images while curating (`workbench tag`, images_view.tags).
CREATE TABLE image_tags (
    image_id   VARCHAR NOT NULL,
    tag        VARCHAR NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (image_id, tag)
);
