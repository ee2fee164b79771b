"""Shared helpers for the BatchNormalization series.

Every notebook puts the repository root on ``sys.path`` and does ``import utils``.
Each helper says in its docstring which notebook introduces it; the notebook shows
the idea in the open first, and the helper then carries it for reuse.

Sections: setup, data, model, statistics, remedies, plots.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

_IMPORTED_AT = time.perf_counter()

#: The one seed of the series. Change it here to rerun everything with another.
#: With this one, five epochs of the case memorise the shipped images and
#: ``fit`` reports accuracy 1.0 from epoch 2, as in the original case. With some
#: other seeds Adam's steps on raw 0-255 pixels bounce, and the series trains a
#: few epochs more (``StopWhenMemorised``); ``tests/test_seeds.py`` runs eight.
SEED = 6

#: Side length, in pixels, of the square images the network sees (as in the case).
IMAGE_SIZE = 197

#: Oldest versions the notebooks work with, and why.
MIN_VERSIONS = {
    "tensorflow": ("2.16", "Keras 3 is the default from TensorFlow 2.16"),
    "keras": ("3.14", "BatchNormalization(renorm=True) is back from Keras 3.14"),
    "pillow": ("10.0", "Image.Resampling.LANCZOS; Image.ANTIALIAS is gone from Pillow 10"),
}

#: The repository's root folder (where this file lives).
ROOT = Path(__file__).resolve().parent

#: Folder of the training images. Set the environment variable ``BN_SERIES_DATA``
#: to a folder of your own pictures (before starting Jupyter) to run the series on them.
DATA_DIR = Path(os.environ.get("BN_SERIES_DATA") or ROOT / "data" / "train")

#: Folder for everything the series generates (git-ignored).
OUTPUT_DIR = ROOT / "output"

#: The series' GitHub repository, owner/name: the one definition every Binder link uses.
REPOSITORY = "batchnorm-series/fit-vs-predict"


def binder_url(path: str = "") -> str:
    """The mybinder.org link that opens ``path`` (e.g. ``notebooks/01_load_images.ipynb``) in JupyterLab."""
    base = f"https://mybinder.org/v2/gh/{REPOSITORY}/HEAD"
    return f"{base}?urlpath=lab/tree/{path}" if path else f"{base}?urlpath=lab"


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration of the block.

    TensorFlow's C++ start-up messages (oneDNN, CUDA stub) bypass Python and
    ``TF_CPP_MIN_LOG_LEVEL``; this keeps them out of notebook outputs. Python
    exceptions are unaffected: they are raised, not written to fd 2.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# oneDNN's CPU kernels keep the memory of every model trained in the process,
# which would push a notebook that trains several models past Binder's 2 GB;
# without them each freed model's memory is returned (training is ~20 % slower).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

#: Threads in each of TensorFlow's two CPU thread pools (intra-op and inter-op).
#: TensorFlow sizes its pools by the CPUs the process may use, and a reduction
#: split among more threads adds its partial sums in another order; a few Adam
#: steps on raw pixels turn that last-bit difference into another model. With a
#: fixed pool size the series computes the same bits on 1, 2 or 64 CPUs. Set
#: ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` yourself before
#: starting Jupyter to opt out (you then see other numbers than the stored ones).
THREADS = 2
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(THREADS))
os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(THREADS))
with _stderr_fd_silenced():
    import tensorflow as tf
    import keras

try:  # the same pool sizes, set through the API too so that setup() can report them
    tf.config.threading.set_intra_op_parallelism_threads(int(os.environ["TF_NUM_INTRAOP_THREADS"]))
    tf.config.threading.set_inter_op_parallelism_threads(int(os.environ["TF_NUM_INTEROP_THREADS"]))
except RuntimeError:  # TensorFlow already ran in this process: its pools are fixed
    pass


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.21.0rc1"`` -> ``(2, 21, 0)``: the leading numeric parts."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def check_versions(installed: dict[str, str] | None = None) -> dict[str, str]:
    """Check TensorFlow, Keras and Pillow against :data:`MIN_VERSIONS`.

    Returns the installed versions. Raises ``RuntimeError`` naming every package
    that is too old and the command that fixes it. ``installed`` overrides some or
    all of the detected versions (for tests). Introduced in notebook 01.
    """
    import PIL

    found = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "pillow": PIL.__version__,
        **(installed or {}),
    }
    too_old = [
        f"{name} {found[name]} is older than {minimum} ({why})"
        for name, (minimum, why) in MIN_VERSIONS.items()
        if _version_tuple(found[name]) < _version_tuple(minimum)
    ]
    if too_old:
        raise RuntimeError(
            "This series needs newer packages:\n  - "
            + "\n  - ".join(too_old)
            + "\nInstall the tested versions with:  pip install -r requirements.txt"
        )
    return found


_VERSIONS = check_versions()  # stop at import, with the fix, if a package is too old


def setup(seed: int = SEED) -> None:
    """Check versions, seed every generator and make TensorFlow ops deterministic.

    The one place where the series sets seeds. Prints one line saying what it
    set. Introduced in notebook 01; every notebook's setup cell calls it.
    """
    versions = check_versions()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    print(
        f"TensorFlow {versions['tensorflow']}, Keras {versions['keras']}, "
        f"Pillow {versions['pillow']} | seed {seed} | deterministic ops | "
        f"{intra}+{inter} threads"
    )


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

#: Background that transparent pixels are composited onto (white, as a viewer shows them).
BACKGROUND = 255


def image_files(directory: str | os.PathLike) -> list[Path]:
    """The files of ``directory`` that ``load_images`` reads, sorted by name.

    Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ...) and
    sub-folders are skipped. Raises ``FileNotFoundError`` if the folder does
    not exist and ``ValueError`` if it is a file. Introduced in notebook 01.
    """
    folder = Path(directory)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder of images")
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()
    )


def _to_gray_float(image: Image.Image) -> np.ndarray:
    """Grayscale float32 array in 0-255 for any Pillow mode.

    16-bit integer images (modes ``I;16*``, and ``I``, which Pillow uses for
    16-bit PNGs too) are scaled from 0-65535 (not clipped);
    transparent pixels are composited onto :data:`BACKGROUND`.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        return (values * (255.0 / 65535.0)).clip(0, 255).astype(np.float32)
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32).clip(0, 255)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(backdrop, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def load_image(path: str | os.PathLike, size: int = IMAGE_SIZE) -> np.ndarray:
    """Read one picture as a ``size x size`` float32 grayscale array, values 0-255.

    Applies the EXIF orientation, converts to grayscale (see ``_to_gray_float``)
    and resizes with Lanczos resampling (the filter ``Image.ANTIALIAS`` used to
    name). Non-square pictures are stretched, as in the original case. Raises
    ``ValueError`` naming the file if it is not a readable image.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path.name}: the file is empty (0 bytes), not an image")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            gray = _to_gray_float(image)
    except Exception as error:  # Pillow raises many types; the learner needs one.
        raise ValueError(
            f"{path.name}: not a readable image ({type(error).__name__}: {error})"
        ) from error
    resized = Image.fromarray(gray, mode="F").resize(
        (size, size), Image.Resampling.LANCZOS
    )
    return np.asarray(resized, dtype=np.float32).clip(0, 255)


def load_images(
    directory: str | os.PathLike, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load every image of ``directory`` as one class each.

    Returns ``(images, labels, names)``:

    - ``images``: float32, shape ``N x size x size x 1``, raw values 0-255;
    - ``labels``: one-hot float32, shape ``N x N``; image ``i`` is class ``i``;
    - ``names``: the file names, sorted, so labels never depend on the order
      the file system lists files in.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for
    fewer than two images or a file that is not a readable image. Introduced
    in notebook 01.
    """
    files = image_files(directory)
    if len(files) < 2:
        raise ValueError(
            f"{directory} holds {len(files)} image file(s); the series needs at "
            "least 2 (one class each)"
        )
    images = np.stack([load_image(f, size) for f in files])[..., np.newaxis]
    labels = np.eye(len(files), dtype=np.float32)
    return images, labels, [f.name for f in files]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class _GroupNormalization(keras.layers.GroupNormalization):
    """GroupNormalization that accepts (and ignores) the ``mask`` a model passes."""

    def call(self, inputs, mask=None):  # noqa: D102 - same as the parent
        return super().call(inputs)


def build_resnet50(
    num_classes: int,
    size: int = IMAGE_SIZE,
    momentum: float = 0.99,
    normalization: str = "batch",
    seed: int = SEED,
) -> keras.Model:
    """The case's model: ``ResNet50(weights=None, input_shape=(size, size, 1), classes=N)``.

    The seed is set first, so every call gives the same initial weights.
    ``momentum`` is set on all BatchNormalization layers. ``normalization``
    replaces them: ``"batch"`` (as built), ``"renorm"`` (Batch Renormalization)
    or ``"group"`` (GroupNormalization, 32 groups). Call
    ``keras.backend.clear_session()`` and drop the old model before building
    a new one, to keep one model in memory. Introduced in notebook 02.
    """
    if normalization not in ("batch", "renorm", "group"):
        raise ValueError(
            f"normalization={normalization!r}; use 'batch', 'renorm' or 'group'"
        )
    keras.utils.set_random_seed(seed)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(size, size, 1), classes=num_classes
    )
    if normalization != "batch":
        model = _replace_batchnorm(model, normalization)
    for layer in batchnorm_layers(model):
        layer.momentum = float(momentum)
    return model


