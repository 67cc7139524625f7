"""Captioning throughput: `model_captions` (batched, DataLoader decode) vs a one-image-at-a-time loop.

Both run the same BLIP model on the same synthetic photo-sized images in one process and one run, and the
script prints images/s side by side with the ratio. The default architecture is BLIP *base* (ViT-B/16 at
384 px + BERT-base decoder, the shape of Salesforce/blip-image-captioning-base) built from config with random
weights, since no weights can be downloaded here: the compute per image is the real model's, the words are not.
A random decoder never emits [SEP], so every caption runs to --max-length tokens (the worst case, for both).

    python benchmarks/caption.py                                  # BLIP-base arch, CPU, 16 images
    python benchmarks/caption.py --arch tiny --images 64          # the offline tiny preset
    python benchmarks/caption.py --device cuda --dtype fp16 --images 256 --batch-size 64
    python benchmarks/caption.py --arch sd15 --device cuda        # real weights, if they are in the HF cache
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.caption import model_captions, open_rgb, usable_images  # noqa: E402
from pipelines.ingest import ingested_images  # noqa: E402
from workbench.catalog import connect  # noqa: E402
from workbench.models import PRESETS, load_blip, resolve_device, resolve_dtype  # noqa: E402


def blip_base_random(device: torch.device, dtype: torch.dtype):
    """BLIP-base architecture (default BlipConfig) with random weights and a 30,524-entry WordPiece vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tiny_processor, _ = load_blip("tiny", device="cpu")
    config = BlipConfig()  # defaults = blip-image-captioning-base: 384 px ViT-B/16, BERT-base text decoder
    vocab = list(tiny_processor.tokenizer.get_vocab())
    vocab = [t for t in vocab if t != "[DEC]"]
    vocab += [f"[unused{i}]" for i in range(config.text_config.vocab_size - 1 - len(vocab))] + ["[DEC]"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.txt"
        vocab_file.write_text("".join(t + "\n" for t in vocab))
        tokenizer = BertTokenizer(vocab=str(vocab_file), bos_token="[DEC]")
    config.text_config.bos_token_id = tokenizer.convert_tokens_to_ids("[DEC]")
    config.text_config.sep_token_id = tokenizer.convert_tokens_to_ids("[SEP]")
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer)
    return processor, model


def make_images(folder: Path, count: int) -> None:
    """Photo-sized JPEGs (640-1024 px) with smooth gradients and noise, so decoding costs what photos cost."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        width, height = int(rng.integers(640, 1025)), int(rng.integers(480, 1025))
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * (i + 1)) % 256, (y * 2) % 256, ((x + y) // 3 + 40 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo_{i:04d}.jpg", quality=90)


def single_loop(con, processor, model, *, max_length: int, device, dtype) -> int:
    """The plain way: open, preprocess, generate and store one image at a time."""
    rows = usable_images(con)
    with torch.inference_mode():
        for image_id, path in rows:
            inputs = processor(images=open_rgb(path), return_tensors="pt")
            tokens = model.generate(pixel_values=inputs["pixel_values"].to(device, dtype=dtype), max_length=max_length)
            text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
            con.execute("INSERT OR REPLACE INTO captions (image_id, source, text) VALUES (?, 'model:loop', ?)",
                        [image_id, text])
    return len(rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="blip-base", help="blip-base (random weights), tiny, or a preset/HF id/folder")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers for the batched run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); use 1 on a CPU shared with other jobs")
    parser.add_argument("--skip-loop", action="store_true", help="only the batched figure (large GPU runs)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    os.environ.setdefault("WORKBENCH_HOME", str(Path(tempfile.gettempdir()) / "workbench_bench_home"))
    if args.arch == "blip-base":
        processor, model = blip_base_random(device, dtype)
        label = "BLIP-base architecture, random weights"
    else:
        processor, model = load_blip(args.arch, device=device, dtype=dtype)
        label = args.arch + (" (preset)" if args.arch in PRESETS else "")
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {label}, {params / 1e6:.1f}M parameters, device {device}, dtype {dtype}, "
          f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}")

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "images"
        make_images(folder, args.images)
        con = connect(Path(work) / "bench.duckdb")
        ingested_images(con, [folder], workers=1)

        # warm-up (kernels, allocator) on two images, not timed
        with torch.inference_mode():
            warm = processor(images=[open_rgb(p) for _, p in usable_images(con)[:2]], return_tensors="pt")
            model.generate(pixel_values=warm["pixel_values"].to(device, dtype=dtype), max_length=4)
        sync(device)

        start = time.perf_counter()
        counts = model_captions(con, processor, model, model_name="bench", batch_size=args.batch_size,
                                max_length=args.max_length, device=device, workers=args.workers)
        sync(device)
        batched_s = time.perf_counter() - start
        batched_rate = counts["captioned"] / batched_s
        print(f"batched  (batch {args.batch_size}, DataLoader decode): {counts['captioned']} images in "
              f"{batched_s:.1f} s = {batched_rate:.2f} images/s")
        if args.skip_loop:
            return
        start = time.perf_counter()
        n = single_loop(con, processor, model, max_length=args.max_length, device=device, dtype=dtype)
        sync(device)
        loop_s = time.perf_counter() - start
        loop_rate = n / loop_s
        print(f"one-at-a-time loop:                  {n} images in {loop_s:.1f} s = {loop_rate:.2f} images/s")
        print(f"ratio batched / loop: {batched_rate / loop_rate:.2f}x")
        same = con.execute(
            "SELECT count(*) FROM captions a JOIN captions b USING (image_id) "
            "WHERE a.source = 'model:bench' AND b.source = 'model:loop' AND a.text = b.text"
        ).fetchone()[0]
        print(f"captions identical between the two runs: {same}/{n}")
        con.close()


if __name__ == "__main__":
    main()
