"""CLIP embeddings, scores against the current caption, embedding near-duplicates, and text search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pipelines.dedup import choose_keeper, duplicate_groups
from pipelines.ingest import ingested_images
from pipelines.score import (
    clip_scores,
    embedding_duplicates,
    encode_texts,
    image_embeddings,
    register_text_embedding_function,
    search_images,
)
from workbench.cli import app
from workbench.models import load_clip


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny", device="cpu")


def picture(seed: int, size=(96, 72)) -> Image.Image:
    """A distinct picture per seed: random coloured shapes on a random background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (96, 72), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, 70)), int(rng.integers(0, 50))
        draw.rectangle((x, y, x + int(rng.integers(8, 30)), y + int(rng.integers(8, 30))),
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.resize(size)


@pytest.fixture
def catalog(con, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    picture(1, (192, 144)).save(folder / "a_large.png")
    picture(1, (96, 72)).save(folder / "a_small.png")  # pHash near-duplicate of a_large
    picture(2, (120, 90)).save(folder / "c.png")
    picture(3, (80, 80)).save(folder / "d.jpg", quality=90)
    picture(4, (80, 80)).save(folder / "e.png")
    picture(5, (64, 64)).save(folder / "f.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ingested_images(con, [folder], workers=1)
    return con


def ids_by_name(con) -> dict[str, str]:
    rows = con.execute("SELECT path, image_id FROM images_view WHERE status = 'ok'").fetchall()
    return {path.rsplit("/", 1)[-1].split(".")[0]: image_id for path, image_id in rows}


def stored_embedding(con, image_id: str, model: str = "tiny") -> np.ndarray:
    row = con.execute("SELECT embedding FROM clip_embeddings WHERE image_id = ? AND model = ?", [image_id, model]).fetchone()
    return np.asarray(row[0], dtype=np.float32)


def test_a_file_edited_since_ingest_is_not_embedded_under_the_old_image(catalog, clip, tmp_path):
    """Its embedding would describe other pixels, and its CLIP score and embedding duplicates with it."""
    ids = ids_by_name(catalog)
    picture(9, (80, 80)).save(tmp_path / "images" / "e.png")  # edited in place, not ingested since
    counts = image_embeddings(catalog, clip, batch_size=4, workers=0)
    assert counts["embedded"] == 5 and counts["changed_since_ingest"] == 1
    embedded = {row[0] for row in catalog.execute("SELECT image_id FROM clip_embeddings").fetchall()}
    assert ids["e"] not in embedded and ids["f"] in embedded


def test_embeddings_are_stored_normalised_for_ok_images(catalog, clip):
    counts = image_embeddings(catalog, clip, batch_size=4, workers=0)
    assert counts["embedded"] == 6 and counts["images_ok"] == 6
    ids = ids_by_name(catalog)
    dims = catalog.execute("SELECT DISTINCT dim, len(embedding) FROM clip_embeddings").fetchall()
    assert dims == [(32, 32)]
    large, small = stored_embedding(catalog, ids["a_large"]), stored_embedding(catalog, ids["a_small"])
    assert abs(np.linalg.norm(large) - 1) < 1e-5
    assert float(large @ small) > 0.99  # same picture at two sizes
    again = image_embeddings(catalog, clip, batch_size=4, workers=2)
    assert again["embedded"] == 0 and again["already_embedded"] == 6


def test_score_is_the_cosine_to_the_current_caption_and_follows_caption_changes(catalog, clip):
    ids = ids_by_name(catalog)
    catalog.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'sidecar', 'a red square'), "
                    "(?, 'sidecar', 'a photo of a dog')", [ids["c"], ids["d"]])
    first = clip_scores(catalog, clip, batch_size=4, workers=0)
    assert first["scored"] == 2 and first["without_caption"] == 4

    def view_score(image_id):
        return catalog.execute("SELECT clip_score FROM images_view WHERE image_id = ?", [image_id]).fetchone()[0]

    expected = float(stored_embedding(catalog, ids["c"]) @ encode_texts(clip, ["a red square"])[0])
    assert view_score(ids["c"]) == pytest.approx(expected, abs=1e-5)
    assert view_score(ids["e"]) is None  # no caption, no score

    assert clip_scores(catalog, clip, workers=0)["scored"] == 0
    runs = catalog.execute("SELECT count(*) FROM runs").fetchone()[0]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):  # refused, not recorded as a run on nothing
        clip_scores(catalog, clip, batch_size=-1, workers=0)
    assert catalog.execute("SELECT count(*) FROM runs").fetchone()[0] == runs

    catalog.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'a blue circle')", [ids["c"]])
    assert view_score(ids["c"]) is None  # the old score belongs to the old caption
    rescored = clip_scores(catalog, clip, workers=0)
    assert rescored["scored"] == 1 and rescored["score_up_to_date"] == 1
    expected = float(stored_embedding(catalog, ids["c"]) @ encode_texts(clip, ["a blue circle"])[0])
    assert view_score(ids["c"]) == pytest.approx(expected, abs=1e-5)
    assert catalog.execute("SELECT caption_source FROM clip_scores WHERE image_id = ?", [ids["c"]]).fetchone()[0] == "manual"
    assert "clip_score" in [d[0] for d in catalog.execute("DESCRIBE dataset").fetchall()]


