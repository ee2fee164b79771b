"""The shared module of the BatchNormalization series: glue the notebooks share and helpers a
lesson writes out first. The toolkit for your own Keras model (``diagnose_batchnorm``,
``recalibrate_batchnorm``, ``PreciseBN``...) lives in ``bn_toolkit.py``, which imports nothing of
this module; ``utils`` re-exports it under the same names. Importing it sets no environment,
threads or logs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import pickle
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

import bn_toolkit
from bn_toolkit import (  # noqa: F401  re-exported: utils.NAME is the toolkit's own object
    LayerGap,
    Moments,
    PreciseBN,
    Recalibration,
    _Bold,
    _built,
    _check_counts,
    _html_table,
    _pooled,
    batch_statistics,
    batchnorm_layers,
    diagnose_batchnorm,
    frozen_moving_statistics,
    gaps_table_html,
    log_variance_ratio,
    moving_statistics,
    named_batchnorm_layers,
    recalibrate_batchnorm,
    recording_batchnorm_inputs,
    set_moving_statistics,
)

# --- Setup -----------------------------------------------------------------------------------
_IMPORTED_AT = time.perf_counter()
#: The one seed of the series (docs/decisions.md, "Seed"); ``setup`` uses it. Notebook 01.
SEED = 6
#: Most epochs (= updates: one batch of all images each) a training gets. Introduced in
#: notebook 02.
MAX_EPOCHS = 20
#: Side, in pixels, of the square images the network sees.
IMAGE_SIZE = 197
#: Threads in each of TensorFlow's two CPU pools that ``setup`` fixes (docs/decisions.md).
THREADS = 2
#: Oldest versions the notebooks work with, and why (the toolkit itself needs only Keras 3).
MIN_VERSIONS = {
    "tensorflow": ("2.16", "Keras 3 is the default from TensorFlow 2.16"),
    "keras": ("3.14", "the Batch Renorm deep dive uses renorm=True, back in Keras 3.14"),
    "pillow": ("10.0", "Image.Resampling.LANCZOS; Image.ANTIALIAS is gone from Pillow 10"),
}
ROOT = Path(__file__).resolve().parent
#: The training images: ``data/train/``, or the folder the variable ``BN_SERIES_DATA`` names.
DATA_DIR = Path(os.environ.get("BN_SERIES_DATA") or ROOT / "data" / "train")


def _version(text: str) -> tuple[int, ...]:
    """``"2.21.0rc1"`` -> ``(2, 21, 0)``."""
    return tuple(int(p) for p in re.findall(r"\d+", re.match(r"[\d.]*", text).group()))


def setup(seed: int = SEED, threads: int | None = THREADS) -> None:
    """Check versions, seed, deterministic ops, CPU pools of ``threads`` (``None``: TF's own; the
    ``TF_NUM_*`` variables win); ``RuntimeError``: too old, pools already fixed. Notebook 01."""
    import PIL

    found = {"tensorflow": tf.__version__, "keras": keras.__version__, "pillow": PIL.__version__}
    old = [
        f"{name} {found[name]} is older than {low} ({why})"
        for name, (low, why) in MIN_VERSIONS.items()
        if _version(found[name]) < _version(low)
    ]
    if old:
        raise RuntimeError("Too old: " + "; ".join(old) + ". Fix: pip install -r requirements.txt")
    pools = tf.config.threading
    if threads is not None:
        intra = int(os.environ.get("TF_NUM_INTRAOP_THREADS", threads))
        inter = int(os.environ.get("TF_NUM_INTEROP_THREADS", threads))
        try:
            pools.set_intra_op_parallelism_threads(intra)
            pools.set_inter_op_parallelism_threads(inter)
        except RuntimeError as error:  # TensorFlow started: fine if it runs with these sizes
            if _pool_sizes() != (intra, inter):
                raise RuntimeError(
                    "TensorFlow's thread pools are already fixed: restart the "
                    "kernel and call utils.setup() first"
                ) from error
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    sizes = _pool_sizes()
    threads_used = "+".join(map(str, sizes)) if all(sizes) else "TensorFlow's own"
    print(
        f"TensorFlow {found['tensorflow']}, Keras {found['keras']}, Pillow {found['pillow']} | "
        f"seed {seed} | deterministic ops | {threads_used} threads"
    )


def _pool_sizes() -> tuple:
    """(intra, inter) pool sizes set through ``tf.config``, else the environment's (0: TF's
    own)."""
    pools, env = tf.config.threading, os.environ.get
    return (
        pools.get_intra_op_parallelism_threads() or int(env("TF_NUM_INTRAOP_THREADS", 0)),
        pools.get_inter_op_parallelism_threads() or int(env("TF_NUM_INTEROP_THREADS", 0)),
    )


def resources() -> str:
    """Seconds since ``utils`` was imported and peak memory (``VmHWM``), one line. Notebook 01."""
    found = None
    with contextlib.suppress(OSError):
        found = re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text())
    peak = f"{int(found.group(1)) / 1024:.0f} MB" if found else "unknown"
    return f"this notebook took {time.perf_counter() - _IMPORTED_AT:.0f} s; peak memory {peak}"


def html_table(header: list, rows: list, caption: str = ""):
    """An ``IPython.display.HTML`` table (floats to 3 significant digits, ``_Bold`` cells in bold);
    rows not lists of the header's length: ``TypeError`` / ``ValueError``. Notebook 03."""
    return _html_table(header, rows, caption)


