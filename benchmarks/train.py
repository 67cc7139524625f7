"""LoRA training throughput and peak memory: workbench vs diffusers' train_dreambooth_lora.py, same run.

Both trainers get the same model folder, the same square images (so bucketing and diffusers'
resize + centre crop see identical pixels), the same prompt, rank, learning rate, batch size,
resolution, precision, seed and step count. Each runs in its own child process with the same
instrument: a global `torch.optim.Optimizer` step post-hook timestamps every optimizer step and reads
the peak memory at that moment. steps/s is measured over the steps after `--warmup`; on GPU the hook
waits for the device (CUDA synchronize) at the first measured step and the last only, so a trainer that
queues its next step while the GPU still runs is measured as fast as it is (the per-step median is then
a CPU-side figure; the window's steps/s is the one to read). Peak memory is the peak up to the last training step (CUDA: the
allocator's max_memory_allocated; CPU: the process's peak RSS, VmHWM).

The peer script is NOT part of this repository. Fetch it once (never commit it) into the ignored
folder `.bench/peers/diffusers/`:
    git -C <diffusers checkout> show HEAD:examples/dreambooth/train_dreambooth_lora.py \
        > .bench/peers/diffusers/train_dreambooth_lora.py
or pass --peer-script PATH. Variants: `default` (the script as documented: VAE and text encoder run
every step) and `precompute` (its --pre_compute_text_embeddings flag, its fastest setting).

CPU, tiny:    .venv/bin/python benchmarks/train.py   [--resolution 128|256] [--repeats 5 --steps 100]
GPU, SD-1.5 architecture with random weights, 512 px, batch 4, bf16:
              .venv/bin/python benchmarks/train.py --device cuda --full-size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = REPO / ".bench" / "peers" / "diffusers" / "train_dreambooth_lora.py"
PROMPT = "a photo of sks thing"


# --- child side ------------------------------------------------------------------------


def _anon_rss() -> int:
    """This process's resident anonymous memory now (RssAnon): what it allocated (tensors, Python objects, heaps),
    without the pages of library code and files it maps, the CPU counterpart of CUDA's allocated memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _instrument(device: str, warmup: int, steps: int) -> dict:
    import torch

    record: dict = {"stamps": [], "peak_bytes": 0, "peak_anon_bytes": 0, "syncs": {}}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        _count_syncs(record["syncs"])

    def after_step(optimizer, args, kwargs):
        if cuda:
            # wait for the GPU only where the measured window starts and ends: a wait after every step would
            # stop a trainer from queuing the next step while the GPU runs this one, which is part of its speed
            index = len(record["stamps"])
            if index == steps - 1:
                torch.cuda.set_sync_debug_mode(0)
            if index in (warmup, steps - 1):
                torch.cuda.synchronize()
            if index == warmup:  # from here to the last step, every implicit wait for the GPU is counted
                torch.cuda.set_sync_debug_mode("warn")
            record["peak_bytes"] = torch.cuda.max_memory_allocated()  # the allocator's own count: no wait needed
        else:
            record["peak_bytes"] = _peak_rss()
            record["peak_anon_bytes"] = max(record["peak_anon_bytes"], _anon_rss())  # no kernel high-water mark: sampled each step
        record["stamps"].append(time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)
    return record


