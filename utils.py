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
#: other seeds the weights after the fifth update still get an image wrong, even
#: in training mode, and the series trains a few epochs more
#: (``StopWhenMemorised``); ``tests/test_seeds.py`` runs eight.
SEED = 6

#: Most epochs (= updates, one batch of all images each) the series trains the case for: five,
#: then one more at a time until the weights memorise the images (``StopWhenMemorised``), at most
#: this many. Every training of the case, and every remedy that retrains, gets this budget. Even
#: then the start values still weigh 0.99**20 (82 %) in each moving statistic; notebook 02
#: prints it. Introduced in notebook 02.
MAX_EPOCHS = 20

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
    """The mybinder.org link that opens ``path`` (e.g. ``notebooks/01_load_images.ipynb``) in JupyterLab.

    The badge under every notebook's title is this link. Introduced in notebook 01.
    """
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
    ``ValueError`` naming the file if it is not a readable image. Introduced in
    notebook 01 (``load_images`` reads every picture with it).
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
    renorm_clipping: dict[str, float] | None = None,
) -> keras.Model:
    """The case's model: ``ResNet50(weights=None, input_shape=(size, size, 1), classes=N)``.

    The seed is set first, so every call gives the same initial weights.
    ``momentum`` is set on all BatchNormalization layers. ``normalization``
    replaces them: ``"batch"`` (as built), ``"renorm"`` (Batch Renormalization,
    Ioffe 2017; ``renorm_clipping`` is passed to every layer: ``{"rmax": ...,
    "rmin": ..., "dmax": ...}``, Keras clips nothing without it) or ``"group"``
    (GroupNormalization, 32 groups, Wu & He 2018; notebook 05). Call
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
    if renorm_clipping is not None and normalization != "renorm":
        raise ValueError("renorm_clipping needs normalization='renorm'")
    if normalization != "batch":
        model = _replace_batchnorm(model, normalization, renorm_clipping)
    for layer in batchnorm_layers(model):
        layer.momentum = float(momentum)
    return model


def _replace_batchnorm(
    model: keras.Model, kind: str, renorm_clipping: dict[str, float] | None = None
) -> keras.Model:
    """Clone ``model`` with every BatchNormalization swapped, other weights kept."""

    def swap(layer):
        if not isinstance(layer, keras.layers.BatchNormalization):
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        if kind == "renorm":
            return keras.layers.BatchNormalization.from_config(
                {**config, "renorm": True, "renorm_clipping": dict(renorm_clipping or {})}
            )
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

    Pass ``epochs=MAX_EPOCHS`` to ``fit``. From epoch ``min_epochs`` on, at the end
    of every epoch it checks :func:`memorised` on ``images`` and ``labels`` and
    stops training once it holds. ``stopped_epoch`` is the number of epochs run
    (so, with every image in one batch, of updates made); ``memorised`` says
    whether the last weights memorise. This is how the series trains the case: five
    epochs, or a few more when, with some seeds or pictures, the weights after the
    fifth update still get an image wrong even in training mode. Raises
    ``ValueError`` if ``min_epochs`` is below 1. Introduced in notebook 02.
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
    Introduced in notebook 02.
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
    confidently wrong answer would be clipped at -ln(1e-7) = 16.1.) ``labels``:
    one-hot, shape ``(N, classes)``. Returns ``(loss, accuracy)``: the mean loss in
    nats and the fraction of images right. Introduced in notebook 03, section 2.
    """
    loss = float(keras.losses.CategoricalCrossentropy()(labels, outputs))
    return loss, accuracy(keras.ops.convert_to_numpy(outputs), labels)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max matches the one-hot label, a float in [0, 1].

    ``probabilities``: shape ``(N, classes)`` (a model's output, as NumPy);
    ``labels``: one-hot, the same shape. Introduced in notebook 03, section 1.
    """
    return float(
        (np.argmax(probabilities, axis=1) == np.argmax(labels, axis=1)).mean()
    )


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def named_batchnorm_layers(model: keras.layers.Layer) -> dict[str, keras.layers.BatchNormalization]:
    """Every BatchNormalization layer in ``model``'s whole layer tree, keyed by a unique path.

    Walks the list of sub-layers Keras itself tracks on every layer (``Layer._layers``,
    the list that ``Layer._flatten_layers`` walks, in ``keras/src/layers/layer.py``):
    layers of functional, Sequential and subclassed models, layers that a custom
    layer holds as attributes or in lists and dicts, the layer a wrapper such as
    ``TimeDistributed`` wraps, and nested models. Subclasses of BatchNormalization
    count. A layer reachable twice (shared) appears once, under its first path.
    (``_flatten_layers`` itself gives no paths and lists a nested layer's children
    in reverse order, hence the walk here over the same lists.)

    Keys: a top-level layer keeps its plain name (``"conv1_bn"`` in ResNet50); a
    nested one is prefixed with the names of the layers that contain it, joined by
    ``/`` (``"outer_block/batch_normalization"``). Should two layers still get the
    same path (a custom layer may name two sub-layers alike), the later ones get
    ``#2``, ``#3``, ... appended. Order: depth first, in the order Keras tracks the
    layers (for functional and Sequential models the order of the graph, input side
    first; inside a custom layer the order its ``__init__`` created them). Every dict
    of this module that holds per-layer results uses these keys. A layer that a
    subclassed model creates in ``build()`` exists, and is listed, only once the
    model is built (called on a batch). Introduced in notebook 03.
    """
    return dict(_find_batchnorm(model))


def batchnorm_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer in ``model``'s layer tree, in the order of
    :func:`named_batchnorm_layers` (which also gives each one's unique path).

    Nested models, custom layers, wrappers and lists of layers included; an empty list
    when there is none. Introduced in notebook 02 (counting them); notebook 03, section 3,
    looks inside them.
    """
    return [layer for _, layer in _find_batchnorm(model)]


def _find_batchnorm(model) -> list[tuple[str, keras.layers.BatchNormalization]]:
    """``(path, layer)`` pairs, depth first over the sub-layers Keras tracks (``_layers``)."""
    bn_class = keras.layers.BatchNormalization
    if isinstance(model, bn_class):
        return [(model.name, model)]
    found: list[tuple[str, keras.layers.BatchNormalization]] = []
    seen = {id(model)}
    taken: set[str] = set()

    def visit(parent, prefix: str) -> None:
        for child in getattr(parent, "_layers", None) or ():
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            if isinstance(child, bn_class):
                unique, k = path, 2
                while unique in taken:
                    unique, k = f"{path}#{k}", k + 1
                taken.add(unique)
                found.append((unique, child))
            visit(child, path + "/")

    visit(model, "")
    return found


def _require_batchnorm(model, purpose: str) -> dict[str, keras.layers.BatchNormalization]:
    """:func:`named_batchnorm_layers`, or a ``ValueError`` saying there is none (or the
    model is not built yet, see :func:`_require_built`)."""
    layers = _require_built(model, purpose)
    if not layers:
        raise ValueError(
            f"{getattr(model, 'name', model)!r} has no BatchNormalization layer (searched its "
            f"whole layer tree), so there is nothing to {purpose}"
        )
    return layers


def _require_built(model, purpose: str) -> dict[str, keras.layers.BatchNormalization]:
    """:func:`named_batchnorm_layers` of a built model, or a ``ValueError``.

    A model never called has no variables to save or read yet: a BatchNormalization
    layer created in ``__init__`` gets its moving statistics at its first call (so a
    probe would change them with nothing to restore), one created in ``build()`` does
    not exist yet at all.
    """
    layers = named_batchnorm_layers(model)
    unbuilt = [path for path, layer in layers.items() if not layer.built]
    if getattr(model, "built", True) and not unbuilt:
        return layers
    what = (
        f"{getattr(model, 'name', model)!r} is not built yet" if not getattr(model, "built", True)
        else f"BatchNormalization layer(s) {unbuilt[:4]} are not built yet"
    )
    raise ValueError(
        f"cannot {purpose}: {what}, so its BatchNormalization layers have no moving "
        "statistics to read or restore (layers created in build() do not even exist): "
        "call the model on one batch of your data first (model(x) or model.build(...)); "
        "a layer the model's call never uses stays unbuilt"
    )


def _reduction_axes(layer, ndim: int) -> tuple[int, ...]:
    """The axes a BN layer averages over for an input of rank ``ndim``: all but ``layer.axis``."""
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    keep = {a % ndim for a in axes}
    return tuple(i for i in range(ndim) if i not in keep)


@dataclass
class Moments:
    """Per-channel mean and (biased) variance of what one layer received, and the count per channel.

    ``mean`` and ``var`` have shape ``(channels,)``, float64; ``count`` is the number of
    values averaged per channel (samples x positions, e.g. ``N*H*W`` for images with
    channels last). ``training`` says whether the layer normalized with these very
    moments (it ran in training mode: ``training=True`` and ``layer.trainable``),
    ``None`` when unknown. Introduced in notebook 03.
    """

    mean: np.ndarray
    var: np.ndarray
    count: int
    training: bool | None = None

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
        training = self.training if self.training == other.training else None
        return Moments(mean, m2 / n, n, training)


def _pooled(calls: list[Moments]) -> Moments:
    total = calls[0]
    for moments in calls[1:]:
        total = total.merged(moments)
    return total


#: Recordings currently open (innermost last); a probe hides its calls from these.
_OPEN_RECORDINGS: list[dict] = []


def _input_moments(layer, inputs, mask, training) -> Moments:
    """Moments over the layer's reduction axes, as ``BatchNormalization._moments`` computes them."""
    values = keras.ops.cast(inputs, "float32")  # the layer computes in float32 too
    axes = _reduction_axes(layer, len(values.shape))
    if mask is None:
        mean, var = keras.ops.moments(values, axes=axes)
        count = int(np.prod([values.shape[a] for a in axes]))
    else:  # masked positions (mask has the input's shape without the channel axis) left out
        weights = keras.ops.broadcast_to(
            keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1), keras.ops.shape(values)
        )
        total = keras.ops.sum(weights, axis=axes, keepdims=True)
        mean = keras.ops.sum(weights * values, axis=axes, keepdims=True) / total
        var = keras.ops.sum(weights * (values - mean) ** 2, axis=axes, keepdims=True) / total
        count = int(round(float(keras.ops.convert_to_numpy(total).reshape(-1)[0])))
    return Moments(
        np.asarray(keras.ops.convert_to_numpy(mean), dtype=np.float64).reshape(-1),
        np.asarray(keras.ops.convert_to_numpy(var), dtype=np.float64).reshape(-1),
        count,
        bool(training) and bool(layer.trainable),
    )


