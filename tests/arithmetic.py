"""Does this machine compute the notebooks' trainings to the same bits as the one that recorded
them?

A training's last bits follow the CPU: the kernels TensorFlow runs for a convolution are chosen
for the instruction set and split their sums by the cache sizes, and Adam's first updates carry a
last-bit difference into a different model (docs/decisions.md). So the outputs of cells
downstream of a training can be compared with the stored ones only on a machine whose arithmetic
reproduces the recording's.

This script tells, from computed bits rather than from the CPU's name: for each kind of model the
notebooks train, it runs the first steps of such a training, with the notebooks' own process
settings, and digests every weight afterwards (moving statistics included). The recording
machine's digests are stored in ``tests/recording.json``; a machine that reproduces the recording
computes the same digests, so it is always compared strictly.

Usage, from the repository root::

    python tests/arithmetic.py            # this machine's digests, and whether they match
    python tests/arithmetic.py --write    # store them, after re-recording the notebooks here

After a change to the code that leaves every notebook's outputs as they are (a comment, a
refactoring the tests show to be exact), ``--write`` on the recording kind of CPU, where every
kind still reads "the recording's", refreshes the digest of the inputs alone.

The kinds:

- ``resnet50``: the case (notebooks 02-05, the ResNet50 deep dives): ``utils.build_resnet50`` on
  the shipped pictures, one eager update with Adam, as notebook 02 trains;
- ``small-cnn``: the small CNN of notebooks 06-07: four graph-mode updates of
  ``utils.build_small_cnn`` on drawn patterns in batches of 16 (06) and four in batches of 32
  (07's pretraining), and eight eager updates in a ``tf.GradientTape`` loop (07's custom loop).

The digests follow the code and packages too, not only the CPU: ``tests/recording.json`` also
holds a digest of what the trainings are made of (``utils.py``, ``bn_toolkit.py``, this file, the
shipped pictures, the TensorFlow, Keras and NumPy versions). Where that differs, the recording
cannot tell this CPU's arithmetic from a change in the code, and the plugin compares every cell.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "recording.json"


def _resnet50() -> str:
    """One eager Adam update of the case's ResNet50 on the shipped pictures."""
    import utils

    images, labels, _ = utils.load_images(utils.ROOT / "data" / "train")
    model = utils.compile_model(utils.build_resnet50(num_classes=len(labels)))
    model.fit(images, labels, epochs=1, verbose=0)
    return utils.weights_digest(model)


def _small_cnn() -> str:
    """Graph-mode ``fit`` in batches of 16 and of 32 (four updates each), and an eager
    ``GradientTape`` loop (eight updates), on the small CNN."""
    import keras
    import numpy as np
    import tensorflow as tf

    import utils

    images, labels = utils.draw_patterns(128, rng=np.random.default_rng(0))
    digests = []
    for batch_size in (16, 32):  # 06 trains in batches of 16, 07 pretrains in batches of 32
        graph = utils.compile_model(utils.build_small_cnn(), run_eagerly=False)
        graph.fit(
            images[: 4 * batch_size],
            labels[: 4 * batch_size],
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        digests.append(utils.weights_digest(graph))

    eager = utils.build_small_cnn()
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.CategoricalCrossentropy()
    for start in range(0, len(images), 16):
        x, y = images[start : start + 16], labels[start : start + 16]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, eager(x, training=True))
        gradients = tape.gradient(loss, eager.trainable_variables)
        optimizer.apply_gradients(zip(gradients, eager.trainable_variables, strict=True))
    return "".join(digests) + utils.weights_digest(eager)


#: Each kind of training the notebooks run, and the first steps that stand for it.
TRAININGS = {"resnet50": _resnet50, "small-cnn": _small_cnn}
KINDS = tuple(TRAININGS)


def fingerprints() -> dict[str, str]:
    """This machine's digest for each kind, computed with the notebooks' process settings.

    Returns:
        A dict from kind (``"resnet50"``, ``"small-cnn"``) to a hexadecimal digest.
    """
    import utils

    found = {}
    for kind, compute in TRAININGS.items():
        utils.setup()  # seeds, deterministic ops and thread pools, as every notebook
        found[kind] = compute()
        utils.release_memory()
    return found


def inputs() -> str:
    """Digest of what the trainings are made of: the code, the pictures and the packages.

    Returns:
        16 hexadecimal digits of SHA-256 over ``utils.py``, ``bn_toolkit.py``, this file, every
        file in ``data/train/`` and the installed TensorFlow, Keras and NumPy versions.
    """
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    files = [
        ROOT / "utils.py",
        ROOT / "bn_toolkit.py",
        Path(__file__),
        *sorted((ROOT / "data" / "train").iterdir()),
    ]
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"python=={sys.version_info[:3]}".encode())
    for names in (("tensorflow-cpu", "tensorflow"), ("keras",), ("numpy",), ("pillow",)):
        found = "missing"
        for name in names:  # the CPU build, or the full one, of the same TensorFlow
            with contextlib.suppress(PackageNotFoundError):
                found = version(name)
                break
        digest.update(f"{names[0]}=={found}".encode())
    return digest.hexdigest()[:16]


def recorded() -> dict:
    """The recording machine's digests and inputs, from ``tests/recording.json``.

    Returns:
        ``{"fingerprints": {kind: digest}, "inputs": digest}``.
    """
    return json.loads(RECORDING.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store this machine's digests")
    args = parser.parse_args()
    # The notebooks' setup cell, before TensorFlow starts.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.path.insert(0, str(ROOT))
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # setup's version line
        found = fingerprints()
    stored = recorded()
    for kind, digest in found.items():  # for the reader, on stderr: stdout's last line is data
        same = "the recording's" if digest == stored["fingerprints"].get(kind) else "other bits"
        print(f"{kind}: {same}", file=sys.stderr)
    same_inputs = "the recording's" if inputs() == stored["inputs"] else "changed"
    print(f"code, pictures and packages: {same_inputs}", file=sys.stderr)
    if args.write:
        stored = {"fingerprints": found, "inputs": inputs()}
        RECORDING.write_text(json.dumps(stored, indent=1) + "\n")
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