def _plant_embeddings(con, vectors: dict[str, list[float]], model: str = "synthetic") -> None:
    for image_id, vector in vectors.items():
        v = np.asarray(vector, dtype=np.float32)
        con.execute("INSERT INTO clip_embeddings (image_id, model, dim, embedding) VALUES (?, ?, ?, ?)",
                    [image_id, model, len(v), (v / np.linalg.norm(v)).tolist()])


def test_embedding_duplicates_merge_into_phash_groups_with_the_keep_policy(catalog):
    ids = ids_by_name(catalog)
    duplicate_groups(catalog, threshold=6)
    phash_group = catalog.execute("SELECT count(*) FROM duplicates").fetchone()[0]
    assert phash_group == 2  # a_large + a_small
    basis = np.eye(4)
    _plant_embeddings(catalog, {
        ids["a_large"]: basis[0], ids["a_small"]: basis[1],
        ids["c"]: basis[0] + 0.1 * basis[2],          # cosine 0.995 to a_large
        ids["d"]: basis[3], ids["e"]: basis[3] + 0.25 * basis[2],  # cosine 0.970
        ids["f"]: basis[2],
    })
    counts = embedding_duplicates(catalog, threshold=0.95, model="synthetic")
    assert counts["embedding_pairs"] == 2
    groups = catalog.execute(
        "SELECT group_id, list(image_id ORDER BY image_id), any_value(keeper_id) FROM duplicates GROUP BY group_id"
    ).fetchall()
    members = {frozenset(g[1]): g[2] for g in groups}
    assert members == {
        frozenset([ids["a_large"], ids["a_small"], ids["c"]]): ids["a_large"],  # highest resolution
        frozenset([ids["d"], ids["e"]]): ids["e"],  # same size: lossless PNG over JPEG
    }
    excluded = dict(catalog.execute("SELECT image_id, reason FROM exclusions WHERE step = 'dedup'").fetchall())
    assert excluded == {
        ids["a_small"]: f"duplicate of {ids['a_large']}",
        ids["c"]: f"duplicate of {ids['a_large']}",
        ids["d"]: f"duplicate of {ids['e']}",
    }
    method, distance = catalog.execute("SELECT method, distance FROM duplicates WHERE image_id = ?", [ids["c"]]).fetchone()
    assert method == "embedding" and distance == pytest.approx(1 / np.sqrt(1.01), abs=1e-5)

    choose_keeper(catalog, ids["c"])
    embedding_duplicates(catalog, threshold=0.95, model="synthetic")
    assert catalog.execute("SELECT keeper_id FROM duplicates WHERE image_id = ?", [ids["a_small"]]).fetchone()[0] == ids["c"]

    stricter = embedding_duplicates(catalog, threshold=0.98, model="synthetic")
    assert stricter["embedding_pairs"] == 1
    assert catalog.execute("SELECT count(*) FROM duplicates WHERE image_id IN (?, ?)", [ids["d"], ids["e"]]).fetchone()[0] == 0

    duplicate_groups(catalog, threshold=6)  # a pHash rerun keeps the CLIP pairs ...
    assert catalog.execute("SELECT count(*) FROM duplicates WHERE image_id = ?", [ids["c"]]).fetchone()[0] == 1
    duplicate_groups(catalog, threshold=6, drop_embedding_pairs=True)  # ... unless asked to forget them
    assert catalog.execute("SELECT count(*) FROM duplicates").fetchone()[0] == phash_group
    assert catalog.execute("SELECT count(*) FROM exclusions WHERE step = 'dedup' AND image_id = ?", [ids["c"]]).fetchone()[0] == 0


def test_embedding_duplicates_need_embeddings(con):
    with pytest.raises(ValueError, match="workbench score"):
        embedding_duplicates(con)