# --- Data and the case's model ---------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder of images")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_image(path, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(size, size)`` float32 grayscale, 0-255 (EXIF-rotated, alpha onto white, Lanczos
    resized); ``ValueError`` naming the file if it is not a readable image. Notebook 01."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path.name}: the file is empty (0 bytes), not an image")
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                gray = np.asarray(image, np.float64) * (255.0 / 65535.0)
            elif image.mode == "F":
                gray = np.asarray(image, np.float64)
            else:
                if (
                    image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
                    or "transparency" in image.info
                ):
                    rgba = image.convert("RGBA")
                    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
                gray = np.asarray(image.convert("L"), np.float64)
    except Exception as error:  # Pillow raises many types; a learner needs one
        raise ValueError(f"{path.name}: not a readable image ({error!r})") from error
    gray = Image.fromarray(gray.clip(0, 255).astype(np.float32), mode="F")
    return np.asarray(gray.resize((size, size), Image.Resampling.LANCZOS), np.float32).clip(0, 255)


def load_images(directory, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images, labels, names)``: float32 ``(N, size, size, 1)`` 0-255, one-hot ``(N, N)``, a
    class per file by name; ``FileNotFoundError``, ``ValueError`` (< 2, unreadable).
    Notebook 01."""
    if len(files := _image_files(Path(directory))) < 2:
        raise ValueError(f"{directory} holds {len(files)} image file(s); the series needs 2+")
    images = np.stack([load_image(f, size) for f in files])[..., np.newaxis]
    return images, np.eye(len(files), dtype=np.float32), [f.name for f in files]


def build_resnet50(
    num_classes: int, size: int = IMAGE_SIZE, momentum: float = 0.99, seed: int = SEED
) -> keras.Model:
    """``ResNet50(weights=None, input_shape=(size, size, 1), classes=num_classes)``, seeded first,
    ``momentum`` set on every BatchNormalization layer. Notebook 02."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(size, size, 1), classes=num_classes
    )
    for layer in batchnorm_layers(model):
        layer.momentum = float(momentum)
    return model


def compile_model(
    model: keras.Model, learning_rate: float = 1e-3, *, run_eagerly: bool = True, **adam_options
) -> keras.Model:
    """Compile with ``Adam(learning_rate, **adam_options)``, categorical cross-entropy, accuracy,
    eagerly unless ``run_eagerly=False`` (notebooks 06-07); return it. Notebook 02."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, **adam_options),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=run_eagerly,
    )
    return model


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows ``(N, classes)`` whose arg-max is the one-hot label's (a row with NaN: wrong).
    Notebook 03, section 1."""
    probabilities = np.asarray(probabilities)
    right = np.argmax(probabilities, axis=1) == np.argmax(labels, axis=1)
    return float((right & ~np.isnan(probabilities).any(axis=1)).mean())