def _replace_batchnorm(model: keras.Model, kind: str) -> keras.Model:
    """Clone ``model`` with every BatchNormalization swapped, other weights kept."""

    def swap(layer):
        if not isinstance(layer, keras.layers.BatchNormalization):
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        if kind == "renorm":
            return keras.layers.BatchNormalization.from_config({**config, "renorm": True})
        return _GroupNormalization(
            groups=32, axis=config["axis"], epsilon=config["epsilon"], name=config["name"]
        )

    clone = keras.models.clone_model(model, clone_function=swap)
    for old, new in zip(model.layers, clone.layers):
        if not isinstance(old, keras.layers.BatchNormalization):
            new.set_weights(old.get_weights())
    return clone


def compile_model(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Compile as in the case: Adam, categorical cross-entropy, accuracy.

    Runs eagerly: on a CPU the first step of a graph-mode ResNet50 spends ~35 s
    tracing, more than a few eager steps cost. Returns the model. Introduced
    in notebook 02.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=True,
    )
    return model


def memorised(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the model's current weights get every image right in training mode.

    Runs ``model(images, training=True)`` on all images as one batch (as ``fit``
    normalizes them, with this batch's statistics) and leaves the moving
    statistics untouched. ``fit``'s own accuracy cannot tell this: it is measured
    on each batch *before* that batch's update. Introduced in notebook 02.
    """
    with frozen_moving_statistics(model):
        outputs = keras.ops.convert_to_numpy(model(images, training=True))
    return accuracy(outputs, labels) == 1.0


class StopWhenMemorised(keras.callbacks.Callback):
    """Keras callback: after ``min_epochs``, stop ``fit`` at the first epoch whose weights memorise.

    Pass ``epochs=max_epochs`` to ``fit``. From epoch ``min_epochs`` on, at the end
    of every epoch it checks :func:`memorised` on ``images`` and ``labels`` and
    stops training once it holds. ``stopped_epoch`` is the number of epochs run
    (so, with every image in one batch, of updates made); ``memorised`` says
    whether the last weights memorise. This is how the series trains the case: five
    epochs, or a few more when Adam's steps on raw pixels have not settled yet.
    Introduced in notebook 02.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, min_epochs: int = 5):
        super().__init__()
        if min_epochs < 1:
            raise ValueError(f"min_epochs={min_epochs} must be at least 1")
        self.images = images
        self.labels = labels
        self.min_epochs = int(min_epochs)
        self.stopped_epoch = 0
        self.memorised = False

    def on_epoch_end(self, epoch, logs=None):  # noqa: D102
        self.stopped_epoch = epoch + 1
        if self.stopped_epoch >= self.min_epochs:
            self.memorised = memorised(self.model, self.images, self.labels)
            if self.memorised:
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        """Drop the reference to the model, so a kept callback does not keep the model in memory."""
        self.set_model(None)


def release_memory() -> None:
    """Free what Keras and Python hold of models already deleted (``del model`` first).

    Clears Keras's global session, runs the garbage collector, and on Linux asks
    glibc to hand freed memory back to the system, so the next model starts
    from a low watermark. Notebooks 04 and 05 call it between models.
    """
    keras.backend.clear_session()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def loss_and_accuracy(outputs, labels: np.ndarray) -> tuple[float, float]:
    """Categorical cross-entropy and accuracy of a model's output, as ``evaluate`` computes them.

    Pass the tensor that a model call returned, not a NumPy copy: Keras then
    computes the loss from the logits behind the final softmax, unclipped,
    exactly like ``evaluate``. (From probabilities alone the loss of a
    confidently wrong answer would be clipped at -ln(1e-7) = 16.1.)
    Introduced in notebook 03.
    """
    loss = float(keras.losses.CategoricalCrossentropy()(labels, outputs))
    return loss, accuracy(keras.ops.convert_to_numpy(outputs), labels)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max matches the one-hot label."""
    return float(
        (np.argmax(probabilities, axis=1) == np.argmax(labels, axis=1)).mean()
    )


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model``, nested models included, in order.

    The helpers of this module key layers by name, so names must be unique:
    a ``ValueError`` names any duplicate. Introduced in notebook 03.
    """
    found = _find_batchnorm(model)
    names = [layer.name for layer in found]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"BatchNormalization layer names are not unique: {duplicates}")
    return found


