-- pHash of each image mirrored left-right, so dedup finds flipped copies (a flip is the most common
-- repost edit and the flip augmentation of training makes the two one image). Images ingested before
-- this migration get theirs from `workbench dedup`, which reads just those files once.
ALTER TABLE hashes ADD COLUMN phash_mirror UBIGINT;
-- Such pairs are stored in duplicate_pairs with method 'mirror' (distance = Hamming bits between one image's
-- pHash and the other's mirrored pHash).