def loss_and_accuracy(outputs, labels: np.ndarray) -> tuple[float, float]:
    """``(loss in nats, accuracy)`` of a model call's output tensor, as ``evaluate`` computes them
    (from the logits behind the softmax). Notebook 03, section 2."""
    loss = float(keras.losses.CategoricalCrossentropy()(labels, outputs))
    return loss, accuracy(keras.ops.convert_to_numpy(outputs), labels)


def memorised(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> bool:
    """Whether a training-mode pass gets every image right (moving statistics kept).
    Notebook 02."""
    with frozen_moving_statistics(model):
        return accuracy(keras.ops.convert_to_numpy(model(images, training=True)), labels) == 1.0


class StopWhenMemorised(keras.callbacks.Callback):
    """Stop ``fit`` at the first epoch from ``min_epochs`` on whose weights memorise the images;
    sets ``stopped_epoch``, ``memorised``. ``ValueError`` for ``min_epochs < 1``. Notebook 02."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, min_epochs: int = 5):
        super().__init__()
        _check_counts(False, min_epochs=min_epochs)
        self.images, self.labels, self.min_epochs = images, labels, int(min_epochs)
        self.stopped_epoch, self.memorised = 0, False

    def on_epoch_end(self, epoch, logs=None):
        self.stopped_epoch = epoch + 1
        if self.stopped_epoch >= self.min_epochs:
            self.memorised = memorised(self.model, self.images, self.labels)
            self.model.stop_training = self.memorised

    def on_train_end(self, logs=None):
        self.set_model(None)  # a kept callback must not keep the model in memory


def release_memory() -> None:
    """Free what Keras, Python and glibc hold of deleted models. Notebook 02."""
    keras.backend.clear_session()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- Moving statistics replayed (the statistics themselves: bn_toolkit) -----------------
def replay_moving_statistics(
    steps: dict[str, list[Moments]], momentum: float, initial: tuple[float, float] = (0.0, 1.0)
) -> dict:
    """``path -> (mean, var)`` after ``moving = momentum * moving + (1 - momentum) * batch`` per
    recorded step, from ``initial``; ``ValueError``: a layer without steps, momentum off [0, 1].
    Notebook 05."""
    if not 0.0 <= momentum <= 1.0:  # NaN too
        raise ValueError(f"momentum={momentum} must lie in [0, 1]")
    replayed = {}
    for path, moments in steps.items():
        if not moments:
            raise ValueError(f"no recorded training step for layer {path!r}")
        mean = np.full_like(moments[0].mean, initial[0])
        var = np.full_like(moments[0].var, initial[1])
        for step in moments:
            mean = momentum * mean + (1 - momentum) * step.mean
            var = momentum * var + (1 - momentum) * step.var
        replayed[path] = (mean, var)
    return replayed


def updates_needed(momentum: float, remaining: float) -> int:
    """Fewest ``n`` with ``momentum**n <= remaining`` (0 once ``remaining >= 1``); ``ValueError``
    for a momentum off (0, 1) or ``remaining <= 0``. Notebook 04."""
    if not (0.0 < momentum < 1.0 and remaining > 0.0):
        raise ValueError(
            f"momentum={momentum}, remaining={remaining}: need 0 < momentum < 1 and remaining > 0"
        )
    if remaining >= 1.0:
        return 0
    n = int(np.ceil(np.log(remaining) / np.log(momentum)))  # at least 1; fix float rounding
    return n - 1 if momentum ** (n - 1) <= remaining else n + int(momentum**n > remaining)


# --- The case's training: recorded once in notebook 02, read again by notebooks 03-05 -------
#: Where ``CaseRecord`` saves the case's training and ``trained_case`` reads it.
CASE_DIR = ROOT / "output" / "case"


class CaseRecord(keras.callbacks.Callback):
    """Records a ``fit`` of one batch per epoch (else ``ValueError``) after each epoch and saves
    it with the final weights in ``CASE_DIR`` (its 4 newest files kept). Per layer path and epoch k
    (0: the start): ``moving[p][k]`` (mean, var) and ``batch[p][k]`` (``Moments`` of a
    training-mode pass on the images: what update k+1 normalizes with, up to float32 rounding, as
    ``fit`` shuffles the batch); per epoch ``train_loss``, ``train_acc``, ``infer_loss``,
    ``infer_acc``; ``fit_loss``: ``fit``'s; ``updates``; ``seconds`` of ``fit`` without the
    records'. Notebook 02."""

    KEPT = (
        "updates",
        "moving",
        "batch",
        "train_loss",
        "train_acc",
        "infer_loss",
        "infer_acc",
        "fit_loss",
        "seconds",
    )

    def __init__(self, images, labels, save: bool = True):
        super().__init__()
        self.images, self.labels, self.save = images, labels, save

    def on_train_begin(self, logs=None):
        if self.params.get("steps") != 1:
            raise ValueError(
                f"CaseRecord records one batch per epoch; fit makes "
                f"{self.params.get('steps') or 'an unknown number'}: pass arrays "
                "and batch_size >= len(images)"
            )
        self.moving, self.batch, self.updates, self.seconds = {}, {}, 0, 0.0
        self.train_loss, self.train_acc, self.infer_loss, self.infer_acc = [], [], [], []
        self.fit_loss, self._first = [], None
        self.key = _case_key(self.model, self.images, self.labels, self.params["epochs"])
        self._started, self._recording = time.perf_counter(), 0.0
        self._record()

    def _record(self):
        started, model = time.perf_counter(), self.model
        for path, stats in moving_statistics(model).items():
            self.moving.setdefault(path, []).append(stats)
        seen, train_out = batch_statistics(model, self.images)  # statistics left as they are
        for path, moments in seen.items():
            self.batch.setdefault(path, []).append(moments)
        with frozen_moving_statistics(model):
            infer_out = model(self.images, training=False)
        for out, losses, accs in (
            (train_out, self.train_loss, self.train_acc),
            (infer_out, self.infer_loss, self.infer_acc),
        ):
            loss, acc = loss_and_accuracy(out, self.labels)
            losses.append(loss)
            accs.append(acc)
        self._recording += time.perf_counter() - started

    def on_epoch_end(self, epoch, logs=None):
        self._first = epoch if self._first is None else self._first
        self.updates = epoch + 1
        self.fit_loss.append(float((logs or {}).get("loss", np.nan)))
        self._record()

    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter() - self._started - self._recording
        memorised = [k for k, acc in enumerate(self.train_acc) if k >= 5 and acc == 1.0]
        recipe = (
            self._first == 0
            and self.updates == min(memorised + [self.params["epochs"]])
            and np.allclose(self.fit_loss, self.train_loss[:-1], rtol=1e-2, atol=1e-6)
        )
        if self.save and not recipe:  # fit's loss is not the loss on all the images, or it
            warnings.warn(
                "not saved: this fit is not the case's training (all images in one "
                "batch, stopped by StopWhenMemorised), which trained_case reads",
                stacklevel=1,
            )
        elif self.save:
            aside = CASE_DIR / f"{self.key}.{os.getpid()}.part"
            try:  # whole files only: written aside, then renamed
                CASE_DIR.mkdir(parents=True, exist_ok=True)
                with open(aside, "wb") as file:
                    pickle.dump(
                        {k: getattr(self, k) for k in self.KEPT}
                        | {"weights": self.model.get_weights()},
                        file,
                    )
                    _uncache(file)
                os.replace(aside, CASE_DIR / f"{self.key}.pkl")
                saved = [f for f in CASE_DIR.glob("*.pkl") if re.fullmatch("[0-9a-f]{16}", f.stem)]
                for old in sorted(saved, key=lambda f: f.stat().st_mtime)[:-4]:
                    old.unlink(missing_ok=True)
            except Exception as error:  # training is done: say it, lose nothing else
                aside.unlink(missing_ok=True)
                warnings.warn(
                    f"could not save the case's training in {CASE_DIR} ({error!r}): "
                    "notebooks 03-05 will train it again",
                    stacklevel=1,
                )
        self.set_model(None)  # a kept callback must not keep the model in memory


def _uncache(file) -> None:
    """Drop a file's pages from the page cache: Binder's memory limit counts them."""
    with contextlib.suppress(AttributeError, OSError):
        file.flush()
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _case_key(model, images, labels, epochs) -> str:
    """Digest of the images, labels, layers and wiring (not generated names), initial weights,
    compile settings, epochs, thread pools, oneDNN, versions, this file and ``bn_toolkit.py``
    (the training code and the statistics it records)."""
    wiring = model.to_json()  # layers, their wiring and the compile settings
    for i, layer in enumerate([model, *model.layers]):  # generated names by position
        wiring = wiring.replace(f'"{layer.name}"', f'"#{i}"')
    wiring = re.sub(r'"name": "[^"]*"', "", wiring)  # the optimizer's too
    settings = [
        _pool_sizes(),
        os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        tf.__version__,
        keras.__version__,
    ]  # what changes the last bits of a training
    digest = hashlib.sha256(
        json.dumps([wiring, int(epochs), settings], default=str, sort_keys=True).encode()
    )
    digest.update(Path(__file__).read_bytes())
    digest.update(Path(bn_toolkit.__file__).read_bytes())  # the records' statistics code
    for array in (images, labels, *model.get_weights()):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def trained_case(images, labels) -> tuple[keras.Model, CaseRecord]:
    """``(model, record)`` of the case as notebook 02 trains it (``build_resnet50``,
    ``compile_model``, ``fit`` with ``StopWhenMemorised`` and ``CaseRecord``): read from
    ``CASE_DIR`` when saved for these images, else trained and saved (about 5 updates). The
    optimizer's state is not kept. ``ValueError``: labels not one-hot. Notebook 02."""
    if np.ndim(labels) != 2:
        raise ValueError(
            f"labels of shape {np.shape(labels)}: pass them one-hot, (images, "
            "classes), as utils.load_images returns them"
        )
    model = compile_model(build_resnet50(num_classes=labels.shape[1]))
    record = CaseRecord(images, labels)
    try:
        with open(CASE_DIR / f"{_case_key(model, images, labels, MAX_EPOCHS)}.pkl", "rb") as file:
            saved = pickle.load(file)  # the series' own file (a pickle can run code: no others)
            _uncache(file)
        weights, kept = saved["weights"], {k: saved[k] for k in CaseRecord.KEPT}
        if [np.shape(w) for w in weights] != [tuple(v.shape) for v in model.weights]:
            raise ValueError("the saved weights do not fit this model")
    except Exception:  # not saved yet, half written, or not the series' file: train it again
        model.fit(
            images,
            labels,
            epochs=MAX_EPOCHS,
            verbose=0,
            callbacks=[StopWhenMemorised(images, labels), record],
        )
        return model, record
    model.set_weights(weights)
    vars(record).update(kept)
    return model, record


def weights_digest(model: keras.Model) -> str:
    """16 hex digits of SHA-256 over every weight, moving statistics included: which training
    these weights come from (another CPU's arithmetic gives other bits). Notebook 05."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


# --- Notebook 05's remedies, measured alike there and in its deep dive -----------------------
@dataclass
class RemedyResult:
    """A remedy served on the training images: ``predicted`` classes, their ``accuracy`` and
    ``loss`` (computed as ``evaluate`` does, on the served output); ``alone_*``: each image a batch
    of one; ``mode_gap``: largest |training-mode - served logit| relative to the largest
    |training-mode logit| (logits do not saturate as probabilities do); ``memorised``: training
    mode right on every image; ``same_computation``: served is training mode's computation (gap 0
    by construction); ``extra``: its cost in words; ``seconds``: measured seconds of the training
    or pass that cost names (``None``: none). Notebook 05."""

    name: str
    updates: int
    memorised: bool
    predicted: list
    accuracy: float
    loss: float
    alone_predicted: list
    alone_right: list
    mode_gap: float
    extra: str = ""
    seconds: float | None = None
    same_computation: bool = False
    right = property(lambda self: self.accuracy == 1.0 and all(self.alone_right))


def measure_remedy(
    name,
    model,
    images,
    labels,
    updates,
    extra="",
    seconds=None,
    *,
    training_mode=False,
    same_computation=False,
) -> RemedyResult:
    """Serve ``images`` as ``predict`` does (``training_mode``: ``model(x, training=True)``), all
    together and each alone, against training mode; statistics kept. ``ValueError``: claimed
    ``same_computation`` and the two differ. Notebook 05."""
    _check_counts(False, updates=updates)
    if len(images) < 2:
        raise ValueError(
            f"measure_remedy needs 2+ images, got {len(images)}: a training-mode "
            "batch of one normalizes every value to beta"
        )
    to_numpy = keras.ops.convert_to_numpy
    with frozen_moving_statistics(model):  # training-mode calls would move the statistics
        served = model(images, training=training_mode)
        alone = [
            int(np.argmax(to_numpy(model(images[i : i + 1], training=training_mode))))
            for i in range(len(images))
        ]
        with _logits_out(model):
            served_logits = to_numpy(model(images, training=training_mode))
            reference_logits = to_numpy(model(images, training=True))  # as fit computes
    loss, acc = loss_and_accuracy(served, labels)
    scale = max(float(np.abs(reference_logits).max()), 1e-12)
    gap = float(np.abs(reference_logits - served_logits).max()) / scale
    if same_computation and gap > 1e-5:
        raise ValueError(f"same_computation=True, but the two modes differ by {gap:.2g}")
    truth = np.argmax(labels, axis=1).tolist()
    return RemedyResult(
        str(name),
        int(updates),
        accuracy(reference_logits, labels) == 1.0,  # the largest logit is the likeliest class
        np.argmax(to_numpy(served), axis=1).tolist(),
        acc,
        loss,
        alone,
        [a == t for a, t in zip(alone, truth, strict=False)],
        gap,
        str(extra),
        None if seconds is None else float(seconds),
        bool(same_computation or training_mode and gap <= 1e-5),
    )


@contextlib.contextmanager
def _logits_out(model):
    """Inside the block, ``model`` returns its last Dense layer's logits (softmax removed)."""
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(f"the model ends in {type(head).__name__}, not a Dense classifier")
    activation = head.activation
    head.activation = keras.activations.linear
    try:
        yield
    finally:
        head.activation = activation


