"""Bucket parity with kohya-ss sd-scripts itself: its own dataset loader reads our exported dataset.toml.

For several bucket settings (upscale and bucket_no_upscale, square and non-square resolution, odd
min/max bucket reso), this script ingests synthetic images of many sizes plus sample_data, runs
`aspect_buckets`, exports `--format kohya`, then lets sd-scripts' `config_util` (ConfigSanitizer,
BlueprintGenerator, generate_dataset_group_by_blueprint -> BucketManager) load that TOML, and prints,
side by side, how many images got the same bucket and resized size from both.

It needs an sd-scripts checkout (not shipped here) and its extra modules (voluptuous, toml, imagesize,
opencv-python-headless, einops), e.g. installed with `pip install --target DIR` and put on PYTHONPATH.
With transformers >= 5, sd-scripts' sampling pipelines fail to import (`CLIPFeatureExtractor`): pass
--patch-transformers to replace those two modules, which bucketing never uses, by stand-ins.

    python benchmarks/kohya_parity.py --sd-scripts ~/src/sd-scripts --patch-transformers
Measured here (sd-scripts 48d368fa, 107 images x 4 settings): 426 image/setting pairs, 0 mismatches.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = [
    dict(resolution=512, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64, no_upscale=False),
    dict(resolution=(768, 512), min_bucket_reso=250, max_bucket_reso=1000, bucket_reso_steps=32, no_upscale=False),
    dict(resolution=512, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64, no_upscale=True),
    dict(resolution=1024, min_bucket_reso=256, max_bucket_reso=2048, bucket_reso_steps=64, no_upscale=False),
]


def _stub_sample_pipelines() -> None:
    """sd-scripts imports its long-prompt sampling pipelines at train_util import; with transformers >= 5
    they fail on `CLIPFeatureExtractor`. Bucketing never uses them, so stand-ins are enough here."""
    import types

    for name, attr in (("library.lpw_stable_diffusion", "StableDiffusionLongPromptWeightingPipeline"),
                       ("library.sdxl_lpw_stable_diffusion", "SdxlStableDiffusionLongPromptWeightingPipeline")):
        stub = types.ModuleType(name)
        setattr(stub, attr, type(attr, (), {}))
        sys.modules[name] = stub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts", type=Path, required=True, help="sd-scripts checkout (has library/)")
    parser.add_argument("--images", type=int, default=80, help="synthetic images of random sizes")
    parser.add_argument("--patch-transformers", action="store_true")
    args = parser.parse_args()
    if args.patch_transformers:
        _stub_sample_pipelines()
    sys.path.insert(0, str(args.sd_scripts.resolve()))
    from library import config_util, train_util  # the peer, from the user's checkout

    from PIL import Image

    from pipelines.buckets import aspect_buckets
    from pipelines.concepts import concepts_from_folder_names
    from pipelines.export import exported_dataset
    from pipelines.ingest import ingested_images
    from workbench.catalog import connect

    tmp = Path(tempfile.mkdtemp(prefix="kohya_parity_"))
    src = tmp / "src" / "3_sks thing"
    src.mkdir(parents=True)
    rng = random.Random(1)
    sizes = [(rng.randint(64, 2200), rng.randint(64, 2200)) for _ in range(args.images * 3 // 4)]
    sizes += [(rng.randint(64, 2500), rng.randint(40, 400)) for _ in range(args.images // 4)]
    sizes += [(512, 512), (576, 448), (1024, 768), (1920, 1080), (300, 1200), (768, 1024), (700, 500), (6000, 1000)]
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (k * 3 % 256, k * 7 % 256, k * 11 % 256)).save(src / f"img{k}.jpg", quality=30)
    con = connect(tmp / "c.duckdb")
    ingested_images(con, [src.parent, REPO / "sample_data" / "photos", REPO / "sample_data" / "exif"], workers=1)
    concepts_from_folder_names(con)

    kohya_args = argparse.ArgumentParser()
    train_util.add_dataset_arguments(kohya_args, True, True, True)
    train_util.add_training_arguments(kohya_args, True)
    namespace = kohya_args.parse_args([])
    print(f"{'settings':<100} {'images':>6} {'same':>6} {'differ':>6}")
    all_total = all_same = 0
    for n, setting in enumerate(SETTINGS):
        aspect_buckets(con, **setting)
        ours = {
            image_id[:12]: list(rest)
            for image_id, *rest in con.execute(
                "SELECT image_id, bucket_width, bucket_height, bucket_resized_width, bucket_resized_height FROM dataset"
            ).fetchall()
        }
        out = tmp / f"export{n}"
        exported_dataset(con, out, format="kohya")
        user_config = config_util.load_user_config(str(out / "dataset.toml"))
        generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True))
        blueprint = generator.generate(user_config, namespace)
        group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        total = same = 0
        for dataset in group.datasets:
            for info in dataset.image_data.values():
                key = Path(info.absolute_path).stem.rsplit("-", 1)[1]
                theirs = [*info.bucket_reso, *info.resized_size]
                total += 1
                if ours.get(key) == theirs:
                    same += 1
                else:
                    print(f"  differs: {info.image_size} ours {ours.get(key)} sd-scripts {theirs}")
        all_total += total
        all_same += same
        print(f"{str(setting):<100} {total:>6} {same:>6} {total - same:>6}")
    print(f"all settings: {all_same}/{all_total} images in the same bucket with the same resized size as sd-scripts")


if __name__ == "__main__":
    main()