@contextlib.contextmanager
def recording_batchnorm_inputs(model: keras.layers.Layer) -> Iterator[dict[str, list[Moments]]]:
    """Record the moments of what every BatchNormalization layer receives.

    Yields a dict ``path -> list of Moments`` (paths as in
    :func:`named_batchnorm_layers`), one entry per call of the layer made inside the
    block: eager calls such as ``model(x, training=...)``, or ``fit`` of a model
    compiled with ``run_eagerly=True``. A layer called several times per forward
    pass (a shared layer, or one inside ``TimeDistributed``, called once per time
    step) gets one entry per call. A call traced into a graph (``fit`` or
    ``predict`` without ``run_eagerly``) raises ``RuntimeError``; a graph traced
    before the block is not seen at all.

    It wraps each layer's ``call`` (an instance attribute, restored to exactly what
    it was on leaving, even on an error) rather than building a functional
    sub-model of the layers' inputs: a sub-model exists only for functional models
    and sees only tensors of the top-level graph, while the wrapped call sees every
    call of the layer, inside custom layers, wrappers and subclassed models too.

    Blocks nest: an inner recording sees its calls, and so do the outer ones,
    except for calls made inside :func:`frozen_moving_statistics` (the probes that
    ``batch_statistics``, ``diagnose_batchnorm``, ``recalibrate_batchnorm`` and the
    callbacks run), which outer recordings do not see. ``Moments.training`` of a
    record says whether that call normalized with batch statistics: a model's call
    may pass ``training=False`` to a part of it (a subclassed model running
    ``self.base(x, training=False)``), which then runs in inference mode even in
    ``fit``. Raises ``ValueError`` for a model not built yet (layers created in
    ``build()`` would be missed). Introduced in notebook 03, section 4.
    """
    _require_built(model, "record BatchNormalization inputs")
    records: dict[str, list[Moments]] = {}
    recording = {"records": records, "active": True}
    wrapped = []
    missing = object()
    try:
        for path, layer in _find_batchnorm(model):
            records[path] = []
            previous = vars(layer).get("call", missing)
            inner = layer.call

            def spy(*args, _path=path, _layer=layer, _inner=inner, **kwargs):
                inputs = args[0] if args else kwargs.get("inputs")
                if recording["active"] and not isinstance(inputs, keras.KerasTensor):
                    if not tf.executing_eagerly():
                        raise RuntimeError(
                            f"recording_batchnorm_inputs saw layer {_path!r} called inside a "
                            "traced graph, where its inputs cannot be read; compile the model "
                            "with run_eagerly=True, or call it directly: model(x, training=...)"
                        )
                    training = kwargs.get("training", args[1] if len(args) > 1 else None)
                    mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
                    records[_path].append(_input_moments(_layer, inputs, mask, training))
                return _inner(*args, **kwargs)

            layer.call = spy
            wrapped.append((layer, spy, previous))
        _OPEN_RECORDINGS.append(recording)
        yield records
    finally:
        _OPEN_RECORDINGS[:] = [r for r in _OPEN_RECORDINGS if r is not recording]
        for layer, spy, previous in reversed(wrapped):
            if vars(layer).get("call") is not spy:
                continue  # replaced since by someone else: theirs to restore
            if previous is missing:
                del layer.call  # back to the class's method
            else:
                layer.call = previous


@contextlib.contextmanager
def frozen_moving_statistics(model: keras.layers.Layer) -> Iterator[None]:
    """Restore all of the model's non-trainable state on leaving the block.

    A Keras 3 call with ``training=True`` updates the moving statistics as a
    side effect; inside this block it may, and they (with renorm's extra
    statistics) are put back afterwards, even on an error. So is every other
    non-trainable variable of the model (``model.non_trainable_variables``), such as
    the state of a ``Dropout`` layer's seed generator, which each training-mode call
    advances: a probe run from a callback inside ``fit`` (:class:`StopWhenMemorised`)
    leaves the training it watches bit for bit as it would be without it. Calls made
    inside the block are probes: recordings opened outside it
    (:func:`recording_batchnorm_inputs`) do not see them, so a check run inside
    ``fit`` adds no step to a recording of ``fit``.

    Raises ``ValueError`` for a model not built yet (never called): its moving
    statistics do not exist yet, so there would be nothing to restore.
    Introduced in notebook 03, section 2.
    """
    layers = _require_built(model, "freeze the moving statistics")
    variables = list(model.non_trainable_variables)
    known = {id(v) for v in variables}
    for layer in layers.values():  # a BN layer outside the tracked variables (a bare layer)
        variables += [v for v in layer.non_trainable_variables if id(v) not in known]
        known.update(id(v) for v in layer.non_trainable_variables)
    saved = [v.numpy() for v in variables]
    hidden = [r for r in _OPEN_RECORDINGS if r["active"]]  # compared by identity only
    for recording in hidden:
        recording["active"] = False
    try:
        yield
    finally:
        for recording in hidden:
            recording["active"] = True
        for variable, value in zip(variables, saved):
            variable.assign(value)


def moving_statistics(model: keras.layers.Layer) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``path -> (moving_mean, moving_variance)``, float64 arrays of shape ``(channels,)``.

    Paths as in :func:`named_batchnorm_layers` (plain layer names at top level).
    Raises ``ValueError`` for a model not built yet. Introduced in notebook 03, section 5.
    """
    _require_built(model, "read the moving statistics")
    return {
        path: (
            np.asarray(layer.moving_mean.numpy(), dtype=np.float64),
            np.asarray(layer.moving_variance.numpy(), dtype=np.float64),
        )
        for path, layer in _find_batchnorm(model)
    }


def batch_statistics(
    model: keras.layers.Layer, images, training: bool = True
) -> tuple[dict[str, Moments], object]:
    """Moments of the batch each BatchNormalization layer sees, and the model's output tensor.

    Runs ``model(images, training=training)`` once (``images``: whatever the model
    takes as one batch: an array, a list or a dict of arrays), leaving the moving
    statistics and every other non-trainable variable untouched
    (:func:`frozen_moving_statistics`; ``ValueError`` for a model not built yet).
    With ``training=True`` these are the statistics the layers that train normalize
    with in ``fit`` (``Moments.training`` says which did); with ``False``, what the layers
    receive in ``predict``. Keys are paths (:func:`named_batchnorm_layers`); a layer
    called more than once in the pass (shared, or inside ``TimeDistributed``) gets
    its calls pooled; a layer the pass never calls is left out. Introduced in
    notebook 03, section 5.
    """
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        outputs = model(images, training=training)
    return {path: _pooled(calls) for path, calls in records.items() if calls}, outputs


def log_variance_ratio(moving_var, batch_var, eps: float = 1e-3) -> np.ndarray:
    """Per channel, ``log(moving_var + eps) - log(batch_var + eps)`` (natural log), float64.

    The variance gap of a BatchNormalization layer on a scale that treats "twice
    too large" and "half too small" alike: its absolute value is ``log 2 = 0.69``
    either way, 0 when the moving variance is right. Positive: the moving variance
    (used by ``predict``) is larger than the batch's (used by ``fit``), so inference
    shrinks the layer's output by ``exp(value / 2)``. ``eps`` is the layer's
    ``epsilon`` (Keras default 1e-3), which the layer adds before the square root,
    so channels whose variances both lie far below it count as equal. Arrays of any
    matching shape (usually ``(channels,)``; broadcasting applies). The measure of
    :func:`diagnose_batchnorm` (median and worst channel of the absolute value) and
    of notebook 04's heatmap. Introduced in notebook 03, section 5.
    """
    moving = np.asarray(moving_var, dtype=np.float64)
    batch = np.asarray(batch_var, dtype=np.float64)
    return np.log(moving + eps) - np.log(batch + eps)


@dataclass
class LayerGap:
    """How far one BatchNormalization layer's moving statistics are from the batch's.

    ``name``: the layer's path (:func:`named_batchnorm_layers`).
    ``batch_var`` and ``moving_var``: medians over channels.
    ``shift``: median over channels of ``|moving_mean - batch_mean| / batch_std``
    (``batch_std = sqrt(batch_var + epsilon)``).
    ``var_ratio``: median over channels of ``(moving_var + eps) / (batch_var + eps)`` (1 is right).
    ``worst_shift`` and ``worst_ratio``: the channel furthest off.
    ``log_var_gap`` and ``worst_log_var_gap``: median and largest over channels of
    ``|log_variance_ratio|`` (0 is right; ``log 1.5 = 0.41``); when not given, taken
    from ``var_ratio`` and ``worst_ratio``.
    ``flagged``: the statistics are off (beyond the thresholds of :func:`diagnose_batchnorm`).
    ``frozen``: the layer runs in inference mode in ``fit`` too: in a training-mode
    call of the model it did not normalize with batch statistics, because its
    ``trainable`` is False or because the model's call passes it ``training=False``
    (a subclassed model whose ``call`` runs ``self.base(x, training=False)``;
    ``keras/src/layers/normalization/batch_normalization.py``: training mode needs
    ``training=True`` and ``trainable``). In a *functional* model, by contrast,
    ``base(inputs, training=False)`` does not freeze: at call time Keras 3 replaces
    the stored ``training=False`` by the outer call's value when that is not ``None``
    (``operation_fn`` in ``keras/src/models/functional.py``), so ``fit`` trains it.
    ``never_updated``: moving mean exactly 0 and variance exactly 1, Keras's start values.
    :attr:`verdict` says it in words. Introduced in notebook 03.
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
    log_var_gap: float = float("nan")
    worst_log_var_gap: float = float("nan")
    frozen: bool = False
    never_updated: bool = False

    def __post_init__(self) -> None:
        # Rows built by hand with the first ten fields only: the gap from the ratios.
        if np.isnan(self.log_var_gap):
            self.log_var_gap = abs(float(np.log(self.var_ratio)))
        if np.isnan(self.worst_log_var_gap):
            self.worst_log_var_gap = abs(float(np.log(self.worst_ratio)))

    @property
    def in_fit(self) -> str:
        """``"trains"`` (normalizes with batch statistics in ``fit``) or ``"frozen"``
        (inference mode in ``fit`` too, see :attr:`frozen`)."""
        return "frozen" if self.frozen else "trains"

    @property
    def verdict(self) -> str:
        """In words, the first that applies, in this order: ``"ok"`` (not flagged);
        ``"frozen, stale"`` (a frozen layer whose statistics do not describe this data,
        start values 0 and 1 included: ``fit`` normalized with them too, so this is
        no fit/predict difference); ``"never updated"`` (a layer that trains in
        ``fit`` but kept the start values 0 and 1, which do not describe the data);
        ``"mismatch"`` (a layer that trains in ``fit``: ``predict`` normalizes
        differently from ``fit``)."""
        if not self.flagged:
            return "ok"
        if self.frozen:
            return "frozen, stale"
        return "never updated" if self.never_updated else "mismatch"