def _find_batchnorm(model) -> list:
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(_find_batchnorm(layer))
    return found


def _reduction_axes(layer, ndim: int) -> tuple[int, ...]:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    keep = {a % ndim for a in axes}
    return tuple(i for i in range(ndim) if i not in keep)


@dataclass
class Moments:
    """Per-channel mean and (biased) variance of the inputs one layer saw, and how many values per channel."""

    mean: np.ndarray
    var: np.ndarray
    count: int

    def merged(self, other: "Moments") -> "Moments":
        """Moments of both sets of values together (exact, Chan et al.'s update)."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = (
            self.var * self.count
            + other.var * other.count
            + delta**2 * (self.count * other.count / n)
        )
        return Moments(mean, m2 / n, n)


@contextlib.contextmanager
def recording_batchnorm_inputs(model: keras.Model) -> Iterator[dict[str, list[Moments]]]:
    """Record the moments of what every BatchNormalization layer receives.

    Yields a dict ``layer name -> list of Moments``, one per call made inside
    the block (eager calls such as ``model(x, training=...)``). Introduced in
    notebook 03.
    """
    records: dict[str, list[Moments]] = {}
    originals = {}
    for layer in batchnorm_layers(model):
        original = layer.call
        originals[id(layer)] = (layer, original)
        records[layer.name] = []

        def spy(inputs, training=None, mask=None, _layer=layer, _call=original):
            values = keras.ops.cast(inputs, "float32")
            axes = _reduction_axes(_layer, len(values.shape))
            mean, var = keras.ops.moments(values, axes=axes)  # as the layer computes them
            records[_layer.name].append(
                Moments(
                    np.asarray(keras.ops.convert_to_numpy(mean), dtype=np.float64),
                    np.asarray(keras.ops.convert_to_numpy(var), dtype=np.float64),
                    int(np.prod([values.shape[a] for a in axes])),
                )
            )
            return _call(inputs, training=training, mask=mask)

        layer.call = spy
    try:
        yield records
    finally:
        for layer, _ in originals.values():
            del layer.call  # back to the class's method


@contextlib.contextmanager
def frozen_moving_statistics(model: keras.Model) -> Iterator[None]:
    """Restore every normalization layer's non-trainable state on leaving the block.

    A Keras 3 call with ``training=True`` updates the moving statistics as a
    side effect; inside this block it may, and they are put back afterwards.
    Introduced in notebook 03.
    """
    layers = batchnorm_layers(model)
    saved = [[v.numpy() for v in layer.non_trainable_variables] for layer in layers]
    try:
        yield
    finally:
        for layer, values in zip(layers, saved):
            for variable, value in zip(layer.non_trainable_variables, values):
                variable.assign(value)


def moving_statistics(model: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``layer name -> (moving_mean, moving_variance)`` as float64 arrays. Notebook 03."""
    return {
        layer.name: (
            np.asarray(layer.moving_mean.numpy(), dtype=np.float64),
            np.asarray(layer.moving_variance.numpy(), dtype=np.float64),
        )
        for layer in batchnorm_layers(model)
    }


