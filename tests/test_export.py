"""Exports: kohya folders + dataset TOML (round trip through import-kohya), HF imagefolder, parquet, path safety."""

from __future__ import annotations

import errno
import json
import os
import shutil
import re
import tomllib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.concepts import added_concept, assign_images_to_concept, concepts_from_folder_names
from pipelines.export import (
    EXPORT_MANIFEST,
    ExportError,
    exported_dataset,
    imported_kohya_dataset_config,
    imported_kohya_folder,
    safe_component,
)
from pipelines.ingest import ingested_images
from workbench.catalog import connect

# Keys sd-scripts' config_util.ConfigSanitizer accepts for DreamBooth-style datasets (transcribed from its
# DATASET_ASCENDABLE / SUBSET_ASCENDABLE / DB_SUBSET_ASCENDABLE / DB_SUBSET_DISTINCT schemas).
KOHYA_SUBSET_KEYS = {
    "color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption", "keep_tokens",
    "keep_tokens_separator", "secondary_separator", "caption_separator", "enable_wildcard", "token_warmup_min",
    "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes", "resize_interpolation",
    "caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate",
    "caption_extension", "class_tokens", "cache_info", "image_dir", "is_reg", "alpha_mask",
}
KOHYA_DATASET_KEYS = {
    "batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso", "min_bucket_reso",
    "validation_seed", "validation_split", "resolution", "network_multiplier", "resize_interpolation",
} | (KOHYA_SUBSET_KEYS - {"image_dir", "is_reg", "alpha_mask"})


def _image(path: Path, size=(64, 48), color=(200, 30, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some texture so images differ
        image.putpixel((x, x % size[1]), (x * 3 % 256, 0, 255))
    image.save(path, **save)
    return path


@pytest.fixture
def curated(con, tmp_path):
    """A small ingested catalog: a kohya concept folder, plain images, an EXIF-rotated JPEG, a nasty name."""
    src = tmp_path / "src"
    _image(src / "10_sks dog" / "a.jpg", color=(10, 200, 10))
    (src / "10_sks dog" / "a.txt").write_text("a photo of sks dog\non grass")
    _image(src / "10_sks dog" / "b.png", color=(10, 10, 200))
    _image(src / "plain" / "c.jpg", color=(120, 120, 20))
    (src / "plain" / "c.txt").write_text("a plain picture")
    _image(src / "plain" / "..weird name?.png", color=(220, 220, 220))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    _image(src / "plain" / "rotated.jpg", size=(64, 32), color=(50, 60, 70), exif=exif)
    # named as a root: a walk skips names starting with "." as hidden files; given by name, a file is read
    ingested_images(con, [src, src / "plain" / "..weird name?.png"], workers=1)
    concepts_from_folder_names(con)
    return src


def _by_name(con) -> dict[str, str]:
    return {Path(p).name: i for i, p in con.execute("SELECT image_id, path FROM images_view").fetchall()}


def _all_files(root: Path) -> list[Path]:
    return [Path(dirpath) / f for dirpath, _, files in os.walk(root) for f in files]


def test_kohya_export_layout_captions_and_dataset_toml(con, curated, tmp_path):
    # a caption on two lines (stored before captions typed here became one line; ingest reads a sidecar's first
    # line only, as kohya does)
    con.execute("INSERT OR REPLACE INTO captions (image_id, source, text) VALUES (?, 'manual', 'a photo of sks dog\non grass')",
                [_by_name(con)["a.jpg"]])
    con.execute("INSERT OR REPLACE INTO caption_choice VALUES (?, 'manual')", [_by_name(con)["a.jpg"]])
    out = tmp_path / "out"
    summary = exported_dataset(con, out, format="kohya")
    assert summary["images"] == 5 and summary["folders"] == 2
    assert summary["captions_joined_to_one_line"] == 1
    folders = sorted(p.name for p in (out / "img").iterdir())
    assert folders == ["10_sks dog", "1_"]  # images without a concept: `1_`, no class tokens
    dog = out / "img" / "10_sks dog"
    captions = {p.stem.rsplit("-", 1)[0]: p.read_text() for p in dog.glob("*.txt")}
    assert captions == {"a": "a photo of sks dog, on grass\n"}  # kohya reads only the first line: lines join as tags
    assert len(list(dog.glob("b-*.png"))) == 1 and not list(dog.glob("b-*.txt"))
    config = tomllib.loads((out / "dataset.toml").read_text())
    assert config["general"]["enable_bucket"] is True
    (dataset,) = config["datasets"]
    assert set(dataset) - {"subsets"} <= KOHYA_DATASET_KEYS
    assert dataset["resolution"] == 512 and dataset["min_bucket_reso"] == 256
    subsets = {Path(s["image_dir"]).name: s for s in dataset["subsets"]}
    for subset in subsets.values():
        assert set(subset) <= KOHYA_SUBSET_KEYS
        assert Path(subset["image_dir"]).is_dir()
    assert subsets["10_sks dog"]["num_repeats"] == 10 and subsets["10_sks dog"]["class_tokens"] == "sks dog"
    assert subsets["1_"]["num_repeats"] == 1 and subsets["1_"]["class_tokens"] == ""


def test_kohya_export_bakes_exif_rotation_and_uses_bucket_settings(con, curated, tmp_path):
    from pipelines.buckets import aspect_buckets

    aspect_buckets(con, resolution=(768, 512), bucket_reso_steps=32, min_bucket_reso=256, max_bucket_reso=1024)
    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    (rotated,) = (out / "img" / "1_").glob("rotated-*")
    assert rotated.suffix == ".png"
    assert Image.open(rotated).size == (32, 64)  # as the catalog measured it, so trainers see the same size
    dataset = tomllib.loads((out / "dataset.toml").read_text())["datasets"][0]
    assert dataset["resolution"] == [768, 512] and dataset["bucket_reso_steps"] == 32


def test_kohya_dataset_toml_leaves_batch_and_tag_shuffle_to_the_command_line_and_names_its_bucket_pitfalls(con, curated, tmp_path):
    """A kohya review: dataset.toml wrote batch_size = 1 and shuffle_caption = false, which beat sd-scripts'
    --train_batch_size and --shuffle_caption (the file wins there); an export with no `workbench buckets` run took
    512 px silently, and a step sd-scripts' SD 1.x trainers refuse (not a multiple of 64) was written without a word."""
    from pipelines.buckets import aspect_buckets

    said: list[str] = []
    hook = lambda **kw: said.append(kw.get("message") or "")  # noqa: E731
    exported_dataset(con, tmp_path / "defaults", format="kohya", progress=hook)
    config = tomllib.loads((tmp_path / "defaults" / "dataset.toml").read_text())
    assert "shuffle_caption" not in config["general"] and "batch_size" not in config["datasets"][0]
    assert any("kohya's bucket defaults (512 px, 256–1024, step 64): no `workbench buckets` run" in m for m in said)
    said.clear()
    aspect_buckets(con, resolution=512, bucket_reso_steps=32)
    exported_dataset(con, tmp_path / "step32", format="kohya", progress=hook)
    assert any("bucket_reso_steps is 32: sd-scripts' SD 1.x/2.x trainers refuse" in m for m in said), said
    said.clear()
    aspect_buckets(con, resolution=512)
    exported_dataset(con, tmp_path / "step64", format="kohya", progress=hook)
    assert not any("bucket" in m for m in said), said


def test_exported_16_bit_and_transparent_images_hold_the_pixels_the_catalog_measured(con, tmp_path):
    """kohya and diffusers read images with Pillow's convert("RGB"): a cut-out exported as RGBA trained black where
    the catalog (and its captions) saw white, and a 16-bit grey would train white."""
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    cutout = np.zeros((48, 64, 4), np.uint8)
    cutout[12:36, 16:48] = (200, 30, 30, 255)
    Image.fromarray(cutout, "RGBA").save(src / "cutout.png")
    Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 8)).save(src / "wide.png")
    _image(src / "plain.png")
    ingested_images(con, [src], workers=1)
    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    written = {p.name.rsplit("-", 1)[0]: p for p in (out / "img" / "1_").glob("*.png")}
    with Image.open(written["cutout"]) as cut:
        assert cut.mode == "RGB" and cut.getpixel((0, 0)) == (255, 255, 255) and cut.getpixel((32, 24)) == (200, 30, 30)
    with Image.open(written["wide"]) as wide:
        assert wide.mode == "L" and wide.getextrema() == (0, 95)  # 0 … 24568 of 65535 (not clipped to 255)
    assert written["plain"].read_bytes() == (src / "plain.png").read_bytes()  # an ordinary image is copied as it is


