-- Class images the user supplies (real photos, a kohya regularisation set) beside the generated ones: no seed or
-- model made them, so both are NULL; `supplied_from` is the folder they were added from (NULL: generated).
ALTER TABLE class_priors ALTER COLUMN seed DROP NOT NULL;
ALTER TABLE class_priors ALTER COLUMN model DROP NOT NULL;
ALTER TABLE class_priors ADD COLUMN supplied_from VARCHAR;
