-- Which life of a run folder a training row belongs to: the id in that folder's dataset.json. A folder deleted and
-- used again for a new run gets a new id, so rows of the deleted run no longer count when a resume there is judged.
ALTER TABLE training_runs ADD COLUMN folder_id VARCHAR;