def test_export_round_trips_through_import_kohya(con, curated, tmp_path):
    added_concept(con, "zz cat", trigger="zz", class_noun="cat", repeats=3)
    assign_images_to_concept(con, "zz cat", [_by_name(con)["c.jpg"]])
    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    before = {
        image_id: (" ".join(caption.split()) if caption else None, repeats or 1, trigger, class_noun)
        for image_id, caption, repeats, trigger, class_noun in con.execute(
            "SELECT image_id, caption, concept_repeats, concept_trigger, concept_class FROM dataset"
        ).fetchall()
    }
    other = connect(tmp_path / "second" / "workbench.duckdb")
    summary = imported_kohya_folder(other, out, workers=1)
    assert summary["concept_folders"] == 2 and summary["folders_without_concept"] == 1
    assert summary["images_assigned_to_concepts"] == 3  # a, b (sks dog) and c (zz cat); the plain two join none
    after = {
        image_id: (caption, repeats or 1, trigger, class_noun)  # no concept: repeats NULL, trained once
        for image_id, caption, repeats, trigger, class_noun in other.execute(
            "SELECT image_id, caption, concept_repeats, concept_trigger, concept_class FROM dataset"
        ).fetchall()
    }
    # files copied as they were keep their content hash; the rotated one was re-encoded
    common = set(before) & set(after)
    assert len(common) == 4
    for image_id in common:
        b_caption, b_repeats, b_trigger, b_class = before[image_id]
        a_caption, a_repeats, a_trigger, a_class = after[image_id]
        assert (a_caption, a_repeats) == (b_caption, b_repeats)
        assert (a_trigger, a_class) == (b_trigger, b_class)  # no concept before: none after either
    # the dataset.toml the export wrote (sd-scripts' --dataset_config) reads back to the same dataset
    from_config = connect(tmp_path / "third" / "workbench.duckdb")
    read = imported_kohya_dataset_config(from_config, out / "dataset.toml", workers=1)
    assert read["subsets"] == 3 and read["images_assigned_to_concepts"] == 3
    assert {row[0]: row[1:] for row in from_config.execute(
        "SELECT image_id, caption, coalesce(concept_repeats, 1), concept_trigger, concept_class FROM dataset").fetchall()} == after
    concepts = "SELECT name, trigger_token, class_noun, repeats FROM concepts ORDER BY name"
    assert from_config.execute(concepts).fetchall() == other.execute(concepts).fetchall()
    other.close()
    from_config.close()


def _kohya_project(root: Path) -> Path:
    """A kohya project laid out by hand: subset folders of any name, named by a dataset config (as the kohya GUI's
    users and sd-scripts' docs write one), with a caption file, a subset without class tokens and a reg subset."""
    for n, (folder, count) in enumerate((("hoge", 3), ("fuga", 2), ("loose", 2), ("reg_human", 4))):
        for i in range(count):
            _image(root / folder / f"{folder}{i}.png", color=(40 * i, 50 * n, 9))
    _image(root / "hoge" / "deeper" / "not_read.png", color=(1, 1, 1))  # sd-scripts reads an image_dir's own files
    (root / "hoge" / "hoge0.txt").write_text("hoge girl, smiling")
    (root / "dataset.toml").write_text(f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = '{root / "hoge"}'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = '{root / "fuga"}'
  class_tokens = 'fuga'
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = '{root / "loose"}'
  num_repeats = 2

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root / "reg_human"}'
  class_tokens = 'human'
""")
    return root / "dataset.toml"


def test_import_kohya_reads_a_dataset_config(con, tmp_path):
    """sd-scripts' --dataset_config names subset folders of any name with their class_tokens and num_repeats: a
    kohya user's project imports from it (a folder import reads only `N_trigger class` names)."""
    config = _kohya_project(tmp_path / "project")
    said: list[str] = []
    summary = imported_kohya_dataset_config(con, config, workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert (summary["new"], summary["subsets"], summary["reg_subsets"], summary["reg_class_images"]) == (7, 3, 1, 4)
    assert con.execute("SELECT name, trigger_token, class_noun, repeats FROM concepts ORDER BY name").fetchall() == [
        ("fuga", "fuga", None, 3), ("hoge girl", "hoge", "girl", 10)]
    rows = con.execute("SELECT role, concept, caption, count(*) FROM images_view GROUP BY ALL").fetchall()
    # class images train by the prompt their class's concepts take priors with, as `reg/1_human` reads
    assert set(rows) == {("class_prior", None, "a photo of a human", 4), ("instance", None, None, 2), ("instance", "fuga", None, 2),
                         ("instance", "hoge girl", None, 2), ("instance", "hoge girl", "hoge girl, smiling", 1)}
    assert any("folder 'loose' has no class tokens" in m and "--repeats 2" in m for m in said), said
    assert any("not imported (batch_size, keep_tokens, resolution, shuffle_caption)" in m for m in said), said
    assert not any("caption file and no" in m for m in said), said
    # the config reads .txt: a .caption file sd-scripts would not read is said (ingest reads it)
    (tmp_path / "project" / "fuga" / "fuga0.caption").write_text("a fuga")
    said.clear()
    imported_kohya_dataset_config(con, config, workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("1 image(s) in " in m and "have a .caption caption file and no .txt" in m for m in said), said
    # the concepts keep their folders: images added there later join them at ingest
    _image(tmp_path / "project" / "hoge" / "later.png", color=(7, 70, 170))
    ingested_images(con, [tmp_path / "project" / "hoge" / "later.png"], workers=1)
    assert con.execute("SELECT count(*) FROM images_view WHERE concept = 'hoge girl'").fetchone()[0] == 4
    again = imported_kohya_dataset_config(con, config, workers=1)  # nothing new, nothing twice
    assert (again["new"], again["concepts_created"], again["images_assigned_to_concepts"]) == (0, 0, 0)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 12


@pytest.mark.parametrize("old, new, said", [
    ("num_repeats = 3", "num_repeats = 0", "num_repeats must be a whole number of at least 1, not 0"),
    ("class_tokens = 'human'", "", "a regularisation subset without class_tokens"),
    ("[[datasets]]", "[[datasets]", "is not valid TOML"),
    ("image_dir = '", "image_dir = 'nowhere/", "is not a folder"),
    ("is_reg = true", "is_reg = true\n  metadata_file = 'meta.json'", "a fine-tuning subset (metadata_file)"),
])
def test_a_dataset_config_it_cannot_read_as_kohya_does_is_refused_with_nothing_changed(catalog_path, con, tmp_path, old, new, said):
    from workbench.cli import app

    config = _kohya_project(tmp_path / "project")
    broken = config.read_text().replace(old, new, 1)
    config.write_text(broken)
    before = con.execute("SELECT count(*) FROM images").fetchone()[0]
    con.close()
    result = CliRunner().invoke(app, ["import-kohya", str(config), "--catalog", str(catalog_path)])
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert "Nothing was imported" in " ".join(result.output.split())
    with connect(catalog_path) as after:
        assert after.execute("SELECT count(*) FROM images").fetchone()[0] == before
    fresh = tmp_path / "fresh.duckdb"
    assert CliRunner().invoke(app, ["import-kohya", str(config), "--catalog", str(fresh)]).exit_code == 2
    assert not fresh.exists()  # refused before a catalog is made


def test_nasty_names_never_escape_out(con, curated, tmp_path):
    ids = _by_name(con)
    # `concept add` refuses a slash in a trigger now; a catalog edited with `sql --write` may still hold one
    con.execute("INSERT INTO concepts (name, trigger_token, class_noun, repeats) VALUES ('../../etc', '../../etc', ?, 2)",
                ["..\\..\\x"])
    assign_images_to_concept(con, "../../etc", [ids["c.jpg"], ids["..weird name?.png"]])
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', ?)",
                [ids["c.jpg"], "../../../etc/passwd\n\x00 line"])
    out = tmp_path / "deep" / "out"
    exported_dataset(con, out, format="kohya")
    exported_dataset(con, tmp_path / "deep" / "hf", format="imagefolder")
    root = (tmp_path / "deep").resolve()
    # "../../etc" from deep/out would land in tmp_path/etc: every new file must be under out/ or hf/
    allowed = [root / "out", root / "hf", (tmp_path / "src").resolve(), (tmp_path / "project").resolve()]
    stray = [f for f in _all_files(tmp_path) if not any(f.resolve().is_relative_to(a) for a in allowed)]
    assert stray == []
    for f in _all_files(root):
        assert ".." not in f.relative_to(root).parts
        assert not f.name.startswith(".") or f.name == EXPORT_MANIFEST  # nasty names never make hidden files
        assert f.is_file() and not f.is_symlink()
    folders = [p.name for p in (out / "img").iterdir()]
    assert "2__.._etc .._.._x" in folders  # slashes replaced, leading dots dropped: one harmless component
    toml = tomllib.loads((out / "dataset.toml").read_text())
    tokens = {s["class_tokens"] for s in toml["datasets"][0]["subsets"]}
    assert "../../etc ..\\..\\x" in tokens  # the TOML keeps the real tokens; only paths are sanitized
    caption_files = list((out / "img" / "2__.._etc .._.._x").glob("c-*.txt"))
    assert caption_files[0].read_text() == "../../../etc/passwd, \x00 line\n"
    assert safe_component("../../etc") == "_.._etc"
    assert safe_component("..") == "_" and safe_component("") == "_"
    assert "/" not in safe_component("a/b\\c\x00d")


def test_imagefolder_export_loads_with_datasets(con, curated, tmp_path):
    import datasets

    out = tmp_path / "hf"
    summary = exported_dataset(con, out, format="imagefolder")
    assert summary["images"] == 5
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert len(loaded) == 5
    texts = {row["image_id"]: row["text"] for row in loaded}
    # what training trains each on: its caption, else its concept's "trigger class", else "" (never null)
    expected = dict(con.execute("SELECT image_id, coalesce(caption, concept_trigger || ' ' || concept_class, '') "
                                "FROM dataset").fetchall())
    assert texts == expected
    sizes = {row["image_id"]: row["image"].size for row in loaded}
    catalog_sizes = {i: (w, h) for i, w, h in con.execute("SELECT image_id, width, height FROM dataset").fetchall()}
    assert sizes == catalog_sizes


def test_parquet_export_reads_back_with_polars(con, curated, tmp_path):
    import polars as pl

    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'manual', 'test')", [_by_name(con)["b.png"]])
    target = tmp_path / "rows.parquet"
    assert exported_dataset(con, target, format="parquet")["rows"] == 4
    frame = pl.read_parquet(target)
    ids = {i for (i,) in con.execute("SELECT image_id FROM dataset").fetchall()}
    assert set(frame["image_id"]) == ids
    assert {"caption", "concept", "concept_repeats", "bucket_width"} <= set(frame.columns)
    with pytest.raises(ExportError, match="exists"):
        exported_dataset(con, target, format="parquet")
    folder = tmp_path / "pq"
    assert exported_dataset(con, folder, format="parquet")["out"].endswith("dataset.parquet")