def batch_statistics(
    model: keras.Model, images: np.ndarray, training: bool = True
) -> tuple[dict[str, Moments], object]:
    """Moments of the batch each BatchNormalization layer sees, and the model's output tensor.

    Runs ``model(images, training=training)`` once, leaving the moving
    statistics untouched. With ``training=True`` these are the statistics the
    layers normalize with in ``fit``; with ``False``, what they receive in
    ``predict``. Introduced in notebook 03.
    """
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        outputs = model(images, training=training)
    return {name: calls[-1] for name, calls in records.items()}, outputs


@dataclass
class LayerGap:
    """How far one BatchNormalization layer's moving statistics are from the batch's.

    ``shift``: median over channels of ``|moving_mean - batch_mean| / batch_std``.
    ``var_ratio``: median over channels of ``moving_var / batch_var`` (1 is right).
    ``worst_shift`` and ``worst_ratio``: the channel furthest off.
    """

    index: int
    name: str
    channels: int
    batch_var: float
    moving_var: float
    shift: float
    var_ratio: float
    worst_shift: float
    worst_ratio: float
    flagged: bool


def diagnose_batchnorm(
    model: keras.Model,
    images: np.ndarray,
    shift_tol: float = 0.2,
    ratio_tol: float = 1.5,
) -> list[LayerGap]:
    """Compare, per BatchNormalization layer, the moving statistics with the batch's.

    The batch statistics are those the layer sees in training mode on
    ``images`` (the moving statistics are left untouched). A layer is flagged
    when its median shift exceeds ``shift_tol`` batch standard deviations or its
    median variance ratio lies outside ``[1/ratio_tol, ratio_tol]``: then
    ``predict`` normalizes these images differently from ``fit``. Works on any
    Keras model with BatchNormalization layers. Introduced in notebook 03.
    """
    if ratio_tol < 1:
        raise ValueError(f"ratio_tol={ratio_tol} must be at least 1")
    batch, _ = batch_statistics(model, images, training=True)
    moving = moving_statistics(model)
    rows = []
    for index, layer in enumerate(batchnorm_layers(model)):
        moving_mean, moving_var = moving[layer.name]
        seen = batch[layer.name]
        eps = float(layer.epsilon)
        shift = np.abs(moving_mean - seen.mean) / np.sqrt(seen.var + eps)
        ratio = (moving_var + eps) / (seen.var + eps)
        median_shift = float(np.median(shift))
        median_ratio = float(np.median(ratio))
        worst = int(np.argmax(np.abs(np.log(ratio))))
        rows.append(
            LayerGap(
                index=index,
                name=layer.name,
                channels=int(moving_mean.shape[0]),
                batch_var=float(np.median(seen.var)),
                moving_var=float(np.median(moving_var)),
                shift=median_shift,
                var_ratio=median_ratio,
                worst_shift=float(shift.max()),
                worst_ratio=float(ratio[worst]),
                flagged=bool(
                    median_shift > shift_tol
                    or not (1 / ratio_tol <= median_ratio <= ratio_tol)
                ),
            )
        )
    return rows


