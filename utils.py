"""The shared module of the BatchNormalization series: glue the notebooks share, helpers a lesson
writes out first, and a toolkit for your own Keras model (``diagnose_batchnorm``,
``recalibrate_batchnorm``, ``PreciseBN``). Importing it sets no environment, threads or logs."""

from __future__ import annotations

import contextlib, ctypes, functools, gc, hashlib, html, inspect, itertools, json, os  # noqa: E401
import pickle, re, sys, time, warnings  # noqa: E401
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import keras, numpy as np, tensorflow as tf  # noqa: E401
from PIL import Image, ImageOps

# --- Setup -----------------------------------------------------------------------------------
_IMPORTED_AT = time.perf_counter()
#: The one seed of the series (README, "Seed"); ``setup`` uses it. Notebook 01.
SEED = 6
#: Most epochs (= updates: one batch of all images each) a training gets. Introduced in notebook 02.
MAX_EPOCHS = 20
#: Side, in pixels, of the square images the network sees.
IMAGE_SIZE = 197
#: Threads in each of TensorFlow's two CPU pools that ``setup`` fixes (README, "Decisions").
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
    old = [f"{name} {found[name]} is older than {low} ({why})"
           for name, (low, why) in MIN_VERSIONS.items() if _version(found[name]) < _version(low)]
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
                raise RuntimeError("TensorFlow's thread pools are already fixed: restart the "
                                   "kernel and call utils.setup() first") from error
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    sizes = _pool_sizes()
    threads_used = "+".join(map(str, sizes)) if all(sizes) else "TensorFlow's own"
    print(f"TensorFlow {found['tensorflow']}, Keras {found['keras']}, Pillow {found['pillow']} | "
          f"seed {seed} | deterministic ops | {threads_used} threads")