def test_overwrite_replaces_the_earlier_export_and_keeps_other_files(con, curated, tmp_path):
    """Images curated out (and whole concept folders) since the last export must not linger for a trainer to find."""
    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    assert (out / "img" / "10_sks dog").is_dir()
    (out / "img" / "my notes.txt").write_text("mine")
    ids = _by_name(con)
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'manual', 'blurry'), (?, 'manual', 'blurry')",
                [ids["a.jpg"], ids["b.png"]])
    summary = exported_dataset(con, out, format="kohya", overwrite=True)
    assert summary["earlier_export_files_removed"] > 0
    assert not (out / "img" / "10_sks dog").exists()  # its two images are excluded now
    assert (out / "img" / "my notes.txt").read_text() == "mine"
    images = sorted(p.name for p in out.rglob("*") if p.suffix in (".jpg", ".png"))
    assert len(images) == summary["images"] == 3
    listed = json.loads((out / EXPORT_MANIFEST).read_text())["files"]
    assert "img/my notes.txt" not in listed and "dataset.toml" in listed


def test_export_refuses_non_empty_folder_and_bad_options(con, curated, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        exported_dataset(con, out, format="kohya")
    exported_dataset(con, out, format="kohya", overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="format"):
        exported_dataset(con, tmp_path / "x", format="zip")
    with pytest.raises(ExportError, match="link"):
        exported_dataset(con, tmp_path / "x", link="symlink")
    con.execute("INSERT INTO exclusions (image_id, step, reason) SELECT image_id, 'manual', 'test' FROM images")
    with pytest.raises(ExportError, match="empty"):
        exported_dataset(con, tmp_path / "empty", format="kohya")
    assert not (tmp_path / "empty").exists()


def test_export_and_import_cli(catalog_path, con, curated, tmp_path):
    from workbench.cli import app

    con.close()
    runner = CliRunner()
    out = tmp_path / "cli_out"
    result = runner.invoke(app, ["export", "--format", "kohya", "--link", "hardlink", str(out), "--catalog", str(catalog_path)])
    assert result.exit_code == 0, result.output
    assert (out / "dataset.toml").exists()
    result = runner.invoke(app, ["export", "--format", "kohya", str(out), "--catalog", str(catalog_path)])
    assert result.exit_code == 2 and "not empty" in " ".join(result.output.split())
    linked = next((out / "img" / "10_sks dog").glob("a-*.jpg"))
    assert linked.stat().st_ino == (curated / "10_sks dog" / "a.jpg").stat().st_ino  # hardlinked, not copied
    second = tmp_path / "second.duckdb"
    result = runner.invoke(app, ["import-kohya", str(out), "--workers", "1", "--catalog", str(second)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["import-kohya", str(curated / "plain"), "--catalog", str(second)])
    assert result.exit_code == 2 and "no kohya subset folders" in " ".join(result.output.split())
    typo = runner.invoke(app, ["import-kohya", str(tmp_path / "nowhere"), "--catalog", str(tmp_path / "typo.duckdb")])
    assert typo.exit_code == 2 and "is neither a folder nor a kohya dataset config" in " ".join(typo.output.split()) and not (tmp_path / "typo.duckdb").exists()


def test_class_priors_go_to_reg_and_missing_files_are_skipped(con, curated, tmp_path):
    ids = _by_name(con)
    prior = _image(tmp_path / "priors" / "p1.png", color=(1, 2, 3))
    ingested_images(con, [prior.parent], workers=1)
    prior_id = _by_name(con)["p1.png"]
    con.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [prior_id])
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", repeats=10)
    con.execute("INSERT INTO concept_images (image_id, concept, source) VALUES (?, 'sks dog', 'manual')", [prior_id])
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'a dog on a sofa')", [ids["b.png"]])
    (curated / "plain" / "c.jpg").unlink()  # gone since ingest
    out = tmp_path / "out"
    messages = []
    summary = exported_dataset(con, out, format="kohya", progress=lambda **kw: messages.append(kw.get("message")))
    assert summary["missing_files_skipped"] == 1
    # "a photo of sks dog" has the trigger, "a dog on a sofa" does not (and the prior needs none)
    assert summary["captions_without_trigger"] == 1
    assert any(m and "lack their trigger" in m for m in messages)
    assert [p.name for p in (out / "reg").iterdir()] == ["1_dog"]
    subsets = tomllib.loads((out / "dataset.toml").read_text())["datasets"][0]["subsets"]
    reg = [s for s in subsets if s.get("is_reg")]
    assert len(reg) == 1 and reg[0]["class_tokens"] == "dog" and reg[0]["num_repeats"] == 1
    assert not list((out / "img").rglob(f"c-{ids['c.jpg'][:12]}*"))


def test_generated_priors_get_one_reg_folder_per_class_prompt_captioned_by_it(con, curated, tmp_path):
    """Priors from `workbench priors` carry their prompt: it names the reg subset and is each image's caption."""
    for i in range(3):
        _image(tmp_path / "priors" / f"p{i}.png", color=(10 * i, 2, 3))
    ingested_images(con, [tmp_path / "priors"], workers=1)
    ids = _by_name(con)
    prompts = {"p0.png": "a photo of a dog", "p1.png": "a photo of a dog", "p2.png": "a photo of a cat"}
    for seed, (name, prompt) in enumerate(prompts.items()):
        con.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [ids[name]])
        con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model) VALUES (?, ?, ?, 'tiny')",
                    [ids[name], prompt, seed])
    added_concept(con, "zz cat", trigger="zz", class_noun="cat")  # a concept of each class: their class images train
    assign_images_to_concept(con, "zz cat", [ids["c.jpg"]])
    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    assert sorted(p.name for p in (out / "reg").iterdir()) == ["1_a photo of a cat", "1_a photo of a dog"]
    dog = out / "reg" / "1_a photo of a dog"
    assert sorted(p.read_text() for p in dog.glob("*.txt")) == ["a photo of a dog\n"] * 2
    subsets = tomllib.loads((out / "dataset.toml").read_text())["datasets"][0]["subsets"]
    assert sorted(s["class_tokens"] for s in subsets if s.get("is_reg")) == ["a photo of a cat", "a photo of a dog"]
    back_con = connect(tmp_path / "back.duckdb")
    back = imported_kohya_folder(back_con, out, workers=1)
    # kohya's regularisation images come back as class images you supplied, each with its folder's prompt
    assert back["reg_class_images"] == 3 and back["reg_images_left_out"] == 0
    assert dict(back_con.execute("SELECT class_prompt, count(*) FROM class_priors WHERE supplied_from IS NOT NULL "
                                 "GROUP BY 1").fetchall()) == {"a photo of a dog": 2, "a photo of a cat": 1}
    assert back_con.execute("SELECT count(*) FROM concept_images WHERE image_id IN (SELECT image_id FROM class_priors)").fetchone()[0] == 0
    # given its img/ (the folder kohya's train_data_dir names), the reg/ beside it is read too: it was left out silently
    messages = []
    from_img = connect(tmp_path / "from_img.duckdb")
    again = imported_kohya_folder(from_img, out / "img", workers=1, progress=lambda **kw: messages.append(kw.get("message")))
    assert again["reg_class_images"] == 3 and any(m and "beside img/" in m for m in messages)
    assert from_img.execute("SELECT count(*) FROM class_priors").fetchone()[0] == 3


def test_no_upscale_export_leaves_out_images_kohya_cannot_bucket(con, curated, tmp_path):
    from pipelines.buckets import aspect_buckets

    _image(tmp_path / "tiny" / "t.png", size=(24, 24))
    ingested_images(con, [tmp_path / "tiny"], workers=1)
    summary = aspect_buckets(con, no_upscale=True, bucket_reso_steps=32)
    assert summary["skipped"] == 1
    result = exported_dataset(con, tmp_path / "out", format="kohya")
    assert result["too_small_for_no_upscale"] == 1 and result["images"] == 5
    dataset = tomllib.loads((tmp_path / "out" / "dataset.toml").read_text())["datasets"][0]
    assert dataset["bucket_no_upscale"] is True and dataset["bucket_reso_steps"] == 32


def test_overwrite_never_deletes_files_the_catalog_reads_images_from(con, curated, tmp_path):
    """An export ingested back (or `import-kohya OUT`), with the originals gone, is the only copy of its images:
    an --overwrite export into it is refused before anything is deleted (before, it deleted them and then
    skipped every image as missing)."""
    import shutil

    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    imported_kohya_folder(con, out, workers=1)  # (ingest leaves an export folder out, even named: import-kohya reads it)
    shutil.rmtree(curated)
    ingested_images(con, [curated.parent], workers=1)  # the catalog now reads these images from OUT only
    before = sorted(_all_files(out))
    with pytest.raises(ExportError, match="reads images from.*Export to another folder"):
        exported_dataset(con, out, format="kohya", overwrite=True)
    assert sorted(_all_files(out)) == before
    again = exported_dataset(con, tmp_path / "elsewhere", format="kohya")
    assert again["images"] == 5 and again["missing_files_skipped"] == 0