def format_gaps(rows: list[LayerGap], max_rows: int | None = None) -> str:
    """A fixed-width text table of ``diagnose_batchnorm`` rows (3 significant digits)."""
    header = f"{'#':>3} {'layer':<22} {'ch':>5} {'batch var':>10} {'moving var':>10} {'var ratio':>10} {'shift':>9}  flag"
    lines = [header, "-" * len(header)]
    shown = rows if max_rows is None else rows[:max_rows]
    for r in shown:
        lines.append(
            f"{r.index:>3} {r.name:<22} {r.channels:>5} {r.batch_var:>10.3g} "
            f"{r.moving_var:>10.3g} {r.var_ratio:>10.3g} {r.shift:>9.3g}  "
            f"{'OFF' if r.flagged else 'ok'}"
        )
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more layers")
    flagged = sum(r.flagged for r in rows)
    lines.append(f"{flagged} of {len(rows)} BatchNormalization layers flagged")
    return "\n".join(lines)


class BatchNormHistory(keras.callbacks.Callback):
    """Keras callback: per epoch, every BN layer's moving and batch statistics.

    At the start of training (epoch 0) and after every epoch it records, on
    ``images``:

    - ``moving[name]``: list of ``(moving_mean, moving_var)`` arrays;
    - ``batch[name]``: list of :class:`Moments` the layer sees in training mode;
    - ``train_loss`` / ``infer_loss`` and ``train_acc`` / ``infer_acc``: the
      model's loss and accuracy on ``images`` in training and inference mode.

    Recording leaves the moving statistics untouched. When training ends the
    callback lets go of the model. Introduced in notebook 04.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        super().__init__()
        self.images = images
        self.labels = labels
        self.epochs: list[int] = []
        self.moving: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.batch: dict[str, list[Moments]] = {}
        self.train_loss: list[float] = []
        self.infer_loss: list[float] = []
        self.train_acc: list[float] = []
        self.infer_acc: list[float] = []

    def _record(self, epoch: int) -> None:
        self.epochs.append(epoch)
        for name, stats in moving_statistics(self.model).items():
            self.moving.setdefault(name, []).append(stats)
        seen, train_out = batch_statistics(self.model, self.images, training=True)
        for name, moments in seen.items():
            self.batch.setdefault(name, []).append(moments)
        infer_out = self.model(self.images, training=False)
        for out, losses, accs in (
            (train_out, self.train_loss, self.train_acc),
            (infer_out, self.infer_loss, self.infer_acc),
        ):
            loss, acc = loss_and_accuracy(out, self.labels)
            losses.append(loss)
            accs.append(acc)

    def on_train_begin(self, logs=None):  # noqa: D102
        if not self.epochs:
            self._record(0)  # a second fit() continues the epoch count

    def on_epoch_end(self, epoch, logs=None):  # noqa: D102
        self._record(self.epochs[-1] + 1)

    def on_train_end(self, logs=None):
        """Drop the reference to the model, so a kept history does not keep the model in memory."""
        self.set_model(None)

    @property
    def layer_names(self) -> list[str]:
        """Names of the recorded layers, in network order."""
        return list(self.moving)

    def relative_gap(self, statistic: str = "var") -> np.ndarray:
        """Layers x recorded epochs: median over channels of ``|moving - batch| / batch``.

        ``statistic`` is ``"var"`` or ``"mean"``; for the mean the gap is in
        units of the batch standard deviation.
        """
        if statistic not in ("var", "mean"):
            raise ValueError(f"statistic={statistic!r}; use 'var' or 'mean'")
        gaps = np.zeros((len(self.moving), len(self.epochs)))
        for i, name in enumerate(self.moving):
            for j, ((m_mean, m_var), seen) in enumerate(zip(self.moving[name], self.batch[name])):
                if statistic == "var":
                    gap = np.abs(m_var - seen.var) / (seen.var + 1e-12)
                else:
                    gap = np.abs(m_mean - seen.mean) / np.sqrt(seen.var + 1e-12)
                gaps[i, j] = np.median(gap)
        return gaps


# ---------------------------------------------------------------------------
# Remedies
# ---------------------------------------------------------------------------


def recalibrate_batchnorm(
    model: keras.Model, images: np.ndarray, batch_size: int = 32
) -> int:
    """Set every BN layer's moving statistics to its population statistics (PreciseBN).

    Runs the images through the model in training mode, ``batch_size`` at a
    time, without updating any weight; each layer's moments are pooled exactly
    over all batches, and written into ``moving_mean`` and ``moving_variance``.
    When all images fit in one batch, ``predict`` then equals the training-mode
    output. Returns the number of layers updated. Introduced in notebook 05.
    """
    images = np.asarray(images)
    if len(images) == 0:
        raise ValueError("recalibrate_batchnorm needs at least one image")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    pooled: dict[str, Moments] = {}
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size], training=True)
    for name, calls in records.items():
        total = calls[0]
        for moments in calls[1:]:
            total = total.merged(moments)
        pooled[name] = total
    layers = batchnorm_layers(model)
    for layer in layers:
        _assign_moving(layer, pooled[layer.name].mean, pooled[layer.name].var)
    return len(layers)


def _assign_moving(layer, mean: np.ndarray, var: np.ndarray) -> None:
    """Write moving statistics into a BN layer, renorm's extra statistics included."""
    layer.moving_mean.assign(np.asarray(mean, dtype=np.float32))
    layer.moving_variance.assign(np.asarray(var, dtype=np.float32))
    if getattr(layer, "renorm", False):  # renorm derives moving_variance from these
        stddev = np.sqrt(np.asarray(var, dtype=np.float64) + layer.epsilon).astype(np.float32)
        layer.moving_stddev.assign(stddev)
        layer.renorm_mean.assign(np.asarray(mean, dtype=np.float32))
        layer.renorm_stddev.assign(stddev)