def _pool_sizes() -> tuple:
    """(intra, inter) pool sizes set through ``tf.config``, else the environment's (0: TF's own)."""
    pools, env = tf.config.threading, os.environ.get
    return (pools.get_intra_op_parallelism_threads() or int(env("TF_NUM_INTRAOP_THREADS", 0)),
            pools.get_inter_op_parallelism_threads() or int(env("TF_NUM_INTEROP_THREADS", 0)))

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
    from IPython.display import HTML
    if not isinstance(header, (list, tuple)) or not isinstance(rows, (list, tuple)):
        raise TypeError("html_table(header, rows): both must be lists (rows: a list of lists)")
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise TypeError(f"row {i} must be a list of {len(header)} cells, got "
                            f"{type(row).__name__}")
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells; the header has {len(header)}")
    def cell(value, tag):
        text = html.escape(f"{value:.3g}" if isinstance(value, (float, np.floating))
                           else str(value))
        return f"<{tag}>{f'<b>{text}</b>' if isinstance(value, _Bold) else text}</{tag}>"
    lines = ["<table>"] + ([f"<caption>{html.escape(caption)}</caption>"] if caption else [])
    lines.append("<tr>" + "".join(cell(h, "th") for h in header) + "</tr>")
    lines += ["<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows]
    return HTML("\n".join(lines + ["</table>"]))

class _Bold(str):
    """A table cell ``html_table`` shows in bold."""

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
                if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                    rgba = image.convert("RGBA")
                    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
                gray = np.asarray(image.convert("L"), np.float64)
    except Exception as error:  # Pillow raises many types; a learner needs one
        raise ValueError(f"{path.name}: not a readable image ({error!r})") from error
    gray = Image.fromarray(gray.clip(0, 255).astype(np.float32), mode="F")
    return np.asarray(gray.resize((size, size), Image.Resampling.LANCZOS), np.float32).clip(0, 255)

def load_images(directory, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(images, labels, names)``: float32 ``(N, size, size, 1)`` 0-255, one-hot ``(N, N)``, a
    class per file by name; ``FileNotFoundError``, ``ValueError`` (< 2, unreadable). Notebook 01."""
    if len(files := _image_files(Path(directory))) < 2:
        raise ValueError(f"{directory} holds {len(files)} image file(s); the series needs 2+")
    images = np.stack([load_image(f, size) for f in files])[..., np.newaxis]
    return images, np.eye(len(files), dtype=np.float32), [f.name for f in files]

def build_resnet50(num_classes: int, size: int = IMAGE_SIZE, momentum: float = 0.99,
                   seed: int = SEED) -> keras.Model:
    """``ResNet50(weights=None, input_shape=(size, size, 1), classes=num_classes)``, seeded first,
    ``momentum`` set on every BatchNormalization layer. Notebook 02."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 1),
                                        classes=num_classes)
    for layer in batchnorm_layers(model):
        layer.momentum = float(momentum)
    return model

def compile_model(model: keras.Model, learning_rate: float = 1e-3, *, run_eagerly: bool = True,
                  **adam_options) -> keras.Model:
    """Compile with ``Adam(learning_rate, **adam_options)``, categorical cross-entropy, accuracy,
    eagerly unless ``run_eagerly=False`` (notebooks 06-07); return it. Notebook 02."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, **adam_options),
                  loss="categorical_crossentropy", metrics=["accuracy"], run_eagerly=run_eagerly)
    return model

def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows ``(N, classes)`` whose arg-max is the one-hot label's (a row with NaN: wrong).
    Notebook 03, section 1."""
    probabilities = np.asarray(probabilities)
    right = (np.argmax(probabilities, axis=1) == np.argmax(labels, axis=1))
    return float((right & ~np.isnan(probabilities).any(axis=1)).mean())

def loss_and_accuracy(outputs, labels: np.ndarray) -> tuple[float, float]:
    """``(loss in nats, accuracy)`` of a model call's output tensor, as ``evaluate`` computes them
    (from the logits behind the softmax). Notebook 03, section 2."""
    loss = float(keras.losses.CategoricalCrossentropy()(labels, outputs))
    return loss, accuracy(keras.ops.convert_to_numpy(outputs), labels)

def memorised(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> bool:
    """Whether a training-mode pass gets every image right (moving statistics kept). Notebook 02."""
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

# --- Statistics (notebook 03 writes both modes out in NumPy first) ---------------------------
def named_batchnorm_layers(model) -> dict[str, keras.layers.BatchNormalization]:
    """``path -> layer`` for every BatchNormalization in the layer tree (nested, wrapped; shared
    ones once); path: parents' names joined by ``/``, ``#2``... if repeated. Notebook 03."""
    bn = keras.layers.BatchNormalization
    if isinstance(model, bn):
        return {model.name: model}
    found, seen = {}, {id(model)}
    def visit(parent, prefix):
        for child in getattr(parent, "_layers", None) or ():  # the list Keras itself tracks
            if id(child) not in seen:
                seen.add(id(child))
                path, k = prefix + child.name, 2
                if isinstance(child, bn):
                    key = path
                    while key in found:
                        key, k = f"{path}#{k}", k + 1
                    found[key] = child
                visit(child, path + "/")
    visit(model, "")
    return found

def batchnorm_layers(model) -> list[keras.layers.BatchNormalization]:
    """The layers of ``named_batchnorm_layers``, as a list. Notebook 02."""
    return list(named_batchnorm_layers(model).values())

def _built(model, purpose: str, need_bn: bool = True) -> dict:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"cannot {purpose}: the model comes first, got {type(model).__name__}")
    layers, name = named_batchnorm_layers(model), model.name
    unbuilt = [p for p, layer in layers.items() if not layer.built]  # in a built model: unused
    if not getattr(model, "built", True) or unbuilt and len(unbuilt) == len(layers):
        raise ValueError(f"cannot {purpose}: {name!r} is not built yet"
                         f"{f' (layers {unbuilt[:4]})' if unbuilt else ''}, so it has no "
                         "moving statistics: call the model on one batch of your data first")
    if need_bn and not layers:
        raise ValueError(f"{name!r} has no BatchNormalization layer: nothing to {purpose}")
    return {p: layer for p, layer in layers.items() if layer.built}

@dataclass
class Moments:
    """Per-channel float64 mean, biased variance, ``count``, ``training`` (normalized with them),
    standard errors ``mean_se``, ``var_se`` (``None`` below 2 samples). Notebook 03, section 5."""
    mean: np.ndarray
    var: np.ndarray
    count: int
    training: bool | None = None
    mean_se: np.ndarray | None = field(default=None, repr=False)
    var_se: np.ndarray | None = field(default=None, repr=False)
    def merged(self, other: "Moments") -> "Moments":
        """Moments of both sets of values together (Chan et al.'s exact merge)."""
        n, delta = self.count + other.count, other.mean - self.mean
        m2 = (self.var * self.count + other.var * other.count
              + delta**2 * self.count * other.count / n)
        training = self.training if self.training == other.training else None
        return Moments(self.mean + delta * other.count / n, m2 / n, n, training)

_pooled = functools.partial(functools.reduce, Moments.merged)  # list[Moments] -> Moments

_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
_OPEN_RECORDINGS: list[dict] = []  # innermost last; probes hide their calls from these

def _moments_of(layer, inputs, mask, training, spread=False) -> Moments:
    """The moments ``BatchNormalization`` computes, in its dtype; with ``spread``, their errors."""
    ops = keras.ops
    values = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
    ndim = len(values.shape)
    keep = {int(a) % ndim for a in np.atleast_1d(layer.axis)}
    axes = [i for i in range(ndim) if i not in keep]
    inner = [a for a in axes if a != 0]
    if mask is None:  # as the layer computes them
        mean, var = ops.moments(values, axes=axes, keepdims=True)
        count = int(np.prod([values.shape[a] for a in axes]))
        w = share = 1.0
        per_sample = (lambda t: ops.mean(t, axis=inner, keepdims=True)) if inner else (lambda t: t)
    else:  # masked positions (mask: the input's shape without the channel axis) left out
        weights = ops.broadcast_to(ops.expand_dims(ops.cast(mask, values.dtype), -1),
                                   ops.shape(values))
        total = ops.sum(weights, axis=axes, keepdims=True)
        mean = ops.sum(weights * values, axis=axes, keepdims=True) / total
        var = ops.sum(weights * (values - mean) ** 2, axis=axes, keepdims=True) / total
        count = int(round(float(ops.convert_to_numpy(total).reshape(-1)[0])))
        summed = (lambda t: ops.sum(t, axis=inner, keepdims=True)) if inner else (lambda t: t)
        w = ops.maximum(summed(weights), 1e-12)
        share = w / ops.sum(w, axis=0, keepdims=True) * values.shape[0]  # 1 for equal samples
        per_sample = lambda t: summed(weights * t) / w  # noqa: E731
    mean_se = var_se = None
    samples = values.shape[0] if 0 in axes else 1
    if spread and samples and samples > 1:  # per-sample means and squares
        a, q = per_sample(values), per_sample((values - mean) ** 2)
        # batch mean = mean of share*a, batch var = mean of share*q: standard errors from the
        # samples' spread, widened for the few samples that estimate it (Student's t, 95 %),
        # and never below the bounds of independent values
        widen = _T975.get(samples - 1, 1.96 + 2.4 / (samples - 1)) / 1.96
        floor = np.sqrt(1 / count), np.sqrt(2 / max(count - 1, 1))
        flat_var = ops.reshape(var, (-1,))
        mean_se = ops.maximum(widen * ops.reshape(ops.std(share * a, axis=0), (-1,))
                              / np.sqrt(samples - 1), floor[0] * ops.sqrt(flat_var))
        var_se = ops.maximum(widen * ops.reshape(ops.std(share * q, axis=0), (-1,))
                             / np.sqrt(samples - 1), floor[1] * flat_var)
    def numpy(t):
        return None if t is None else np.asarray(ops.convert_to_numpy(t), np.float64).reshape(-1)
    return Moments(numpy(mean), numpy(var), count, bool(training) and bool(layer.trainable),
                   numpy(mean_se), numpy(var_se))

def _spy(inner, paths, records, recording, spread):
    """``BatchNormalization.call`` recording, for the layers in ``paths`` (id -> path), the
    moments the base layer normalizes with (after any subclass's own ``call``)."""
    @functools.wraps(inner)  # Keras and error messages see the layer's own signature
    def spy(layer, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        path = paths.get(id(layer))
        if path and recording["active"] and not isinstance(inputs, keras.KerasTensor):
            if not tf.executing_eagerly():
                raise RuntimeError(f"layer {path!r} was called in a traced graph, which hides its "
                                   "inputs: run the model eagerly (compile with run_eagerly=True, "
                                   "and no tf.function around the model or its call)")
            training = kwargs.get("training", args[1] if len(args) > 1 else None)
            mask = kwargs.get("mask", args[2] if len(args) > 2 else None)
            records[path].append(_moments_of(layer, inputs, mask, training, spread))
        return inner(layer, *args, **kwargs)
    return spy

@contextlib.contextmanager
def recording_batchnorm_inputs(model, spread: bool = False) -> Iterator[dict[str, list[Moments]]]:
    """Yield ``path -> [Moments]``, one per BatchNormalization call in the block (eager; traced:
    ``RuntimeError``), probes hidden; ``ValueError`` if unbuilt. Notebook 03, section 4."""
    layers = _built(model, "record BatchNormalization inputs", need_bn=False)
    records: dict[str, list[Moments]] = {path: [] for path in layers}
    recording, bn = {"active": True}, keras.layers.BatchNormalization
    inner = bn.__dict__["call"]  # the class's own, so that subclasses' super().call is seen too
    bn.call = _spy(inner, {id(layer): path for path, layer in layers.items()}, records,
                   recording, spread)
    _OPEN_RECORDINGS.append(recording)
    try:
        yield records
    finally:
        _OPEN_RECORDINGS[:] = [r for r in _OPEN_RECORDINGS if r is not recording]
        bn.call = inner

@contextlib.contextmanager
def frozen_moving_statistics(model) -> Iterator[None]:
    """Restore every non-trainable variable on leaving; calls inside are probes, hidden from
    outer recordings. ``ValueError`` if unbuilt. Notebook 03, section 2."""
    layers = _built(model, "freeze the moving statistics", need_bn=False)
    variables = list({id(v): v for owner in (model, *layers.values())  # a bare layer's own too
                      for v in owner.non_trainable_variables}.values())
    saved = [v.numpy() for v in variables]
    hidden = [r for r in _OPEN_RECORDINGS if r["active"]]
    for recording in hidden:
        recording["active"] = False
    try:
        yield
    finally:
        for recording in hidden:
            recording["active"] = True
        for variable, value in zip(variables, saved):
            variable.assign(value)

def moving_statistics(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``path -> (moving_mean, moving_variance)``, float64 per channel. Notebook 03, section 2."""
    return {path: (np.asarray(layer.moving_mean.numpy(), np.float64),
                   np.asarray(layer.moving_variance.numpy(), np.float64))
            for path, layer in _built(model, "read the moving statistics", need_bn=False).items()}

def batch_statistics(model, images, training: bool = True) -> tuple[dict[str, Moments], object]:
    """``(path -> pooled Moments, output)`` of one ``model(images, training=training)``, moving
    statistics untouched. Notebook 03, section 4."""
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        outputs = model(images, training=training)
    return {path: _pooled(calls) for path, calls in records.items() if calls}, outputs

def log_variance_ratio(moving_var, batch_var, eps: float = 1e-3) -> np.ndarray:
    """Per channel ``log(moving_var + eps) - log(batch_var + eps)``. Notebook 03, section 5."""
    return np.log(np.asarray(moving_var, np.float64) + eps) - np.log(
        np.asarray(batch_var, np.float64) + eps)

def set_moving_statistics(model, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write ``path -> (moving_mean, moving_variance)``, all checked first: ``KeyError`` for an
    unknown path, ``ValueError`` for a shape, non-finite value, negative variance. Notebook 05."""
    layers = _built(model, "set the moving statistics", need_bn=False)
    if missing := sorted(set(stats) - set(layers)):
        raise KeyError(f"no BatchNormalization layer at {missing}; the model's: {list(layers)[:6]}")
    checked = {}
    for path, pair in stats.items():
        shape = tuple(layers[path].moving_mean.shape)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"layer {path!r}: pass a pair (mean, variance) of shape {shape}")
        mean, var = (np.asarray(a, np.float64) for a in pair)
        if mean.shape != shape or var.shape != shape:
            raise ValueError(f"layer {path!r}: shapes {mean.shape}, {var.shape}; need {shape}")
        dtype = layers[path].moving_mean.dtype  # finite as stored, not only as given
        if np.any(var < 0) or not all(np.isfinite(a.astype(dtype)).all() for a in (mean, var)):
            raise ValueError(f"layer {path!r}: statistics must be finite, variances >= 0")
        checked[path] = (mean, var)
    for path, (mean, var) in checked.items():
        _assign_moving(layers[path], mean, var)

def _assign_moving(layer, mean, var) -> None:
    """Write moving statistics, renorm's own (``stddev = sqrt(var + epsilon)``) to match."""
    dtype = layer.moving_mean.dtype
    layer.moving_mean.assign(np.asarray(mean).astype(dtype))
    layer.moving_variance.assign(np.asarray(var).astype(dtype))
    if getattr(layer, "renorm", False):
        stddev = np.sqrt(np.asarray(var, np.float64) + layer.epsilon).astype(dtype)
        layer.moving_stddev.assign(stddev)
        layer.renorm_mean.assign(np.asarray(mean).astype(dtype))
        layer.renorm_stddev.assign(stddev)

def replay_moving_statistics(steps: dict[str, list[Moments]], momentum: float,
                             initial: tuple[float, float] = (0.0, 1.0)) -> dict:
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
        raise ValueError(f"momentum={momentum}, remaining={remaining}: need 0 < momentum < 1 and"
                         " remaining > 0")
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
    (0: the start): ``moving[p][k]`` (mean, var) and ``batch[p][k]`` (``Moments`` of a training-mode
    pass on the images: what update k+1 normalizes with, up to float32 rounding, as ``fit``
    shuffles the batch); per epoch ``train_loss``, ``train_acc``, ``infer_loss``, ``infer_acc``;
    ``fit_loss``: ``fit``'s; ``updates``; ``seconds`` of ``fit`` without the records'. Notebook 02."""
    KEPT = ("updates", "moving", "batch", "train_loss", "train_acc", "infer_loss", "infer_acc",
            "fit_loss", "seconds")
    def __init__(self, images, labels, save: bool = True):
        super().__init__()
        self.images, self.labels, self.save = images, labels, save
    def on_train_begin(self, logs=None):
        if self.params.get("steps") != 1:
            raise ValueError(f"CaseRecord records one batch per epoch; fit makes "
                             f"{self.params.get('steps') or 'an unknown number'}: pass arrays "
                             "and batch_size >= len(images)")
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
        for out, losses, accs in ((train_out, self.train_loss, self.train_acc),
                                  (infer_out, self.infer_loss, self.infer_acc)):
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
        recipe = (self._first == 0 and self.updates == min(memorised + [self.params["epochs"]])
                  and np.allclose(self.fit_loss, self.train_loss[:-1], rtol=1e-2, atol=1e-6))
        if self.save and not recipe:  # fit's loss is not the loss on all the images, or it
            warnings.warn("not saved: this fit is not the case's training (all images in one "
                          "batch, stopped by StopWhenMemorised), which trained_case reads")
        elif self.save:
            aside = CASE_DIR / f"{self.key}.{os.getpid()}.part"
            try:  # whole files only: written aside, then renamed
                CASE_DIR.mkdir(parents=True, exist_ok=True)
                with open(aside, "wb") as file:
                    pickle.dump({k: getattr(self, k) for k in self.KEPT}
                                | {"weights": self.model.get_weights()}, file)
                    _uncache(file)
                os.replace(aside, CASE_DIR / f"{self.key}.pkl")
                saved = [f for f in CASE_DIR.glob("*.pkl") if re.fullmatch("[0-9a-f]{16}", f.stem)]
                for old in sorted(saved, key=lambda f: f.stat().st_mtime)[:-4]:
                    old.unlink(missing_ok=True)
            except Exception as error:  # training is done: say it, lose nothing else
                aside.unlink(missing_ok=True)
                warnings.warn(f"could not save the case's training in {CASE_DIR} ({error!r}): "
                              "notebooks 03-05 will train it again")
        self.set_model(None)  # a kept callback must not keep the model in memory

def _uncache(file) -> None:
    """Drop a file's pages from the page cache: Binder's memory limit counts them."""
    with contextlib.suppress(AttributeError, OSError):
        file.flush()
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

def _case_key(model, images, labels, epochs) -> str:
    """Digest of the images, labels, layers and wiring (not generated names), initial weights,
    compile settings, epochs, thread pools, oneDNN, versions and this file (its training code)."""
    wiring = model.to_json()  # layers, their wiring and the compile settings
    for i, layer in enumerate([model, *model.layers]):  # generated names by position
        wiring = wiring.replace(f'"{layer.name}"', f'"#{i}"')
    wiring = re.sub(r'"name": "[^"]*"', "", wiring)  # the optimizer's too
    settings = [_pool_sizes(), os.environ.get("TF_ENABLE_ONEDNN_OPTS"), tf.__version__,
                keras.__version__]  # what changes the last bits of a training
    digest = hashlib.sha256(json.dumps([wiring, int(epochs), settings], default=str,
                                       sort_keys=True).encode())
    digest.update(Path(__file__).read_bytes())
    for array in (images, labels, *model.get_weights()):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]

def trained_case(images, labels) -> tuple[keras.Model, CaseRecord]:
    """``(model, record)`` of the case as notebook 02 trains it (``build_resnet50``,
    ``compile_model``, ``fit`` with ``StopWhenMemorised`` and ``CaseRecord``): read from
    ``CASE_DIR`` when saved for these images, else trained and saved (about 5 updates). The
    optimizer's state is not kept. ``ValueError``: labels not one-hot. Notebook 02."""
    if np.ndim(labels) != 2:
        raise ValueError(f"labels of shape {np.shape(labels)}: pass them one-hot, (images, "
                         "classes), as utils.load_images returns them")
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
        model.fit(images, labels, epochs=MAX_EPOCHS, verbose=0,
                  callbacks=[StopWhenMemorised(images, labels), record])
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
    of one; ``mode_gap``: largest |training-mode - served probability|; ``memorised``: training
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

def measure_remedy(name, model, images, labels, updates, extra="", seconds=None, *,
                   training_mode=False, same_computation=False) -> RemedyResult:
    """Serve ``images`` as ``predict`` does (``training_mode``: ``model(x, training=True)``), all
    together and each alone, against training mode; statistics kept. ``ValueError``: claimed
    ``same_computation`` and the two differ. Notebook 05."""
    _check_counts(False, updates=updates)
    if len(images) < 2:
        raise ValueError(f"measure_remedy needs 2+ images, got {len(images)}: a training-mode "
                         "batch of one normalizes every value to beta")
    to_numpy = keras.ops.convert_to_numpy
    with frozen_moving_statistics(model):  # training-mode calls would move the statistics
        served = model(images, training=training_mode)
        alone = [int(np.argmax(to_numpy(model(images[i:i + 1], training=training_mode))))
                 for i in range(len(images))]
        reference = to_numpy(model(images, training=True))  # as fit computes
    loss, acc = loss_and_accuracy(served, labels)
    gap = float(np.abs(reference - to_numpy(served)).max())
    if same_computation and gap > 1e-5:
        raise ValueError(f"same_computation=True, but the two modes differ by {gap:.2g}")
    truth = np.argmax(labels, axis=1).tolist()
    return RemedyResult(str(name), int(updates), accuracy(reference, labels) == 1.0,
                        np.argmax(to_numpy(served), axis=1).tolist(), acc, loss, alone,
                        [a == t for a, t in zip(alone, truth)], gap, str(extra),
                        None if seconds is None else float(seconds),
                        bool(same_computation or training_mode and gap <= 1e-5))

def remedies_table(results: list[RemedyResult]):
    """``RemedyResult`` rows as an ``html_table`` (seconds left out: they vary); ``TypeError`` for
    anything else. Notebook 05."""
    if not isinstance(results, (list, tuple)) or not all(isinstance(r, RemedyResult)
                                                         for r in results):
        raise TypeError("remedies_table takes a list of RemedyResult (from utils.measure_remedy)")
    rows = [[r.name, r.updates, "yes" if r.memorised else "no", " ".join(map(str, r.predicted)),
             f"{r.accuracy:.2f}", f"{r.loss:.3g}", f"{sum(r.alone_right)} of {len(r.alone_right)}"
             " right", "n/a: same computation" if r.same_computation else f"{r.mode_gap:.2g}",
             r.extra] for r in results]
    return html_table(["remedy", "updates", "memorised", "predict", "accuracy", "loss",
                       "each alone", "train/served gap", "extra cost"], rows,
                      "updates: optimizer updates of the served weights; memorised: those weights"
                      " right on every image in training mode; predict: classes served for the"
                      " batch of all images; each alone: served one image at a time; train/served"
                      " gap: largest difference of probabilities between training mode and what"
                      " is served (n/a: served by training mode's own computation, 0 by"
                      " construction)")

# --- The toolkit: diagnose and recalibrate your own model (README, "Your own model") ---------
_EMPTY = "the data yielded no batch (an empty array, dataset, generator or PyDataset)"
_KINDS = "an array (or a list/dict of arrays), a tf.data.Dataset, a generator or a PyDataset"

def _size(x) -> int:
    leaves = keras.tree.flatten(x)
    if not leaves or len(getattr(leaves[0], "shape", ()) or ()) == 0:
        raise TypeError(f"a batch is {type(x).__name__}, not arrays with a batch axis: yield x")
    return int(leaves[0].shape[0])

def _check_counts(optional: bool = True, **counts) -> None:
    for name, value in ((n, v) for n, v in counts.items() if v is not None or not optional):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            hint = ": labels are not needed, pass x alone" if hasattr(value, "shape") else ""
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}{hint}")
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")

def _batches(data, batch_size, max_batches=None, max_samples=None):
    """``(x, samples)`` from arrays (cut into ``batch_size``), datasets, generators, PyDatasets."""
    _check_counts(batch_size=batch_size, max_batches=max_batches, max_samples=max_samples)
    unpack, dataset = keras.utils.unpack_x_y_sample_weight, isinstance(data, tf.data.Dataset)
    if max_batches is max_samples is None and (dataset and int(data.cardinality()) == int(
            tf.data.INFINITE_CARDINALITY) or isinstance(data, keras.utils.PyDataset)
            and data.num_batches is None):
        raise ValueError("this tf.data.Dataset or PyDataset is infinite: pass max_batches or "
                         "max_samples")
    if dataset:
        source = (unpack(element)[0] for element in data)
    elif isinstance(data, keras.utils.PyDataset):
        source = (unpack(data[i])[0] for i in
                  (range(data.num_batches) if data.num_batches is not None else itertools.count()))
    elif isinstance(data, (np.ndarray, tf.Tensor, dict, list, tuple)) or keras.ops.is_tensor(data):
        if not all(isinstance(a, np.ndarray) or keras.ops.is_tensor(a)
                   for a in keras.tree.flatten(data)):
            raise TypeError(f"{type(data).__name__} data holds non-arrays; pass {_KINDS}")
        total = _size(data)
        if {len(a) for a in keras.tree.flatten(data)} != {total}:
            raise ValueError(f"the inputs' lengths differ: {_describe(data)}")
        if max_samples is not None and total > max_samples:  # a random subset, the same each time
            total = max_samples - (max_samples % int(batch_size or total) == 1 < max_samples)
            keep = np.sort(np.random.default_rng(0).choice(_size(data), total, replace=False))
            data = keras.tree.map_structure(lambda a: keras.ops.take(a, keep, axis=0), data)
        step = int(batch_size or total or 1)
        source = (keras.tree.map_structure(lambda a, s=s: a[s:s + step], data)
                  for s in range(0, total, step))
    elif hasattr(data, "__iter__") or hasattr(data, "__next__"):
        source = (unpack(element)[0] for element in iter(data))
    else:
        raise TypeError(f"cannot read batches from {type(data).__name__} data; pass {_KINDS}")
    used = 0
    for number, x in enumerate(source):
        if max_batches is not None and number >= int(max_batches):
            return
        samples = _size(x)
        if max_samples is not None and used + samples > int(max_samples):
            if int(max_samples) - used == 1 and used:  # the cut would leave a batch of one
                return
            samples = int(max_samples) - used
            x = keras.tree.map_structure(lambda a: a[:samples], x)
        if samples:
            used += samples
            yield x, samples
        if max_samples is not None and used >= int(max_samples):
            return

def _in_inference_mode(inner, position):
    """``inner`` with its ``training`` argument (at ``position``) forced to ``False``."""
    @functools.wraps(inner)
    def call(*args, **kwargs):
        if len(args) > position:
            args = args[:position] + (False,) + args[position + 1:]
        return inner(*args, **(kwargs if len(args) > position else {**kwargs, "training": False}))
    return call

@contextlib.contextmanager
def _others_in_inference_mode(model):
    """Run every layer without BatchNormalization inside in inference mode (dropout, noise...)."""
    missing, wrapped, seen = object(), [], set()
    stack = list(getattr(model, "_layers", None) or ())
    while stack:
        layer = stack.pop()
        if id(layer) in seen or isinstance(layer, keras.layers.BatchNormalization):
            continue
        seen.add(id(layer))
        holds_bn = any(isinstance(sub, keras.layers.BatchNormalization)
                       for sub in layer._flatten_layers(include_self=False))
        try:  # ValueError: no training argument; after *args or keyword-only: a keyword
            params = list(inspect.signature(layer.call).parameters.values())
            position = [q.name for q in params].index("training")
            if any(q.kind in (q.VAR_POSITIONAL, q.KEYWORD_ONLY) for q in params[:position + 1]):
                position = sys.maxsize
        except (TypeError, ValueError):
            position = None
        stack += list(getattr(layer, "_layers", None) or ())
        if holds_bn or position is None:
            continue
        previous = vars(layer).get("call", missing)
        layer.call = call = _in_inference_mode(layer.call, position)
        wrapped.append((layer, call, previous))
    try:
        yield
    finally:  # undo each layer.call = wrapper, newest first
        for layer, call, previous in reversed(wrapped):
            if vars(layer).get("call") is call and previous is missing:
                del layer.call
            elif vars(layer).get("call") is call:
                layer.call = previous

def _describe(x) -> str:
    return str(keras.tree.map_structure(lambda a: tuple(a.shape), x))

def _passes(model, data, batch_size, max_batches, max_samples, where, spread=False):
    """Yield ``(batch number, samples, path -> [Moments])``: per batch a ``fit``-mode pass (other
    layers in inference mode) from the same state, restored; non-finite inputs: ``ValueError``."""
    count = 0
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model, spread) as records, \
            _others_in_inference_mode(model):
        state = [(v, v.numpy()) for v in model.non_trainable_variables]
        for count, (x, size) in enumerate(_batches(data, batch_size, max_batches, max_samples), 1):
            for calls in records.values():
                calls.clear()
            try:
                model(x, training=True)
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
                if count > 1:
                    raise
                expected = (f"; it takes {_describe(model.inputs)} (None: any size)"
                            if getattr(model, "inputs", None) else "")
                raise ValueError(f"{where}: the model cannot take this data (a batch of shape "
                                 f"{_describe(x)}{expected}; batch a tf.data.Dataset, several "
                                 f"inputs as a list or dict): {type(error).__name__}: "
                                 f"{' '.join(str(error).split())[:600]}") from error
            for variable, value in state:  # every batch from the same state (renorm's too)
                variable.assign(value)
            for path, moments in ((p, m) for p, calls in records.items() for m in calls):
                if not (np.isfinite(moments.mean).all() and np.isfinite(moments.var).all()):
                    raise ValueError(
                        f"{where}: batch {count} (counting from 1): layer {path!r} received "
                        "non-finite values (NaN or Inf); check that batch of the data and "
                        "the layers before it. No statistic was changed")
                if moments.training and moments.count == 1:
                    raise ValueError(f"{where}: batch {count}: layer {path!r} normalized one "
                                     "value per channel (variance 0, output beta): use batches "
                                     "of 2+ samples (batch_size, max_samples)")
            yield count, size, {p: list(c) for p, c in records.items() if c}
    if count == 0:
        raise ValueError(f"{where}: {_EMPTY}")

