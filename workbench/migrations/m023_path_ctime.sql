-- A file's status-change time (st_ctime) as ingest last saw it. Its size and modification time say whether a file
-- changed, but a tool can put an old mtime back on new bytes (touch -r, rsync --times, an editor that keeps
-- times), and that file was never read again: its new pixels trained with the old caption. The ctime cannot be set
-- back, so a change of it is read as a possible edit (the bytes are hashed; the same bytes stay unchanged), as git's
-- index does. NULL for paths recorded before m023: filled in at the next ingest that sees them.
ALTER TABLE paths ADD COLUMN ctime_ns BIGINT;
