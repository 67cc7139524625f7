-- Which base model a training run trained on, beyond the name given to --model (which a Hub update, a replaced
-- folder or another file at the same path can change under it): the folder or file it loaded (for a Hub id, the
-- cached snapshot folder), the Hub commit of that snapshot, and a SHA-256 of the UNet, text encoder and VAE weights
-- as loaded, which a --resume checks. Rows from before m022 keep NULL.
ALTER TABLE training_runs ADD COLUMN model_path VARCHAR;
ALTER TABLE training_runs ADD COLUMN model_revision VARCHAR;
ALTER TABLE training_runs ADD COLUMN model_fingerprint VARCHAR;