def diagnose_batchnorm(
    model: keras.layers.Layer,
    images,
    shift_tol: float = 0.2,
    ratio_tol: float = 1.5,
    *,
    batch_size: int | None = None,
) -> list[LayerGap]:
    """Compare, per BatchNormalization layer, the moving statistics with the batch's.

    ``images``: anything :func:`recalibrate_batchnorm` accepts; the diagnostic uses
    one batch of it: for arrays (or lists/dicts of arrays) the first ``batch_size``
    samples (``None``: all of them, as one batch), for a ``tf.data.Dataset``, a
    generator or a ``keras.utils.PyDataset`` the first batch it yields (labels and
    sample weights ignored; a generator is advanced by that one batch). The batch
    statistics are those every layer sees in a
    ``model(x, training=True)`` pass, as in ``fit`` (the moving statistics are left
    untouched). A layer is flagged when its median shift exceeds ``shift_tol``
    batch standard deviations or its median ``|log_variance_ratio|`` exceeds
    ``log(ratio_tol)``. Each row says whether the layer trains or is frozen in
    ``fit`` (from what that pass did: frozen when it did not normalize with batch
    statistics, see :attr:`LayerGap.frozen`) and gives a :attr:`LayerGap.verdict`.
    Rows follow :func:`named_batchnorm_layers`; a layer the pass never calls gets no
    row. Every non-trainable variable (moving statistics, a dropout layer's seed
    state) is as before afterwards (:func:`frozen_moving_statistics`).

    Raises ``ValueError`` for a model not built yet (call it on one batch first), a
    model without BatchNormalization, a ``ratio_tol`` below 1, empty data, data the
    model cannot take, or a batch whose statistics degenerate (one value per
    channel). Introduced in notebook 03, section 5.
    """
    if ratio_tol < 1:
        raise ValueError(f"ratio_tol={ratio_tol} must be at least 1")
    if shift_tol < 0:
        raise ValueError(f"shift_tol={shift_tol} must be at least 0")
    _require_batchnorm(model, "diagnose")
    x = None
    for x, _ in _input_batches(model, images, batch_size, max_batches=1):
        break
    if x is None:
        raise ValueError(_EMPTY_DATA)
    batch, _ = _first_pass(model, lambda: batch_statistics(model, x, training=True), x)
    _check_not_degenerate(batch.items(), "diagnose_batchnorm")
    moving = moving_statistics(model)
    rows = []
    for index, (path, layer) in enumerate(
        (p, l) for p, l in _find_batchnorm(model) if p in batch
    ):
        moving_mean, moving_var = moving[path]
        seen = batch[path]
        eps = float(layer.epsilon)
        shift = np.abs(moving_mean - seen.mean) / np.sqrt(seen.var + eps)
        log_ratio = log_variance_ratio(moving_var, seen.var, eps)
        gap = np.abs(log_ratio)
        worst = int(np.argmax(gap))
        median_shift = float(np.median(shift))
        median_gap = float(np.median(gap))
        rows.append(
            LayerGap(
                index=index,
                name=path,
                channels=int(moving_mean.shape[0]),
                batch_var=float(np.median(seen.var)),
                moving_var=float(np.median(moving_var)),
                shift=median_shift,
                var_ratio=float(np.median(np.exp(log_ratio))),
                worst_shift=float(shift.max()),
                worst_ratio=float(np.exp(log_ratio[worst])),
                flagged=bool(median_shift > shift_tol or median_gap > np.log(ratio_tol)),
                log_var_gap=median_gap,
                worst_log_var_gap=float(gap[worst]),
                # pooled training is None when some calls trained and some did not
                frozen=seen.training is False or not layer.trainable,
                never_updated=bool(np.all(moving_mean == 0.0) and np.all(moving_var == 1.0)),
            )
        )
    return rows


_GAP_COLUMNS = (
    "#", "layer", "ch", "in fit", "batch var", "moving var", "|log ratio|", "shift", "verdict"
)


def _gap_cells(r: LayerGap) -> list[str]:
    return [
        str(r.index), r.name, str(r.channels), r.in_fit, f"{r.batch_var:.3g}",
        f"{r.moving_var:.3g}", f"{r.log_var_gap:.3g}", f"{r.shift:.3g}", r.verdict,
    ]


def _gap_summary(rows: list[LayerGap]) -> str:
    flagged = [r.verdict for r in rows if r.flagged]
    counts = ", ".join(
        f"{flagged.count(v)} {v}" for v in ("mismatch", "frozen, stale", "never updated")
        if v in flagged
    )
    return f"{len(flagged)} of {len(rows)} BatchNormalization layers flagged" + (
        f": {counts}" if counts else ""
    )


def format_gaps(rows: list[LayerGap], max_rows: int | None = None) -> str:
    """A fixed-width text table of ``diagnose_batchnorm`` rows (3 significant digits).

    The plain-text fallback of :func:`gaps_table_html`. Columns: index, layer path,
    channels, whether the layer trains or is frozen in ``fit``, median batch and
    moving variance, median ``|log_variance_ratio|``, median shift (batch standard
    deviations) and the verdict in words. The last line counts the flagged layers by
    verdict. Introduced in notebook 03, section 9.
    """
    shown = rows if max_rows is None else rows[:max_rows]
    width = max([5] + [len(r.name) for r in shown])
    header = (
        f"{'#':>3} {'layer':<{width}} {'ch':>5} {'in fit':<6} {'batch var':>9} "
        f"{'moving var':>10} {'|log ratio|':>11} {'shift':>7}  verdict"
    )
    lines = [header, "-" * len(header)]
    for r in shown:
        lines.append(
            f"{r.index:>3} {r.name:<{width}} {r.channels:>5} {r.in_fit:<6} {r.batch_var:>9.3g} "
            f"{r.moving_var:>10.3g} {r.log_var_gap:>11.3g} {r.shift:>7.3g}  {r.verdict}"
        )
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more layers")
    lines.append(_gap_summary(rows))
    return "\n".join(lines)