def test_overwrite_into_the_photo_folder_reached_through_a_link_is_refused(con, tmp_path):
    """A review: with the photos ingested through a link (`alias -> data/set`), `export … data/set --overwrite` was
    let through, and the export marker it left there kept every later ingest out of the photo folder."""
    photos = tmp_path / "data" / "set"
    _image(photos / "a.png", color=(1, 2, 3))
    (tmp_path / "alias").symlink_to(photos)
    ingested_images(con, [tmp_path / "alias"], workers=1)
    before = sorted(_all_files(photos))
    with pytest.raises(ExportError, match="reads images from.*Export to another folder"):
        exported_dataset(con, photos, format="kohya", overwrite=True)
    assert sorted(_all_files(photos)) == before


def test_a_file_changed_since_ingest_is_skipped_not_exported_under_its_old_caption(con, curated, tmp_path):
    """Same path, other bytes (edited or replaced, not ingested again): its caption and bucket belong to the old image."""
    _image(curated / "plain" / "c.jpg", size=(80, 80), color=(0, 0, 0))
    messages = []
    summary = exported_dataset(con, tmp_path / "out", format="kohya", progress=lambda **kw: messages.append(kw.get("message")))
    assert summary["changed_files_skipped"] == 1 and summary["images"] == 4
    assert any(m and "c.jpg: changed since it was ingested (run ingest again)" in m for m in messages)
    assert not list((tmp_path / "out").rglob("c-*"))
    ingested_images(con, [curated], workers=1)  # ingest sees the new content; export takes it
    assert exported_dataset(con, tmp_path / "again", format="imagefolder")["changed_files_skipped"] == 0


def test_a_file_only_touched_since_ingest_is_exported(con, curated, tmp_path):
    """`touch` (or a restore from a backup) gives a file a new mtime, not new bytes: export skipped it as `changed
    since it was ingested`. A new time with the same size is checked by the bytes' hash; other bytes are skipped."""
    touched, rewritten = curated / "plain" / "c.jpg", curated / "10_sks dog" / "b.png"
    os.utime(touched, ns=(1_000_000_000, 1_000_000_000))
    size = rewritten.stat().st_size
    data = bytearray(rewritten.read_bytes())
    data[-13] ^= 0xFF  # one byte flipped: the same size, other bytes
    rewritten.write_bytes(bytes(data))
    os.utime(rewritten, ns=(2_000_000_000, 2_000_000_000))
    assert rewritten.stat().st_size == size
    messages = []
    summary = exported_dataset(con, tmp_path / "out", format="kohya", progress=lambda **kw: messages.append(kw.get("message")))
    assert summary["changed_files_skipped"] == 1 and summary["images"] == 4
    assert not any(m and "c.jpg" in m for m in messages)
    assert any(m and "b.png: changed since it was ingested (run ingest again)" in m for m in messages)
    assert (tmp_path / "out" / "img" / "1_").is_dir() and list((tmp_path / "out").rglob("c-*.jpg"))


def test_class_priors_excluded_by_automatic_filters_are_exported_as_training_uses_them(con, curated, tmp_path):
    """Quality and size filters are for instance photos: training keeps a prior they exclude, so export does too;
    a manual exclusion drops it from both."""
    _image(tmp_path / "priors" / "p0.png", color=(10, 2, 3))
    _image(tmp_path / "priors" / "p1.png", color=(30, 2, 3))
    ingested_images(con, [tmp_path / "priors"], workers=1)
    ids = _by_name(con)
    for seed, name in enumerate(("p0.png", "p1.png")):
        con.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [ids[name]])
        con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model) VALUES (?, 'a photo of a dog', ?, 'tiny')",
                    [ids[name], seed])
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'filter', 'too small'), (?, 'manual', 'ugly')",
                [ids["p0.png"], ids["p1.png"]])
    exported_dataset(con, tmp_path / "out", format="kohya")
    reg = list((tmp_path / "out" / "reg" / "1_a photo of a dog").glob("*.png"))
    assert [p.name.split("-")[0] for p in reg] == ["p0"]
    # imagefolder: apart from the photos (in train/ they trained as photos, a review found), with their prompt
    import datasets

    summary = exported_dataset(con, tmp_path / "hf", format="imagefolder")
    assert (summary["images"], summary["class_images"]) == (5, 1)
    assert [p.name.split("-")[0] for p in (tmp_path / "hf" / "class_images").glob("*.png")] == ["p0"]
    assert [p.suffix for p in (tmp_path / "hf" / "class_images").iterdir()] == [".png"]  # diffusers opens each as an image
    rows = [json.loads(line) for line in (tmp_path / "hf" / "class_images.jsonl").read_text().splitlines()]
    assert [(row["role"], row["text"]) for row in rows] == [("class_prior", "a photo of a dog")]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert len(loaded) == 5 and {row["role"] for row in loaded} == {"instance"}
    # a subset of one concept keeps the class images of its class (a review: --where dropped reg/ without a word)
    dogs = exported_dataset(con, tmp_path / "dogs", format="kohya", where="concept = 'sks dog'")
    assert dogs["images"] == 3 and [p.name.split("-")[0] for p in (tmp_path / "dogs" / "reg" / "1_a photo of a dog").glob("*.png")] == ["p0"]
    plain = exported_dataset(con, tmp_path / "plain", format="kohya", where="concept IS NULL AND role = 'instance'")
    assert not (tmp_path / "plain" / "reg").exists() and plain["images"] == 3
    assert exported_dataset(con, tmp_path / "only-priors", format="kohya", where="role = 'class_prior'")["images"] == 1


def test_import_kohya_takes_what_kohya_trains_on_and_says_what_it_left_out(con, tmp_path):
    """Only files directly in `N_trigger class/` folders (kohya reads them non-recursively, and folders without a
    repeat count not at all); before, every image below FOLDER was imported, the others as plain dataset images."""
    root = tmp_path / "kohya"
    _image(root / "10_ohwx woman" / "a.png", color=(1, 2, 3))
    (root / "10_ohwx woman" / "a.txt").write_text("ohwx woman smiling")
    _image(root / "10_ohwx woman" / "sub" / "b.png", color=(4, 5, 6))
    _image(root / "notkohya" / "c.png", color=(7, 8, 9))
    _image(root / "0_zero rep" / "d.png", color=(10, 11, 12))
    _image(root / "e.png", color=(13, 14, 15))
    messages = []
    summary = imported_kohya_folder(con, root, workers=1, progress=lambda **kw: messages.append(kw.get("message")))
    assert summary["files_outside_subset_folders"] == 4 and summary["images_assigned_to_concepts"] == 1
    assert con.execute("SELECT path, concept, caption FROM images_view").fetchall() == [
        (str(root / "10_ohwx woman" / "a.png"), "ohwx woman", "ohwx woman smiling")]
    assert sum(1 for m in messages if m and "left out 4 image(s)" in m) == 1
    assert not any(m and m.startswith("0 concept") for m in messages)  # one line about the concepts, not two that disagree


def _sd_scripts_subsets_by_subdirs(train_data_dir: Path) -> list[dict]:
    """sd-scripts' config_util.generate_dreambooth_subsets_config_by_subdirs (`--train_data_dir`), transcribed:
    a subfolder is a subset when int(name.split("_")[0]) >= 1; its class_tokens are the rest joined with "_"."""
    subsets = []
    for subdir in Path(train_data_dir).iterdir():
        if not subdir.is_dir():
            continue
        tokens = subdir.name.split("_")
        try:
            n_repeats = int(tokens[0])
        except ValueError:
            continue
        if n_repeats < 1:
            continue
        subsets.append({"image_dir": str(subdir), "num_repeats": n_repeats, "class_tokens": "_".join(tokens[1:])})
    return subsets


def test_images_without_a_concept_round_trip_without_gaining_one(con, curated, tmp_path):
    """Before, they were exported to `1_images`, which import-kohya read as a concept "images" (trigger "images"),
    and training then prepended "images, " to each of their captions."""
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import training_images

    out = tmp_path / "out"
    exported_dataset(con, out, format="kohya")
    assert sorted(p.name for p in (out / "img").iterdir()) == ["10_sks dog", "1_"]
    # kohya still trains on it (1 repeat, empty class tokens: an image without a caption gets an empty one)
    by_dir = {Path(s["image_dir"]).name: s for s in _sd_scripts_subsets_by_subdirs(out / "img")}
    assert by_dir["1_"] == {"image_dir": str(out / "img" / "1_"), "num_repeats": 1, "class_tokens": ""}
    assert len([p for p in (out / "img" / "1_").iterdir() if p.suffix != ".txt"]) == 3

    other = connect(tmp_path / "k2.duckdb")
    summary = imported_kohya_folder(other, out, workers=1)
    assert summary["files_outside_subset_folders"] == 0 and summary["new"] == 5
    assert [c for (c,) in other.execute("SELECT name FROM concepts ORDER BY name").fetchall()] == ["sks dog"]
    rows = other.execute("SELECT caption, concept, concept_trigger FROM dataset ORDER BY path").fetchall()
    plain = [(caption, trigger) for caption, concept, trigger in rows if concept is None]
    assert sorted(plain, key=repr) == sorted([(None, None), (None, None), ("a plain picture", None)], key=repr)
    captions = sorted(image.caption for image in training_images(other, TrainConfig(resolution=64)))
    assert captions == ["", "", "a photo of sks dog", "a plain picture", "sks dog"]
    other.close()