def _never_updated(layer) -> bool:
    return bool(np.all(layer.moving_mean.numpy() == 0)
                and np.all(layer.moving_variance.numpy() == 1))

@dataclass
class LayerGap:
    """A ``diagnose_batchnorm`` row: channel medians of the statistics, the gaps and their noise
    (standard errors), and how many channels lie far off. Notebook 03, section 5."""
    index: int
    name: str
    channels: int
    batch_var: float
    moving_var: float
    shift: float
    log_var_gap: float
    noise_shift: float
    noise_log_var: float
    flagged: bool
    samples: int = 0
    batches: int = 0
    frozen: bool = False
    never_updated: bool = False
    finite: bool = True
    negative_var: bool = False  # a moving variance below 0 (written from outside)
    var_ratio: float = 1.0  # median of (moving var + eps) / (var + eps): 1 is right
    channels_off: int = 0  # channels beyond twice their threshold (a tenth of them flags)
    #: ``"frozen"`` (inference mode in ``fit`` too) or ``"trains"``.
    in_fit = property(lambda self: "frozen" if self.frozen else "trains")
    @property
    def verdict(self) -> str:
        """"not finite", "negative variance", "ok", "frozen, stale", "never updated", "mismatch"."""
        return ("not finite" if not self.finite else "negative variance" if self.negative_var
                else "ok" if not self.flagged else "frozen, stale" if self.frozen
                else "never updated" if self.never_updated else "mismatch")

