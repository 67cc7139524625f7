-- A file's hard-link count as ingest last saw it, beside its ctime (m023): making or removing a hard link to a file
-- (`workbench export --link hardlink` does) moves its ctime without touching its bytes, so a ctime that moved
-- together with the link count is no sign of an edit, and the file is not hashed again.
ALTER TABLE paths ADD COLUMN nlink INTEGER;
