-- A file edited in place (same path, new bytes) becomes a new image; the old content's row stays
-- (curation never deletes rows) and names the image that replaced it.
ALTER TABLE images ADD COLUMN replaced_by VARCHAR;
