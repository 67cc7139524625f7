-- Bulk caption edits (`workbench edit-captions`, the TUI's bulk bar), each with what it replaced so it can be
-- undone after the process that made it has gone: per changed image, the manual caption and choice before the
-- edit, the text the edit wrote, and the sidecar file it wrote (its earlier bytes; NULL: the edit created it).
CREATE SEQUENCE caption_edits_seq;
CREATE TABLE caption_edits (
    edit_id     BIGINT PRIMARY KEY DEFAULT nextval('caption_edits_seq'),
    description VARCHAR NOT NULL,
    made_at     TIMESTAMP DEFAULT current_timestamp,
    undone_at   TIMESTAMP
);
CREATE TABLE caption_edit_rows (
    edit_id           BIGINT NOT NULL,
    image_id          VARCHAR NOT NULL,
    manual_text       VARCHAR,
    manual_created_at TIMESTAMP,
    choice            VARCHAR,
    written_text      VARCHAR NOT NULL,
    sidecar_path      VARCHAR,
    sidecar_previous  BLOB,
    sidecar_written   BLOB,
    PRIMARY KEY (edit_id, image_id)
);
