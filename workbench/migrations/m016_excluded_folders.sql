-- Folders excluded by hand (`workbench exclude --folder`), with the reason: a standing rule, as a concept's --folder
-- is. Ingest excludes the files it reads under one later (a photo added to `0_old drafts` stays out); `workbench
-- include --folder` drops the rule. Paths are absolute, as ingest records them.
CREATE TABLE excluded_folders (
    folder     VARCHAR PRIMARY KEY,
    reason     VARCHAR NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp
);