def test_import_kohya_reads_a_plain_subset_folder_and_says_its_repeats_are_not_kept(con, tmp_path):
    root = tmp_path / "kohya"
    _image(root / "3_" / "a.png", color=(1, 2, 3))
    (root / "3_" / "a.txt").write_text("a red square")
    messages = []
    summary = imported_kohya_folder(con, root, workers=1, progress=lambda **kw: messages.append(kw.get("message")))
    assert (summary["folders_without_concept"], summary["concept_folders"], summary["concepts"]) == (1, 0, 0)
    assert con.execute("SELECT caption, concept FROM images_view").fetchall() == [("a red square", None)]
    said = [m for m in messages if m and "'3_' has no class tokens" in m]
    assert len(said) == 1 and "3 repeats are not kept" in said[0]  # once, though ingest's pass says it too
    assert f"workbench concept add NAME --trigger WORD --folder {root / '3_'} --repeats 3" in said[0]
    # FOLDER may itself be the subset folder
    again = imported_kohya_folder(connect(tmp_path / "again.duckdb"), root / "3_", workers=1)
    assert again["new"] == 1 and again["folders_without_concept"] == 1


@pytest.mark.parametrize(
    ("caption", "trigger", "present"),
    [
        ("a photo of a cat", "cat", True),
        ("cat", "cat", True),
        ("cat, sitting, grass", "cat", True),
        ("grass,cat", "cat", True),
        ("the cat's toy", "cat", True),
        ("SKS dog on a sofa", "sks", True),  # CLIP lowercases: the same token
        ("a cathedral at night", "cat", False),  # the substring test found `cat` here
        ("a bobcat", "cat", False),
        ("concatenate", "cat", False),
        ("ohwx  man, smiling", "ohwx man", True),
        ("ohwx manor", "ohwx man", False),
        ("", "sks", False),
    ],
)
def test_caption_has_trigger_is_a_whole_word_test(caption, trigger, present):
    from workbench.text import caption_has_trigger

    assert caption_has_trigger(caption, trigger) is present


def test_training_prepends_a_trigger_found_only_inside_another_word(con, tmp_path):
    """Trigger `cat` in "a cathedral at night" was taken as present (a substring test): the caption trained
    without it. A caption with the trigger as a word stays as it was."""
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import training_images

    src = tmp_path / "src"
    for name, caption, color in (("a", "a cathedral at night", (9, 9, 9)), ("b", "a cat, on grass", (90, 9, 9)),
                                 ("c", "cat", (9, 90, 9))):
        _image(src / "9_cat" / f"{name}.png", color=color)
        (src / "9_cat" / f"{name}.txt").write_text(caption)
    ingested_images(con, [src], workers=1)
    concepts_from_folder_names(con)
    said = []
    captions = {Path(image.path).stem: image.caption for image in training_images(
        con, TrainConfig(resolution=64), progress=lambda **kw: said.append(kw.get("message") or ""))}
    assert captions == {"a": "cat, a cathedral at night", "b": "a cat, on grass", "c": "cat"}
    # said, with how to write it into the captions (a review: kohya trains captions as written, and nothing said so)
    note = next(m for m in said if "lack their concept's trigger word" in m)
    assert note.startswith("1 caption(s)") and "edit-captions --add-token cat --where \"concept = 'cat'\"" in note
    # with --keep-tokens pinning the first tag, a trigger held further on is shuffled like any tag: said (a review)
    (src / "9_cat" / "b.txt").write_text("on grass, cat")
    ingested_images(con, [src], workers=1)
    said.clear()
    training_images(con, TrainConfig(resolution=64, shuffle_tags=True, keep_tokens=1),
                    progress=lambda **kw: said.append(kw.get("message") or ""))
    pinned = next(m for m in said if "after the first 1 tag(s) --keep-tokens pins" in m)
    assert pinned.startswith("1 caption(s)") and "--add-token cat" in pinned