def diagnose_batchnorm(model, data, *, shift_tol: float = 0.2, ratio_tol: float = 1.5,
                       batch_size: int = 32, max_samples: int = 1024,
                       max_batches: int | None = None, noise: float = 2.0) -> list[LayerGap]:
    """``LayerGap`` per BatchNormalization layer reached: moving against ``fit``'s batch statistics
    (README, "Your own model"); state restored. ``ValueError``: bad model, input. Notebook 03."""
    if not (all(isinstance(t, (int, float, np.number)) for t in (ratio_tol, shift_tol, noise))
            and 1 <= ratio_tol < np.inf and 0 <= shift_tol < np.inf and 0 <= noise < np.inf):
        raise ValueError(f"ratio_tol={ratio_tol} must be >= 1, shift_tol={shift_tol} and "
                         f"noise={noise} >= 0, all finite")
    _check_counts(False, batch_size=batch_size)
    layers, calls, samples, batches = _built(model, "diagnose"), {}, 0, 0
    for batches, size, records in _passes(model, data, batch_size, max_batches, max_samples,
                                          "diagnose_batchnorm", spread=True):
        samples += size
        for path, moments in records.items():  # per pass, fit's calls if any
            calls.setdefault(path, []).append([m for m in moments if m.training] or moments)
    if samples < 2:
        raise ValueError("diagnose_batchnorm: pass 2+ samples, to tell a gap from sampling noise")
    if not calls:
        raise ValueError("diagnose_batchnorm: the data reached no BatchNormalization layer")
    rows = []
    for path, layer in [(p, layer) for p, layer in layers.items() if p in calls]:
        k = len(calls[path][0])  # a layer called k times a pass (shared, TimeDistributed): per call
        groups = ([[c[j] for c in calls[path]] for j in range(k)]
                  if {len(c) for c in calls[path]} == {k} else [sum(calls[path], [])])
        judged = [_judge(layer, seen, shift_tol, ratio_tol, noise) for seen in groups]
        fields, _ = max(judged, key=lambda j: (j[0]["flagged"], j[1]))  # the worst call
        rows.append(LayerGap(index=len(rows), name=path, samples=samples, batches=batches,
                             never_updated=_never_updated(layer), **fields))
    return rows