@dataclass
class RemedyResult:
    """One row of notebook 05's comparison: how a remedy's model answers on the training images."""

    name: str
    fit_accuracy: float  # fit's accuracy in the last epoch
    predicted: list[int]  # classes the remedy's prediction gives, all images in one batch
    accuracy: float
    loss: float  # as evaluate computes it
    alone_right: list[bool]  # each image predicted on its own (a batch of one)
    mode_gap: float  # largest |training-mode output - served output|, probabilities
    seconds: float  # measured cost: training plus any extra step


def measure_remedy(
    name: str,
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    fit_accuracy: float,
    seconds: float,
    training_mode: bool = False,
) -> RemedyResult:
    """Measure how ``model`` answers on ``images``, served in inference mode (as ``predict``).

    With ``training_mode=True`` the answers are served by ``model(x, training=True)``
    instead (the "predict in training mode" remedy); the moving statistics are
    restored afterwards. Introduced in notebook 05.
    """
    with frozen_moving_statistics(model):  # training-mode calls would move the statistics
        served = model(images, training=training_mode)
        alone = [
            int(np.argmax(keras.ops.convert_to_numpy(model(images[i : i + 1], training=training_mode))))
            for i in range(len(images))
        ]
    with frozen_moving_statistics(model):
        reference = keras.ops.convert_to_numpy(model(images, training=True))
    loss, acc = loss_and_accuracy(served, labels)
    served = keras.ops.convert_to_numpy(served)
    truth = np.argmax(labels, axis=1)
    return RemedyResult(
        name=name,
        fit_accuracy=float(fit_accuracy),
        predicted=np.argmax(served, axis=1).tolist(),
        accuracy=acc,
        loss=loss,
        alone_right=[a == t for a, t in zip(alone, truth)],
        mode_gap=float(np.abs(reference - served).max()),
        seconds=float(seconds),
    )