def gaps_table_html(rows: list[LayerGap], max_rows: int | None = None) -> str:
    """``diagnose_batchnorm`` rows as an HTML table, for ``IPython.display.HTML``.

    The same columns as :func:`format_gaps`, in a compact table that fits a narrow
    notebook column (small font, no fixed widths); flagged rows' verdicts in bold.
    Caption: what the columns measure; last line: the count by verdict. Plain HTML
    (no script, no style sheet), so GitHub renders it and nbval compares it as text.
    Introduced in notebook 03, section 5.

    Raises ``TypeError`` when ``rows`` is not a list of :class:`LayerGap` (a model, say).
    """
    import html

    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, LayerGap) for r in rows):
        raise TypeError(
            f"gaps_table_html needs the rows of utils.diagnose_batchnorm(model, x), "
            f"a list of LayerGap; got {type(rows).__name__}"
        )
    rows = list(rows)
    shown = rows if max_rows is None else rows[:max_rows]
    right = {0, 2, 4, 5, 6, 7}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _GAP_COLUMNS)
    body = []
    for r in shown:
        cells = []
        for i, text in enumerate(_gap_cells(r)):
            text = html.escape(text)
            if i == len(_GAP_COLUMNS) - 1 and r.flagged:
                text = f"<b>{text}</b>"
            align = ' style="text-align:right"' if i in right else ""
            cells.append(f"<td{align}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if max_rows is not None and len(rows) > max_rows:
        more = f"... {len(rows) - max_rows} more layers"
        body.append(f'<tr><td colspan="{len(_GAP_COLUMNS)}">{more}</td></tr>')
    caption = (
        "batch / moving var: medians over channels; |log ratio|: median "
        "|log(moving var + eps) - log(batch var + eps)|; shift: median "
        "|moving mean - batch mean| in batch standard deviations"
    )
    return "\n".join(
        [
            '<table style="font-size:smaller">',
            f'<caption style="caption-side:bottom">{html.escape(caption)}</caption>',
            f"<thead><tr>{head}</tr></thead>",
            "<tbody>",
            *body,
            "</tbody>",
            "</table>",
            f"<p>{html.escape(_gap_summary(rows))}</p>",
        ]
    )


class BatchNormHistory(keras.callbacks.Callback):
    """Keras callback: per epoch, every BN layer's moving and batch statistics.

    At the start of training (epoch 0) and after every epoch it records, on
    ``images`` (keys are layer paths, :func:`named_batchnorm_layers`):

    - ``moving[path]``: ``(moving_mean, moving_var)``, read from the layer's
      variables ``moving_mean`` and ``moving_variance`` (shape ``(channels,)``);
    - ``batch[path]``: the :class:`Moments` the layer normalizes with in a
      training-mode pass ``model(images, training=True)`` (mean and biased
      variance over every axis but the channels, as the layer computes them);
    - ``epsilon[path]``: the layer's ``epsilon``;
    - ``train_loss`` / ``infer_loss`` and ``train_acc`` / ``infer_acc``: the
      model's loss and accuracy on ``images`` in training and inference mode.

    ``momenta``: other momentum values to replay alongside (notebook 04). When
    ``fit`` trains on exactly ``images`` in one batch per epoch, update ``k``
    normalizes with the batch statistics recorded at epoch ``k - 1``, so the moving
    statistics momentum ``m`` would have given follow from the records
    (``moving = m * moving + (1 - m) * batch``, from Keras's start values 0 and 1;
    ``fit`` never reads the moving statistics, so the weights are the same for
    every momentum). ``replayed[m]`` holds them per epoch, ``replayed_loss[m]`` and
    ``replayed_acc[m]`` the inference-mode loss and accuracy they give.

    Recording leaves the moving statistics untouched, and a recording of ``fit``
    (:func:`recording_batchnorm_inputs`) does not see its passes. When training
    ends the callback lets go of the model. Introduced in notebook 04.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, momenta: tuple[float, ...] = ()):
        super().__init__()
        for m in momenta:
            if not 0.0 <= m < 1.0:
                raise ValueError(f"momentum {m} must lie in [0, 1)")
        self.images = images
        self.labels = labels
        self.momenta = tuple(float(m) for m in momenta)
        self.epochs: list[int] = []
        self.moving: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.batch: dict[str, list[Moments]] = {}
        self.epsilon: dict[str, float] = {}
        self.train_loss: list[float] = []
        self.infer_loss: list[float] = []
        self.train_acc: list[float] = []
        self.infer_acc: list[float] = []
        self.replayed: dict[float, list[dict[str, tuple[np.ndarray, np.ndarray]]]] = {
            m: [] for m in self.momenta
        }
        self.replayed_loss: dict[float, list[float]] = {m: [] for m in self.momenta}
        self.replayed_acc: dict[float, list[float]] = {m: [] for m in self.momenta}

    def _record(self, epoch: int) -> None:
        self.epochs.append(epoch)
        for path, layer in _find_batchnorm(self.model):
            self.epsilon[path] = float(layer.epsilon)
        for name, stats in moving_statistics(self.model).items():
            self.moving.setdefault(name, []).append(stats)
        seen, train_out = batch_statistics(self.model, self.images, training=True)
        with frozen_moving_statistics(self.model):  # a probe: recordings of fit do not see it
            infer_out = self.model(self.images, training=False)
        for out, losses, accs in (
            (train_out, self.train_loss, self.train_acc),
            (infer_out, self.infer_loss, self.infer_acc),
        ):
            loss, acc = loss_and_accuracy(out, self.labels)
            losses.append(loss)
            accs.append(acc)
        for m in self.momenta:
            if not self.replayed[m]:
                stats = {
                    p: (np.zeros_like(s.mean), np.ones_like(s.var)) for p, s in seen.items()
                }
            else:  # the update that led here normalized with the previous record
                stats = {
                    p: (m * mean + (1 - m) * self.batch[p][-1].mean,
                        m * var + (1 - m) * self.batch[p][-1].var)
                    for p, (mean, var) in self.replayed[m][-1].items()
                }
            self.replayed[m].append(stats)
            with frozen_moving_statistics(self.model):
                set_moving_statistics(self.model, stats)
                loss, acc = loss_and_accuracy(self.model(self.images, training=False), self.labels)
            self.replayed_loss[m].append(loss)
            self.replayed_acc[m].append(acc)
        for name, moments in seen.items():
            self.batch.setdefault(name, []).append(moments)

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
        """Paths of the recorded layers, in network order."""
        return list(self.moving)

    def gap(self, statistic: str = "var", momentum: float | None = None) -> np.ndarray:
        """Layers x recorded epochs: how far the moving statistics are from the batch's.

        ``"var"``: median over channels of ``|log_variance_ratio(moving, batch, eps)|``,
        the symmetric measure of :func:`diagnose_batchnorm` (``log 2 = 0.69`` for a
        variance twice too large or half too small). ``"mean"``: median over channels
        of ``|moving mean - batch mean| / sqrt(batch var + eps)``. ``momentum``: use
        the statistics replayed for that momentum (one of ``momenta``) instead of
        the model's own. Raises ``ValueError`` for another statistic or momentum.
        """
        if statistic not in ("var", "mean"):
            raise ValueError(f"statistic={statistic!r}; use 'var' or 'mean'")
        if momentum is not None and float(momentum) not in self.replayed:
            raise ValueError(f"momentum {momentum} was not replayed; momenta={self.momenta}")
        gaps = np.zeros((len(self.moving), len(self.epochs)))
        for i, name in enumerate(self.moving):
            eps = self.epsilon[name]
            moving = (
                self.moving[name]
                if momentum is None
                else [stats[name] for stats in self.replayed[float(momentum)]]
            )
            for j, ((m_mean, m_var), seen) in enumerate(zip(moving, self.batch[name])):
                if statistic == "var":
                    gap = np.abs(log_variance_ratio(m_var, seen.var, eps))
                else:
                    gap = np.abs(m_mean - seen.mean) / np.sqrt(seen.var + eps)
                gaps[i, j] = np.median(gap)
        return gaps


class WeightSteps(keras.callbacks.Callback):
    """Keras callback: how far each epoch moved the trainable weights.

    ``steps[k]``: mean over every trainable weight value of ``|w after epoch k+1 -
    w before it|`` (same units as the weights). With one batch per epoch that is one
    optimizer update. Adam's first update of a weight with gradient ``g`` is
    ``lr * g / (|g| + eps / sqrt(1 - beta_2))``, about ``lr`` whenever ``|g|`` is well
    above 3e-6 with Keras's defaults (``keras/src/optimizers/adam.py`` adds ``eps`` to
    ``sqrt(v)`` before the bias correction); later updates stay below about
    ``lr * (1 - beta_1) / sqrt(1 - beta_2)``, 3.2 ``lr`` for the default betas
    (Kingma & Ba 2015, section 2.1). Keeps one copy of the
    weights (float32, about 94 MB for ResNet50) while training. Introduced in
    notebook 04.
    """

    def __init__(self):
        super().__init__()
        self.steps: list[float] = []
        self._previous: list[np.ndarray] | None = None

    def on_train_begin(self, logs=None):  # noqa: D102
        self._previous = [v.numpy() for v in self.model.trainable_variables]

    def on_epoch_end(self, epoch, logs=None):  # noqa: D102
        total, count = 0.0, 0
        current = []
        for variable, before in zip(self.model.trainable_variables, self._previous):
            now = variable.numpy()
            total += float(np.abs(now.astype(np.float64) - before).sum())
            count += now.size
            current.append(now)
        self.steps.append(total / max(count, 1))
        self._previous = current

    def on_train_end(self, logs=None):
        """Let go of the model and of the copy of its weights."""
        self._previous = None
        self.set_model(None)


# ---------------------------------------------------------------------------
# Remedies
# ---------------------------------------------------------------------------


_EMPTY_DATA = "the data yielded no batch (an empty array, dataset, generator or PyDataset)"


def _num_samples(x) -> int:
    """Samples in one batch of model inputs: the leading size of its first array."""
    leaves = keras.tree.flatten(x)
    if not leaves or getattr(leaves[0], "shape", None) is None or len(leaves[0].shape) == 0:
        raise TypeError(
            f"a batch of the data is {type(x).__name__}, not an array or a list/dict of "
            "arrays with a leading batch axis; yield x, (x, y) or (x, y, sample_weight)"
        )
    return int(leaves[0].shape[0])


def _input_batches(model, data, batch_size, max_batches=None, max_samples=None):
    """Yield ``(x, samples)`` batches of model inputs from any data ``fit`` takes.

    Arrays, tensors, and lists/dicts of them are the model's inputs, cut into
    ``batch_size`` samples (``None``: one batch); ``tf.data.Dataset``, generators,
    other iterators and ``keras.utils.PyDataset`` yield batches already, unpacked
    with ``keras.utils.unpack_x_y_sample_weight`` (labels and weights dropped).
    The last batch is cut so that at most ``max_samples`` samples are used.
    """
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    for name, limit in (("max_batches", max_batches), ("max_samples", max_samples)):
        if limit is not None and int(limit) < 1:
            raise ValueError(f"{name}={limit} must be at least 1 (or None: no limit)")

    def leaves_are_arrays(value) -> bool:
        leaves = keras.tree.flatten(value)
        return bool(leaves) and all(
            isinstance(leaf, (np.ndarray, tf.Tensor)) or keras.ops.is_tensor(leaf)
            for leaf in leaves
        )

    if isinstance(data, tf.data.Dataset):
        batches = (keras.utils.unpack_x_y_sample_weight(element)[0] for element in data)
    elif isinstance(data, keras.utils.PyDataset):
        count = data.num_batches
        if count is None and max_batches is None and max_samples is None:
            raise ValueError(
                "this PyDataset is infinite (num_batches is None): pass max_batches or max_samples"
            )

        def read_py_dataset():
            index = 0
            while count is None or index < count:
                yield keras.utils.unpack_x_y_sample_weight(data[index])[0]
                index += 1

        batches = read_py_dataset()
    elif isinstance(data, (np.ndarray, tf.Tensor, dict, list, tuple)) or keras.ops.is_tensor(data):
        if not leaves_are_arrays(data):
            raise TypeError(
                f"data of type {type(data).__name__} holds something other than arrays; pass "
                "an array (or a list/dict of arrays for a model with several inputs), a "
                "tf.data.Dataset, a generator or a keras.utils.PyDataset"
            )
        total = _num_samples(data)
        step = total if batch_size is None else int(batch_size)
        batches = (
            keras.tree.map_structure(lambda a, s=start: a[s : s + step], data)
            for start in range(0, total, max(step, 1))
        )
    elif hasattr(data, "__iter__") or hasattr(data, "__next__"):
        batches = (keras.utils.unpack_x_y_sample_weight(element)[0] for element in iter(data))
    else:
        raise TypeError(
            f"cannot read batches from data of type {type(data).__name__}; pass an array "
            "(or a list/dict of arrays), a tf.data.Dataset, a generator or a keras.utils.PyDataset"
        )
    used = 0
    for number, x in enumerate(batches):
        if max_batches is not None and number >= int(max_batches):
            return
        samples = _num_samples(x)
        if max_samples is not None and used + samples > int(max_samples):
            samples = int(max_samples) - used
            x = keras.tree.map_structure(lambda a: a[:samples], x)
        if samples == 0:
            continue
        used += samples
        yield x, samples
        if max_samples is not None and used >= int(max_samples):
            return


def _describe(x) -> str:
    shapes = keras.tree.map_structure(lambda a: tuple(a.shape), x)
    return str(shapes)


def _first_pass(model, run, x):
    """Run the first model call; turn an error about the data into one that says so."""
    try:
        return run()
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
        expected = ""
        if getattr(model, "inputs", None):
            expected = f"; it takes {_describe(model.inputs)} (None: any size)"
        raise ValueError(
            f"the model cannot take this data: a batch has shape {_describe(x)}{expected}. "
            "A tf.data.Dataset must be batched (dataset.batch(32)); a model with several "
            "inputs takes a list or dict of arrays. "
            f"Keras said: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
        ) from error


def _check_not_degenerate(items, where: str) -> None:
    """Refuse training-mode moments over one value per channel (variance exactly 0)."""
    for path, moments in items:
        if moments.training and moments.count == 1:
            raise ValueError(
                f"{where}: layer {path!r} normalized a batch holding one value per channel "
                "(one sample and no spatial axes), whose variance is exactly 0, so in "
                "training mode it outputs beta whatever the input and every later layer "
                "sees a constant. Use batches of at least 2 samples (better: the batch "
                "size the model will be served with); with arrays, pick a batch_size that "
                "does not leave a last batch of one, or set max_samples"
            )


class Recalibration(int):
    """What :func:`recalibrate_batchnorm` did; as an ``int``, the number of layers updated.

    Attributes: ``statistics`` (``path -> Moments`` written into the layer:
    ``count`` = values per channel used), ``skipped`` (paths of the layers left
    alone: frozen ones, and those the data never reached), ``reasons`` (``path ->``
    why that layer was skipped, in words), ``samples`` and ``batches`` (how much
    data was read), ``estimator``. Introduced in notebook 05.
    """

    statistics: dict[str, Moments]
    skipped: list[str]
    reasons: dict[str, str]
    samples: int
    batches: int
    estimator: str

    def __str__(self) -> str:
        return int.__repr__(self)

    def __repr__(self) -> str:
        return (
            f"Recalibration({int(self)} layers updated from {self.samples} samples in "
            f"{self.batches} batches, estimator={self.estimator!r}, "
            f"{len(self.skipped)} skipped)"
        )


def recalibrate_batchnorm(
    model: keras.layers.Layer,
    images,
    batch_size: int = 32,
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    estimator: str = "population",
    include_frozen: bool = False,
    verbose: int = 0,
) -> Recalibration:
    """Set the BN layers' moving statistics to statistics measured on data (PreciseBN).

    Runs the data through the model in training mode, batch by batch, with every
    weight fixed, records what each BatchNormalization layer receives, and writes
    the estimate into ``moving_mean`` and ``moving_variance`` (Wu & Johnson 2021,
    "Rethinking 'Batch' in BatchNorm", Sec. 3; layer equations in Ioffe & Szegedy
    2015 and ``keras/src/layers/normalization/batch_normalization.py``).

    ``images``: the data, as ``fit`` takes it: a NumPy array or tensor, a list or
    dict of them (a model with several inputs), all cut into ``batch_size``
    samples; or a ``tf.data.Dataset``, a generator (any iterator) or a
    ``keras.utils.PyDataset`` yielding ``x``, ``(x, y)`` or ``(x, y, sample_weight)``
    (read as ``fit`` reads them, with ``keras.utils.unpack_x_y_sample_weight``: a
    list is ``(x, y)``, so a multi-input ``x`` goes in a tuple or dict), whose own
    batches are used as they come (``batch_size`` is ignored for them).
    Labels and sample weights are ignored. ``max_batches`` / ``max_samples`` stop
    early (the last batch is cut to ``max_samples``); an infinite generator needs
    one of them. ``verbose=1`` shows a ``keras.utils.Progbar``.

    ``estimator``, per layer and channel:

    - ``"population"``: the exact mean and (biased) variance of all values the
      layer received, pooled over batches (Chan et al.'s merge): as if one batch
      held all the data. fvcore's ``update_bn_stats`` computes approximately this
      (its population estimator weights batches by size, but undoes PyTorch's
      Bessel correction with the number of samples in a batch only, not with the
      values per channel, e.g. ``N*H*W`` for images).
    - ``"batch_mean"``: the mean over the layer's calls of each call's mean and of
      each call's biased variance (the variance Keras normalizes with), every call
      weighted alike. A layer called once per batch: the mean over batches. A layer
      called several times per batch normalizes each call with that call's own
      statistics, and each call counts once: a shared layer, or one inside
      ``TimeDistributed`` (one call per time step, normalized over the batch at that
      step). PyTorch's ``torch.optim.swa_utils.update_bn`` (momentum
      ``None``: a cumulative average) and fvcore's older ``update_bn_stats`` average
      the same way but over Bessel-corrected batch variances, larger by ``n/(n-1)``
      for ``n`` values per channel in a batch.

    The two means agree for equal batches; the variances differ: the mean of
    per-batch variances misses the variance of the batch means around the
    population mean, so it is smaller by that amount. They are equal when one batch
    holds everything. Use the estimator that matches how the model will be
    served: ``"population"`` for the statistics of the data as a whole,
    ``"batch_mean"`` for the typical batch of ``batch_size``. Either way the batch
    size matters, because each layer's input depends on the earlier layers, which
    normalize with the statistics of the batch at hand: the statistics measured are
    those of a network that normalizes batches of that size.

    Frozen layers run in inference mode in ``fit`` too, and the layers after them
    were trained on their statistics: they are left alone. A layer is frozen when it
    does not normalize with batch statistics in the run's training-mode calls: its
    ``trainable`` is False, or the model's own ``call`` passes it ``training=False``
    (a subclassed model running ``self.base(x, training=False)``; see
    :attr:`LayerGap.frozen`). ``include_frozen=True`` sets ``trainable=True`` on the
    first kind for the run (restored afterwards), so they normalize with batch
    statistics like the others and are updated. It cannot change the second kind: a
    call that passes ``training=False`` explicitly runs in inference mode whatever
    the outer call says, so those layers are always left alone and listed in
    ``skipped``, with the reason in ``reasons``. Only the moving statistics change
    (renorm's extra statistics are set to match), and only from calls that
    normalized with batch statistics; every other variable (e.g. a dropout layer's
    seed state) and setting is restored, even on an error.

    Returns a :class:`Recalibration`: an ``int``, the number of layers updated (so
    ``n = recalibrate_batchnorm(model, images)`` counts layers), with details.
    Raises ``ValueError`` for a model not built yet (call it on one batch first), a
    model without BatchNormalization, no layer to update (all frozen), empty data,
    data the model cannot take, a batch with one value per channel, or a bad
    argument; ``TypeError`` for data of a type it cannot read. Introduced in
    notebook 05.
    """
    if estimator not in ("population", "batch_mean"):
        raise ValueError(f"estimator={estimator!r}; use 'population' or 'batch_mean'")
    named = _require_batchnorm(model, "recalibrate")
    targets = {p: l for p, l in named.items() if include_frozen or l.trainable}
    if not targets:
        raise ValueError(
            f"all {len(named)} BatchNormalization layers are frozen (trainable=False): they "
            "run in inference mode in fit too, and the layers after them were trained on "
            "their statistics; pass include_frozen=True to recalibrate them anyway"
        )
    batches = _input_batches(model, images, batch_size, max_batches, max_samples)
    target = None
    if isinstance(images, keras.utils.PyDataset) and images.num_batches is not None:
        target = images.num_batches
    elif isinstance(images, tf.data.Dataset) and int(images.cardinality()) >= 0:
        target = int(images.cardinality())
    elif not isinstance(images, (tf.data.Dataset, keras.utils.PyDataset)) and (
        isinstance(images, (np.ndarray, dict, list, tuple)) or keras.ops.is_tensor(images)
    ):
        total = _num_samples(images)
        if max_samples is not None:
            total = min(total, int(max_samples))
        target = -(-total // int(batch_size or total or 1))
    if max_batches is not None:
        target = min(target or int(max_batches), int(max_batches))
    progress = keras.utils.Progbar(target, verbose=verbose, unit_name="batch") if verbose else None

    per_call: dict[str, list[Moments]] = {path: [] for path in targets}  # training-mode calls
    reached: set[str] = set()
    samples = count = 0
    thawed = [l for l in targets.values() if not l.trainable]
    others = [v for v in model.non_trainable_variables]
    saved = [v.numpy() for v in others]
    try:
        for layer in thawed:
            layer.trainable = True
        with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
            for x, size in batches:
                before = {path: len(calls) for path, calls in records.items()}
                if count == 0:
                    _first_pass(model, lambda: model(x, training=True), x)
                else:
                    model(x, training=True)
                _check_not_degenerate(
                    ((p, c) for p in records for c in records[p][before[p]:]),
                    "recalibrate_batchnorm",
                )
                for path, recorded in records.items():
                    fresh = recorded[before[path]:]
                    reached.update([path] if fresh else [])
                    if path in per_call:  # only calls that normalized with batch statistics
                        per_call[path] += [moments for moments in fresh if moments.training]
                samples += size
                count += 1
                if progress is not None:
                    progress.update(count)
    finally:
        for layer in thawed:
            layer.trainable = False
        for variable, value in zip(others, saved):
            variable.assign(value)
    if progress is not None:
        progress.update(count, finalize=True)
    if count == 0:
        raise ValueError(_EMPTY_DATA)
    written: dict[str, Moments] = {}
    for path, moments in per_call.items():
        if not moments:
            continue
        if estimator == "population":
            written[path] = _pooled(moments)
        else:
            written[path] = Moments(
                np.mean([m.mean for m in moments], axis=0),
                np.mean([m.var for m in moments], axis=0),
                int(sum(m.count for m in moments)),
                True,
            )
    reasons = {}
    for path in named:
        if path in written:
            continue
        if path not in reached:
            reasons[path] = "the data never reached it (the model's call did not call it)"
        elif path not in targets:
            reasons[path] = (
                "frozen (trainable=False): inference mode in fit too; "
                "include_frozen=True updates it"
            )
        else:
            reasons[path] = (
                "frozen by the model's call, which passes it training=False: inference mode "
                "in fit too, and include_frozen cannot override that argument"
            )
    if not written:
        raise ValueError(
            "no BatchNormalization layer normalized with batch statistics in a training-mode "
            "call, so there is nothing to recalibrate: "
            + "; ".join(f"{path!r}: {why}" for path, why in list(reasons.items())[:4])
        )
    for path, moments in written.items():
        _assign_moving(targets[path], moments.mean, moments.var)
    result = Recalibration(len(written))
    result.statistics = written
    result.skipped = list(reasons)
    result.reasons = reasons
    result.samples = samples
    result.batches = count
    result.estimator = estimator
    return result


def _assign_moving(layer, mean: np.ndarray, var: np.ndarray) -> None:
    """Write moving statistics into a BN layer, renorm's extra statistics included.

    With ``renorm=True`` Keras derives ``moving_variance`` from ``moving_stddev`` at
    each update and corrects with ``renorm_mean`` / ``renorm_stddev`` in training:
    all three are set to match, ``stddev = sqrt(var + epsilon)``.
    """
    layer.moving_mean.assign(np.asarray(mean, dtype=np.float32))
    layer.moving_variance.assign(np.asarray(var, dtype=np.float32))
    if getattr(layer, "renorm", False):  # renorm derives moving_variance from these
        stddev = np.sqrt(np.asarray(var, dtype=np.float64) + layer.epsilon).astype(np.float32)
        layer.moving_stddev.assign(stddev)
        layer.renorm_mean.assign(np.asarray(mean, dtype=np.float32))
        layer.renorm_stddev.assign(stddev)


@dataclass
class RemedyResult:
    """One row of notebook 05's comparison: how a remedy's model answers on the training images.

    ``updates``: optimizer updates the served weights received (one per epoch with
    the case's single batch). ``memorised``: those weights get every image right in
    training mode on the batch of all images (:func:`memorised`): whether the
    training itself succeeded. ``predicted`` / ``accuracy`` / ``loss``: what the
    remedy serves for the batch of all images (loss as ``evaluate`` computes it).
    ``alone_right``: each image served on its own (a batch of one). ``mode_gap``:
    largest ``|training-mode probability - served probability|``. ``extra``: what the
    remedy costs beyond the baseline's training, in words (updates, passes).
    ``seconds``: measured seconds of that extra work (varies from run to run), or
    ``None`` when nothing extra was computed. ``alone_predicted``: the class served
    for each image on its own. ``same_computation``: the served answers come from
    the very computation the gap is measured against (training mode itself, or a
    model without BatchNormalization such as GroupNorm), so a gap of 0 holds by
    construction and says nothing; tables show it as "n/a". Introduced in notebook 05.
    """

    name: str
    updates: int
    memorised: bool
    predicted: list[int]
    accuracy: float
    loss: float
    alone_right: list[bool]
    mode_gap: float
    extra: str
    seconds: float | None
    alone_predicted: list[int] | None = None
    same_computation: bool = False


def measure_remedy(
    name: str,
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    updates: int,
    extra: str = "",
    seconds: float | None = None,
    training_mode: bool = False,
    same_computation: bool = False,
) -> RemedyResult:
    """Measure how ``model`` answers on ``images``, served in inference mode (as ``predict``).

    With ``training_mode=True`` the answers are served by ``model(x, training=True)``
    instead (the "predict in training mode" remedy). Every pass leaves the moving
    statistics as they were. ``memorised`` is read from the training-mode output on
    all images at once, the reference the gap is measured against. The result's
    ``same_computation`` is set with ``training_mode=True`` (the reference is what is
    served) or when the caller passes ``same_computation=True`` for a model whose two
    modes compute the same thing (e.g. ``build_resnet50(normalization="group")``);
    ``ValueError`` if such a model's modes differ by more than 1e-5. ``seconds`` is
    passed through (``None``: nothing measured). Introduced in notebook 05.
    """
    same = training_mode or same_computation
    with frozen_moving_statistics(model):  # training-mode calls would move the statistics
        served = model(images, training=training_mode)
        alone = [
            int(np.argmax(keras.ops.convert_to_numpy(model(images[i : i + 1], training=training_mode))))
            for i in range(len(images))
        ]
        reference = keras.ops.convert_to_numpy(model(images, training=True))
    loss, acc = loss_and_accuracy(served, labels)
    served = keras.ops.convert_to_numpy(served)
    truth = np.argmax(labels, axis=1)
    gap = float(np.abs(reference - served).max())
    if same_computation and gap > 1e-5:
        raise ValueError(
            f"same_computation=True, but training and inference mode differ by {gap:.2g}"
        )
    return RemedyResult(
        name=name,
        updates=int(updates),
        memorised=accuracy(reference, labels) == 1.0,
        predicted=np.argmax(served, axis=1).tolist(),
        accuracy=acc,
        loss=loss,
        alone_right=[a == t for a, t in zip(alone, truth)],
        mode_gap=gap,
        extra=str(extra),
        seconds=None if seconds is None else float(seconds),
        alone_predicted=alone,
        same_computation=bool(same),
    )


_REMEDY_COLUMNS = (
    "remedy", "updates", "memorised", "predict", "accuracy", "loss", "each alone",
    "train/served gap", "extra cost",
)


def remedies_table_html(results: list[RemedyResult]) -> str:
    """Notebook 05's comparison as an HTML table, for ``IPython.display.HTML``.

    One row per remedy; a row whose training did not memorise the images says so in
    bold ("no: training failed"), since its served answers then say nothing about
    the fit/predict gap. A row with ``same_computation`` shows its gap as "n/a: same
    computation" (0 by construction, not a success). Seconds are left out (they vary
    from run to run); plain
    HTML, so GitHub renders it and nbval compares it as text. Introduced in
    notebook 05.
    """
    import html

    right = {1, 4, 5, 7}
    body = []
    for r in results:
        alone = f"{sum(r.alone_right)} of {len(r.alone_right)} right"
        memorised = "yes" if r.memorised else "<b>no: training failed</b>"
        cells = [
            html.escape(r.name), str(r.updates), memorised,
            html.escape(" ".join(str(p) for p in r.predicted)), f"{r.accuracy:.2f}",
            f"{r.loss:.3g}", alone,
            "n/a: same computation" if r.same_computation else f"{r.mode_gap:.2g}",
            html.escape(r.extra),
        ]
        align = ' style="text-align:right"'
        body.append("<tr>" + "".join(
            f"<td{align if i in right else ''}>{c}</td>" for i, c in enumerate(cells)
        ) + "</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _REMEDY_COLUMNS)
    caption = (
        "updates: optimizer updates of the served weights; memorised: those weights right on "
        "every image in training mode; predict: classes served for the batch of all images; "
        "each alone: served one image at a time; train/served gap: largest difference of "
        "probabilities between training mode and what is served (n/a: the served answers are "
        "training mode's own computation, so the gap is 0 by construction)"
    )
    return (
        '<table style="font-size:smaller">'
        f'<caption style="caption-side:bottom">{html.escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _plt():
    import matplotlib.pyplot as plt

    return plt


def show_images(images: np.ndarray, names: list[str], labels: np.ndarray | None = None) -> None:
    """Show the images side by side, titled with file name and class. Introduced in notebook 01."""
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
    """Loss (log scale) and accuracy per epoch from ``fit``'s history. Introduced in notebook 02."""
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
    """Bar chart of each image's predicted class probabilities. Introduced in notebook 02."""
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
    Introduced in notebook 01.
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


def plot_layer_gaps(
    rows: list[LayerGap], title: str, shift_tol: float = 0.2, ratio_tol: float = 1.5
) -> None:
    """Per BN layer: the log variance ratio and the mean shift, flagged layers in red.

    Top: ``log(var_ratio)``, the median over channels of :func:`log_variance_ratio`
    (natural log of moving over batch variance; 0 is right, below 0 the moving
    variance is too small, above too large), with the band ``+-log(ratio_tol)``
    that :func:`diagnose_batchnorm` accepts; its distance from 0 is the symmetric
    gap ``|log ratio|`` of the table. Bottom: the shift (``|moving - batch mean|``
    in batch standard deviations, log scale) with the line ``shift_tol``. ``rows``
    come from :func:`diagnose_batchnorm` (pass the tolerances given to it).
    Introduced in notebook 03, section 5.
    """
    plt = _plt()
    index = np.array([r.index for r in rows])
    flagged = np.array([r.flagged for r in rows], dtype=bool)
    fig, (ax_var, ax_shift) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True)
    log_ratio = np.log([r.var_ratio for r in rows])
    ax_var.plot(index, log_ratio, "o-", ms=3, color="tab:gray")
    ax_var.plot(index[flagged], log_ratio[flagged], "o", ms=4, color="tab:red",
                label="flagged layer")
    ax_var.axhspan(-np.log(ratio_tol), np.log(ratio_tol), color="tab:green", alpha=0.15,
                   label=f"within a factor {ratio_tol:g}")
    ax_var.axhline(0, color="black", lw=0.8)
    ax_var.set(ylabel="log(moving var / batch var)\nmedian over channels")
    ax_var.legend(fontsize=8)
    shift = np.array([r.shift for r in rows])
    ax_shift.semilogy(index, shift, "o-", ms=3, color="tab:gray")
    ax_shift.semilogy(index[flagged], shift[flagged], "o", ms=4, color="tab:red",
                      label="flagged layer")
    ax_shift.axhline(shift_tol, color="tab:green", ls="--", lw=1, label=f"shift {shift_tol:g}")
    ax_shift.set(xlabel="BatchNormalization layer (input side -> output side)",
                 ylabel="|moving - batch mean|\nin batch std (log)")
    ax_shift.legend(fontsize=8)
    for ax in (ax_var, ax_shift):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def plot_activation_scale(train_rms: np.ndarray, infer_rms: np.ndarray, title: str) -> None:
    """Root-mean-square of each BN layer's input, training vs inference mode (log scale).

    ``train_rms`` and ``infer_rms``: one value per layer, shape ``(layers,)``, in the
    units of the layer's input. Introduced in notebook 03, section 6.
    """
    plt = _plt()
    index = np.arange(len(train_rms))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.semilogy(index, train_rms, "o-", ms=3, label="training mode (batch statistics)")
    ax.semilogy(index, infer_rms, "s-", ms=3, color="tab:red",
                label="inference mode (moving statistics)")
    ax.set(xlabel="BatchNormalization layer (input side -> output side)",
           ylabel="RMS of the layer's input (log)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()


def plot_moving_vs_batch(history: BatchNormHistory, layer_names: list[str], title: str) -> None:
    """Per epoch, for a few layers: moving vs batch mean and variance (medians over channels).

    Introduced in notebook 04.
    """
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
    """Heatmap of the variance gap ``|log_variance_ratio|`` (:meth:`BatchNormHistory.gap`),
    BN layers x epochs, log colour scale. Introduced in notebook 04."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    gaps = history.gap("var")
    vmin = max(float(gaps[gaps > 0].min()) if np.any(gaps > 0) else 1e-3, 1e-3)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(gaps, aspect="auto", cmap="magma", norm=LogNorm(vmin=vmin, vmax=max(gaps.max(), 10 * vmin)),
                      extent=(history.epochs[0] - 0.5, history.epochs[-1] + 0.5, len(gaps) - 0.5, -0.5))
    ax.set(xlabel="epoch", ylabel="BatchNormalization layer (0 = input side)", title=title)
    ax.set_xticks(history.epochs)
    fig.colorbar(image, ax=ax, label="|ln(moving var / batch var)|, median over channels")
    fig.tight_layout()
    plt.show()


def plot_mode_losses(history: BatchNormHistory, title: str) -> None:
    """Loss on the training images per epoch, training mode vs inference mode (log).

    Introduced in notebook 04.
    """
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
    """Measured fraction of the way travelled vs the law ``1 - m**n``. Introduced in notebook 04.

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


def plot_gap_by_momentum(history: BatchNormHistory, momentum: float, title: str) -> None:
    """Per epoch, one curve per momentum: the worst layer's variance gap and the accuracy of predict.

    ``momentum``: the model's own (its recorded moving statistics); the others are
    ``history.momenta``, replayed. The gap is :meth:`BatchNormHistory.gap`'s
    ``|log_variance_ratio|``, largest over layers. Introduced in notebook 04.
    """
    plt = _plt()
    fig, (ax_gap, ax_acc) = plt.subplots(1, 2, figsize=(8, 3.2))
    curves = [(momentum, history.gap("var"), history.infer_acc)] + [
        (m, history.gap("var", momentum=m), history.replayed_acc[m]) for m in history.momenta
    ]
    for m, gaps, accs in curves:
        ax_gap.semilogy(history.epochs, gaps.max(axis=0), "o-", ms=3, label=f"momentum {m}")
        ax_acc.plot(history.epochs, accs, "o-", ms=3, label=f"momentum {m}")
    ax_gap.set(xlabel="epoch", ylabel="worst layer's |ln(moving var /\nbatch var)| (log)",
               title="moving vs batch")
    ax_acc.set(xlabel="epoch", ylabel="accuracy in inference mode", ylim=(-0.05, 1.05), title="predict on training images")
    for ax in (ax_gap, ax_acc):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def updates_needed(momentum: float, remaining: float = 0.01) -> int:
    """Fewest updates after which ``momentum**n <= remaining``.

    By the moving-average law ``v_n - s = m**n (v_0 - s)`` (batch statistic ``s``
    held fixed), that is when the distance to ``s`` has shrunk to ``remaining``
    (default 1 %) of the initial distance, whatever the values. The series' one
    criterion for "the moving statistics have caught up" (notebooks 04 and 05).
    Raises ``ValueError`` unless ``0 < momentum < 1`` and ``0 < remaining < 1``.
    Introduced in notebook 04.
    """
    if not (0.0 < momentum < 1.0 and 0.0 < remaining < 1.0):
        raise ValueError(
            f"momentum={momentum} and remaining={remaining} must both lie strictly between 0 and 1"
        )
    n = int(np.ceil(np.log(remaining) / np.log(momentum)))
    while momentum ** n > remaining:  # guard against rounding in the logarithms
        n += 1
    while n > 0 and momentum ** (n - 1) <= remaining:
        n -= 1
    return n


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


def set_moving_statistics(
    model: keras.layers.Layer, stats: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Write ``path -> (moving_mean, moving_variance)`` into the model's BN layers.

    Paths as :func:`named_batchnorm_layers` and :func:`moving_statistics` give them
    (plain names at top level); arrays of shape ``(channels,)``. Everything is
    checked before anything is written: ``KeyError`` naming any unknown path,
    ``ValueError`` naming the layer and the shape it expects for a value that is not
    a pair of arrays of that shape, holds a non-finite value or a negative variance,
    and for a model not
    built yet. Introduced in notebook 05.
    """
    layers = _require_built(model, "set the moving statistics")
    missing = set(stats) - set(layers)
    if missing:
        raise KeyError(
            f"no BatchNormalization layer at {sorted(missing)}; the model's are "
            f"{list(layers)[:6]}{' ...' if len(layers) > 6 else ''}"
        )
    checked = {}
    for path, pair in stats.items():
        expected = tuple(layers[path].moving_mean.shape)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"layer {path!r}: expected a pair (moving_mean, moving_variance) of arrays "
                f"of shape {expected}, got {type(pair).__name__}"
            )
        mean, var = (np.asarray(a, dtype=np.float64) for a in pair)
        for what, value in (("moving_mean", mean), ("moving_variance", var)):
            if value.shape != expected:
                raise ValueError(
                    f"layer {path!r}: {what} has shape {value.shape}, expected {expected} "
                    "(one value per channel); nothing was written"
                )
        if np.any(var < 0) or not np.all(np.isfinite(mean)) or not np.all(np.isfinite(var)):
            raise ValueError(
                f"layer {path!r}: moving_variance must be finite and >= 0 and moving_mean "
                "finite; nothing was written"
            )
        checked[path] = (mean, var)
    for path, (mean, var) in checked.items():
        _assign_moving(layers[path], mean, var)


def plot_remedies(results: list[RemedyResult], title: str) -> None:
    """Accuracy of predict and the training/inference gap, one bar per remedy.

    Introduced in notebook 05.

    Remedies whose training did not memorise the images are labelled "(training failed)".
    """
    plt = _plt()
    names = [r.name for r in results]
    y = np.arange(len(results))
    fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(8, 0.45 * len(results) + 1.6), sharey=True)
    names = [n if r.memorised else f"{n} (training failed)" for n, r in zip(names, results)]
    colors = ["tab:green" if r.accuracy == 1.0 and all(r.alone_right) else "tab:red" for r in results]
    ax_acc.barh(y, [r.accuracy for r in results], color=colors)
    ax_acc.set(xlabel="accuracy of the served answers", xlim=(0, 1.05))
    ax_acc.set_yticks(y, names, fontsize=8)
    ax_acc.invert_yaxis()
    ax_gap.barh(y, [1e-8 if r.same_computation else max(r.mode_gap, 1e-8) for r in results],
                color=colors)
    ax_gap.set_xscale("log")
    ax_gap.set(xlabel="training vs served gap (log)", xlim=(1e-8, 2))
    for i, r in enumerate(results):  # zero (or tiny) gaps have no visible bar: say them
        if r.same_computation:  # 0 by construction: no bar, and say why
            ax_gap.text(2e-8, i, "n/a: same computation", va="center", fontsize=7)
            continue
        ax_gap.text(2e-8, i, "0" if r.mode_gap == 0 else f"{r.mode_gap:.0e}", va="center", fontsize=7,
                    color="white" if r.mode_gap > 1e-6 else "black")
    for ax in (ax_acc, ax_gap):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title + "\n(green: all right, alone too)", fontsize=10)
    fig.tight_layout()
    plt.show()


# ---------------------------------------------------------------------------
# Notebooks 06-07
# ---------------------------------------------------------------------------

#: The classes :func:`draw_patterns` draws, in label order.
PATTERN_CLASSES = ("horizontal", "vertical", "diagonal", "blob")


def draw_patterns(
    count: int,
    size: int = 16,
    noise: float = 1.0,
    offset: float = 0.0,
    gain: float = 1.0,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` noisy grayscale patterns, one of :data:`PATTERN_CLASSES` each.

    Stripes (horizontal, vertical, diagonal) of random period (3-6 pixels),
    phase and amplitude (0.4-0.9), or a Gaussian blob at a random place, plus
    Gaussian pixel noise of standard deviation ``noise``; then every pixel is
    mapped to ``gain * value + offset`` (a shifted distribution, notebook 07).
    Classes are balanced and shuffled. Returns ``images`` of shape
    ``(count, size, size, 1)`` (float32, values around 0, no units) and one-hot
    ``labels`` of shape ``(count, 4)``. Without ``rng`` it draws from NumPy's
    global generator, which ``setup()`` seeds. Raises ``TypeError`` for a ``count``
    or ``size`` that is not an integer or a ``noise``, ``offset`` or ``gain`` that is
    not a number, ``ValueError`` for one out of range (each message names the
    argument). Introduced in notebook 06.
    """
    for name, value, low in (("count", count, 1), ("size", size, 8)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    for name, value in (("noise", noise), ("offset", offset), ("gain", gain)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if noise < 0:
        raise ValueError(f"noise (a standard deviation) must be >= 0, got {noise}")
    if gain <= 0:
        raise ValueError(f"gain must be > 0, got {gain}")
    if rng is None:
        rng = np.random.default_rng(np.random.randint(2**31 - 1))
    classes = len(PATTERN_CLASSES)
    labels = np.arange(count) % classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((count, size, size), np.float64)
    for i, label in enumerate(labels):
        period = rng.uniform(3, 6)
        phase = rng.uniform(0, 2 * np.pi)
        amplitude = rng.uniform(0.4, 0.9)
        if label == 0:
            pattern = np.sin(2 * np.pi * yy / period + phase)
        elif label == 1:
            pattern = np.sin(2 * np.pi * xx / period + phase)
        elif label == 2:
            pattern = np.sin(2 * np.pi * (xx + yy) / (period * np.sqrt(2)) + phase)
        else:
            cy, cx = rng.uniform(3, size - 3, 2)
            radius = rng.uniform(2, 4)
            pattern = 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)) - 0.5
        images[i] = amplitude * pattern + noise * rng.standard_normal((size, size))
    images = gain * images + offset
    return images[..., None].astype(np.float32), np.eye(classes, dtype=np.float32)[labels]


def build_small_cnn(
    size: int = 16,
    num_classes: int = len(PATTERN_CLASSES),
    momentum: float = 0.99,
    seed: int = SEED,
    prefix: str = "",
) -> keras.Model:
    """A small CNN with three BatchNormalization layers (after two convolutions and a dense layer).

    ``conv1`` (8 filters 3x3) - ``bn1`` - ReLU - ``conv2`` (16 filters 3x3,
    stride 2) - ``bn2`` - ReLU - global average pooling (``pool``) - ``dense``
    (16 units) - ``bn3`` - ReLU - ``classes`` (softmax). Input ``(size, size, 1)``.
    ``bn1`` and ``bn2`` take statistics over batch and space (batch x 256 and
    batch x 64 values per channel at ``size=16``), ``bn3`` over the batch only.
    Seeds first, so every call gives the same initial weights; ``prefix`` is
    put before every layer name (two models in one network, notebook 07).
    ``momentum`` follows Keras's convention, ``moving = momentum * moving + (1 - momentum)
    * batch`` with ``0 <= momentum < 1`` (PyTorch's ``momentum=0.1`` is Keras's 0.9; its
    ``momentum=None``, a cumulative average, has no Keras counterpart): anything else
    raises ``ValueError``. Not compiled. Introduced in notebook 06.
    """
    if size < 8 or num_classes < 2:
        raise ValueError(f"size={size} must be at least 8 and num_classes={num_classes} at least 2")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)) or not (
        0 <= momentum < 1
    ):
        raise ValueError(
            f"momentum={momentum!r}: Keras's momentum is the weight the moving average keeps, "
            "0 <= momentum < 1 (default 0.99; PyTorch's momentum=0.1 is Keras's 0.9, and "
            "PyTorch's momentum=None has no Keras counterpart)"
        )
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((size, size, 1), name=f"{prefix}image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"{prefix}conv1")(inputs)
    x = layers.BatchNormalization(momentum=momentum, name=f"{prefix}bn1")(x)
    x = layers.ReLU(name=f"{prefix}relu1")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name=f"{prefix}conv2")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{prefix}bn2")(x)
    x = layers.ReLU(name=f"{prefix}relu2")(x)
    x = layers.GlobalAveragePooling2D(name=f"{prefix}pool")(x)
    x = layers.Dense(16, use_bias=False, name=f"{prefix}dense")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{prefix}bn3")(x)
    x = layers.ReLU(name=f"{prefix}relu3")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name=f"{prefix}classes")(x)
    return keras.Model(inputs, outputs, name=f"{prefix}small_cnn")