def _judge(layer, seen, shift_tol, ratio_tol, noise) -> tuple[dict, float]:
    """``LayerGap`` fields and a score (> 1: beyond the thresholds): the moving statistics
    against the mean of the ``seen`` calls' moments, as ``diagnose_batchnorm`` judges them."""
    mean, var = (np.mean([getattr(m, k) for m in seen], axis=0) for k in ("mean", "var"))
    moving_mean, moving_var = (np.asarray(v.numpy(), np.float64)
                               for v in (layer.moving_mean, layer.moving_variance))
    eps = float(layer.epsilon)
    std = np.sqrt(var + eps)
    within_m = [m.mean_se for m in seen if m.mean_se is not None]
    within_v = [m.var_se for m in seen if m.var_se is not None]
    scatter_m = np.sqrt(np.mean(np.square(within_m), axis=0)) if within_m else np.inf
    scatter_v = np.sqrt(np.mean(np.square(within_v), axis=0)) if within_v else np.inf
    if len(seen) > 1:
        scatter_m = np.maximum(scatter_m, np.std([m.mean for m in seen], axis=0, ddof=1))
        scatter_v = np.maximum(scatter_v, np.std([m.var for m in seen], axis=0, ddof=1))
    # the gap's standard error: one batch's scatter (within it or between batches, the larger)
    # over the len(seen) calls averaged, plus the share (1 - m) / (1 + m) an average keeps
    widen = np.sqrt(1 / len(seen) + (1 - layer.momentum) / (1 + layer.momentum))
    per_channel = dict(zip(
        ("batch_var", "moving_var", "shift", "log_var_gap", "noise_shift", "noise_log_var"),
        (var, moving_var, np.abs(moving_mean - mean) / std, np.abs(log_variance_ratio(
            moving_var, var, eps)), widen * scatter_m / std, widen * scatter_v / (var + eps))))
    med = {k: float(np.median(v)) for k, v in per_channel.items()}
    weights = [w.numpy() for w in (layer.gamma, layer.beta) if w is not None]
    finite = all(np.isfinite(a).all() for a in [moving_mean, moving_var, mean, var, *weights])
    with np.errstate(divide="ignore", invalid="ignore"):  # per channel: times its threshold
        excess = np.nan_to_num(np.maximum(
            per_channel["shift"] / np.maximum(shift_tol, noise * per_channel["noise_shift"]),
            per_channel["log_var_gap"]
            / np.maximum(np.log(ratio_tol), noise * per_channel["noise_log_var"])))
        score = max(np.float64(med["shift"]) / max(shift_tol, noise * med["noise_shift"]),
                    np.float64(med["log_var_gap"]) / max(np.log(ratio_tol),
                                                         noise * med["noise_log_var"]),
                    np.quantile(excess, 0.9) / 2)  # a tenth of the channels far off
    negative = bool(np.any(moving_var < 0))  # written from outside: predict gives NaN
    return dict(med, channels=len(mean), finite=bool(finite), negative_var=negative,
                var_ratio=float(np.median(np.exp(log_variance_ratio(moving_var, var, eps)))),
                flagged=bool(score > 1 or not finite or negative), channels_off=int(np.sum(
                    excess > 2)), frozen=all(m.training is False for m in seen)
                or not layer.trainable), float(np.nan_to_num(score, nan=np.inf))

