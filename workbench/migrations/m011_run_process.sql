-- Which process runs a step: a 'running' row whose process is gone (killed with SIGKILL, a crash, a power cut)
-- is marked 'interrupted' by the next step run on the same host (workbench/catalog.py: start_run). Rows from before
-- m011 keep NULL and are left as they are.
ALTER TABLE runs ADD COLUMN pid INTEGER;
ALTER TABLE runs ADD COLUMN host VARCHAR;
