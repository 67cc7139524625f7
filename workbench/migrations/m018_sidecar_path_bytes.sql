-- A bulk edit's sidecar path as bytes, as paths.path_bytes: a file name that is not UTF-8 could not be recorded in
-- the text column (the edit failed after writing the file, and its undo never knew of it). sidecar_path stays,
-- for reading, with undecodable bytes as \xNN escapes.
ALTER TABLE caption_edit_rows ADD COLUMN sidecar_path_bytes BLOB;
UPDATE caption_edit_rows SET sidecar_path_bytes = encode(sidecar_path) WHERE sidecar_path IS NOT NULL;