def _count_syncs(counts: dict) -> None:
    """Count the warnings of torch's CUDA sync debug mode by the trainer's line that made the CPU wait."""
    import warnings

    warnings.filterwarnings("always", message=".*synchronizing")
    show = warnings.showwarning

    def counted(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return show(message, category, filename, lineno, file, line)
        site = f"{Path(filename).name}:{lineno}"
        counts[site] = counts.get(site, 0) + 1

    warnings.showwarning = counted


def _layout(variant: str) -> bool | None:
    """channels_last for a variant: forced on or off, or None (the trainer's default: on for CUDA, off on CPU)."""
    parts = variant.split("+")
    return True if "channels_last" in parts else False if "no_channels_last" in parts else None


def _child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    record = _instrument(spec["device"], spec["warmup"], spec["steps"])
    started = time.perf_counter()
    if spec["who"] == "ours":
        sys.path.insert(0, str(REPO))
        from pipelines.train import load_train_config, trained_model
        from workbench.catalog import connect

        con = connect(spec["catalog"])  # ingested by the parent: ingest is its own command, not part of training
        config = load_train_config(None, dict(
            mode="lora", model=spec["model"], resolution=spec["resolution"], train_batch_size=spec["batch"],
            max_train_steps=spec["steps"], learning_rate=1e-4, rank=4, seed=0, mixed_precision=spec["mixed_precision"],
            checkpointing_steps=10**6, num_validation_images=0, evaluate=False, output_dir=str(Path(spec["out"]) / "run"),
            instance_prompt=PROMPT, cache_dir=str(Path(spec["out"]) / "cache"), device=spec["device"],
            report_to="tensorboard", gradient_checkpointing=spec["gradient_checkpointing"],
            channels_last=_layout(spec["variant"]), torch_compile="compile" in spec["variant"].split("+"),
        ))
        trained_model(con, config, release_catalog=True)  # as `workbench train` runs it
    else:
        import runpy

        argv = [
            spec["peer_script"], "--pretrained_model_name_or_path", spec["model"], "--instance_data_dir", spec["images"],
            "--instance_prompt", PROMPT, "--output_dir", str(Path(spec["out"]) / "run"), "--resolution", str(spec["resolution"]),
            "--train_batch_size", str(spec["batch"]), "--max_train_steps", str(spec["steps"]), "--learning_rate", "1e-4",
            "--rank", "4", "--seed", "0", "--mixed_precision", spec["mixed_precision"], "--checkpointing_steps", str(10**6),
            "--center_crop", "--report_to", "tensorboard", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        ]
        if spec["gradient_checkpointing"]:
            argv.append("--gradient_checkpointing")
        if spec["variant"] == "precompute":
            argv.append("--pre_compute_text_embeddings")
        sys.argv = argv
        runpy.run_path(spec["peer_script"], run_name="__main__")
    stamps = record["stamps"]
    warm = spec["warmup"]
    measured = stamps[warm:]
    steps_per_s = (len(measured) - 1) / (measured[-1] - measured[0]) if len(measured) > 1 else float("nan")
    intervals = sorted(b - a for a, b in zip(measured, measured[1:]))
    median_steps_per_s = 1 / intervals[len(intervals) // 2] if intervals else float("nan")
    print("BENCH " + json.dumps({"steps": len(stamps), "steps_per_s": steps_per_s, "median_steps_per_s": median_steps_per_s,
                                  "peak_bytes": record["peak_bytes"], "peak_anon_bytes": record["peak_anon_bytes"], "syncs": record["syncs"], "first_step_s": stamps[0] - started if stamps else None,
                                  "wall_s": time.perf_counter() - started}), flush=True)


# --- parent side -----------------------------------------------------------------------


def _images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # smooth colour fields with a few blobs: photo-like enough for a VAE, identical for both trainers
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i)], axis=-1)
        noise = rng.normal(0, 0.1, (size, size, 3))
        Image.fromarray(((base + noise + 1.2) / 2.4 * 255).clip(0, 255).astype("uint8")).save(folder / f"img{i:03d}.png")


def _full_size_model(folder: Path) -> str:
    """A Stable Diffusion 1.5-architecture pipeline with random weights, built from config (fp16 on disk)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from workbench.models import component_path

    if (folder / "model_index.json").is_file():
        return str(folder)
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(component_path("tiny", "sd"), subfolder="tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


CATALOG_FOOTPRINT = """
import sys
def rss():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
bare = rss()
from workbench.catalog import connect
con = connect(sys.argv[1])
con.execute("SELECT * FROM dataset").fetchall()
print(rss() - bare)
"""


def _catalog_footprint(catalog: Path, env: dict) -> int | None:
    """Peak RSS that opening the catalog and reading the dataset adds to a bare Python process: the part of
    our trainer's memory that is the catalog (DuckDB), not training."""
    proc = subprocess.run([sys.executable, "-c", CATALOG_FOOTPRINT, str(catalog)], env=env, capture_output=True, text=True)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None


def _run_child(spec: dict, env: dict) -> dict:
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"error": f"exit {proc.returncode}: {tail}"}


