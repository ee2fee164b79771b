"""The notebooks on a learner's own pictures: other formats, sizes, modes and kinds, made here.

Every notebook that reads ``utils.DATA_DIR`` runs top to bottom in a fresh kernel with
``BN_SERIES_DATA`` pointing at a folder of three pictures this test draws. Two sets:

- ``formats``: a non-square RGB JPEG with an EXIF orientation tag, an RGBA PNG with
  transparency, and a large 16-bit grayscale PNG (flat drawings);
- ``photographs``: pictures that behave like photographs: smooth gradients, fine texture and
  sensor-like noise, color, non-square, JPEG-compressed (a landscape, a portrait, objects on a
  table).

Every assertion in the notebooks must hold on both (the notebooks check the phenomenon, not our
pixels). The executed notebooks are kept in memory only, and the picture folder must come out
unchanged.
"""

import hashlib
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [
    path
    for path in [
        *sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")),
        *sorted((ROOT / "notebooks" / "deep_dives").glob("*.ipynb")),
    ]
    if "utils.DATA_DIR" in path.read_text(encoding="utf-8")
]


def draw_formats(folder: Path) -> None:
    """Three clearly different pictures in three different formats and modes."""
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 40 + yy // 40) % 2) * 200], -1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": a phone photo held upright
    Image.fromarray(rgb.astype(np.uint8)).save(folder / "a_photo.jpg", exif=exif, quality=90)

    ring = Image.new("RGBA", (150, 150), (0, 0, 0, 0))
    ImageDraw.Draw(ring).ellipse([20, 20, 130, 130], outline=(200, 30, 30, 255), width=18)
    ring.save(folder / "b_ring.png")

    stripes = (np.arange(1200)[None, :] // 75 % 2) * 60000 + 3000 * np.ones((900, 1))
    Image.fromarray(stripes.astype(np.uint16)).save(folder / "c_stripes.png")


def texture(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    """Fractal noise in 0-1: random grids of growing resolution, upsampled and summed."""
    total = np.zeros((h, w))
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
        total += np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC)) / 2**octave
    return (total - total.min()) / (total.max() - total.min())


def draw_photographs(folder: Path) -> None:
    """Three photograph-like pictures: gradients, texture, noise, color, non-square, JPEG."""
    rng = np.random.default_rng(7)

    h, w = 427, 640  # a landscape: sky gradient, sun, textured hills
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    sky = np.stack([90 + 80 * yy, 140 + 70 * yy, 230 - 30 * yy], -1)
    sun = np.exp(-((xx - 0.75) ** 2 + (yy - 0.2) ** 2) / 0.004)[..., None] * [120, 100, 0]
    hills = yy > 0.55 + 0.08 * np.sin(9 * xx) + 0.1 * texture(rng, h, w)
    ground = np.stack([40 + 60 * texture(rng, h, w), 90 + 90 * texture(rng, h, w), 40 * yy], -1)
    land = np.where(hills[..., None], ground, sky + sun) + rng.normal(0, 6, (h, w, 3))
    Image.fromarray(land.clip(0, 255).astype(np.uint8)).save(folder / "landscape.jpg", quality=85)

    h, w = 640, 480  # a portrait: a lit oval face before a dark textured wall, grayscale
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    face = ((xx - 0.5) / 0.28) ** 2 + ((yy - 0.45) / 0.3) ** 2 < 1
    light = 150 + 90 * (1 - xx) - 40 * yy + 25 * texture(rng, h, w)
    wall = 35 + 50 * texture(rng, h, w, octaves=6)
    gray = np.where(face, light, wall) + rng.normal(0, 8, (h, w))
    Image.fromarray(gray.clip(0, 255).astype(np.uint8), mode="L").save(
        folder / "portrait.jpg", quality=80
    )

    h, w = 375, 500  # objects on a wooden table: colored blobs with shading
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    wood = 120 + 60 * np.sin(60 * yy + 8 * texture(rng, h, w))
    table = np.stack([wood + 40, wood, wood * 0.6], -1)
    for cx, cy, r, color in [(0.3, 0.5, 0.18, (200, 40, 40)), (0.68, 0.42, 0.14, (40, 160, 60))]:
        d2 = ((xx - cx) * w / h) ** 2 + (yy - cy) ** 2
        shade = np.clip(1.1 - d2 / r**2, 0, 1)[..., None]
        table = np.where((d2 < r**2)[..., None], np.array(color) * (0.4 + shade), table)
    table += rng.normal(0, 5, (h, w, 3))
    Image.fromarray(table.clip(0, 255).astype(np.uint8)).save(folder / "objects.jpg", quality=90)


def fingerprint(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


EXPECTED_MODES = {
    "formats": {"a_photo.jpg": "RGB", "b_ring.png": "RGBA", "c_stripes.png": "I;16"},
    "photographs": {"landscape.jpg": "RGB", "portrait.jpg": "L", "objects.jpg": "RGB"},
}
DRAW = {"formats": draw_formats, "photographs": draw_photographs}


@pytest.fixture(scope="module", params=sorted(DRAW))
def pictures(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"own_pictures_{request.param}")
    DRAW[request.param](folder)
    modes = {p.name: Image.open(p).mode for p in folder.iterdir()}
    assert modes == EXPECTED_MODES[request.param]
    before = fingerprint(folder)
    yield folder
    assert fingerprint(folder) == before, "a notebook wrote into the learner's picture folder"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_other_pictures(path, pictures, monkeypatch):
    monkeypatch.setenv("BN_SERIES_DATA", str(pictures))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any assertion fails
    outputs = "".join(
        "".join(o.get("text", ""))
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "circle.png" not in outputs, "the notebook read the shipped images, not the learner's"