def gaps_table_html(rows: list[LayerGap], max_rows: int | None = None):
    """``diagnose_batchnorm`` rows as an ``html_table``, flagged verdicts in bold. Notebook 03."""
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, LayerGap) for r in rows):
        raise TypeError(f"need the rows of utils.diagnose_batchnorm(model, x), not {type(rows)}")
    _check_counts(max_rows=max_rows)
    shown = list(rows)[:max_rows]
    body = [[r.index, r.name, r.channels, r.in_fit, r.batch_var, r.moving_var, r.log_var_gap,
             r.noise_log_var, r.shift, r.noise_shift, r.channels_off,
             _Bold(r.verdict) if r.flagged else r.verdict] for r in shown]
    if len(shown) < len(rows):
        body.append(["...", f"{len(rows) - len(shown)} more layers"] + [""] * 10)
    verdicts = [r.verdict for r in rows if r.flagged]
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
    samples = f"{rows[0].samples} samples in {rows[0].batches} batches" if rows else "no data"
    caption = (f"{len(verdicts)} of {len(rows)} BatchNormalization layers flagged"
               f"{': ' + counts if counts else ''} ({samples}). Medians over channels; noise: "
               "the gap's standard error from sampling; flagged beyond twice it and the tolerance,"
               " or when a tenth of the channels (far off) lie beyond twice that")
    return html_table(["#", "layer", "ch", "in fit", "batch var", "moving var", "|log ratio|",
                       "noise", "shift", "noise", "far off", "verdict"], body, caption)