def _median(found: list[dict]) -> dict:
    """The run with the median steps/s (its memory and wall time with it); the first error if any failed."""
    ok = [r for r in found if "error" not in r]
    if not ok:
        return found[0]
    ok.sort(key=lambda r: r["steps_per_s"])
    step_medians = sorted(r["median_steps_per_s"] for r in ok)
    return {**ok[len(ok) // 2], "all_steps_per_s": [round(r["steps_per_s"], 2) for r in found if "error" not in r],
            "best_steps_per_s": ok[-1]["steps_per_s"], "step_median_steps_per_s": step_medians[len(step_medians) // 2],
            "min_peak_bytes": min(r["peak_bytes"] for r in ok), "min_peak_anon_bytes": min(r["peak_anon_bytes"] for r in ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="SD-1.5-architecture model, random weights (GPU).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps per run (default 40 tiny, 30 full).")
    parser.add_argument("--warmup", type=int, default=5, help="Steps left out of the steps/s figure.")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="Default 64 tiny, 512 full.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mixed-precision", default=None, help="no, fp16, bf16 (default: no on CPU, bf16 on CUDA).")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (1 is stable on a shared CPU).")
    parser.add_argument("--peer-script", type=Path, default=DEFAULT_PEER)
    parser.add_argument("--peer-variants", default="default,precompute")
    parser.add_argument("--ours-variants", default=None,
                        help="default,channels_last,no_channels_last,compile; join options with + (no_channels_last+compile). "
                             "Default: default,compile on CPU; default,no_channels_last,compile on CUDA (where the "
                             "trainer's default is channels-last).")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "train")
    parser.add_argument("--repeats", type=int, default=None, help="Runs per trainer, median reported (default 3 CPU, 1 full size).")
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    sys.path.insert(0, str(REPO))
    steps = args.steps or (30 if args.full_size else 40)
    args.ours_variants = args.ours_variants or ("default,no_channels_last,compile" if args.device.startswith("cuda") else "default,compile")
    resolution = args.resolution or (512 if args.full_size else 64)
    mixed = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    args.workdir.mkdir(parents=True, exist_ok=True)
    home = args.workdir / "home"
    env = {**os.environ, "WORKBENCH_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    os.environ.update({k: env[k] for k in ("WORKBENCH_HOME", "HF_HUB_OFFLINE")})
    if args.full_size:
        print("building the SD-1.5-architecture model (random weights) ...", flush=True)
        model = _full_size_model(args.workdir / "sd15-random")
    else:
        from workbench.models import component_path

        model = component_path("tiny", "sd")
    images = args.workdir / f"images-{resolution}"
    _images(images, args.images, resolution)
    catalog = args.workdir / f"catalog-{resolution}.duckdb"
    if catalog.exists():
        catalog.unlink()
    from pipelines.ingest import ingested_images
    from workbench.catalog import connect

    con = connect(catalog)
    ingested_images(con, [images], workers=1)
    con.close()
    common = dict(model=model, images=str(images), resolution=resolution, batch=args.batch, steps=steps, warmup=args.warmup,
                  mixed_precision=mixed, device=args.device, threads=args.threads, gradient_checkpointing=args.gradient_checkpointing)
    print(f"LoRA rank 4, {args.images} images at {resolution} px, batch {args.batch}, {steps} steps ({args.warmup} warm-up), "
          f"precision {mixed}, device {args.device}, {args.threads} thread(s); model {'SD-1.5 architecture, random' if args.full_size else 'tiny'}")
    jobs = {}
    for variant in args.ours_variants.split(","):
        name = "workbench" if variant == "default" else f"workbench ({variant})"
        jobs[name] = {**common, "who": "ours", "variant": variant, "catalog": str(catalog), "out": str(args.workdir / f"ours-{variant}")}
    if not args.peer_script.is_file():
        print(f"peer script not found at {args.peer_script}: fetch diffusers' examples/dreambooth/train_dreambooth_lora.py there (see --help)")
    else:
        for variant in filter(None, args.peer_variants.split(",")):
            jobs[f"diffusers ({variant})"] = {**common, "who": "peer", "variant": variant, "peer_script": str(args.peer_script),
                                              "out": str(args.workdir / f"peer-{variant}")}
    repeats = args.repeats or (1 if args.full_size else 3)
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for _ in range(repeats):  # interleaved, so a busy spell on a shared machine hits every trainer alike
        for name, spec in jobs.items():
            runs[name].append(_run_child(spec, env))
            done = runs[name][-1]  # as each run ends, so a run cut short by a time limit still leaves figures
            print(f"  {name}: " + (f"{done['steps_per_s']:.2f} steps/s, peak {done['peak_bytes'] / 2**20:.0f} MiB"
                                   if "error" not in done else "FAILED"), flush=True)
    results = {name: _median(found) for name, found in runs.items()}
    unit = "MiB VRAM" if args.device.startswith("cuda") else "MiB RSS"
    cpu = not args.device.startswith("cuda")  # on CPU, RSS holds library code too: anonymous memory is shown beside it
    anon_header = f"{'peak MiB anon':>15}" if cpu else ""
    print(f"\n{'trainer':<28}{'steps/s':>9}{'median-step':>13}{'peak ' + unit:>18}{anon_header}{'1st step s':>12}{'wall s':>9}   runs (steps/s)")
    for name, result in results.items():
        if "error" in result:
            print(f"{name:<28} FAILED: {result['error']}")
            continue
        anon = f"{result['peak_anon_bytes'] / 2**20:>15.0f}" if cpu else ""
        print(f"{name:<28}{result['steps_per_s']:>9.2f}{result['step_median_steps_per_s']:>13.2f}{result['peak_bytes'] / 2**20:>18.0f}{anon}"
              f"{result['first_step_s']:>12.1f}{result['wall_s']:>9.1f}   {result['all_steps_per_s']}")
    ours = {n: r for n, r in results.items() if n.startswith("workbench") and "error" not in r}
    peers = {n: r for n, r in results.items() if not n.startswith("workbench") and "error" not in r}
    if ours and peers:
        print(f"\n{'workbench variant':<28}{'vs peer':<24}{'speed':>8}{'median-step':>13}{'best run':>10}{'memory':>9}"
              f"{'anon' if cpu else '':>7}{'wall':>7}")
        for our_name, our in ours.items():
            for peer_name, peer in peers.items():
                print(f"{our_name:<28}{peer_name:<24}{our['steps_per_s'] / peer['steps_per_s']:>7.2f}x"
                      f"{our['step_median_steps_per_s'] / peer['step_median_steps_per_s']:>12.2f}x"
                      f"{our['best_steps_per_s'] / peer['best_steps_per_s']:>9.2f}x"
                      f"{our['min_peak_bytes'] / peer['min_peak_bytes']:>8.2f}x"
                      + (f"{our['min_peak_anon_bytes'] / peer['min_peak_anon_bytes']:>6.2f}x" if cpu else "")
                      + f"{our['wall_s'] / peer['wall_s']:>6.2f}x")
    if args.device.startswith("cuda"):
        print(f"\nimplicit waits for the GPU over the {steps - args.warmup - 1} measured steps (torch's CUDA sync debug mode), by line:")
        for name, result in results.items():
            if "error" not in result:
                sites = ", ".join(f"{site} ×{n}" for site, n in sorted(result["syncs"].items(), key=lambda kv: -kv[1])) or "none"
                print(f"  {name:<26}{sum(result['syncs'].values()):>5}   {sites}")
    footprint = _catalog_footprint(catalog, env) if not args.device.startswith("cuda") else None
    if footprint is not None:
        print(f"\nof our peak RSS, {footprint / 2**20:.0f} MiB is the catalog: DuckDB loaded, the catalog opened and the\n"
              "dataset read, measured on its own in a bare Python process (the peer has no catalog)")
    print("\nspeed = steps/s over the steps after warm-up, median run; median-step = 1 / the median step time (robust to"
          "\nbusy spells on a shared machine); best run = fastest run of each; memory = our peak ÷ peer peak (lowest run"
          "\nof each); anon = the same for peak anonymous memory (RssAnon, sampled at each step: what the process"
          "\nallocated, without the library code it maps, which RSS counts); wall = whole-process time, model loading, caching and any compile included."
          "\nTargets: speed ≥ 1.5, memory ≤ 1.0.")


if __name__ == "__main__":
    main()
