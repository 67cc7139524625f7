-- The file that was edited in place (its path now holds `replaced_by`): images_view's error names it. NULL for rows
-- from before m013, whose error names the new image's first path as before.
ALTER TABLE images ADD COLUMN replaced_path VARCHAR;