def remedies_table(results: list[RemedyResult]):
    """``RemedyResult`` rows as an ``html_table`` (seconds left out: they vary); ``TypeError`` for
    anything else. Notebook 05."""
    if not isinstance(results, (list, tuple)) or not all(
        isinstance(r, RemedyResult) for r in results
    ):
        raise TypeError("remedies_table takes a list of RemedyResult (from utils.measure_remedy)")
    rows = [
        [
            r.name,
            r.updates,
            "yes" if r.memorised else "no",
            " ".join(map(str, r.predicted)),
            f"{r.accuracy:.2f}",
            f"{r.loss:.3g}",
            f"{sum(r.alone_right)} of {len(r.alone_right)} right",
            "n/a: same computation" if r.same_computation else f"{r.mode_gap:.2g}",
            r.extra,
        ]
        for r in results
    ]
    return html_table(
        [
            "remedy",
            "updates",
            "memorised",
            "predict",
            "accuracy",
            "loss",
            "each alone",
            "logit difference",
            "extra cost",
        ],
        rows,
        "updates: optimizer updates of the served weights; memorised: those weights"
        " right on every image in training mode; predict: classes served for the"
        " batch of all images; each alone: served one image at a time; logit"
        " difference: largest difference of logits between training mode and what is"
        " served, relative to the largest training-mode logit (n/a: served by training"
        " mode's own computation, 0 by construction)",
    )