def test_an_export_stopped_part_way_says_so_and_overwrite_replaces_exactly_what_it_wrote(catalog_path, con, curated, tmp_path, monkeypatch):
    """Ctrl+C during an export ended with no word and no manifest: the rerun was refused ("not empty") and --overwrite
    could not know which files were the export's."""
    import pipelines.export as export_mod
    from workbench.cli import app

    runner = CliRunner()
    con.close()  # the CLI opens the catalog itself
    out = tmp_path / "kohya"
    out.mkdir()
    (out / "my notes.txt").write_text("keep me")
    calls = []
    original = export_mod._write_image

    def stop_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(export_mod, "_write_image", stop_on_the_second)
    stopped = runner.invoke(app, ["export", str(out), "--overwrite", "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert stopped.exit_code == 130 and "the export in" in stopped.output and "--overwrite" in stopped.output
    assert f"--catalog {catalog_path}" in " ".join(stopped.output.split())  # the command to copy names its catalog
    manifest = json.loads((out / ".workbench-export.json").read_text())
    assert manifest["finished"] is False and len([f for f in manifest["files"] if f.endswith(".jpg") or f.endswith(".png")]) == 1
    monkeypatch.setattr(export_mod, "_write_image", original)
    again = runner.invoke(app, ["export", str(out), "--overwrite", "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert again.exit_code == 0, again.output
    assert "finished" not in json.loads((out / ".workbench-export.json").read_text())
    assert (out / "my notes.txt").read_text() == "keep me"


def test_captions_without_their_trigger_are_named_a_few_then_how_many_more(con, curated, tmp_path):
    """"1 caption(s) in concept folders lack their trigger word" named no file to fix."""
    ids = _by_name(con)
    for n in range(4):
        _image(curated / "10_sks dog" / f"more{n}.png", color=(40 * n, 9, 9))
        (curated / "10_sks dog" / f"more{n}.txt").write_text(f"a dog, number {n}")
    ingested_images(con, [curated], workers=1)
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'a dog on a sofa')", [ids["b.png"]])
    messages = []
    summary = exported_dataset(con, tmp_path / "out", format="kohya", progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert summary["captions_without_trigger"] == 5
    (note,) = [m for m in messages if "lack their trigger" in m]
    assert f"(img/10_sks dog/b-{ids['b.png'][:12]}.txt, img/10_sks dog/more0-" in note and " and 2 more)" in note
    # with the command that adds it (a review: "add it to their captions" named none)
    assert "workbench edit-captions --add-token sks --where \"concept = 'sks dog'\"" in note, note


def test_the_export_marker_is_written_before_the_first_image(con, curated, tmp_path, monkeypatch):
    """The manifest, which keeps an ingest of a folder above out of the export, was written only at the end: an export
    killed outright (or an ingest while it ran) left a folder of images and caption files that looked like photos."""
    import pipelines.export as export_mod

    out = tmp_path / "data" / "export"
    seen = []
    original = export_mod._write_image

    def look_first(row, target_dir, *args, **kwargs):
        seen.append(json.loads((out / EXPORT_MANIFEST).read_text()))
        return original(row, target_dir, *args, **kwargs)

    monkeypatch.setattr(export_mod, "_write_image", look_first)
    exported_dataset(con, out, format="kohya")
    assert seen and all(manifest["finished"] is False for manifest in seen)
    assert "finished" not in json.loads((out / EXPORT_MANIFEST).read_text())
    # a folder refused as not empty gets no marker (ingest would leave the user's folder out)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "photo.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        exported_dataset(con, busy, format="kohya")
    assert not (busy / EXPORT_MANIFEST).exists()


def test_import_kohya_takes_a_renamed_folders_repeats(con, tmp_path):
    """kohya users change repeats by renaming `10_sks dog` to `20_sks dog`: import-kohya kept 10 and said nothing."""
    from pipelines.concepts import get_concept
    from pipelines.export import imported_kohya_folder

    folder = tmp_path / "set" / "img"
    _image(folder / "10_sks dog" / "a.jpg", color=(200, 10, 10))
    _image(folder / "10_sks dog" / "b.jpg", color=(10, 200, 10))
    imported_kohya_folder(con, tmp_path / "set", workers=1)
    assert get_concept(con, "sks dog").repeats == 10
    (folder / "10_sks dog").rename(folder / "20_sks dog")
    said = []
    imported_kohya_folder(con, tmp_path / "set", workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert get_concept(con, "sks dog").repeats == 20
    assert any("'sks dog': 20 repeats, as its folder now says (it had 10)" in m for m in said), said
    assert not any("which it keeps" in m for m in said), said  # its ingest pass said the opposite first


def test_an_export_says_when_a_reg_folder_mixes_the_class_images_of_several_models(con, curated, tmp_path):
    """Class images of one prompt from the base model and from a trained one went into one reg folder silently."""
    for i in range(3):
        _image(tmp_path / "priors" / f"p{i}.png", color=(10 * i, 2, 3))
    ingested_images(con, [tmp_path / "priors"], workers=1)
    ids = _by_name(con)
    for seed, (name, model) in enumerate({"p0.png": "tiny", "p1.png": "tiny", "p2.png": "/runs/db1/model.safetensors"}.items()):
        con.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [ids[name]])
        con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model) VALUES (?, 'a photo of a dog', ?, ?)",
                    [ids[name], seed, model])
    messages = []
    exported_dataset(con, tmp_path / "out", format="kohya", progress=lambda **kw: messages.append(kw.get("message") or ""))
    said = [m for m in messages if "are 2 generated sets" in m]
    assert len(said) == 1 and "(/runs/db1/model.safetensors; tiny)" in said[0] and "workbench exclude --where" in said[0]
    messages.clear()  # the imagefolder export says it too (a README check found it silent)
    exported_dataset(con, tmp_path / "hf", format="imagefolder", progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert len([m for m in messages if "are 2 generated sets" in m]) == 1
    # the command it gives works: with the other model's images excluded, one set is exported and nothing is said
    from workbench.catalog import catalog_file
    from workbench.cli import app

    runner = CliRunner()

    path = catalog_file(con)
    con.close()
    where = "image_id IN (SELECT image_id FROM class_priors WHERE model = '/runs/db1/model.safetensors')"
    assert runner.invoke(app, ["exclude", "--where", where, "--reason", "other model", "-c", str(path)]).exit_code == 0
    again = connect(path)
    messages.clear()
    exported_dataset(again, tmp_path / "out2", format="kohya", progress=lambda **kw: messages.append(kw.get("message") or ""))
    again.close()
    assert not any("generated sets" in m for m in messages)
    assert len(list((tmp_path / "out2" / "reg" / "1_a photo of a dog").glob("*.png"))) == 2
    # a priors review: sets of one model at two sizes went into one reg folder without a word too
    again = connect(path)
    ids = _by_name(again)
    again.execute("UPDATE class_priors SET resolution = 64, steps = 2 WHERE image_id = ?", [ids["p0.png"]])
    again.execute("UPDATE class_priors SET resolution = 128, steps = 3 WHERE image_id = ?", [ids["p1.png"]])
    messages.clear()
    exported_dataset(again, tmp_path / "out3", format="kohya", progress=lambda **kw: messages.append(kw.get("message") or ""))
    again.close()
    said = [m for m in messages if "are 2 generated sets" in m]
    assert len(said) == 1 and "(tiny at 128 px, 3 steps; tiny at 64 px, 2 steps)" in said[0], messages


def test_export_says_when_caption_files_changed_since_ingest_and_names_stay_on_a_round_trip(con, curated, tmp_path):
    """Training warned of a caption file edited since ingest, export wrote the old caption without a word; a file
    name grew another `-<id>` on every export → import-kohya → export."""
    from pipelines.caption_edits import save_manual_caption
    from workbench.images import sidecars_changed_since_ingest

    ids = _by_name(con)
    # written by the Captions screen's "write sidecar" box: it says the catalog's caption, nothing is stale
    save_manual_caption(con, ids["c.jpg"], "a plain picture, typed", sidecar=True)
    assert (curated / "plain" / "c.txt").read_text() == "a plain picture, typed\n"
    assert sidecars_changed_since_ingest(con, list(ids.values())) == []
    (curated / "plain" / "rotated.txt").write_text("edited by hand")  # added after ingest: stale
    messages = []
    exported_dataset(con, tmp_path / "out", format="kohya", progress=lambda **kw: messages.append(kw.get("message") or ""))
    stale = [m for m in messages if "changed since they were ingested" in m]
    assert len(stale) == 1 and "rotated.txt" in stale[0] and "c.txt" not in stale[0]

    first = sorted(p.name for p in (tmp_path / "out" / "img").rglob("*") if p.is_file())
    again = connect(tmp_path / "again.duckdb")
    imported_kohya_folder(again, tmp_path / "out", workers=1)
    exported_dataset(again, tmp_path / "out2", format="kohya")
    second = sorted(p.name for p in (tmp_path / "out2" / "img").rglob("*") if p.is_file())
    # the same names, but for the rotated JPEG: exported upright as a PNG, it is new content with an id of its own
    assert len(second) == len(first) and set(second) - set(first) == {n for n in second if n.startswith("rotated-")}
    assert all(re.fullmatch(r"[^-]+-[0-9a-f]{12}\.\w+", name) for name in second if not name.startswith("rotated-")), second
    again.close()


def test_two_folders_of_the_same_tokens_keep_their_own_repeats(con, tmp_path):
    """`20_sks dog` (close-ups) beside `5_sks dog` (full body) made one concept: all 5 images trained at 20 repeats
    and the export put them all in `20_sks dog`. kohya trains each folder with its own repeats."""
    from pipelines.concepts import get_concept

    img = tmp_path / "set" / "img"
    for i in range(3):
        _image(img / "20_sks dog" / f"close{i}.jpg", color=(200, 10 * i, 10))
    for i in range(2):
        _image(img / "5_sks dog" / f"body{i}.jpg", color=(10, 10 * i, 200))
    said = []
    imported_kohya_folder(con, tmp_path / "set", workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    first, second = get_concept(con, "sks dog"), get_concept(con, "5_sks dog")
    assert (first.repeats, first.images, first.trigger, first.class_noun) == (20, 3, "sks", "dog")
    assert (second.repeats, second.images, second.trigger, second.class_noun) == (5, 2, "sks", "dog")
    assert any("form concept '5_sks dog' with 5" in m for m in said), said
    exported_dataset(con, tmp_path / "out", format="kohya")
    counts = {d.name: len([f for f in d.iterdir() if f.suffix != ".txt"]) for d in (tmp_path / "out" / "img").iterdir()}
    assert counts == {"20_sks dog": 3, "5_sks dog": 2}
    # importing again changes nothing: neither folder is taken for a renamed one
    said.clear()
    imported_kohya_folder(con, tmp_path / "set", workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert (get_concept(con, "sks dog").repeats, get_concept(con, "5_sks dog").images) == (20, 2)
    assert not any("as its folder now says" in m for m in said), said


def test_an_image_in_two_concept_folders_joins_the_other_when_one_copy_goes(con, tmp_path):
    """The copy in `10_sks dog` deleted, the image left that concept and joined none for good, though its other
    copy sits in `5_ohwx cat` (unchanged, so no ingest read its folder name again)."""
    from pipelines.concepts import get_concept

    data = tmp_path / "data"
    _image(data / "10_sks dog" / "brick.jpg", color=(120, 30, 30))
    (data / "5_ohwx cat").mkdir(parents=True)
    shutil.copy(data / "10_sks dog" / "brick.jpg", data / "5_ohwx cat" / "brick_copy.jpg")
    said = []
    ingested_images(con, [data], workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("also in folder '10_sks dog'" in m for m in said), said  # one image, one concept: said
    assert (get_concept(con, "sks dog").images, get_concept(con, "ohwx cat")) == (1, None)
    (data / "10_sks dog" / "brick.jpg").unlink()
    ingested_images(con, [data], workers=1)
    assert con.execute("SELECT concept, concept_repeats FROM dataset").fetchall() == [("ohwx cat", 5)]


def test_import_kohya_says_what_ingest_says(tmp_path, catalog_path):
    """import-kohya kept one of two differing sidecars of byte-identical copies silently and showed `errors 2` with
    no reason; `ingest` names both (and now an example file of each error reason)."""
    from workbench.cli import app

    sub = tmp_path / "set" / "img" / "10_sks dog"
    _image(sub / "dog0.png", color=(40, 90, 140))
    shutil.copy(sub / "dog0.png", sub / "DOG5.png")
    (sub / "dog0.txt").write_text("caption one")
    (sub / "DOG5.txt").write_text("caption five")
    (sub / "bad.png").write_text("not a picture")
    result = CliRunner().invoke(app, ["import-kohya", str(tmp_path / "set"), "--catalog", str(catalog_path), "--workers", "1"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "byte-identical copies whose caption sidecars differ" in text
    assert "files recorded as errors" in text and "not an image" in text and str(sub / "bad.png") in text


def test_overwrite_replaces_an_export_that_was_killed_outright(con, curated, tmp_path):
    """An export killed with -9 left a manifest listing no files: `--overwrite` exports kept its 444 files for good,
    excluded images among them."""
    from pipelines.filter import manual_exclusions

    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")  # a file of the user's, there before any export
    exported_dataset(con, out, format="kohya", overwrite=True)
    written = sorted(p for p in _all_files(out) if p.name not in ("notes.txt", EXPORT_MANIFEST))
    # what kill -9 leaves: the manifest written before the first image, with the files that were there before
    (out / EXPORT_MANIFEST).write_text(json.dumps({"format": "kohya", "files": [], "finished": False, "files_before": ["notes.txt"]}))
    (out / "model").mkdir()
    (out / "model" / "weights.safetensors").write_text("trained into OUT after the kill: not the export's")
    excluded = _by_name(con)["b.png"]
    manual_exclusions(con, [excluded], "blurry")
    exported_dataset(con, out, format="kohya", overwrite=True)
    assert (out / "model" / "weights.safetensors").is_file()
    now = sorted(p for p in _all_files(out) if p.name not in ("notes.txt", EXPORT_MANIFEST, "weights.safetensors"))
    assert not any(excluded[:12] in p.name for p in now)  # the excluded image's file is gone
    assert len(now) == len(written) - 1 and (out / "notes.txt").read_text() == "mine"


def test_an_exported_name_keeps_a_number_of_its_own(con, tmp_path):
    """A trailing `-<12 hex digits>` was taken for an earlier export's id: `scan-202301011230` lost its timestamp."""
    _image(tmp_path / "src" / "scan-202301011230.png", color=(9, 8, 7))
    ingested_images(con, [tmp_path / "src"], workers=1)
    exported_dataset(con, tmp_path / "out", format="kohya")
    assert [p.name.startswith("scan-202301011230-") for p in (tmp_path / "out" / "img" / "1_").iterdir()] == [True]


def test_a_copy_in_a_second_folder_of_the_same_tokens_moves_to_its_concept_when_the_first_goes(con, tmp_path):
    """An image in `20_sks dog` with a copy in `5_sks dog` stayed in concept `sks dog` (20 repeats) when the first copy
    was deleted: any folder of the tokens kept it, "whatever its repeats"."""
    from pipelines.concepts import get_concept

    img = tmp_path / "img"
    for i in range(2):
        _image(img / "20_sks dog" / f"close{i}.png", color=(200, 10 * i, 10))
    _image(img / "5_sks dog" / "body.png", color=(10, 10, 200))
    shutil.copy(img / "20_sks dog" / "close0.png", img / "5_sks dog" / "copy.png")
    ingested_images(con, [img], workers=1)
    assert (get_concept(con, "sks dog").images, get_concept(con, "5_sks dog").images) == (2, 1)
    (img / "20_sks dog" / "close0.png").unlink()
    ingested_images(con, [img], workers=1)
    concept = con.execute("SELECT concept FROM dataset WHERE path LIKE '%copy.png'").fetchall()
    assert concept == [("5_sks dog",)]
    assert (get_concept(con, "sks dog").images, get_concept(con, "5_sks dog").images) == (1, 2)


def test_one_line_joins_lines_as_tags_and_leaves_a_captions_own_spacing():
    """A review: export counted `solo,  long_hair` as joined to one line (it tidied spaces), and joined two lines
    with a space, making two tags one."""
    from pipelines.export import one_line

    assert one_line("solo,  long_hair") == "solo,  long_hair"
    assert one_line("microphone\n\n second line tag \n") == "microphone, second line tag"
    assert one_line(" \n ") is None and one_line(None) is None


def test_overwrite_deletes_nothing_outside_out_whatever_the_manifest_lists(con, curated, tmp_path, catalog_path):
    """A security review: `export --overwrite` deleted through a folder in OUT linked elsewhere (a catalog image and
    another folder's files), and the catalog itself when the manifest listed it."""
    image = Path(con.execute("SELECT path FROM images_view WHERE status = 'ok' ORDER BY path LIMIT 1").fetchall()[0][0])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes-0123456789ab.txt").write_text("mine")  # named as an export names its files
    out = tmp_path / "evil_out"
    out.mkdir()
    (out / "photos").symlink_to(image.parent)
    (out / "sub").symlink_to(victim)
    (out / "here-0123456789ab.txt").write_text("an earlier export's caption file")
    listed = ["sub/notes-0123456789ab.txt", f"photos/{image.name}", catalog_path.name, "here-0123456789ab.txt",
              "not-an-export-file.txt"]
    (out / ".workbench-export.json").write_text(json.dumps({"format": "kohya", "files": listed}))
    (out / "not-an-export-file.txt").write_text("kept")
    exported_dataset(con, out, format="kohya", overwrite=True)
    assert image.is_file() and (victim / "notes-0123456789ab.txt").read_text() == "mine" and catalog_path.is_file()
    assert not (out / "here-0123456789ab.txt").exists()  # what an export wrote inside OUT still goes
    assert (out / "not-an-export-file.txt").read_text() == "kept"


def test_removing_an_earlier_export_never_deletes_the_files_kept(tmp_path):
    """The catalog living in OUT under a name an export could write is kept (a second review: the test of the
    manifest never reached this check)."""
    from pipelines.export import _removed_previous_export

    out = tmp_path / "out"
    out.mkdir()
    catalog = out / "cat-0123456789ab.duckdb"
    for path in (catalog, out / "img-0123456789ab.txt"):
        path.write_text("x")
    (out / ".workbench-export.json").write_text(json.dumps({"format": "kohya", "files": [catalog.name, "img-0123456789ab.txt"]}))
    assert _removed_previous_export(out, frozenset({catalog.resolve()})) == 1
    assert catalog.is_file() and not (out / "img-0123456789ab.txt").exists()
    (out / ".workbench-export.json").write_text(json.dumps({"format": "kohya", "files": [catalog.name]}))
    assert _removed_previous_export(out) == 1 and not catalog.exists()  # without it, it would go: the check has teeth


def test_an_image_that_may_not_be_read_now_is_skipped_and_named_not_the_end_of_the_export(con, curated, tmp_path, monkeypatch):
    """A review: one image made unreadable (chmod 000) after ingest stopped the export part way with a bare
    "Permission denied"; a missing or changed file is skipped with a note."""
    from train_fixtures import deny_opening

    locked = str(curated / "10_sks dog" / "b.png")
    deny_opening(monkeypatch, locked)
    messages = []
    summary = exported_dataset(con, tmp_path / "out", format="kohya", progress=lambda **kw: messages.append(kw.get("message")))
    assert summary["unreadable_files_skipped"] == 1 and summary["images"] == 4
    assert any(m and f"skipped {locked}: it may not be read (Permission denied)" in m for m in messages)


def test_a_hardlink_export_counts_the_images_it_had_to_copy(tmp_path):
    """A review: `--link hardlink` to another disk copied every image, silently (link count 1)."""
    from pipelines.export import _copied_not_linked

    class Row:
        source = b"/proc/self/status"  # another file system than tmp_path's

    written = tmp_path / "a.png"
    written.write_bytes(b"x")
    assert _copied_not_linked(Row(), written, "hardlink") and not _copied_not_linked(Row(), written, "copy")
    Row.source = os.fsencode(tmp_path / "original.png")
    (tmp_path / "original.png").write_bytes(b"x")
    os.link(tmp_path / "original.png", tmp_path / "linked.png")
    assert not _copied_not_linked(Row(), tmp_path / "linked.png", "hardlink")


def test_a_subset_is_exported_with_where_without_excluding_the_rest(con, curated, tmp_path):
    """A FiftyOne user's review: export always wrote the whole dataset, so a subset meant excluding everything else."""
    summary = exported_dataset(con, tmp_path / "dogs", format="kohya", where="concept = 'sks dog'")
    assert summary["images"] == 2 and {p.parent.name for p in (tmp_path / "dogs").rglob("*.png")} | {
        p.parent.name for p in (tmp_path / "dogs").rglob("*.jpg")} == {"10_sks dog"}
    hf = exported_dataset(con, tmp_path / "hf", format="imagefolder", where="path LIKE '%/plain/%'")
    assert hf["images"] == 3
    rows = exported_dataset(con, tmp_path / "rows.parquet", format="parquet", where="width > 40")
    assert rows["rows"] == con.execute("SELECT count(*) FROM dataset WHERE width > 40").fetchall()[0][0] > 0
    assert con.execute("SELECT count(*) FROM exclusions").fetchall()[0][0] == 0  # nothing curated out
    with pytest.raises(ExportError, match="no image of the dataset .or class image in use. matches"):
        exported_dataset(con, tmp_path / "none", format="kohya", where="width > 100000")
    with pytest.raises(ExportError, match="--where failed"):
        exported_dataset(con, tmp_path / "bad", format="kohya", where="no_such_column = 1")


def _generated_priors(con, tmp_path, prompts: dict[str, str]) -> dict[str, str]:
    """Class images `workbench priors` made (seed = their order): name → prompt; returns name → image id."""
    for i, name in enumerate(prompts):
        _image(tmp_path / "priors" / name, color=(10 * i, 2, 3))
    ingested_images(con, [tmp_path / "priors"], workers=1)
    ids = _by_name(con)
    for seed, (name, prompt) in enumerate(prompts.items()):
        con.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [ids[name]])
        con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model, resolution, steps, guidance_scale, sampler) "
                    "VALUES (?, ?, ?, 'tiny', 64, 2, 7.5, 'DDIMScheduler')", [ids[name], prompt, seed])
    return ids


def test_kohya_reg_folders_only_for_classes_of_exported_concepts_and_as_many_as_training_takes(con, curated, tmp_path, monkeypatch):
    """A review: `priors --class-prompt "a photo of a horse"` (no concept of that class) and the priors of an empty
    concept went to reg/ as `is_reg = true` subsets, so kohya regularised with classes nothing trains; and every class
    image of a prompt went, however few training takes."""
    added_concept(con, "zkx person", trigger="zkx", class_noun="person")  # no image: exports none
    _generated_priors(con, tmp_path, {"d0.png": "a photo of a dog", "d1.png": "a photo of a dog", "d2.png": "a photo of a dog",
                                      "h0.png": "a photo of a horse", "q0.png": "a photo of a person",
                                      "q1.png": "a photo of a person"})
    said: list[str] = []
    out = tmp_path / "out"
    summary = exported_dataset(con, out, format="kohya", progress=lambda **kw: said.append(kw.get("message") or ""))
    assert [p.name for p in (out / "reg").iterdir()] == ["1_a photo of a dog"]
    subsets = tomllib.loads((out / "dataset.toml").read_text())["datasets"][0]["subsets"]
    assert [s["class_tokens"] for s in subsets if s.get("is_reg")] == ["a photo of a dog"]
    assert len(list((out / "reg" / "1_a photo of a dog").glob("*.png"))) == 3  # 200 per instance image: all of them
    assert summary["unused_class_images_left_out"] == 3 and summary["surplus_class_images_left_out"] == 0
    assert summary["images"] == 5 + 3 and summary["folders"] == 3
    note = [m for m in said if "no exported concept has that class" in m]
    assert len(note) == 1 and "'a photo of a horse' (1), 'a photo of a person' (2)" in note[0], said
    # training takes 200 generated class images per instance image (here: 1), lowest seeds first
    import pipelines.priors

    monkeypatch.setattr(pipelines.priors, "PRIORS_PER_INSTANCE", 1)
    said.clear()
    fewer = exported_dataset(con, tmp_path / "fewer", format="kohya", progress=lambda **kw: said.append(kw.get("message") or ""))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "fewer" / "reg" / "1_a photo of a dog").glob("*.png")) == ["d0", "d1"]
    assert fewer["surplus_class_images_left_out"] == 1 and fewer["unused_class_images_left_out"] == 3
    assert any("left out 1 class image(s) of 'a photo of a dog': more than training takes" in m for m in said), said
    # class images supplied for a prompt are what training takes for it (all of them), not generated ones
    ids = _by_name(con)
    con.execute("UPDATE class_priors SET supplied_from = '/photos/dogs', seed = NULL, model = NULL WHERE image_id = ?", [ids["d2.png"]])
    supplied = exported_dataset(con, tmp_path / "supplied", format="kohya")
    assert [p.name.split("-")[0] for p in (tmp_path / "supplied" / "reg" / "1_a photo of a dog").glob("*.png")] == ["d2"]
    assert supplied["surplus_class_images_left_out"] == 2
    # class images --where names itself are exported as chosen (a set for `train --class-prompt`, say)
    chosen = exported_dataset(con, tmp_path / "chosen", format="kohya", where="role = 'class_prior' AND path LIKE '%h0.png'")
    assert [p.name for p in (tmp_path / "chosen" / "reg").iterdir()] == ["1_a photo of a horse"] and chosen["images"] == 1


def test_concepts_of_one_trigger_class_and_repeats_export_into_one_kohya_folder(con, curated, tmp_path):
    """A review: two such concepts went to `3_zkx man` and `3_zkx man-2`, which kohya and import-kohya read as
    class "man-2". The folder name is all kohya reads of a subset: they share one folder, listed once."""
    ids = _by_name(con)
    for name, trigger, image in (("zkx man", "zkx", "c.jpg"), ("zkx man too", "zkx", "..weird name?.png"),
                                 ("Zkx man", "ZKX", "rotated.jpg")):  # `3_ZKX man`: the same folder on macOS
        added_concept(con, name, trigger=trigger, class_noun="man", repeats=3)
        assign_images_to_concept(con, name, [ids[image]])
    said: list[str] = []
    out = tmp_path / "out"
    summary = exported_dataset(con, out, format="kohya", progress=lambda **kw: said.append(kw.get("message") or ""))
    assert sorted(p.name for p in (out / "img").iterdir()) == ["10_sks dog", "3_ZKX man"]
    man = out / "img" / "3_ZKX man"
    assert sorted(p.name.split("-")[0] for p in man.iterdir() if p.suffix != ".txt") == ["c", "rotated", "weird name_"]
    assert [p.stem.split("-")[0] for p in man.glob("*.txt")] == ["c"]  # its own caption, beside its own image
    assert (summary["images"], summary["folders"], summary["captions"], summary["without_caption"]) == (5, 2, 2, 3)
    subsets = tomllib.loads((out / "dataset.toml").read_text())["datasets"][0]["subsets"]
    assert sorted(Path(s["image_dir"]).name for s in subsets) == ["10_sks dog", "3_ZKX man"]
    assert any("export into one folder, img/3_ZKX man" in m for m in said), said
    back = connect(tmp_path / "back.duckdb")
    imported_kohya_folder(back, out, workers=1)
    assert sorted(back.execute("SELECT trigger_token, class_noun, repeats FROM concepts").fetchall()) == [
        ("ZKX", "man", 3), ("sks", "dog", 10)]
    assert back.execute("SELECT count(*) FROM images_view WHERE concept = 'ZKX man'").fetchone()[0] == 3


def test_images_without_a_caption_export_the_text_training_gives_them_never_null(con, curated, tmp_path):
    """A review: imagefolder wrote `"text": null` for a concept image without a caption (diffusers'
    train_text_to_image raises on it), where training here trains it on its concept's "trigger class"."""
    import polars as pl

    from pipelines.train.config import TrainConfig
    from pipelines.train.data import training_images

    ids = _by_name(con)
    added_concept(con, "style", trigger="zqstyle")  # no class: its trigger alone
    assign_images_to_concept(con, "style", [ids["..weird name?.png"]])
    trained = {image.image_id: image.caption for image in training_images(con, TrainConfig(resolution=64))}
    said: list[str] = []
    summary = exported_dataset(con, tmp_path / "hf", format="imagefolder", progress=lambda **kw: said.append(kw.get("message") or ""))
    rows = {row["image_id"]: row["text"] for row in map(json.loads, (tmp_path / "hf" / "train" / "metadata.jsonl").read_text().splitlines())}
    assert rows == trained  # the same text training trains on, image by image
    assert rows[ids["b.png"]] == "sks dog" and rows[ids["..weird name?.png"]] == "zqstyle" and rows[ids["rotated.jpg"]] == ""
    assert (summary["captions"], summary["uncaptioned_given_concept_text"], summary["uncaptioned_without_text"]) == (2, 2, 1)
    note = [m for m in said if "no caption and no concept" in m]
    assert len(note) == 1 and note[0].startswith("1 image(s)") and "rotated-" in note[0], said
    # parquet: the catalog's rows as they are, and the text each trains on beside them
    said.clear()
    rows_out = exported_dataset(con, tmp_path / "rows.parquet", format="parquet", progress=lambda **kw: said.append(kw.get("message") or ""))
    frame = pl.read_parquet(tmp_path / "rows.parquet")
    assert dict(zip(frame["image_id"], frame["text"])) == trained and frame["caption"].null_count() == 3
    assert rows_out["uncaptioned_without_text"] == 1 and any("no caption and no concept" in m for m in said), said


def test_an_image_whose_first_path_is_gone_exports_from_another_it_has(con, tmp_path):
    """An odd-files review: after `mv old new; workbench ingest new`, export skipped every image as "file no longer
    there (run ingest again)": the catalog still listed old/ (not walked, so not marked missing) before new/, and
    `ingest old` then failed as old/ was gone. Training opened the new paths."""
    _image(tmp_path / "old" / "p0.jpg", color=(200, 10, 10))
    _image(tmp_path / "old" / "p1.jpg", color=(10, 10, 200))
    ingested_images(con, [tmp_path / "old"], workers=1)
    (tmp_path / "old").rename(tmp_path / "new")
    ingested_images(con, [tmp_path / "new"], workers=1)
    summary = exported_dataset(con, tmp_path / "out", format="kohya")
    assert summary["images"] == 2 and summary["missing_files_skipped"] == 0
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "out" / "img" / "1_").glob("*.jpg")) == ["p0", "p1"]


def test_a_moved_images_caption_file_is_not_said_to_have_changed(con, tmp_path):
    """An odd-files review: after the same move, training said "1 caption file(s) changed since they were ingested
    (old/p0.txt) … run workbench ingest …/old first", a command that fails: the file had moved, not changed."""
    from workbench.images import sidecars_changed_since_ingest

    _image(tmp_path / "old" / "p0.jpg", color=(200, 10, 10))
    (tmp_path / "old" / "p0.txt").write_text("a red square")
    ingested_images(con, [tmp_path / "old"], workers=1)
    (tmp_path / "old").rename(tmp_path / "new")
    ingested_images(con, [tmp_path / "new"], workers=1)
    assert sidecars_changed_since_ingest(con, list(_by_name(con).values())) == []
    (tmp_path / "new" / "p0.txt").write_text("a blue square")  # an edit where the image is now is still said
    assert sidecars_changed_since_ingest(con, list(_by_name(con).values())) == [str(tmp_path / "new" / "p0.txt")]


def test_an_export_that_cannot_be_written_is_said_in_words(catalog_path, con, curated, tmp_path, monkeypatch):
    """An odd-files review: exporting where the folder could not be made printed Python's "[Errno 13] Permission
    denied: 'ph/ro/exp2'"."""
    from workbench.cli import app

    con.close()
    (tmp_path / "a_file").write_text("not a folder")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "a_file" / "out"), "--catalog", str(catalog_path)],
                                env={"COLUMNS": "250"})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "The export stopped at" in said and "Not a directory" in said, result.output
    assert "[Errno" not in said
    # a full disk stopped it: status 1, as every command says one (a reliability review: it was 2, as bad input)
    import pipelines.export as export_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "x.png"))

    monkeypatch.setattr(export_module.shutil, "copyfile", full)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "full"), "--catalog", str(catalog_path)],
                                env={"COLUMNS": "250"})
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "No space left on device" in said, result.output


