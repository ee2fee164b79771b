"""The notebooks on a learner's own pictures: other formats, sizes and modes, made here.

Each notebook runs top to bottom in a fresh kernel with ``BN_SERIES_DATA`` pointing at a folder
of three pictures this test draws: a non-square RGB JPEG with an EXIF orientation tag, an RGBA PNG
with transparency, and a large 16-bit grayscale PNG. Every assertion in the notebooks must hold
on them (the notebooks check the phenomenon, not our pixels). The executed notebooks are kept in
memory only, and the picture folder must come out unchanged.
"""

import hashlib
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def draw_pictures(folder: Path) -> None:
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


def fingerprint(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own_pictures")
    draw_pictures(folder)
    modes = {p.name: Image.open(p).mode for p in folder.iterdir()}
    assert modes == {"a_photo.jpg": "RGB", "b_ring.png": "RGBA", "c_stripes.png": "I;16"}
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
        "".join(o.get("text", "")) for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "circle.png" not in outputs, "the notebook read the shipped images, not the learner's"
