"""What training reads from the catalog: the images whose files still hold what ingest read."""

from __future__ import annotations

import os

import pytest
from train_fixtures import fast_config, ingest_images, one_thread, tiny_components  # noqa: F401

from pipelines.train.data import DataError, openable_paths, training_images


def test_a_file_changed_or_deleted_since_ingest_is_left_out_with_a_message(con, tmp_path):
    """Before, an edited file trained with its old caption and bucket, and a file that was no image any more
    crashed the run with a traceback (export already skipped both)."""
    paths = ingest_images(con, tmp_path / "images", 5)
    config = fast_config(tmp_path / "out")
    paths[0].write_bytes(b"oops")  # no image any more
    data = bytearray(paths[1].read_bytes())
    data[-20] ^= 0xFF  # other bytes, the same size
    paths[1].write_bytes(bytes(data))
    paths[2].unlink()
    stat = os.stat(paths[4])
    os.utime(paths[4], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # only touched: the same bytes, still trains
    messages = []
    images = training_images(con, config, progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert sorted(i.path for i in images) == [str(paths[3]), str(paths[4])]
    assert any("3 image(s) left out" in m and "img0.png" in m for m in messages)
    assert set(openable_paths(con, [i.image_id for i in images])) == {i.image_id for i in images}

    paths[3].unlink()
    paths[4].unlink()
    with pytest.raises(DataError, match="changed or went away since it was ingested"):
        training_images(con, config)


def test_a_caption_prefix_is_joined_with_a_separator(con, tmp_path):
    """`caption_prefix=sks` made "sksphoto of zzz"."""
    ingest_images(con, tmp_path / "images", 2)
    captions = {i.caption for i in training_images(con, fast_config(tmp_path / "out", caption_prefix="sks"))}
    assert captions == {"sks, square 0, red, blue, green", "sks, square 1, red, blue, green"}
    captions = {i.caption for i in training_images(con, fast_config(tmp_path / "out", caption_prefix="sks "))}
    assert captions == {"sks square 0, red, blue, green", "sks square 1, red, blue, green"}
    # the concept's trigger as the prefix is not doubled ("sks, sks, square 0"); another prefix goes after the
    # trigger, which stays in front, where --keep-tokens keeps it
    from pipelines.concepts import added_concept

    added_concept(con, "sks thing", trigger="sks", where="true")
    captions = {i.caption for i in training_images(con, fast_config(tmp_path / "out", caption_prefix="sks"))}
    assert captions == {"sks, square 0, red, blue, green", "sks, square 1, red, blue, green"}
    captions = {i.caption for i in training_images(con, fast_config(tmp_path / "out", caption_prefix="photo of"))}
    assert captions == {"sks, photo of, square 0, red, blue, green", "sks, photo of, square 1, red, blue, green"}


def test_class_priors_made_for_a_lower_resolution_are_named_when_a_run_upscales_them(con, tmp_path):
    """64 px priors of a quick trial were silently upscaled into a 128 px run."""
    from PIL import Image

    from pipelines.priors import ingested_priors, prior_plan
    from pipelines.train.data import class_prior_images

    plan = prior_plan(con, class_prompt="a photo of a dog", model_name="tiny", out_dir=tmp_path / "priors", num_images=2)
    for shade, path in enumerate(plan.to_generate.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (shade * 90, 80, 80)).save(path)
    ingested_priors(con, plan, dict(plan.to_generate))
    for resolution, named in ((32, False), (64, True)):
        messages = []
        pools = class_prior_images(con, fast_config(tmp_path / "out", resolution=resolution), {"a photo of a dog": 2}, "tiny",
                                   progress=lambda **kw: messages.append(kw.get("message") or ""))
        assert len(pools["a photo of a dog"]) == 2
        assert any("2 class prior(s)" in m and "smaller than 64 px" in m for m in messages) == named


def test_images_without_a_caption_are_counted_in_one_message(con, tmp_path):
    """21 of 27 sample images trained on an empty caption and nothing said so."""
    paths = ingest_images(con, tmp_path / "images", 3)
    paths[0].with_suffix(".txt").unlink()
    from pipelines.ingest import ingested_images

    ingested_images(con, [tmp_path / "images"], workers=1)
    messages = []
    images = training_images(con, fast_config(tmp_path / "out"), progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert sorted(i.caption for i in images)[0] == ""
    assert any("1 of 3 image(s) have no caption" in m for m in messages)


def test_the_instance_prompt_is_the_caption_of_every_image_as_in_diffusers_dreambooth(con, tmp_path):
    """`--instance-prompt "a photo of sks dog"` only captioned images that had no caption: with BLIP captions in the
    catalog it did nothing, and nothing said so; diffusers' DreamBooth trains every instance image on it."""
    paths = ingest_images(con, tmp_path / "images", 3)
    paths[0].with_suffix(".txt").unlink()
    from pipelines.ingest import ingested_images

    ingested_images(con, [tmp_path / "images"], workers=1)
    messages = []
    config = fast_config(tmp_path / "out", instance_prompt="a photo of sks dog")
    images = training_images(con, config, progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert [i.caption for i in images] == ["a photo of sks dog"] * 3
    said = [m for m in messages if "instance prompt" in m]
    assert len(said) == 1 and "the captions of 2 of them are not used" in said[0]
    assert not any("have no caption" in m for m in messages)
    assert sorted(i.caption for i in training_images(con, fast_config(tmp_path / "out")))[1:] != ["a photo of sks dog"] * 2
    # in a concept whose trigger it lacks, the prompt still trains as written (a review found "wbk, a photo of sks
    # dog"), and that is said
    from pipelines.concepts import added_concept

    added_concept(con, "wbk cat", trigger="wbk", class_noun="cat", where="true")
    messages.clear()
    images = training_images(con, config, progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert [i.caption for i in images] == ["a photo of sks dog"] * 3
    assert any("does not hold the concept trigger 'wbk'" in m for m in messages), messages


def test_an_image_no_bucket_fits_is_left_out_with_the_fix_named(con, tmp_path):
    """One 40x40 image among many stopped a --bucket-no-upscale run with an error; `workbench buckets` skips it."""
    ingest_images(con, tmp_path / "images", 3, sizes=[(32, 32), (32, 32), (4, 4)])
    messages = []
    config = fast_config(tmp_path / "out", bucket_no_upscale=True)
    images = training_images(con, config, progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert sorted(os.path.basename(i.path) for i in images) == ["img0.png", "img1.png"]
    said = [m for m in messages if "left out: no bucket fits" in m]
    assert len(said) == 1 and "img2.png" in said[0] and "workbench exclude" in said[0] and "bucket_no_upscale = false" in said[0]
    assert len(training_images(con, fast_config(tmp_path / "out"))) == 3  # upscaling allowed: it trains
    con.execute("INSERT INTO exclusions SELECT image_id, 'manual', 'test', now() FROM images WHERE width <> 4")
    with pytest.raises(DataError, match="No image to train on fits a bucket"):
        training_images(con, config)


def test_caption_files_edited_since_ingest_are_named_before_training(con, tmp_path):
    """A kohya user's loop is edit the .txt, train again: the edit never reached training, and nothing said so."""
    paths = ingest_images(con, tmp_path / "images", 3)
    messages = []
    training_images(con, fast_config(tmp_path / "out"), progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert not any("caption file(s) changed" in m for m in messages)
    sidecar = paths[0].with_suffix(".txt")
    sidecar.write_text("sks dog, EDITED caption")
    os.utime(sidecar, ns=(1, 10**18))  # a new mtime, whatever the clock's resolution
    paths[1].with_suffix(".txt").unlink()
    messages = []
    images = training_images(con, fast_config(tmp_path / "out"), progress=lambda **kw: messages.append(kw.get("message") or ""))
    said = [m for m in messages if "caption file(s) changed" in m]
    assert len(said) == 1 and said[0].startswith("2 caption file(s)") and "img0.txt" in said[0] and "workbench ingest" in said[0]
    assert "EDITED" not in " ".join(i.caption for i in images)  # the catalog's captions train until an ingest
    from pipelines.ingest import ingested_images

    ingested_images(con, [tmp_path / "images"], workers=1)
    messages = []
    images = training_images(con, fast_config(tmp_path / "out"), progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert not any("caption file(s) changed" in m for m in messages)
    assert any("EDITED" in i.caption for i in images)


def test_a_caption_file_ingest_left_out_as_not_utf8_is_not_called_changed(con, tmp_path):
    """A Latin-1 .txt that ingest left out (and names at every ingest) made every training run say it changed since
    ingest and advise an ingest, which never cleared it."""
    paths = ingest_images(con, tmp_path / "images", 2)
    paths[0].with_suffix(".txt").write_bytes("café au lait".encode("latin-1"))
    from pipelines.ingest import ingested_images

    assert ingested_images(con, [tmp_path / "images"], workers=1).sidecars_left_out == 1
    messages = []
    training_images(con, fast_config(tmp_path / "out"), progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert not any("caption file(s) changed" in m for m in messages)
    paths[0].with_suffix(".txt").write_text("re-saved as UTF-8: café")  # now it is one to read
    os.utime(paths[0].with_suffix(".txt"), ns=(1, 10**18))
    messages = []
    training_images(con, fast_config(tmp_path / "out"), progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert any(m.startswith("1 caption file(s) changed") for m in messages)


def test_training_sees_the_pixels_the_catalog_measured_for_16_bit_and_transparent_images(con, tmp_path):
    """A 16-bit PNG trained as solid white and a cut-out PNG's transparent area as black (the colour under it),
    while ingest, captioning and CLIP saw grey and white: Pillow's convert("RGB") in the loader."""
    import numpy as np
    from PIL import Image

    from pipelines.caption import open_rgb
    from pipelines.train.data import ItemSpec, TrainImage, load_pixels

    folder = tmp_path / "images"
    folder.mkdir()
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8)  # 0 … 32760 of 65535: dark to mid grey
    Image.fromarray(ramp).save(folder / "wide.png")
    cutout = np.zeros((64, 64, 4), np.uint8)
    cutout[16:48, 16:48] = (200, 30, 30, 255)  # a red square; black under the transparent rest
    Image.fromarray(cutout, "RGBA").save(folder / "cutout.png")
    for name in ("wide.png", "cutout.png"):
        image = TrainImage("x", str(folder / name), "", (64, 64), (64, 64), (0, 0))
        trained = load_pixels(image, ItemSpec(0, "instance", False, (0, 0), None, ""))
        seen = np.asarray(open_rgb(os.fsencode(folder / name)), dtype=np.float32) / 127.5 - 1.0  # what BLIP and CLIP get
        assert np.abs(trained.permute(1, 2, 0).numpy() - seen).max() < 1e-6
    assert trained[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # the cut-out's corner trains white
    wide = load_pixels(TrainImage("x", str(folder / "wide.png"), "", (64, 64), (64, 64), (0, 0)), ItemSpec(0, "instance", False, (0, 0), None, ""))
    assert wide.min() == -1.0 and -0.1 < wide.max() < 0.1  # its full range: black to mid grey, not white


def test_an_image_that_no_longer_decodes_stops_the_run_with_the_fix_named(con, tmp_path, one_thread):
    """A PNG an older ingest recorded 'ok' whose pixel data is corrupt stopped training with Pillow's traceback."""
    from pipelines.train import trained_model

    paths = ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    stat = paths[0].stat()
    data = bytearray(paths[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, and the mtime put back: the catalog takes it for the file it read
    paths[0].write_bytes(bytes(data))
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    image_id = con.execute("SELECT image_id FROM images_view WHERE path = ?", [str(paths[0])]).fetchone()[0]
    with pytest.raises(DataError, match=rf"cannot be decoded: .*workbench exclude {image_id[:12]} --reason corrupt"):
        trained_model(con, fast_config(tmp_path / "run"), components=tiny_components())


def test_a_run_that_buckets_otherwise_than_the_catalog_says_so(con, tmp_path):
    """A kohya review: after `workbench buckets --resolution 512,768` (or --no-upscale at another size) a run at
    --resolution 64 bucketed with its own defaults in silence, while the dataset view and the export showed the
    catalog's buckets."""
    from pipelines.buckets import aspect_buckets

    ingest_images(con, tmp_path / "images", 2, sizes=[(96, 64)])
    said: list[str] = []
    hook = lambda **kw: said.append(kw.get("message") or "")  # noqa: E731
    aspect_buckets(con, resolution=(512, 768))
    training_images(con, fast_config(tmp_path / "run", resolution=64), progress=hook)
    (note,) = [m for m in said if "The catalog's buckets" in m]
    assert "`workbench buckets --resolution 512,768 --min-bucket-reso 256 --max-bucket-reso 1024 --bucket-reso-steps 64`" in note
    assert "makes them this run's" in note and "--resolution 64 --min-bucket-reso 32" in note
    said.clear()
    aspect_buckets(con, resolution=64)
    training_images(con, fast_config(tmp_path / "run", resolution=64), progress=hook)
    assert not [m for m in said if "The catalog's buckets" in m]


def test_bucket_settings_that_fit_no_image_are_said_as_settings(con, tmp_path):
    """A review: `--resolution 64 --bucket_reso_steps 64` said the first image fit no bucket, and advised lowering the
    resolution or allowing upscaling (already allowed), where the settings themselves do not go together."""
    ingest_images(con, tmp_path / "images", 2, sizes=[(64, 64)])
    with pytest.raises(DataError, match=r"The bucket settings do not work together .*min_bucket_reso must be at least "
                                        r"bucket_reso_steps \(64\)"):
        training_images(con, fast_config(tmp_path / "run", resolution=64, bucket_reso_steps=64))


def test_the_drift_a_resume_reports_names_concept_and_repeat_changes():
    """A multi-concept review: a resume after `concept remove` or a new --repeats said only "N captions changed" (or
    nothing at all for repeats)."""
    from pipelines.train.data import TrainImage, snapshot_drift

    def image(image_id, concept, repeats, caption="sks dog"):
        return TrainImage(image_id=image_id, path=f"/{image_id}.png", caption=caption, bucket=(64, 64), resized=(64, 64),
                          crop=(0, 0), concept=concept, repeats=repeats)

    saved = [image("a", "dog", 10), image("b", "dog", 10), image("c", "cat", 5, "ohwx cat"), image("d", None, 1, "x")]
    now = [image("a", "dog", 3), image("b", "dog", 3), image("c", None, 1, "a cat"), image("d", None, 1, "x")]
    assert snapshot_drift(saved, now) == {"added": 0, "removed": 0, "captions changed": 1, "buckets changed": 0,
                                          "in another concept or none": 1, "repeats changed": 2}


def test_a_named_concept_without_images_is_said(con, tmp_path):
    """A multi-concept review: `--concept ghost --concept rex` trained rex with no word on ghost, and `--concept ghost`
    alone said to run `workbench ingest FOLDER`."""
    from pipelines.concepts import added_concept
    from pipelines.train.data import DataError, training_images

    ingest_images(con, tmp_path / "images", 2)
    added_concept(con, "rex", trigger="rx", where="true")
    added_concept(con, "ghost", trigger="gh")
    said = []
    images = training_images(con, fast_config(tmp_path / "run", concepts=["ghost", "rex"]),
                             progress=lambda **kw: said.append(kw.get("message") or ""))
    assert len(images) == 2 and any("concept 'ghost' has no image in the dataset" in m for m in said)
    with pytest.raises(DataError, match="Concept 'ghost' has no image in the dataset"):
        training_images(con, fast_config(tmp_path / "run", concepts=["ghost"]))


def test_the_same_weights_from_another_folder_have_the_same_fingerprint(tmp_path):
    """A README check: the base fingerprint ("a SHA-256 of its weights") hashed the config's _name_or_path too, so the
    tiny model copied to ./mymodel, weights identical, was another model to --resume and to the caches."""
    import shutil

    import torch

    from pipelines.train.data import module_fingerprint
    from workbench.models import component_path, load_sd_components

    shutil.copytree(component_path("tiny", "sd"), tmp_path / "mymodel")
    here, there = load_sd_components("tiny", device="cpu"), load_sd_components(str(tmp_path / "mymodel"), device="cpu")
    assert here.unet.config._name_or_path != there.unet.config._name_or_path
    assert module_fingerprint(here.unet, here.vae) == module_fingerprint(there.unet, there.vae)
    with torch.no_grad():
        there.unet.conv_in.bias.add_(1e-3)
    assert module_fingerprint(here.unet, here.vae) != module_fingerprint(there.unet, there.vae)
