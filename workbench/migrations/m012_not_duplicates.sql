-- Images the user says are pictures of their own (`workbench keep ID --alone`, the Duplicates screen's a): no stored
-- pair joins them to a duplicate group, whatever its distance; the pairs stay, so `--rejoin` (deleting the row) undoes it.
CREATE TABLE not_duplicates (
    image_id   VARCHAR PRIMARY KEY,
    created_at TIMESTAMP DEFAULT current_timestamp
);