_FROZEN = "frozen (trainable=False): inference mode in fit too; include_frozen=True updates it"
_NEVER = ("never updated (statistics exactly 0 and 1): if it trained in inference mode (a loop "
          "without training=True), new statistics change what the weights learned: retrain; if "
          "they were never set (a cloned or rebuilt model), include_never_updated=True")

def _check_options(batch_size=32, max_batches=None, max_samples=None, estimator="population",
                   include_frozen=False, include_never_updated=False, verbose=0) -> None:
    if estimator not in ("population", "batch_mean"):
        raise ValueError(f"estimator={estimator!r}; use 'population' or 'batch_mean'")
    if not (isinstance(include_frozen, bool) and isinstance(include_never_updated, bool)
            and verbose in (0, 1, 2)):
        raise TypeError("include_frozen, include_never_updated: True or False; verbose: 0, 1, 2")
    _check_counts(False, batch_size=batch_size)
    _check_counts(max_batches=max_batches, max_samples=max_samples)

class Recalibration(int):
    """What ``recalibrate_batchnorm`` did: an ``int`` (layers updated) with ``statistics``,
    ``skipped``, ``reasons``, ``samples``, ``batches``, ``estimator``, ``seconds``. Notebook 06."""
    def __repr__(self) -> str:
        return (f"Recalibration({int(self)} layers updated from {self.samples} samples in "
                f"{self.batches} batches, estimator={self.estimator!r}, "
                f"{len(self.skipped)} skipped)")
    __str__ = int.__repr__