# --- Notebooks 06-07: mini-batches -----------------------------------------------------------
def draw_patterns(
    count: int,
    size: int = 16,
    noise: float = 1.0,
    offset: float = 0.0,
    gain: float = 1.0,
    rng: np.random.Generator | None = None,
):
    """``(images, labels)``: float32 ``(count, size, size, 1)``, ``gain * (pattern + noise) +
    offset``, 4 shuffled classes (stripes: -, |, /; blob), one-hot ``(count, 4)``. Notebook 06."""
    for name, value, low in (
        ("count", count, 1),
        ("size", size, 8),
        ("noise", noise, 0),
        ("offset", offset, 0),
        ("gain", gain, 0),
    ):
        kinds = (int, np.integer) if low else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise TypeError(f"{name} must be {'an integer' if low else 'a number'}, got {value!r}")
        if value < low if low else not np.isfinite(value):
            raise ValueError(f"{name}={value} must be {f'at least {low}' if low else 'finite'}")
    if noise < 0 or gain <= 0:
        raise ValueError(
            f"noise={noise} must be >= 0" if noise < 0 else f"gain={gain} must be > 0"
        )
    rng = rng or np.random.default_rng(np.random.randint(2**31 - 1))
    labels = np.arange(count) % 4
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((count, size, size), np.float64)
    for i, label in enumerate(labels):
        period, phase, amplitude = (
            rng.uniform(3, 6),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(0.4, 0.9),
        )
        if label < 2:
            pattern = np.sin(2 * np.pi * (yy, xx)[label] / period + phase)
        elif label == 2:
            pattern = np.sin(2 * np.pi * (xx + yy) / (period * np.sqrt(2)) + phase)
        else:
            (cy, cx), radius = rng.uniform(3, size - 3, 2), rng.uniform(2, 4)
            pattern = 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)) - 0.5
        images[i] = amplitude * pattern + noise * rng.standard_normal((size, size))
    return (gain * images + offset)[..., None].astype("float32"), np.eye(4, dtype="float32")[
        labels
    ]


