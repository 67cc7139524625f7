-- How each class prior was made. A prior set is (class prompt, model, these settings): priors of another size, step
-- count, guidance scale or sampler are another set, and never reused in silence. Rows recorded before m010 keep NULL
-- here (it was not recorded): they still count for every set of their prompt and model, so upgrading regenerates
-- nothing, and training names those smaller than its resolution (pipelines/priors.py: prior_set_where).
ALTER TABLE class_priors ADD COLUMN resolution INTEGER;      -- the size sampled, px (square)
ALTER TABLE class_priors ADD COLUMN steps INTEGER;           -- sampling steps
ALTER TABLE class_priors ADD COLUMN guidance_scale DOUBLE;   -- classifier-free guidance scale
ALTER TABLE class_priors ADD COLUMN sampler VARCHAR;         -- the diffusers scheduler class sampled with, e.g. DDIMScheduler
