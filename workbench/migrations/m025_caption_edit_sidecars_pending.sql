-- A bulk edit records the sidecar files it will write before it writes any (caption_edit_rows.sidecar_*), and
-- whether some may still be unwritten: one stopped part way (Ctrl+C, kill -9) is finished by the next edit, and
-- only such an edit's files are looked at again. (m023 and m024 were taken by migrations dropped before release.)
ALTER TABLE caption_edits ADD COLUMN sidecars_pending BOOLEAN DEFAULT false;