def build_small_cnn(
    size: int = 16,
    num_classes: int = 4,
    momentum: float = 0.99,
    seed: int = SEED,
    prefix: str = "",
) -> keras.Model:
    """conv1-bn1-ReLU-conv2 (stride 2)-bn2-ReLU-pool-dense-bn3-ReLU-classes, seeded, uncompiled,
    names after ``prefix``; ``ValueError``: ``size < 8``, < 2 classes, bad momentum.
    Notebook 06."""
    if (
        size < 8
        or num_classes < 2
        or isinstance(momentum, bool)
        or not (isinstance(momentum, (int, float, np.floating)) and 0 <= momentum < 1)
    ):
        raise ValueError(
            f"size={size} (at least 8), num_classes={num_classes} (at least 2), "
            f"momentum={momentum!r} (0 <= momentum < 1; PyTorch's 0.1 is 0.9)"
        )
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    x = inputs = keras.Input((size, size, 1), name=f"{prefix}image")
    for i, (filters, strides) in enumerate(((8, 1), (16, 2)), start=1):
        x = layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False, name=f"{prefix}conv{i}"
        )(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"{prefix}bn{i}")(x)
        x = layers.ReLU(name=f"{prefix}relu{i}")(x)
    x = layers.GlobalAveragePooling2D(name=f"{prefix}pool")(x)
    x = layers.Dense(16, use_bias=False, name=f"{prefix}dense")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{prefix}bn3")(x)
    x = layers.ReLU(name=f"{prefix}relu3")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name=f"{prefix}classes")(x)
    return keras.Model(inputs, outputs, name=f"{prefix}small_cnn")


def per_batch_statistics(model, images: np.ndarray, batch_size: int) -> dict[str, list[Moments]]:
    """``path -> [Moments]``, one per consecutive batch in training mode; the model unchanged.
    ``TypeError`` / ``ValueError``: bad ``batch_size``, no images or BN layer. Notebook 06."""
    images = np.asarray(images)
    _check_counts(False, batch_size=batch_size)
    if images.ndim == 0 or len(images) == 0:
        raise ValueError(f"images is empty (shape {images.shape}): need at least one image")
    _built(model, "record batch statistics of")
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size], training=True)
    return records
