-- Captions carried from an excluded duplicate to its kept copy are computed by the carried_captions view
-- (views.sql), so they follow the copy's caption; the stored rows an earlier version wrote go.
DELETE FROM captions WHERE source = 'duplicate';
