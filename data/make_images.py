"""Draw the three training images of the series into ``data/train/``.

Run from the repository root::

    python data/make_images.py

The images are drawn, not downloaded: a disc, a square and a triangle, each a
light shape on a dark, softly shaded background, saved as 8-bit grayscale PNG.
Drawing is deterministic, so the files are byte-for-byte the same on every run.
An existing file is never overwritten unless you pass ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256
OUT_DIR = Path(__file__).resolve().parent / "train"


def _background(size: int) -> Image.Image:
    """A dark diagonal gradient, so the pictures are not purely two-valued."""
    ramp = np.add.outer(np.arange(size), np.arange(size)) / (2 * (size - 1))
    return Image.fromarray((20 + 50 * ramp).astype(np.uint8), mode="L")


def draw(shape: str, size: int = SIZE) -> Image.Image:
    """Return one ``size`` x ``size`` grayscale picture of ``shape``.

    ``shape`` is ``"circle"``, ``"square"`` or ``"triangle"``.
    """
    image = _background(size)
    pen = ImageDraw.Draw(image)
    m = size // 6  # margin
    if shape == "circle":
        pen.ellipse([m, m, size - m, size - m], fill=230)
    elif shape == "square":
        pen.rectangle([m, m, size - m, size - m], fill=200)
    elif shape == "triangle":
        pen.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=250)
    else:
        raise ValueError(f"unknown shape {shape!r}; use circle, square or triangle")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write into")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in ("circle", "square", "triangle"):
        path = args.out / f"{shape}.png"
        if path.exists() and not args.force:
            print(f"kept     {path} (exists; --force to redraw)")
            continue
        draw(shape).save(path)
        print(f"wrote    {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
