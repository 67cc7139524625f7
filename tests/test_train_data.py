"""What training reads from the catalog: the images whose files still hold what ingest read."""

from __future__ import annotations

import os

import pytest
from train_fixtures import fast_config, ingest_images

from pipelines.train.data import DataError, openable_paths, training_images


def test_a_file_changed_or_deleted_since_ingest_is_left_out_with_a_message(con, tmp_path):
    """Before, an edited file trained with its old caption and bucket, and a file that was no image any more
    crashed the run with a traceback (export already skipped both)."""
    paths = ingest_images(con, tmp_path / "images", 4)
    config = fast_config(tmp_path / "out")
    paths[0].write_bytes(b"oops")  # no image any more
    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: it may hold other pixels
    paths[2].unlink()
    messages = []
    images = training_images(con, config, progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert [i.path for i in images] == [str(paths[3])]
    assert any("3 image(s) left out" in m and "img0.png" in m for m in messages)
    assert set(openable_paths(con, [i.image_id for i in images])) == {images[0].image_id}

    paths[3].unlink()
    with pytest.raises(DataError, match="changed or went away since it was ingested"):
        training_images(con, config)