def recalibrate_batchnorm(model, data, batch_size: int = 32, *, max_batches: int | None = None,
                          max_samples: int | None = None, estimator: str = "population",
                          include_frozen: bool = False, include_never_updated: bool = False,
                          verbose: int = 0) -> Recalibration:
    """Moving statistics set to ``data``'s in ``fit``'s batches, weights fixed (PreciseBN): a
    ``Recalibration``; ``ValueError``, ``TypeError`` (bad input, NaN): no change. Notebook 05."""
    _check_options(batch_size, max_batches, max_samples, estimator, include_frozen,
                   include_never_updated, verbose)
    started, named = time.perf_counter(), _built(model, "recalibrate")
    reasons = {p: _FROZEN for p, layer in named.items() if not (layer.trainable or include_frozen)}
    if not include_never_updated:
        reasons.update({p: _NEVER for p, layer in named.items()
                        if p not in reasons and _never_updated(layer)})
    targets = {p: layer for p, layer in named.items() if p not in reasons}
    if not targets:
        raise ValueError("no BatchNormalization layer to recalibrate: "
                         + "; ".join(f"{p!r}: {why}" for p, why in list(reasons.items())[:3]))
    thawed = [layer for layer in targets.values() if not layer.trainable]
    arrays = isinstance(data, np.ndarray) and data.ndim and not max_samples
    total = min(-(-len(data) // int(batch_size)), max_batches or np.inf) if arrays else max_batches
    saved = [(v, v.numpy()) for layer in targets.values() for v in layer.non_trainable_variables]
    rounds = 1 + sum(bool(getattr(layer, "renorm", False)) for layer in targets.values())
    try:  # renorm's statistics shape what later layers receive in fit: a pass per renorm layer
        for layer in thawed:
            layer.trainable = True
        for _ in range(rounds):
            progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
            per_call, reached, samples, batches = {path: [] for path in targets}, set(), 0, 0
            for batches, size, records in _passes(model, data, batch_size, max_batches,
                                                  max_samples, "recalibrate_batchnorm"):
                reached.update(records)
                for path in per_call:
                    per_call[path] += [m for m in records.get(path, ()) if m.training]
                samples += size
                progress.update(batches)
            reasons.update({p: "the data never reached it" if p not in reached else "frozen by "
                            "the model's call (training=False): inference mode in fit too"
                            for p, calls in per_call.items() if not calls})
            written = {p: _pooled(c) if estimator == "population" else Moments(
                np.mean([m.mean for m in c], axis=0), np.mean([m.var for m in c], axis=0),
                sum(m.count for m in c), True) for p, c in per_call.items() if c}
            if not written:
                raise ValueError("nothing to recalibrate, no layer normalized with batch "
                                 "statistics: " + "; ".join(f"{p!r}: {why}" for p, why in
                                                            list(reasons.items())[:3]))
            for path, moments in written.items():
                _assign_moving(targets[path], moments.mean, moments.var)
    except BaseException:  # an error or an interrupt: nothing changed
        for variable, value in saved:
            variable.assign(value)
        raise
    finally:
        for layer in thawed:
            layer.trainable = False
    result = Recalibration(len(written))
    vars(result).update(statistics=written, skipped=list(reasons), reasons=reasons,
                        samples=samples, batches=batches, estimator=estimator,
                        seconds=time.perf_counter() - started)
    return result

class PreciseBN(keras.callbacks.Callback):
    """``recalibrate_batchnorm`` on ``max_samples`` of ``data`` before each validation pass (else at
    each epoch's end) of ``fit``; list it before checkpoints. ``results``: each. Notebook 06."""
    def __init__(self, data, max_samples: int = 1024, batch_size: int = 32, **options):
        super().__init__()
        if hasattr(data, "__next__"):  # generators and iterators
            raise TypeError("PreciseBN reads the data every epoch; a generator is used up after "
                            "one pass: pass arrays, a tf.data.Dataset or a PyDataset")
        self.options = dict(options, max_samples=max_samples, batch_size=batch_size)
        try:  # bad options and data fail here, not after an epoch of training
            _check_options(**self.options)
            if next(_batches(data, batch_size, max_batches=1), None) is None:
                raise ValueError(f"PreciseBN: {_EMPTY}")
        except TypeError as error:
            raise TypeError(f"PreciseBN takes recalibrate_batchnorm's options: {error}") from None
        self.data, self.results, self._in_fit, self._done = data, [], False, False
    def _recalibrate(self):
        self.results.append(recalibrate_batchnorm(self.model, self.data, **self.options))
        self._done = True
    def on_train_begin(self, logs=None):
        if getattr(self.model, "built", False):  # nothing to recalibrate: say so before training
            frozen = self.options.get("include_frozen", False)
            if not any(layer.trainable or frozen for layer in batchnorm_layers(self.model)):
                raise ValueError("PreciseBN: no BatchNormalization layer it would recalibrate "
                                 "(none, or all frozen: include_frozen=True updates those)")
        self._in_fit = True
    def on_test_begin(self, logs=None):  # the validation pass inside fit
        if self._in_fit and not self._done:
            self._recalibrate()
    def on_epoch_end(self, epoch, logs=None):
        if not self._done:
            self._recalibrate()
        self._done = False  # the next epoch recalibrates again
    def on_train_end(self, logs=None):
        self._in_fit = False
        self.set_model(None)  # a kept callback must not keep the model in memory

# --- Notebooks 06-07: mini-batches -----------------------------------------------------------
def draw_patterns(count: int, size: int = 16, noise: float = 1.0, offset: float = 0.0,
                  gain: float = 1.0, rng: np.random.Generator | None = None):
    """``(images, labels)``: float32 ``(count, size, size, 1)``, ``gain * (pattern + noise) +
    offset``, 4 shuffled classes (stripes: -, |, /; blob), one-hot ``(count, 4)``. Notebook 06."""
    for name, value, low in (("count", count, 1), ("size", size, 8), ("noise", noise, 0),
                             ("offset", offset, 0), ("gain", gain, 0)):
        kinds = (int, np.integer) if low else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise TypeError(f"{name} must be {'an integer' if low else 'a number'}, got {value!r}")
        if value < low if low else not np.isfinite(value):
            raise ValueError(f"{name}={value} must be {f'at least {low}' if low else 'finite'}")
    if noise < 0 or gain <= 0:
        raise ValueError(f"noise={noise} must be >= 0" if noise < 0 else f"gain={gain} must be > 0")
    rng = rng or np.random.default_rng(np.random.randint(2**31 - 1))
    labels = np.arange(count) % 4
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((count, size, size), np.float64)
    for i, label in enumerate(labels):
        period, phase, amplitude = rng.uniform(3, 6), rng.uniform(0, 2 * np.pi), rng.uniform(.4, .9)
        if label < 2:
            pattern = np.sin(2 * np.pi * (yy, xx)[label] / period + phase)
        elif label == 2:
            pattern = np.sin(2 * np.pi * (xx + yy) / (period * np.sqrt(2)) + phase)
        else:
            (cy, cx), radius = rng.uniform(3, size - 3, 2), rng.uniform(2, 4)
            pattern = 2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)) - 0.5
        images[i] = amplitude * pattern + noise * rng.standard_normal((size, size))
    return (gain * images + offset)[..., None].astype("float32"), np.eye(4, dtype="float32")[labels]

def build_small_cnn(size: int = 16, num_classes: int = 4, momentum: float = 0.99,
                    seed: int = SEED, prefix: str = "") -> keras.Model:
    """conv1-bn1-ReLU-conv2 (stride 2)-bn2-ReLU-pool-dense-bn3-ReLU-classes, seeded, uncompiled,
    names after ``prefix``; ``ValueError``: ``size < 8``, < 2 classes, bad momentum. Notebook 06."""
    if size < 8 or num_classes < 2 or isinstance(momentum, bool) or not (
            isinstance(momentum, (int, float, np.floating)) and 0 <= momentum < 1):
        raise ValueError(f"size={size} (at least 8), num_classes={num_classes} (at least 2), "
                         f"momentum={momentum!r} (0 <= momentum < 1; PyTorch's 0.1 is 0.9)")
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    x = inputs = keras.Input((size, size, 1), name=f"{prefix}image")
    for i, (filters, strides) in enumerate(((8, 1), (16, 2)), start=1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                          name=f"{prefix}conv{i}")(x)
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
            model(images[start:start + batch_size], training=True)
    return records