def test_a_dataset_config_wins_over_folder_names_and_leaves_hidden_files_and_reg_only_configs_alone(catalog_path, tmp_path):
    """A code review: a subset folder named `10_sks dog` with class_tokens "zwx dog" put its images in concept
    "sks dog" (ingest read the folder name); macOS `._x.png` companions came in as unreadable images; a config of
    regularisation subsets alone recorded an empty ingest and printed "no image files in ."."""
    from workbench.cli import app

    folder = tmp_path / "data" / "10_sks dog"
    for i in range(2):
        _image(folder / f"d{i}.png", color=(30 * i, 60, 90))
    (folder / "._d0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _image(tmp_path / "reg" / "r0.png", color=(9, 9, 90))
    config = tmp_path / "dataset.toml"
    config.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder}'\nclass_tokens = 'zwx dog'\nnum_repeats = 3\n")
    runner = CliRunner()
    result = runner.invoke(app, ["import-kohya", str(config), "--catalog", str(catalog_path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    with connect(catalog_path) as con:
        assert con.execute("SELECT concept, count(*) FROM images_view GROUP BY 1").fetchall() == [("zwx dog", 2)]
        assert con.execute("SELECT name, repeats FROM concepts").fetchall() == [("zwx dog", 3)]
    reg_only = tmp_path / "reg.toml"
    reg_only.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'reg'}'\nclass_tokens = 'dog'\nis_reg = true\n")
    result = runner.invoke(app, ["import-kohya", str(reg_only), "--catalog", str(catalog_path), "--workers", "1"])
    assert result.exit_code == 0 and "no image files" not in result.output, result.output
    with connect(catalog_path) as con:
        assert con.execute("SELECT count(*) FROM runs WHERE step = 'ingest' AND params->>'paths' = '[]'").fetchone()[0] == 0
        # "dog": the prompt concept "zwx dog" takes its class images by (DreamBooth training would not find "dog")
        assert con.execute("SELECT class_prompt, count(*) FROM class_priors GROUP BY 1").fetchall() == [("a photo of a dog", 1)]