def per_batch_statistics(
    model: keras.Model, images: np.ndarray, batch_size: int
) -> dict[str, list[Moments]]:
    """The statistics each BatchNormalization layer normalizes with, batch by batch.

    Runs ``model(batch, training=True)`` on consecutive batches of ``images``
    (the last one may be smaller) and returns ``layer name -> list of Moments``,
    one per batch: per-channel mean and biased variance over the batch (and the
    spatial axes of a convolution's output), as ``fit`` computes them. No weight
    and no moving statistic changes. Raises ``TypeError`` for a ``batch_size`` that
    is not an integer, ``ValueError`` for no images, ``batch_size < 1`` or a model
    without BatchNormalization layers. Introduced in notebook 06.
    """
    images = np.asarray(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if images.ndim == 0 or len(images) == 0:
        raise ValueError(f"images is empty (shape {images.shape}): need at least one image")
    _require_batchnorm(model, "record batch statistics of")
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size], training=True)
    return records


def html_table(header: list[str], rows: list[list], caption: str = ""):
    """A small HTML table (``IPython.display.HTML``) that JupyterLab renders and nbval compares.

    ``header``: a list of column names; ``rows``: a list of rows, each a list (or
    tuple) with one value per column. Floats (Python's and NumPy's) are shown with
    3 significant digits, other values as ``str``. Raises ``TypeError`` when
    ``header`` or a row is not a list or tuple, ``ValueError`` when a row has the
    wrong number of cells. Introduced in notebook 04.
    """
    from html import escape

    from IPython.display import HTML

    if not isinstance(header, (list, tuple)):
        raise TypeError(f"header must be a list of column names, got {type(header).__name__}")
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"rows must be a list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise TypeError(
                f"row {index} must be a list of {len(header)} cells, got {type(row).__name__}"
            )
        if len(row) != len(header):
            raise ValueError(f"row {index} has {len(row)} cells; the header has {len(header)}")

    def cell(value, tag):
        text = f"{value:.3g}" if isinstance(value, (float, np.floating)) else str(value)
        return f"<{tag}>{escape(text)}</{tag}>"

    lines = ["<table>"]
    if caption:
        lines.append(f"<caption>{escape(caption)}</caption>")
    lines.append("<tr>" + "".join(cell(h, "th") for h in header) + "</tr>")
    lines += ["<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows]
    lines.append("</table>")
    return HTML("\n".join(lines))
