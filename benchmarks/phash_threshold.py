"""Why the default pHash threshold is 6: distances of edited copies vs distinct photos.

Prints, for the sample photos, the pHash distance between each photo and edited copies of it
(resize, JPEG/WebP re-encode, brightness, crops), the smallest distance between two distinct
photos, and the chance that two unrelated (uniformly random) 64-bit hashes fall within t bits.

    python benchmarks/phash_threshold.py
"""

from __future__ import annotations

import io
import itertools
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipelines.ingest import _hashes  # noqa: E402


def reencode(img: Image.Image, fmt: str, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, fmt, quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * fraction), int(h * fraction)
    return img.crop((dx, dy, w - dx, h - dy))


EDITS = {
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "JPEG quality 40": lambda im: reencode(im, "JPEG", 40),
    "WebP quality 60": lambda im: reencode(im, "WEBP", 60),
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "quarter size, JPEG q60": lambda im: reencode(im.resize((im.width // 4, im.height // 4)), "JPEG", 60),
    "crop 3% each side": lambda im: crop(im, 0.03),
    "crop 8% each side": lambda im: crop(im, 0.08),
}


def main() -> None:
    files = sorted(p for p in (REPO / "sample_data" / "photos").iterdir() if p.suffix in {".jpg", ".png"})
    images = [Image.open(p).convert("RGB") for p in files]
    hashes = [_hashes(im)[0] for im in images]
    distinct = [bin(a ^ b).count("1") for a, b in itertools.combinations(hashes, 2)]
    print(f"{len(images)} distinct sample photos: {len(distinct)} pairs, smallest distance {min(distinct)}, median {np.median(distinct):.0f}")
    print(f"{'edit':26s} {'max':>4s} {'mean':>5s}")
    for name, edit in EDITS.items():
        distances = [bin(_hashes(edit(im))[0] ^ h).count("1") for im, h in zip(images, hashes)]
        print(f"{name:26s} {max(distances):4d} {np.mean(distances):5.1f}")
    print("chance that two unrelated hashes are within t bits (expected false pairs among 1M images):")
    for t in (4, 6, 8, 10):
        p = sum(math.comb(64, k) for k in range(t + 1)) / 2**64
        print(f"  t={t:2d}: {p:.1e} per pair, {p * 1e6 * (1e6 - 1) / 2:,.0f} at 1M images")


if __name__ == "__main__":
    main()
