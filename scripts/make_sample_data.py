"""Rebuild sample_data/ from scikit-image's bundled photos (public domain / CC0), with planted cases.

Run once by a maintainer (needs `pip install scikit-image`); the result is committed.
Every photo used is public domain or CC0 per scikit-image's data docstrings.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image
import skimage.data as skd

OUT = Path(__file__).resolve().parents[1] / "sample_data"


def rgb(array) -> Image.Image:
    img = Image.fromarray(array)
    return img.convert("RGB")


def save_jpeg(img: Image.Image, path: Path, quality: int = 88, exif: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": quality}
    if exif is not None:
        kwargs["exif"] = exif
    img.save(path, "JPEG", **kwargs)


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def main() -> None:
    for child in OUT.iterdir() if OUT.exists() else []:
        if child.name == "README.md":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    OUT.mkdir(exist_ok=True)
    photos = OUT / "photos"
    # Distinct photos (public domain or CC0).
    sources = {
        "astronaut": skd.astronaut(), "coffee": skd.coffee(), "chelsea": skd.chelsea(),
        "rocket": skd.rocket(), "hubble": skd.hubble_deep_field()[:600, :800], "brick": skd.brick(),
        "grass": skd.grass(), "gravel": skd.gravel(), "retina": skd.retina()[::3, ::3], "clock": skd.clock(),
        "camera": skd.camera(), "coins": skd.coins(), "horse": (~skd.horse()).astype(np.uint8) * 255,
        "cell": skd.cell(),
    }
    grayscale = {"camera", "coins", "horse", "cell", "clock", "brick", "grass", "gravel"}
    photos.mkdir(parents=True, exist_ok=True)
    for name, array in sources.items():
        img = Image.fromarray(array)
        img = img.convert("L") if name in grayscale else img.convert("RGB")
        if name in {"camera", "coins", "horse"}:
            img.save(photos / f"{name}.png")
        else:
            save_jpeg(img, photos / f"{name}.jpg")
    # Distinct crops of the astronaut photo, so the set has a few more training images.
    astronaut = rgb(skd.astronaut())
    for i, box in enumerate([(0, 0, 256, 320), (256, 0, 512, 320), (100, 250, 420, 512)]):
        save_jpeg(astronaut.crop(box), photos / f"astronaut_crop_{i}.jpg")

    # Caption sidecars: .txt and .caption beside the image, same stem.
    (photos / "coffee.txt").write_text("a cup of coffee on a saucer, top view\n")
    (photos / "chelsea.caption").write_text("a tabby cat looking at the camera\n")
    (photos / "rocket.txt").write_text("a rocket on its launch pad\n")

    # Near duplicates: resized and re-encoded copies.
    dup = OUT / "duplicates"
    coffee = rgb(skd.coffee())
    save_jpeg(coffee.resize((300, 200), Image.Resampling.LANCZOS), dup / "coffee_small_q70.jpg", quality=70)
    chelsea = rgb(skd.chelsea())
    dup.mkdir(exist_ok=True)
    chelsea.save(dup / "chelsea_lossless.png")  # same size, lossless: should win the keep policy
    astronaut.resize((384, 384), Image.Resampling.LANCZOS).save(dup / "astronaut_384.webp", quality=80)

    # Byte-identical copies at two paths.
    copies = OUT / "copies"
    copies.mkdir(exist_ok=True)
    shutil.copyfile(photos / "rocket.jpg", copies / "rocket_copy.jpg")

    # EXIF-rotated photos: pixels stored sideways, EXIF orientation says how to show them.
    exif = OUT / "exif"
    gravel = rgb(skd.gravel()).crop((0, 0, 512, 384))
    save_jpeg(gravel.transpose(Image.Transpose.ROTATE_90), exif / "gravel_orientation6.jpg", exif=exif_with_orientation(6))
    clock = Image.fromarray(skd.clock()).convert("RGB")
    save_jpeg(clock.transpose(Image.Transpose.ROTATE_270), exif / "clock_orientation8.jpg", exif=exif_with_orientation(8))

    # A kohya-style concept folder: "<repeats>_<trigger> <class>".
    concept = OUT / "concepts" / "5_wbk cat"
    concept.mkdir(parents=True)
    for i, box in enumerate([(0, 0, 300, 300), (150, 0, 451, 300), (60, 20, 360, 300)]):
        save_jpeg(chelsea.crop(box).resize((256, 256), Image.Resampling.LANCZOS), concept / f"cat_{i}.jpg")
        (concept / f"cat_{i}.txt").write_text(f"wbk cat, crop {i}\n")

    # Bad input, one of each kind.
    bad = OUT / "bad"
    bad.mkdir()
    (bad / "zero_byte.jpg").write_bytes(b"")
    full = io.BytesIO()
    save_jpeg_bytes = coffee.copy()
    save_jpeg_bytes.save(full, "JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    (bad / "text_named_as.jpg").write_text("this is not a picture, just text with a .jpg name\n")
    Image.new("1", (20000, 20000), 0).save(bad / "decompression_bomb.png", optimize=True)
    os.symlink("loop_b.jpg", bad / "loop_a.jpg")
    os.symlink("loop_a.jpg", bad / "loop_b.jpg")
    os.symlink("..", bad / "loop_to_parent")  # a folder link back up: must not be walked forever
    non_utf8 = os.fsencode(str(bad)) + b"/caf\xe9_latin1_name.jpg"
    with open(non_utf8, "wb") as handle:
        rgb(skd.coffee()).crop((100, 50, 400, 350)).rotate(90).save(handle, "JPEG", quality=85)
    yy, xx = np.mgrid[0:384, 0:512].astype(np.float64)
    rings = 0.5 + 0.25 * np.sin(np.hypot(xx - 200, yy - 150) / 9.0) + 0.25 * (xx / 512.0)
    Image.fromarray((rings / rings.max() * 65535).astype(np.uint16)).save(bad / "sixteen_bit.png")
    rgb(skd.rocket()).crop((0, 0, 300, 300)).convert("CMYK").save(bad / "cmyk.jpg", "JPEG", quality=85)
    palette = rgb(skd.chelsea()).crop((200, 100, 400, 300)).quantize(64)
    palette.info["transparency"] = 0
    palette.save(bad / "palette_transparency.png", transparency=0)
    frames = [rgb(skd.hubble_deep_field()[i * 40 : i * 40 + 160, :160]) for i in range(4)]
    frames[0].save(bad / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    buffer = io.BytesIO()
    rgb(skd.hubble_deep_field()[600:, 200:]).save(buffer, "PNG")
    (bad / "png_with_wrong_extension.dat").write_bytes(buffer.getvalue())
    (bad / "notes.md").write_text("Not an image and not named like one: ingest ignores it.\n")


if __name__ == "__main__":
    main()