def test_search_ranks_by_cosine_and_finds_the_matching_image(catalog, clip):
    image_embeddings(catalog, clip, workers=0)
    ids = ids_by_name(catalog)
    query = encode_texts(clip, ["a red car"])[0]
    # make image f's embedding exactly the text's: it must come first, with similarity 1
    catalog.execute("UPDATE clip_embeddings SET embedding = ? WHERE image_id = ? AND model = 'tiny'",
                    [query.tolist(), ids["f"]])
    hits = search_images(catalog, clip, "a red car", limit=10)
    assert hits[0]["image_id"] == ids["f"] and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 6
    stored = {i: stored_embedding(catalog, i) for i in ids.values()}
    expected = sorted(stored, key=lambda i: (-float(stored[i] @ query), i))
    assert [h["image_id"] for h in hits] == expected
    assert [h["similarity"] for h in hits] == pytest.approx([float(stored[i] @ query) for i in expected], abs=1e-5)
    assert len(search_images(catalog, clip, "a red car", limit=2)) == 2
    # among the images a condition names (a review: the top hits were excluded copies, with no way to leave them out)
    catalog.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'manual', 'manual: test')", [ids["f"]])
    kept = search_images(catalog, clip, "a red car", limit=10, where="NOT excluded")
    assert [h["image_id"] for h in kept] == [i for i in expected if i != ids["f"]]
    with pytest.raises(ValueError, match="--where failed"):
        search_images(catalog, clip, "a red car", where="no_such_column > 1")

    register_text_embedding_function(catalog, clip)
    first = catalog.execute(
        "SELECT image_id FROM clip_embeddings WHERE model = 'tiny' "
        "ORDER BY array_cosine_similarity(embedding::FLOAT[32], clip_text_embedding('a red car')) DESC LIMIT 1"
    ).fetchone()[0]
    assert first == ids["f"]


def test_cli_score_and_search(catalog_path, tmp_path):
    from workbench.catalog import connect

    folder = tmp_path / "cli_images"
    folder.mkdir()
    for seed in range(3):
        picture(seed).save(folder / f"p{seed}.png")
    (folder / "p0.txt").write_text("a red car")
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()
    runner = CliRunner()
    before = runner.invoke(app, ["search", "a red car", "-c", str(catalog_path)])
    assert before.exit_code == 2 and "workbench score" in before.output
    scored = runner.invoke(app, ["score", "-c", str(catalog_path), "--workers", "0"])
    assert scored.exit_code == 0, scored.output
    found = runner.invoke(app, ["search", "a red car", "-c", str(catalog_path), "--limit", "2", "-f", "json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output)
    assert len(hits) == 2 and hits[0]["similarity"] >= hits[1]["similarity"]
    table = runner.invoke(app, ["search", "a red car", "-c", str(catalog_path), "--where", "caption = 'a red car'"],
                          env={"COLUMNS": "200"})
    assert table.exit_code == 0 and table.output.count("p0.png") == 1 and "p1.png" not in table.output
    con = connect(catalog_path, read_only=True)
    (p0_id,) = con.execute("SELECT image_id FROM images_view WHERE path LIKE '%p0.png'").fetchall()[0]
    con.close()
    assert p0_id[:12] in table.output  # the id column: pasted into exclude, keep, include
    con = connect(catalog_path, read_only=True)
    assert con.execute("SELECT count(clip_score) FROM images_view").fetchone()[0] == 1
    con.close()
    bad = runner.invoke(app, ["score", "-c", str(catalog_path), "--dedup-threshold", "1.5"])
    assert bad.exit_code == 2
    random_clip = runner.invoke(app, ["score", "-c", str(catalog_path), "--dedup", "--workers", "0"])
    assert random_clip.exit_code == 2 and "needs a real CLIP" in " ".join(random_clip.output.split())
    con = connect(catalog_path, read_only=True)
    assert con.execute("SELECT count(*) FROM exclusions").fetchone()[0] == 0  # refused before touching anything
    con.close()


def test_similar_pairs_match_brute_force_across_block_edges():
    from pipelines.score import similar_pairs

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    vectors[7] = vectors[50] + 0.05 * rng.normal(size=8)
    vectors[13] = vectors[14] + 0.05 * rng.normal(size=8)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"img{i:02d}" for i in range(60)]
    sims = vectors @ vectors.T
    expected = {(ids[i], ids[j]) for i in range(60) for j in range(i + 1, 60) if sims[i, j] >= 0.9}
    assert {("img07", "img50"), ("img13", "img14")} <= expected
    for chunk in (1, 7, 64, None):
        found = similar_pairs(ids, vectors, 0.9, chunk=chunk)
        assert set(found.select(["image_a", "image_b"]).iter_rows()) == expected


def test_a_class_prior_is_scored_against_its_prompt(catalog, clip):
    """A class prior's caption in images_view is its class prompt (what it trains with): its score is against that,
    even when it came with a caption file of its own."""
    ids = ids_by_name(catalog)
    catalog.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [ids["e"]])
    catalog.execute("INSERT INTO class_priors (image_id, class_prompt, supplied_from) VALUES (?, 'a photo of a dog', '/reg')", [ids["e"]])
    catalog.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'sidecar', 'dog')", [ids["e"]])
    clip_scores(catalog, clip, workers=0)
    expected = float(stored_embedding(catalog, ids["e"]) @ encode_texts(clip, ["a photo of a dog"])[0])
    score, caption = catalog.execute("SELECT clip_score, caption FROM images_view WHERE image_id = ?", [ids["e"]]).fetchone()
    assert caption == "a photo of a dog" and score == pytest.approx(expected, abs=1e-5)