def format_remedies(results: list[RemedyResult]) -> str:
    """The comparison table of notebook 05, as fixed-width text."""
    header = (
        f"{'remedy':<26} {'fit acc':>7} {'predicted':<11} {'acc':>5} {'loss':>9} "
        f"{'alone':<7} {'mode gap':>9} {'cost':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        alone = "".join("Y" if ok else "n" for ok in r.alone_right)
        lines.append(
            f"{r.name:<26} {r.fit_accuracy:>7.2f} {str(r.predicted).replace(' ', ''):<11} "
            f"{r.accuracy:>5.2f} {r.loss:>9.3g} {alone:<7} {r.mode_gap:>9.2g} "
            f"{r.seconds:>6.1f} s"
        )
    lines.append(
        "alone: each image predicted on its own, Y = right; mode gap: largest difference "
        "between training-mode and served probabilities; cost: measured seconds"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _plt():
    import matplotlib.pyplot as plt

    return plt


def show_images(images: np.ndarray, names: list[str], labels: np.ndarray | None = None) -> None:
    """Show the images side by side, titled with file name and class. Notebook 01."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        title = names[i] if labels is None else f"{names[i]}\nclass {int(np.argmax(labels[i]))}"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    plt.show()


def plot_history(history: dict[str, list[float]], title: str) -> None:
    """Loss (log scale) and accuracy per epoch from ``fit``'s history. Notebook 02."""
    plt = _plt()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    ax_loss.semilogy(epochs, history["loss"], "o-")
    ax_loss.set(xlabel="epoch", ylabel="training loss (log scale)", title="loss in fit()")
    ax_acc.plot(epochs, history["accuracy"], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="training accuracy", ylim=(-0.05, 1.05), title="accuracy in fit()")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def plot_probabilities(probabilities: np.ndarray, names: list[str], title: str) -> None:
    """Bar chart of each image's predicted class probabilities. Notebook 02."""
    plt = _plt()
    n, k = probabilities.shape
    fig, ax = plt.subplots(figsize=(6, 2.8))
    width = 0.8 / k
    for c in range(k):
        ax.bar(np.arange(n) + (c - (k - 1) / 2) * width, probabilities[:, c], width, label=f"class {c}")
    ax.set_xticks(np.arange(n), [f"{name}\n(true class {i})" for i, name in enumerate(names)], fontsize=8)
    ax.set(ylabel="predicted probability", ylim=(0, 1.05), title=title)
    ax.legend(fontsize=8, ncol=k, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.tight_layout()
    plt.show()


def resources() -> str:
    """Wall seconds since ``utils`` was imported, and this process's peak memory.

    Peak memory is the kernel's resident high-water mark (``VmHWM`` in
    ``/proc/self/status``, Linux only). Every notebook ends by printing it.
    """
    seconds = time.perf_counter() - _IMPORTED_AT
    peak = "unknown"
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = f"{int(line.split()[1]) / 1024:.0f} MB"
    except OSError:
        pass
    return f"this notebook took {seconds:.0f} s; peak memory {peak}"


def plot_layer_gaps(rows: list[LayerGap], title: str) -> None:
    """Per BN layer: batch vs moving variance (log scale), and the mean shift. Notebook 03.

    ``rows`` come from :func:`diagnose_batchnorm`; flagged layers are marked red.
    """
    plt = _plt()
    index = np.array([r.index for r in rows])
    flagged = np.array([r.flagged for r in rows])
    fig, (ax_var, ax_shift) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True)
    ax_var.semilogy(index, [r.batch_var for r in rows], "o-", ms=3, label="batch variance (what fit uses)")
    ax_var.semilogy(index, [r.moving_var for r in rows], "s-", ms=3, label="moving variance (what predict uses)")
    ax_var.set(ylabel="variance, median\nover channels (log)")
    ax_var.legend(fontsize=8)
    shift = np.array([r.shift for r in rows])
    ax_shift.semilogy(index, shift, "o-", ms=3, color="tab:gray")
    ax_shift.semilogy(index[flagged], shift[flagged], "o", ms=4, color="tab:red", label="flagged layer")
    ax_shift.set(xlabel="BatchNormalization layer (input side -> output side)",
                 ylabel="|moving - batch mean|\nin batch std (log)")
    ax_shift.legend(fontsize=8)
    for ax in (ax_var, ax_shift):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def plot_activation_scale(train_rms: np.ndarray, infer_rms: np.ndarray, title: str) -> None:
    """Root-mean-square of each BN layer's input in training vs inference mode (log). Notebook 03."""
    plt = _plt()
    index = np.arange(len(train_rms))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.semilogy(index, train_rms, "o-", ms=3, label="training mode (batch statistics)")
    ax.semilogy(index, infer_rms, "s-", ms=3, color="tab:red", label="inference mode (moving statistics)")
    ax.set(xlabel="BatchNormalization layer (input side -> output side)",
           ylabel="RMS of the layer's input (log)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


def plot_moving_vs_batch(history: BatchNormHistory, layer_names: list[str], title: str) -> None:
    """Per epoch, for a few layers: moving vs batch mean and variance (medians over channels). Notebook 04."""
    plt = _plt()
    epochs = np.array(history.epochs)
    fig, axes = plt.subplots(len(layer_names), 2, figsize=(7, 2.3 * len(layer_names)), squeeze=False)
    for row, name in zip(axes, layer_names):
        moving = history.moving[name]
        batch = history.batch[name]
        for ax, k, label in ((row[0], 0, "mean"), (row[1], 1, "variance")):
            moving_values = [np.median(m[k]) for m in moving]
            batch_values = [np.median(b.mean if k == 0 else b.var) for b in batch]
            ax.plot(epochs, batch_values, "o-", ms=3, label=f"batch {label}")
            ax.plot(epochs, moving_values, "s--", ms=3, label=f"moving {label}")
            values = np.array(moving_values + batch_values)
            log = k == 1 and values.min() > 0 and values.max() / values.min() > 10
            if log:
                ax.set_yscale("log")
            ax.set(xlabel="epoch", ylabel=label + (" (log)" if log else ""))
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def plot_gap_heatmap(history: BatchNormHistory, title: str) -> None:
    """Heatmap of the relative variance gap, BN layers x epochs (log colour). Notebook 04."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    gaps = history.relative_gap("var")
    vmin = max(gaps[gaps > 0].min(initial=1e-3), 1e-3)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(gaps, aspect="auto", cmap="magma", norm=LogNorm(vmin=vmin, vmax=max(gaps.max(), 10 * vmin)),
                      extent=(history.epochs[0] - 0.5, history.epochs[-1] + 0.5, len(gaps) - 0.5, -0.5))
    ax.set(xlabel="epoch", ylabel="BatchNormalization layer (0 = input side)", title=title)
    ax.set_xticks(history.epochs)
    fig.colorbar(image, ax=ax, label="|moving - batch variance| / batch variance")
    fig.tight_layout()
    plt.show()


def plot_mode_losses(history: BatchNormHistory, title: str) -> None:
    """Loss on the training images per epoch, training mode vs inference mode (log). Notebook 04."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.semilogy(history.epochs, history.train_loss, "o-", label="training mode (what fit sees)")
    ax.semilogy(history.epochs, history.infer_loss, "s-", color="tab:red", label="inference mode (what predict sees)")
    ax.set(xlabel="epoch", ylabel="loss on the training images (log)", title=title)
    ax.set_xticks(history.epochs)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


def plot_moving_average_law(updates: np.ndarray, measured: np.ndarray, momentum: float, title: str) -> None:
    """Measured fraction of the way travelled vs the law ``1 - m**n``. Notebook 04.

    ``measured`` is ``(moving - initial) / (batch - initial)`` after each of ``updates``.
    """
    plt = _plt()
    n = np.linspace(0, updates.max(), 200)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(n, 1 - momentum**n, "-", color="tab:gray", label=f"law: 1 - {momentum}^n")
    ax.plot(updates, measured, "o", ms=4, label="measured (all layers' medians)")
    ax.set(xlabel="updates n (training-mode calls, weights frozen)",
           ylabel="fraction of the way\nfrom initial to batch value", ylim=(-0.05, 1.05), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


def plot_gap_by_momentum(histories: dict[float, BatchNormHistory], title: str) -> None:
    """Median relative variance gap and inference-mode accuracy per epoch, one curve per momentum. Notebook 04."""
    plt = _plt()
    fig, (ax_gap, ax_acc) = plt.subplots(1, 2, figsize=(8, 3.2))
    for momentum, history in histories.items():
        gap = np.median(history.relative_gap("var"), axis=0)
        ax_gap.semilogy(history.epochs, gap, "o-", ms=3, label=f"momentum {momentum}")
        ax_acc.plot(history.epochs, history.infer_acc, "o-", ms=3, label=f"momentum {momentum}")
    ax_gap.set(xlabel="epoch", ylabel="median relative variance gap (log)", title="moving vs batch")
    ax_acc.set(xlabel="epoch", ylabel="accuracy in inference mode", ylim=(-0.05, 1.05), title="predict on training images")
    for ax in (ax_gap, ax_acc):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def replay_moving_statistics(
    steps: dict[str, list[Moments]], momentum: float, initial: tuple[float, float] = (0.0, 1.0)
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The moving statistics that ``momentum`` would have produced from recorded batch statistics.

    ``steps`` maps layer names to the moments of every training step, as
    :func:`recording_batchnorm_inputs` records them during ``fit``. Applies
    ``moving = momentum * moving + (1 - momentum) * batch`` once per step from
    ``initial`` (Keras's start values: mean 0, variance 1). Valid because
    ``fit`` never reads the moving statistics: the weights, and so the batch
    statistics, do not depend on the momentum. Introduced in notebook 05.
    """
    replayed = {}
    for name, moments in steps.items():
        if not moments:
            raise ValueError(f"no recorded training step for layer {name!r}")
        mean = np.full_like(moments[0].mean, initial[0])
        var = np.full_like(moments[0].var, initial[1])
        for step in moments:
            mean = momentum * mean + (1 - momentum) * step.mean
            var = momentum * var + (1 - momentum) * step.var
        replayed[name] = (mean, var)
    return replayed


def set_moving_statistics(model: keras.Model, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write ``layer name -> (moving_mean, moving_variance)`` into the model's BN layers. Notebook 05."""
    layers = {layer.name: layer for layer in batchnorm_layers(model)}
    missing = set(stats) - set(layers)
    if missing:
        raise KeyError(f"no BatchNormalization layer named {sorted(missing)}")
    for name, (mean, var) in stats.items():
        _assign_moving(layers[name], mean, var)


def plot_remedies(results: list[RemedyResult], title: str) -> None:
    """Accuracy of predict and the training/inference gap, one bar per remedy. Notebook 05."""
    plt = _plt()
    names = [r.name for r in results]
    y = np.arange(len(results))
    fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(8, 0.45 * len(results) + 1.6), sharey=True)
    colors = ["tab:green" if r.accuracy == 1.0 and all(r.alone_right) else "tab:red" for r in results]
    ax_acc.barh(y, [r.accuracy for r in results], color=colors)
    ax_acc.set(xlabel="accuracy of the served answers", xlim=(0, 1.05))
    ax_acc.set_yticks(y, names, fontsize=8)
    ax_acc.invert_yaxis()
    ax_gap.barh(y, [max(r.mode_gap, 1e-8) for r in results], color=colors)
    ax_gap.set_xscale("log")
    ax_gap.set(xlabel="training vs served gap (log)", xlim=(1e-8, 2))
    for i, r in enumerate(results):  # zero (or tiny) gaps have no visible bar: say them
        ax_gap.text(2e-8, i, "0" if r.mode_gap == 0 else f"{r.mode_gap:.0e}", va="center", fontsize=7,
                    color="white" if r.mode_gap > 1e-6 else "black")
    for ax in (ax_acc, ax_gap):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title + "\n(green: all right, alone too)", fontsize=10)
    fig.tight_layout()
    plt.show()
