"""Diagnose and fix BatchNormalization's fit/predict gap in your own Keras 3 model.

A BatchNormalization layer normalizes with its batch's statistics in `fit()` and with its moving
averages in `predict()` and `evaluate()`. Where the two differ, a model right in training can be
wrong when served. This module measures that gap layer by layer and closes it by setting the
moving statistics to those of the training batches (PreciseBN):

- `diagnose_batchnorm(model, x)`: a `LayerGap` row per layer, with a verdict;
  `gaps_table_html(rows)` shows them in Jupyter.
- `recalibrate_batchnorm(model, data)`: the moving statistics set to `data`'s, the weights left
  alone; `PreciseBN(data)` does it inside `fit()` before each validation pass.
- Building blocks: `named_batchnorm_layers`, `recording_batchnorm_inputs`,
  `frozen_moving_statistics`, `moving_statistics`, `set_moving_statistics`, `batch_statistics`,
  `Moments`, `log_variance_ratio`.

It works on any Keras 3 model with BatchNormalization layers on the TensorFlow backend only (it
reads each layer's input eagerly; it does not run on the JAX or PyTorch backends), wherever the
layers sit (nested models, custom layers, wrappers, lists of layers), fed the way you feed `fit`.
Each layer is named by its path in the layer tree (`block/batch_normalization`).

It imports only Keras, NumPy, TensorFlow and the standard library (IPython, where installed, to
show tables), and importing it sets nothing in your process: no environment variable, no thread
pool, no log level, no seed.

Example:

```python
import bn_toolkit

rows = bn_toolkit.diagnose_batchnorm(model, x_train, batch_size=32)  # your training batch size
display(bn_toolkit.gaps_table_html(rows))  # per layer: trains or frozen, and a verdict
bn_toolkit.recalibrate_batchnorm(model, train_data, batch_size=32, verbose=1)
```
"""

from __future__ import annotations

import contextlib
import functools
import html
import inspect
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "LayerGap",
    "Moments",
    "PreciseBN",
    "Recalibration",
    "batch_statistics",
    "batchnorm_layers",
    "diagnose_batchnorm",
    "frozen_moving_statistics",
    "gaps_table_html",
    "log_variance_ratio",
    "moving_statistics",
    "named_batchnorm_layers",
    "recalibrate_batchnorm",
    "recording_batchnorm_inputs",
    "set_moving_statistics",
]


# --- Finding the layers ----------------------------------------------------------------------
def named_batchnorm_layers(model) -> dict[str, keras.layers.BatchNormalization]:
    """Finds every BatchNormalization layer of a model, by its path.

    The walk follows the layer tree Keras itself tracks: nested models, custom layers, wrappers
    and lists of layers. A layer shared by several parents is listed once.

    Args:
        model: A Keras model or layer (a BatchNormalization layer itself is its own only entry).

    Returns:
        A dict `path -> layer`, in the order of the layer tree. A path joins the names of the
        parents and the layer by `/` (`"block/batch_normalization"`); where two layers would
        get the same path, the later ones get `#2`, `#3`... appended.

    Example:

    ```python
    for path, layer in named_batchnorm_layers(model).items():
        print(path, layer.momentum)
    ```
    """
    bn = keras.layers.BatchNormalization
    if isinstance(model, bn):
        return {model.name: model}
    found = {}
    seen = {id(model)}

    def visit(parent, prefix):
        for child in getattr(parent, "_layers", None) or ():  # the list Keras itself tracks
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            if isinstance(child, bn):
                found[_unique_key(path, found)] = child
            visit(child, path + "/")

    visit(model, "")
    return found


def _unique_key(path: str, taken: dict) -> str:
    """``path``, or ``path#2``, ``path#3``... the first not in ``taken``."""
    key, k = path, 2
    while key in taken:
        key, k = f"{path}#{k}", k + 1
    return key


def batchnorm_layers(model) -> list[keras.layers.BatchNormalization]:
    """Lists every BatchNormalization layer of a model.

    Args:
        model: A Keras model or layer.

    Returns:
        The layers of `named_batchnorm_layers(model)`, as a list in the same order.

    Example:

    ```python
    for layer in batchnorm_layers(model):
        layer.momentum = 0.9
    ```
    """
    return list(named_batchnorm_layers(model).values())


def _built(model, purpose: str, need_bn: bool = True) -> dict:
    """The built BatchNormalization layers by path; errors say what ``purpose`` needs."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"cannot {purpose}: the model comes first, got {type(model).__name__}")
    layers, name = named_batchnorm_layers(model), model.name
    unbuilt = [p for p, layer in layers.items() if not layer.built]  # in a built model: unused
    none_built = bool(unbuilt) and len(unbuilt) == len(layers)
    if not getattr(model, "built", True) or none_built:
        which = f" (layers {unbuilt[:4]})" if unbuilt else ""
        raise ValueError(
            f"cannot {purpose}: {name!r} is not built yet{which}, so it has no "
            "moving statistics: call the model on one batch of your data first"
        )
    if need_bn and not layers:
        raise ValueError(f"{name!r} has no BatchNormalization layer: nothing to {purpose}")
    return {p: layer for p, layer in layers.items() if layer.built}


# --- Moments of what a layer receives --------------------------------------------------------
@dataclass
class Moments:
    """Per-channel moments of the values a BatchNormalization layer normalized.

    Args:
        mean: float64 array, the mean per channel.
        var: float64 array, the biased variance per channel (as the layer computes it).
        count: The number of values per channel the moments rest on.
        training: Whether the layer normalized with these moments (`fit`'s mode, in a
            trainable layer); `None` where merged moments disagree.
        mean_se: float64 array or `None`, the standard error of `mean` from the spread of the
            samples (`None` below 2 samples, or when not asked for).
        var_se: float64 array or `None`, the standard error of `var`, likewise.

    Example:

    ```python
    both = Moments(np.zeros(2), np.ones(2), 10).merged(Moments(np.ones(2), np.ones(2), 10))
    both.mean, both.var  # [0.5, 0.5], [1.25, 1.25]
    ```
    """

    mean: np.ndarray
    var: np.ndarray
    count: int
    training: bool | None = None
    mean_se: np.ndarray | None = field(default=None, repr=False)
    var_se: np.ndarray | None = field(default=None, repr=False)

    def merged(self, other: Moments) -> Moments:
        """Returns the moments of both sets of values together.

        Chan et al.'s exact merge of means and biased variances; no standard errors.

        Args:
            other: The `Moments` of the other set of values.

        Returns:
            A new `Moments` over `self.count + other.count` values, `training` kept where both
            agree, else `None`.
        """
        n, delta = self.count + other.count, other.mean - self.mean
        m2 = (
            self.var * self.count
            + other.var * other.count
            + delta**2 * self.count * other.count / n
        )
        training = self.training if self.training == other.training else None
        return Moments(self.mean + delta * other.count / n, m2 / n, n, training)


def _pooled(moments: list[Moments]) -> Moments:
    """The moments of all the values of ``moments`` together."""
    return functools.reduce(Moments.merged, moments)


#: Student's t, 97.5 % quantile, by degrees of freedom (1.96 + 2.4 / df beyond).
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
        mean, var, count, share, per_sample = _plain_moments(values, axes, inner)
    else:
        mean, var, count, share, per_sample = _masked_moments(values, mask, axes, inner)
    mean_se = var_se = None
    samples = values.shape[0] if 0 in axes else 1
    if spread and samples and samples > 1 and count > 0:
        mean_se, var_se = _standard_errors(values, mean, var, count, share, per_sample, samples)
    is_training = bool(training) and bool(layer.trainable)
    return Moments(_flat(mean), _flat(var), count, is_training, _flat(mean_se), _flat(var_se))


def _flat(tensor) -> np.ndarray | None:
    """A tensor as a flat float64 array (``None`` stays ``None``)."""
    if tensor is None:
        return None
    return np.asarray(keras.ops.convert_to_numpy(tensor), np.float64).reshape(-1)


def _plain_moments(values, axes, inner):
    """``(mean, var, count, share, per_sample)`` of every value, as the layer computes them."""
    ops = keras.ops
    mean, var = ops.moments(values, axes=axes, keepdims=True)
    count = int(np.prod([values.shape[a] for a in axes]))

    def per_sample(t):
        return ops.mean(t, axis=inner, keepdims=True) if inner else t

    return mean, var, count, 1.0, per_sample


def _masked_moments(values, mask, axes, inner):
    """``(mean, var, count, share, per_sample)`` with the masked positions left out.

    ``mask`` has the input's shape without the channel axis; ``share`` is each sample's weight
    relative to an equal one (1 for samples of equal size).
    """
    ops = keras.ops
    weights = ops.broadcast_to(
        ops.expand_dims(ops.cast(mask, values.dtype), -1), ops.shape(values)
    )
    total = ops.sum(weights, axis=axes, keepdims=True)
    mean = ops.sum(weights * values, axis=axes, keepdims=True) / total
    var = ops.sum(weights * (values - mean) ** 2, axis=axes, keepdims=True) / total
    count = int(round(float(ops.convert_to_numpy(total).reshape(-1)[0])))

    def summed(t):
        return ops.sum(t, axis=inner, keepdims=True) if inner else t

    w = ops.maximum(summed(weights), 1e-12)
    share = w / ops.sum(w, axis=0, keepdims=True) * values.shape[0]  # 1 for equal samples

    def per_sample(t):
        return summed(weights * t) / w

    return mean, var, count, share, per_sample


def _standard_errors(values, mean, var, count, share, per_sample, samples):
    """``(mean_se, var_se)`` per channel from the spread of the samples' means and squares.

    The batch mean is the mean of ``share * a``, the batch variance the mean of ``share * q``:
    standard errors from the samples' spread, widened for the few samples that estimate it
    (Student's t, 95 %), and never below the bounds of independent values.
    """
    ops = keras.ops
    a, q = per_sample(values), per_sample((values - mean) ** 2)
    widen = _T975.get(samples - 1, 1.96 + 2.4 / (samples - 1)) / 1.96
    mean_floor, var_floor = np.sqrt(1 / count), np.sqrt(2 / max(count - 1, 1))
    flat_var = ops.reshape(var, (-1,))
    mean_spread = widen * ops.reshape(ops.std(share * a, axis=0), (-1,)) / np.sqrt(samples - 1)
    var_spread = widen * ops.reshape(ops.std(share * q, axis=0), (-1,)) / np.sqrt(samples - 1)
    mean_se = ops.maximum(mean_spread, mean_floor * ops.sqrt(flat_var))
    var_se = ops.maximum(var_spread, var_floor * flat_var)
    return mean_se, var_se


def _spy(inner, paths, records, recording, spread):
    """``BatchNormalization.call`` recording, for the layers in ``paths`` (id -> path), the
    moments the base layer normalizes with (after any subclass's own ``call``)."""

    @functools.wraps(inner)  # Keras and error messages see the layer's own signature
    def spy(layer, *args, **kwargs):
        inputs = args[0] if args else kwargs.get("inputs")
        path = paths.get(id(layer))
        if path and recording["active"] and not isinstance(inputs, keras.KerasTensor):
            if not tf.executing_eagerly():
                raise RuntimeError(
                    f"layer {path!r} was called in a traced graph, which hides its "
                    "inputs: run the model eagerly (compile with run_eagerly=True, "
                    "and no tf.function around the model or its call)"
                )
            training = kwargs.get("training", _positional(args, 1))
            mask = kwargs.get("mask", _positional(args, 2))
            records[path].append(_moments_of(layer, inputs, mask, training, spread))
        return inner(layer, *args, **kwargs)

    return spy


def _positional(args: tuple, position: int):
    """``args[position]``, or ``None`` when fewer arguments were given."""
    return args[position] if len(args) > position else None


@contextlib.contextmanager
def recording_batchnorm_inputs(model, spread: bool = False) -> Iterator[dict[str, list[Moments]]]:
    """Records the moments of what every BatchNormalization layer receives, inside a block.

    Every call of a layer of `model` inside the `with` block adds one `Moments` to that layer's
    list, with `training` telling whether the layer normalized with them. A subclass of
    BatchNormalization is recorded as its base layer receives it. Calls made inside
    `frozen_moving_statistics` (probes) are hidden from the recordings open around it.

    Args:
        model: A built Keras model or layer.
        spread: If `True`, the moments also carry their standard errors (`mean_se`, `var_se`).

    Returns:
        A context manager yielding a dict `path -> [Moments]`, one per call, filled as the
        block runs.

    Raises:
        TypeError: `model` is not a Keras layer or model.
        ValueError: the model is not built.
        RuntimeError: a layer was called in a traced graph (run the model eagerly).

    Example:

    ```python
    with recording_batchnorm_inputs(model) as records:
        model(x, training=True)
    records["bn1"][0].var  # the variance bn1 normalized with
    ```
    """
    layers = _built(model, "record BatchNormalization inputs", need_bn=False)
    records: dict[str, list[Moments]] = {path: [] for path in layers}
    recording, bn = {"active": True}, keras.layers.BatchNormalization
    inner = bn.__dict__["call"]  # the class's own, so that subclasses' super().call is seen too
    paths = {id(layer): path for path, layer in layers.items()}
    bn.call = _spy(inner, paths, records, recording, spread)
    _OPEN_RECORDINGS.append(recording)
    try:
        yield records
    finally:
        _OPEN_RECORDINGS[:] = [r for r in _OPEN_RECORDINGS if r is not recording]
        bn.call = inner


@contextlib.contextmanager
def frozen_moving_statistics(model) -> Iterator[None]:
    """Keeps the moving statistics (every non-trainable variable) as they are, around a block.

    Training-mode calls inside the block move the moving statistics as usual; on leaving, every
    non-trainable variable of the model is restored. Calls inside are probes: hidden from the
    `recording_batchnorm_inputs` blocks open around this one.

    Args:
        model: A built Keras model or layer.

    Returns:
        A context manager.

    Raises:
        TypeError: `model` is not a Keras layer or model.
        ValueError: the model is not built.

    Example:

    ```python
    with frozen_moving_statistics(model):
        train_mode_output = model(x, training=True)  # statistics restored afterwards
    ```
    """
    layers = _built(model, "freeze the moving statistics", need_bn=False)
    owners = (model, *layers.values())  # a bare layer's own variables too
    variables = {id(v): v for owner in owners for v in owner.non_trainable_variables}
    saved = [(v, v.numpy()) for v in variables.values()]
    hidden = [r for r in _OPEN_RECORDINGS if r["active"]]
    for recording in hidden:
        recording["active"] = False
    try:
        yield
    finally:
        for recording in hidden:
            recording["active"] = True
        for variable, value in saved:
            variable.assign(value)


# --- Reading and writing the moving statistics -----------------------------------------------
def moving_statistics(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the moving statistics of every BatchNormalization layer.

    Args:
        model: A built Keras model or layer.

    Returns:
        A dict `path -> (moving_mean, moving_variance)`, float64 arrays per channel.

    Raises:
        TypeError: `model` is not a Keras layer or model.
        ValueError: the model is not built.

    Example:

    ```python
    mean, var = moving_statistics(model)["bn1"]
    ```
    """
    layers = _built(model, "read the moving statistics", need_bn=False)
    return {
        path: (
            np.asarray(layer.moving_mean.numpy(), np.float64),
            np.asarray(layer.moving_variance.numpy(), np.float64),
        )
        for path, layer in layers.items()
    }


def batch_statistics(model, images, training: bool = True) -> tuple[dict[str, Moments], object]:
    """Runs the model once and returns the moments each BatchNormalization layer received.

    The moving statistics are left as they were.

    Args:
        model: A built Keras model or layer.
        images: One batch of inputs for `model(images, training=training)`.
        training: The mode of the call.

    Returns:
        A tuple `(path -> Moments, output)`: per layer reached, the moments of all its calls
        pooled, and the model's output.

    Raises:
        TypeError: `model` is not a Keras layer or model.
        ValueError: the model is not built.

    Example:

    ```python
    stats, output = batch_statistics(model, x[:32])
    stats["bn1"].var
    ```
    """
    with frozen_moving_statistics(model), recording_batchnorm_inputs(model) as records:
        outputs = model(images, training=training)
    return {path: _pooled(calls) for path, calls in records.items() if calls}, outputs


def log_variance_ratio(moving_var, batch_var, eps: float = 1e-3) -> np.ndarray:
    """Computes the log-ratio of two variances per channel, each with `eps` added.

    0 where they agree; `log(1.5)` is `diagnose_batchnorm`'s default tolerance.

    Args:
        moving_var: The moving variances (array-like).
        batch_var: The batch variances (array-like, same shape).
        eps: The layer's `epsilon`, added to both.

    Returns:
        float64 array `log(moving_var + eps) - log(batch_var + eps)`.

    Example:

    ```python
    log_variance_ratio([4.0], [1.0], eps=0.0)  # array([1.386...]): log 4
    ```
    """
    moving = np.asarray(moving_var, np.float64)
    batch = np.asarray(batch_var, np.float64)
    return np.log(moving + eps) - np.log(batch + eps)


def set_moving_statistics(model, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Writes moving statistics into BatchNormalization layers.

    Every pair is checked before any is written, so a bad one changes nothing. Layers with
    `renorm=True` get their own statistics (`moving_stddev`, `renorm_mean`, `renorm_stddev`)
    to match.

    Args:
        model: A built Keras model or layer.
        stats: A dict `path -> (moving_mean, moving_variance)`, paths as
            `named_batchnorm_layers` names them, arrays of the layer's shape. Layers not named
            are left as they are.

    Raises:
        TypeError: `model` is not a Keras layer or model.
        KeyError: a path names no BatchNormalization layer.
        ValueError: the model is not built; a value is not a pair, has another shape, is not
            finite (as stored in the layer's dtype), or a variance is negative.

    Example:

    ```python
    saved = moving_statistics(model)
    ...  # train, experiment
    set_moving_statistics(model, saved)
    ```
    """
    layers = _built(model, "set the moving statistics", need_bn=False)
    missing = sorted(set(stats) - set(layers))
    if missing:
        raise KeyError(
            f"no BatchNormalization layer at {missing}; the model's: {list(layers)[:6]}"
        )
    checked = {path: _checked_pair(path, pair, layers[path]) for path, pair in stats.items()}
    for path, (mean, var) in checked.items():
        _assign_moving(layers[path], mean, var)


def _checked_pair(path: str, pair, layer) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, var)`` as float64 arrays, if fit to write into ``layer``; else ``ValueError``."""
    shape = tuple(layer.moving_mean.shape)
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"layer {path!r}: pass a pair (mean, variance) of shape {shape}")
    mean, var = (np.asarray(a, np.float64) for a in pair)
    if mean.shape != shape or var.shape != shape:
        raise ValueError(f"layer {path!r}: shapes {mean.shape}, {var.shape}; need {shape}")
    dtype = layer.moving_mean.dtype  # finite as stored, not only as given
    if np.any(var < 0) or not all(np.isfinite(a.astype(dtype)).all() for a in (mean, var)):
        raise ValueError(f"layer {path!r}: statistics must be finite, variances >= 0")
    return mean, var


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


# --- Reading the data in batches -------------------------------------------------------------
_EMPTY = "the data yielded no batch (an empty array, dataset, generator or PyDataset)"
_KINDS = "an array (or a list/dict of arrays), a tf.data.Dataset, a generator or a PyDataset"


def _size(x) -> int:
    """Samples in a batch: the first axis of its first array."""
    leaves = keras.tree.flatten(x)
    if not leaves or len(getattr(leaves[0], "shape", ()) or ()) == 0:
        raise TypeError(f"a batch is {type(x).__name__}, not arrays with a batch axis: yield x")
    return int(leaves[0].shape[0])


def _check_counts(optional: bool = True, **counts) -> None:
    """Each count an integer >= 1 (``None`` allowed where ``optional``)."""
    for name, value in counts.items():
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            hint = ": labels are not needed, pass x alone" if hasattr(value, "shape") else ""
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}{hint}")
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")


def _is_endless(data) -> bool:
    """Whether ``data`` is a ``tf.data.Dataset`` or ``PyDataset`` that never ends."""
    if isinstance(data, tf.data.Dataset):
        return int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    if isinstance(data, keras.utils.PyDataset):
        return data.num_batches is None
    return False


def _batches(data, batch_size, max_batches=None, max_samples=None, shuffle=True):
    """``(x, samples)`` from arrays (shuffled, cut into ``batch_size``), datasets, generators,
    PyDatasets."""
    _check_counts(batch_size=batch_size, max_batches=max_batches, max_samples=max_samples)
    if max_batches is None and max_samples is None and _is_endless(data):
        raise ValueError(
            "this tf.data.Dataset or PyDataset is infinite: pass max_batches or max_samples"
        )
    used = 0
    for number, x in enumerate(_source(data, batch_size, max_samples, shuffle)):
        if max_batches is not None and number >= int(max_batches):
            return
        samples = _size(x)
        if max_samples is not None and used + samples > int(max_samples):
            if int(max_samples) - used == 1 and used:  # the cut would leave a batch of one
                return
            samples = int(max_samples) - used
            x = _head(x, samples)
        if samples:
            used += samples
            yield x, samples
        if max_samples is not None and used >= int(max_samples):
            return


def _head(x, samples: int):
    """The first ``samples`` samples of every array of the batch ``x``."""
    return keras.tree.map_structure(lambda a: a[:samples], x)


def _source(data, batch_size, max_samples, shuffle=True):
    """An iterator over the ``x`` of each batch that ``data`` holds (labels dropped)."""
    unpack = keras.utils.unpack_x_y_sample_weight
    if isinstance(data, tf.data.Dataset):
        return (unpack(element)[0] for element in data)
    if isinstance(data, keras.utils.PyDataset):
        endless = data.num_batches is None
        numbers = itertools.count() if endless else range(data.num_batches)
        return (unpack(data[i])[0] for i in numbers)
    if isinstance(data, (np.ndarray, tf.Tensor, dict, list, tuple)) or keras.ops.is_tensor(data):
        return _array_batches(data, batch_size, max_samples, shuffle)
    if hasattr(data, "__iter__") or hasattr(data, "__next__"):
        return (unpack(element)[0] for element in iter(data))
    raise TypeError(f"cannot read batches from {type(data).__name__} data; pass {_KINDS}")


def _array_batches(data, batch_size, max_samples, shuffle=True):
    """Arrays (or a list/dict of them) cut into batches, in an order shuffled as ``fit``
    shuffles (the same on every call), or in the given order; a random subset of
    ``max_samples``."""
    leaves = keras.tree.flatten(data)
    if not all(isinstance(a, np.ndarray) or keras.ops.is_tensor(a) for a in leaves):
        raise TypeError(f"{type(data).__name__} data holds non-arrays; pass {_KINDS}")
    total = _size(data)
    if {len(a) for a in leaves} != {total}:
        raise ValueError(f"the inputs' lengths differ: {_describe(data)}")
    step = int(batch_size or total or 1)
    order = _order(total, max_samples, step, shuffle)
    if order is None:
        return (_slice(data, start, step) for start in range(0, total, step))
    return (_rows(data, order[start : start + step]) for start in range(0, len(order), step))


def _order(total: int, max_samples, step: int, shuffle: bool):
    """The samples to read, in order (``None``: all, as given): a permutation of them, or of a
    random subset of ``max_samples``, from NumPy's ``default_rng(0)``; without ``shuffle``, or
    when they make a single batch (whose statistics do not depend on its order), in the given
    order."""
    rng = np.random.default_rng(0)
    kept = total
    if max_samples is not None and total > max_samples:
        kept = _subset_size(max_samples, step)
    if shuffle and kept > step:
        return rng.permutation(total)[:kept]
    if kept < total:
        return np.sort(rng.choice(total, kept, replace=False))
    return None


def _rows(data, rows: np.ndarray):
    """The samples ``rows`` of every array of ``data``, in that order."""
    return keras.tree.map_structure(lambda a: _take(a, rows), data)


def _take(array, rows: np.ndarray):
    """``array[rows]`` for a NumPy array, ``keras.ops.take`` for a tensor."""
    if isinstance(array, np.ndarray):
        return array[rows]
    return keras.ops.take(array, rows, axis=0)


def _subset_size(max_samples, step: int):
    """``max_samples``, one less where batches of ``step`` would leave a last batch of one."""
    if max_samples % step == 1 and max_samples > 1:
        return max_samples - 1
    return max_samples


def _slice(data, start: int, step: int):
    """Samples ``start`` to ``start + step`` of every array of ``data``."""
    return keras.tree.map_structure(lambda a: a[start : start + step], data)


def _describe(x) -> str:
    """The shapes of a batch's arrays, nested as the batch is."""
    return str(keras.tree.map_structure(lambda a: tuple(a.shape), x))


# --- Passes as fit makes them ----------------------------------------------------------------
def _in_inference_mode(inner, position):
    """``inner`` with its ``training`` argument (at ``position``) forced to ``False``."""

    @functools.wraps(inner)
    def call(*args, **kwargs):
        if len(args) > position:
            args = (*args[:position], False, *args[position + 1 :])
            return inner(*args, **kwargs)
        return inner(*args, **{**kwargs, "training": False})

    return call


def _training_position(layer):
    """Where ``layer.call`` takes ``training``: its position, ``sys.maxsize`` (a keyword only)
    or ``None`` (no such argument, or no signature)."""
    try:  # ValueError: no training argument; after *args or keyword-only: a keyword
        params = list(inspect.signature(layer.call).parameters.values())
        position = [q.name for q in params].index("training")
    except (TypeError, ValueError):
        return None
    if any(q.kind in (q.VAR_POSITIONAL, q.KEYWORD_ONLY) for q in params[: position + 1]):
        return sys.maxsize
    return position


def _holds_batchnorm(layer) -> bool:
    """Whether a BatchNormalization layer sits anywhere inside ``layer``."""
    return any(
        isinstance(sub, keras.layers.BatchNormalization)
        for sub in layer._flatten_layers(include_self=False)
    )


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
        holds_bn = _holds_batchnorm(layer)
        position = _training_position(layer)
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
            if vars(layer).get("call") is not call:
                continue
            if previous is missing:
                del layer.call
            else:
                layer.call = previous


def _passes(
    model,
    data,
    batch_size,
    max_batches,
    max_samples,
    where,
    spread=False,
    shuffle=True,
    in_predict=None,
):
    """Yield ``(batch number, samples, path -> [Moments])``: per batch a ``fit``-mode pass (other
    layers in inference mode) from the same state, restored; non-finite inputs: ``ValueError``.
    With a set ``in_predict``, the first batch also goes through as ``predict`` calls the model,
    and the set receives the paths of the layers that normalize with batch statistics there."""
    _check_input_count(model, data, where)
    count = 0
    with (
        frozen_moving_statistics(model),
        recording_batchnorm_inputs(model, spread) as records,
        _others_in_inference_mode(model),
    ):
        state = [(v, v.numpy()) for v in _carried_state(model)]
        batches = _batches(data, batch_size, max_batches, max_samples, shuffle)
        for count, (x, size) in enumerate(batches, 1):
            try:
                if count == 1 and in_predict is not None:
                    _predict_probe(model, x, records, state, in_predict)
                for calls in records.values():
                    calls.clear()
                _training_pass(model, x, count, where)
            finally:  # every batch from the same state (renorm's too), after an error as well
                for variable, value in state:
                    variable.assign(value)
            _check_received(records, count, where)
            yield count, size, {p: list(c) for p, c in records.items() if c}
    if count == 0:
        raise ValueError(f"{where}: {_EMPTY}")


def _carried_state(model) -> list:
    """Every variable a forward pass can change: the non-trainable variables (moving statistics,
    seed generators) and the states stateful RNN layers carry, which Keras lists in neither
    ``model.variables`` nor ``non_trainable_variables``."""
    variables = list(model.non_trainable_variables)
    seen = {id(v) for v in variables}
    for layer in model._flatten_layers(include_self=True):
        for state in getattr(layer, "states", None) or ():
            if isinstance(state, keras.Variable) and id(state) not in seen:
                variables.append(state)
                seen.add(id(state))
    return variables


def _predict_probe(model, x, records, state, in_predict: set) -> None:
    """Calls ``model`` on ``x`` as ``predict`` does and adds to ``in_predict`` the layers that
    normalized with batch statistics there (called with ``training=True`` by the model's own
    code); the state is restored."""
    for calls in records.values():
        calls.clear()
    _fit_call(model, x, training=False)
    in_predict.update(p for p, calls in records.items() if any(m.training for m in calls))
    for variable, value in state:
        variable.assign(value)


def _fit_call(model, x, training: bool = True) -> None:
    """Calls ``model`` on ``x`` as ``fit`` does (``training=False``: as ``predict`` does): with
    ``training`` where its ``call`` takes a ``training`` argument, else without (its layers then
    run in inference mode, as in ``fit``)."""
    if _training_position(model) is None:
        model(x)
    else:
        model(x, training=training)


def _check_input_count(model, data, where: str) -> None:
    """``ValueError`` for a list or tuple of arrays that is not one array per model input (a
    list of batches would be read as that many inputs)."""
    inputs = getattr(model, "inputs", None)
    if not isinstance(data, (list, tuple)) or not inputs or len(data) == len(inputs):
        return
    if all(isinstance(a, np.ndarray) or keras.ops.is_tensor(a) for a in data):
        raise ValueError(
            f"{where}: a {type(data).__name__} of {len(data)} arrays is read as one array per "
            f"input, and the model takes {len(inputs)}: pass one array (cut into batches of "
            "batch_size), a tf.data.Dataset or a generator of batches"
        )


def _training_pass(model, x, count: int, where: str) -> None:
    """A pass as ``fit`` makes it (``_fit_call``); the first batch's failure explained as unfit
    data."""
    try:
        _fit_call(model, x)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
        if count > 1:
            raise
        expected = ""
        if getattr(model, "inputs", None):
            expected = f"; it takes {_describe(model.inputs)} (None: any size)"
        raise ValueError(
            f"{where}: the model cannot take this data (a batch of shape "
            f"{_describe(x)}{expected}; batch a tf.data.Dataset, several "
            f"inputs as a list or dict): {type(error).__name__}: "
            f"{' '.join(str(error).split())[:600]}"
        ) from error


def _check_received(records: dict, count: int, where: str) -> None:
    """``ValueError`` if a layer received non-finite values or normalized one value a channel."""
    for path, calls in records.items():
        for moments in calls:
            if moments.count == 0:
                raise ValueError(
                    f"{where}: batch {count} (counting from 1): layer {path!r} received no "
                    "value its mask keeps (a batch whose mask is all False): leave such "
                    "batches out of the data. No statistic was changed"
                )
            if not (np.isfinite(moments.mean).all() and np.isfinite(moments.var).all()):
                raise ValueError(
                    f"{where}: batch {count} (counting from 1): layer {path!r} received "
                    "non-finite values (NaN or Inf); check that batch of the data and "
                    "the layers before it. No statistic was changed"
                )
            if moments.training and moments.count == 1:
                raise ValueError(
                    f"{where}: batch {count}: layer {path!r} normalized one "
                    "value per channel (variance 0, output beta): every batch needs 2+ "
                    "samples; with arrays, choose batch_size or max_samples so that the "
                    "last batch is not a single sample. No statistic was changed"
                )


def _never_updated(layer) -> bool:
    """Whether the moving statistics are still exactly their start values 0 and 1."""
    return bool(
        np.all(layer.moving_mean.numpy() == 0) and np.all(layer.moving_variance.numpy() == 1)
    )


# --- Diagnosis -------------------------------------------------------------------------------
@dataclass
class LayerGap:
    """One row of `diagnose_batchnorm`: a layer's moving statistics against `fit`'s.

    Statistics are medians over the layer's channels. A gap's noise is its standard error from
    sampling: how far it would scatter on a healthy model whose moving statistics converged.

    Args:
        index: The row's number, from 0.
        name: The layer's path (`named_batchnorm_layers`).
        channels: The number of channels.
        batch_var: The variance `fit`'s batches give, averaged over the batches.
        moving_var: The moving variance `predict` normalizes with.
        shift: `|moving_mean - batch mean|` in batch standard deviations.
        log_var_gap: `|log_variance_ratio(moving_var, batch_var)|`.
        noise_shift: The standard error of `shift`.
        noise_log_var: The standard error of `log_var_gap`.
        flagged: Whether the layer is beyond the tolerances (see `verdict`).
        samples: The samples the row rests on.
        batches: The batches they came in.
        frozen: The layer runs in inference mode in `fit` too (`trainable=False`, or called with
            `training=False`).
        never_updated: The moving statistics are still exactly 0 and 1.
        finite: No NaN or Inf in the moving statistics, `gamma`, `beta` or what it received.
        negative_var: A moving variance below 0 (written from outside).
        var_ratio: The median of `(moving var + eps) / (var + eps)`: 1 is right.
        channels_off: The channels beyond twice their threshold (a tenth of them flags).
        batch_statistics_in_predict: The model's own code calls the layer with `training=True`,
            so `predict` normalizes with batch statistics too (pix2pix does this): its moving
            statistics are not used, and it is never flagged.

    Attributes:
        in_fit: `"frozen"` (inference mode in `fit` too) or `"trains"`.
        verdict: `"not finite"`, `"batch statistics in predict"`, `"negative variance"`,
            `"ok"`, `"frozen, stale"`, `"never updated"` or `"mismatch"`.

    Example:

    ```python
    for row in diagnose_batchnorm(model, x_train):
        print(row.name, row.in_fit, row.verdict)
    ```
    """

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
    batch_statistics_in_predict: bool = False  # the model calls it with training=True always

    @property
    def in_fit(self) -> str:
        """`"frozen"` (inference mode in `fit` too) or `"trains"`."""
        return "frozen" if self.frozen else "trains"

    @property
    def verdict(self) -> str:
        """The layer's verdict, the first that applies.

        - `"not finite"`: NaN or Inf in the moving statistics, `gamma` or `beta`;
        - `"batch statistics in predict"`: the model's code calls the layer with
          `training=True`, so `predict` normalizes as `fit` does (right only for a network
          trained to be served that way, such as pix2pix's batches of one);
        - `"negative variance"`: a moving variance below 0: `predict` gives NaN;
        - `"ok"`: within the tolerances;
        - `"frozen, stale"`: inference mode in `fit` too, so no fit/predict difference;
        - `"never updated"`: moving statistics still exactly 0 and 1;
        - `"mismatch"`: the layer trains in `fit`, and `predict` normalizes differently.
        """
        if not self.finite:
            return "not finite"
        if self.batch_statistics_in_predict:
            return "batch statistics in predict"
        if self.negative_var:
            return "negative variance"
        if not self.flagged:
            return "ok"
        if self.frozen:
            return "frozen, stale"
        if self.never_updated:
            return "never updated"
        return "mismatch"


def diagnose_batchnorm(
    model,
    data,
    *,
    shift_tol: float = 0.2,
    ratio_tol: float = 1.5,
    batch_size: int = 32,
    max_samples: int = 1024,
    max_batches: int | None = None,
    noise: float = 2.0,
    shuffle: bool = True,
) -> list[LayerGap]:
    """Compares each BatchNormalization layer's moving statistics with those of `fit`'s batches.

    The data goes through the model in batches as `fit` makes them (training mode for the
    BatchNormalization layers, every other layer in inference mode), each from the same state;
    the model is left exactly as it was. A layer is flagged only when its gap exceeds both a
    fixed tolerance (`shift_tol`, `ratio_tol`) and `noise` times the gap's standard error from
    sampling: one training batch's scatter (between its samples and between batches, widened by
    Student's t when few samples estimate it) times `sqrt(1/k + (1-m)/(1+m))`, since the
    reference is a mean over the `k` batches given and a converged moving average with momentum
    `m` keeps a share `(1-m)/(1+m)` of one batch's variance. A layer is also flagged when a
    tenth of its channels or more lie beyond twice that threshold, so that a few badly off
    channels cannot hide behind the median.

    Give it training data, about a thousand samples (the default `max_samples`): with a handful
    the scatter is wide and only gross gaps are flagged. Known limit: a single batch of 2-4
    samples all of one class can be flagged on a healthy model, because the spread inside that
    batch misses the variance between classes; pass several shuffled batches.

    A layer called both in `fit`'s mode and with `training=False` is judged on `fit`'s calls. A
    layer called several times per pass (shared by two branches, or inside `TimeDistributed`) is
    judged call by call, and its row shows the worst call. A subclass of BatchNormalization is
    judged on what its base layer receives. Dropout or noise before a layer is off here, as in
    `predict`, while the moving statistics were collected with it on: that variance shift is a
    real fit/predict difference, shown as `"mismatch"`, which recalibration removes.

    Args:
        model: A built Keras model or layer holding BatchNormalization layers.
        data: What you feed `fit`: NumPy arrays (a list or dict of them for several inputs), a
            `tf.data.Dataset`, a generator or a `keras.utils.PyDataset` yielding `x`, `(x, y)`
            or `(x, y, sample_weight)`; labels and weights are ignored. Arrays are shuffled
            (see `shuffle`); other data is read in its own order, so shuffle it as `fit` reads
            it.
        shift_tol: The tolerated shift of the moving mean, in batch standard deviations (>= 0).
        ratio_tol: The tolerated factor between moving and batch variance (>= 1).
        batch_size: The batch size you train with (an integer): every layer after the first
            sees inputs normalized with their batch's statistics. Arrays are cut into batches
            of this size; other data keeps its own batches.
        max_samples: Stop after this many samples. From arrays it takes a random subset, the
            same on every call; from other data, the first samples. A cut that would leave a
            last batch of one sample drops it.
        max_batches: Stop after this many batches (`None`: no limit).
        noise: How many standard errors a gap must exceed (>= 0).
        shuffle: Shuffle arrays before cutting them into batches, as `fit` does, in the same
            order on every call (NumPy's `default_rng(0)`), so that arrays sorted by class give
            batches of every class. `False` keeps the given order (for arrays you arranged in
            batches yourself). Arrays that fit in one batch keep their order: a batch's
            statistics do not depend on it.

    Returns:
        A list of `LayerGap`, one per BatchNormalization layer the data reached, in the order of
        the layer tree.

    Raises:
        TypeError: `model` is not a Keras model or layer; a count is not an integer; `shuffle`
            is not a bool; the data is of a kind it cannot read.
        ValueError: a tolerance is out of range; the model is not built or has no
            BatchNormalization layer; the data is empty, of another shape than the model takes,
            of fewer than 2 samples, reaches no BatchNormalization layer, or gives a layer
            non-finite values or one value per channel; an infinite dataset without
            `max_batches` or `max_samples`.
        RuntimeError: the model runs in a traced graph (compile with `run_eagerly=True`).

    Example:

    ```python
    rows = diagnose_batchnorm(model, x_train, batch_size=32)
    flagged = [row.name for row in rows if row.flagged]
    ```
    """
    _check_tolerances(shift_tol, ratio_tol, noise)
    _check_counts(False, batch_size=batch_size)
    layers = _built(model, "diagnose")
    calls, samples, batches, in_predict = {}, 0, 0, set()
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle={shuffle!r}: True or False")
    passes = _passes(
        model,
        data,
        batch_size,
        max_batches,
        max_samples,
        "diagnose_batchnorm",
        spread=True,
        shuffle=shuffle,
        in_predict=in_predict,
    )
    for number, size, records in passes:
        samples, batches = samples + size, number
        for path, moments in records.items():  # per pass, fit's calls if any
            calls.setdefault(path, []).append([m for m in moments if m.training] or moments)
    if samples < 2:
        raise ValueError("diagnose_batchnorm: pass 2+ samples, to tell a gap from sampling noise")
    if not calls:
        raise ValueError("diagnose_batchnorm: the data reached no BatchNormalization layer")
    rows = []
    for path, layer in layers.items():
        if path not in calls:
            continue
        fields = _worst_call(layer, calls[path], shift_tol, ratio_tol, noise)
        if path in in_predict:  # predict normalizes as fit does: no gap to flag
            fields["flagged"] = False
        row = LayerGap(
            index=len(rows),
            name=path,
            samples=samples,
            batches=batches,
            never_updated=_never_updated(layer),
            batch_statistics_in_predict=path in in_predict,
            **fields,
        )
        rows.append(row)
    return rows


def _check_tolerances(shift_tol, ratio_tol, noise) -> None:
    """``ValueError`` unless ``ratio_tol >= 1``, ``shift_tol, noise >= 0``, all finite numbers."""
    numbers = all(isinstance(t, (int, float, np.number)) for t in (ratio_tol, shift_tol, noise))
    if not (
        numbers and 1 <= ratio_tol < np.inf and 0 <= shift_tol < np.inf and 0 <= noise < np.inf
    ):
        raise ValueError(
            f"ratio_tol={ratio_tol} must be >= 1, shift_tol={shift_tol} and "
            f"noise={noise} >= 0, all finite"
        )


def _worst_call(layer, passes: list[list[Moments]], shift_tol, ratio_tol, noise) -> dict:
    """``LayerGap`` fields of a layer's worst call, from its calls in each pass.

    A layer called ``k`` times a pass (shared, ``TimeDistributed``) is judged call by call;
    where passes called it a different number of times, on all calls together.
    """
    k = len(passes[0])
    if {len(c) for c in passes} == {k}:
        groups = [[c[j] for c in passes] for j in range(k)]
    else:
        groups = [list(itertools.chain.from_iterable(passes))]
    judged = [_judge(layer, seen, shift_tol, ratio_tol, noise) for seen in groups]
    fields, _ = max(judged, key=lambda j: (j[0]["flagged"], j[1]))  # the worst call
    return fields


def _judge(layer, seen, shift_tol, ratio_tol, noise) -> tuple[dict, float]:
    """``LayerGap`` fields and a score (> 1: beyond the thresholds): the moving statistics
    against the mean of the ``seen`` calls' moments, as ``diagnose_batchnorm`` judges them."""
    mean, var = (np.mean([getattr(m, k) for m in seen], axis=0) for k in ("mean", "var"))
    moving_mean, moving_var = (
        np.asarray(v.numpy(), np.float64) for v in (layer.moving_mean, layer.moving_variance)
    )
    eps = float(layer.epsilon)
    per_channel = _per_channel_gaps(layer, seen, mean, var, moving_mean, moving_var, eps)
    med = {k: float(np.median(v)) for k, v in per_channel.items()}
    weights = [w.numpy() for w in (layer.gamma, layer.beta) if w is not None]
    finite = all(np.isfinite(a).all() for a in [moving_mean, moving_var, mean, var, *weights])
    excess, score = _excess_and_score(per_channel, med, shift_tol, ratio_tol, noise)
    negative = bool(np.any(moving_var < 0))  # written from outside: predict gives NaN
    fields = dict(
        med,
        channels=len(mean),
        finite=bool(finite),
        negative_var=negative,
        var_ratio=float(np.median(np.exp(log_variance_ratio(moving_var, var, eps)))),
        flagged=bool(score > 1 or not finite or negative),
        channels_off=int(np.sum(excess > 2)),
        frozen=all(m.training is False for m in seen) or not layer.trainable,
    )
    return fields, float(np.nan_to_num(score, nan=np.inf))


def _scatter(seen: list[Moments], name: str):
    """One batch's standard error of the moment ``name`` (``"mean"``, ``"var"``) per channel:
    within a batch or between batches, the larger. Batches of one sample have no spread
    within: then the scatter between batches, widened by Student's t for the few batches that
    estimate it (``inf`` with a single batch, which ``diagnose_batchnorm`` refuses)."""
    within = [getattr(m, f"{name}_se") for m in seen if getattr(m, f"{name}_se") is not None]
    values = [getattr(m, name) for m in seen]
    if within:
        scatter = np.sqrt(np.mean(np.square(within), axis=0))
        if len(seen) > 1:
            scatter = np.maximum(scatter, np.std(values, axis=0, ddof=1))
        return scatter
    if len(seen) == 1:
        return np.full_like(np.asarray(values[0], np.float64), np.inf)
    widen = _T975.get(len(seen) - 1, 1.96 + 2.4 / (len(seen) - 1)) / 1.96
    return widen * np.std(values, axis=0, ddof=1)


def _per_channel_gaps(layer, seen, mean, var, moving_mean, moving_var, eps) -> dict:
    """Per channel: the statistics, the gaps and their standard errors.

    The gap's standard error is one batch's scatter over the ``len(seen)`` calls averaged,
    plus the share ``(1 - m) / (1 + m)`` a moving average with momentum ``m`` keeps.
    """
    std = np.sqrt(var + eps)
    widen = np.sqrt(1 / len(seen) + (1 - layer.momentum) / (1 + layer.momentum))
    return {
        "batch_var": var,
        "moving_var": moving_var,
        "shift": np.abs(moving_mean - mean) / std,
        "log_var_gap": np.abs(log_variance_ratio(moving_var, var, eps)),
        "noise_shift": widen * _scatter(seen, "mean") / std,
        "noise_log_var": widen * _scatter(seen, "var") / (var + eps),
    }


def _excess_and_score(per_channel, med, shift_tol, ratio_tol, noise):
    """Each channel's gap in times its threshold, and the layer's score (> 1: flagged)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shift_excess = per_channel["shift"] / np.maximum(
            shift_tol, noise * per_channel["noise_shift"]
        )
        var_excess = per_channel["log_var_gap"] / np.maximum(
            np.log(ratio_tol), noise * per_channel["noise_log_var"]
        )
        excess = np.nan_to_num(np.maximum(shift_excess, var_excess))
        median_shift = np.float64(med["shift"]) / max(shift_tol, noise * med["noise_shift"])
        median_var = np.float64(med["log_var_gap"]) / max(
            np.log(ratio_tol), noise * med["noise_log_var"]
        )
        far_off = np.quantile(excess, 0.9) / 2  # a tenth of the channels far off
        score = max(median_shift, median_var, far_off)
    return excess, score


# --- Tables ----------------------------------------------------------------------------------
class _Bold(str):
    """A table cell ``_html_table`` shows in bold."""


class _HtmlText:
    """An HTML table where IPython is not installed: ``data`` holds it, Jupyter shows it."""

    def __init__(self, data: str):
        self.data = data

    def _repr_html_(self) -> str:
        return self.data


def _html_table(header: list, rows: list, caption: str = ""):
    """An ``IPython.display.HTML`` table (floats to 3 significant digits, ``_Bold`` cells in bold);
    rows not lists of the header's length: ``TypeError`` / ``ValueError``."""
    try:
        from IPython.display import HTML
    except ImportError:  # outside Jupyter: the same text, shown by anything that reads it
        HTML = _HtmlText
    if not isinstance(header, (list, tuple)) or not isinstance(rows, (list, tuple)):
        raise TypeError("html_table(header, rows): both must be lists (rows: a list of lists)")
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise TypeError(
                f"row {i} must be a list of {len(header)} cells, got {type(row).__name__}"
            )
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells; the header has {len(header)}")
    lines = ["<table>"]
    if caption:
        lines.append(f"<caption>{html.escape(caption)}</caption>")
    lines.append("<tr>" + "".join(_html_cell(h, "th") for h in header) + "</tr>")
    lines += ["<tr>" + "".join(_html_cell(v, "td") for v in row) + "</tr>" for row in rows]
    return HTML("\n".join([*lines, "</table>"]))


def _html_cell(value, tag: str) -> str:
    """One cell: floats to 3 significant digits, escaped, ``_Bold`` in bold."""
    if isinstance(value, (float, np.floating)):
        text = html.escape(f"{value:.3g}")
    else:
        text = html.escape(str(value))
    if isinstance(value, _Bold):
        text = f"<b>{text}</b>"
    return f"<{tag}>{text}</{tag}>"


def gaps_table_html(rows: list[LayerGap], max_rows: int | None = None):
    """Shows `diagnose_batchnorm`'s rows as an HTML table, flagged verdicts in bold.

    Columns: the row's number, layer, channels, `in fit` (trains or frozen), batch and moving
    variance, `|log ratio|` and its noise, shift and its noise, channels far off, and the
    verdict. The caption counts the flagged layers by verdict and says on how many samples and
    batches the rows rest.

    Args:
        rows: The list `diagnose_batchnorm` returned.
        max_rows: Show at most this many rows, then one that counts the rest (`None`: all).

    Returns:
        An `IPython.display.HTML` object, which Jupyter shows as a table (without IPython, an
        object whose `data` holds the HTML and `_repr_html_` returns it).

    Raises:
        TypeError: `rows` is not a list of `LayerGap`; `max_rows` is not an integer.
        ValueError: `max_rows` is below 1.

    Example:

    ```python
    display(gaps_table_html(diagnose_batchnorm(model, x_train), max_rows=20))
    ```
    """
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, LayerGap) for r in rows):
        raise TypeError(f"need the rows of utils.diagnose_batchnorm(model, x), not {type(rows)}")
    _check_counts(max_rows=max_rows)
    shown = list(rows)[:max_rows]
    body = [_gap_cells(r) for r in shown]
    if len(shown) < len(rows):
        body.append(["...", f"{len(rows) - len(shown)} more layers"] + [""] * 10)
    header = ["#", "layer", "ch", "in fit", "batch var", "moving var", "|log ratio|"]
    header += ["noise", "shift", "noise", "far off", "verdict"]
    return _html_table(header, body, _gaps_caption(rows))


def _gap_cells(r: LayerGap) -> list:
    """A ``LayerGap`` as the cells of ``gaps_table_html``'s row."""
    verdict = _Bold(r.verdict) if r.flagged else r.verdict
    return [
        r.index,
        r.name,
        r.channels,
        r.in_fit,
        r.batch_var,
        r.moving_var,
        r.log_var_gap,
        r.noise_log_var,
        r.shift,
        r.noise_shift,
        r.channels_off,
        verdict,
    ]


def _gaps_caption(rows: list[LayerGap]) -> str:
    """The caption of ``gaps_table_html``: flagged layers by verdict, and the data."""
    verdicts = [r.verdict for r in rows if r.flagged]
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
    samples = f"{rows[0].samples} samples in {rows[0].batches} batches" if rows else "no data"
    listed = f": {counts}" if counts else ""
    return (
        f"{len(verdicts)} of {len(rows)} BatchNormalization layers flagged"
        f"{listed} ({samples}). Medians over channels; noise: "
        "the gap's standard error from sampling; flagged beyond twice it and the tolerance,"
        " or when a tenth of the channels (far off) lie beyond twice that"
    )


# --- Recalibration ---------------------------------------------------------------------------
_FROZEN = "frozen (trainable=False): inference mode in fit too; include_frozen=True updates it"
_NEVER = (
    "never updated (statistics exactly 0 and 1): if it trained in inference mode (a loop "
    "without training=True), new statistics change what the weights learned: retrain; if "
    "they were never set (a cloned or rebuilt model), include_never_updated=True"
)
_UNREACHED = "the data never reached it"
_FROZEN_BY_CALL = "frozen by the model's call (training=False): inference mode in fit too"


def _check_options(
    batch_size=32,
    max_batches=None,
    max_samples=None,
    estimator="batch_mean",
    include_frozen=False,
    include_never_updated=False,
    verbose=0,
    shuffle=True,
) -> None:
    """``ValueError`` / ``TypeError`` for options ``recalibrate_batchnorm`` does not take."""
    if estimator not in ("population", "batch_mean"):
        raise ValueError(f"estimator={estimator!r}; use 'batch_mean' or 'population'")
    flags = [include_frozen, include_never_updated, shuffle]
    if not (all(isinstance(f, bool) for f in flags) and verbose in (0, 1, 2)):
        raise TypeError(
            "include_frozen, include_never_updated, shuffle: True or False; verbose: 0, 1, 2"
        )
    _check_counts(False, batch_size=batch_size)
    _check_counts(max_batches=max_batches, max_samples=max_samples)


class Recalibration(int):
    """What `recalibrate_batchnorm` did: the number of layers updated, with the details.

    It is an `int` (compares equal to the number of layers updated, prints as it) that also
    carries the details as attributes.

    Args:
        updated: The number of layers whose moving statistics were written.
        statistics: A dict `path -> Moments` of what was written.
        skipped: The paths of the layers left alone.
        reasons: A dict `path -> why` for each skipped layer.
        samples: The samples read (in the last pass).
        batches: The batches they came in.
        estimator: `"batch_mean"` or `"population"`.
        seconds: The time it took.

    Example:

    ```python
    result = recalibrate_batchnorm(model, x_train)
    result == 3, result.skipped, result.reasons  # (True, [...], {...})
    ```
    """

    statistics: dict[str, Moments]
    skipped: list[str]
    reasons: dict[str, str]
    samples: int
    batches: int
    estimator: str
    seconds: float

    def __new__(
        cls,
        updated: int = 0,
        *,
        statistics: dict[str, Moments] | None = None,
        skipped: list[str] | None = None,
        reasons: dict[str, str] | None = None,
        samples: int = 0,
        batches: int = 0,
        estimator: str = "batch_mean",
        seconds: float = 0.0,
    ) -> Recalibration:
        self = super().__new__(cls, updated)
        self.statistics = {} if statistics is None else statistics
        self.skipped = [] if skipped is None else skipped
        self.reasons = {} if reasons is None else reasons
        self.samples = samples
        self.batches = batches
        self.estimator = estimator
        self.seconds = seconds
        return self

    def __repr__(self) -> str:
        return (
            f"Recalibration({int(self)} layers updated from {self.samples} samples in "
            f"{self.batches} batches, estimator={self.estimator!r}, "
            f"{len(self.skipped)} skipped)"
        )

    __str__ = int.__repr__


def recalibrate_batchnorm(
    model,
    data,
    batch_size: int = 32,
    *,
    max_batches: int | None = None,
    max_samples: int | None = None,
    estimator: str = "batch_mean",
    include_frozen: bool = False,
    include_never_updated: bool = False,
    verbose: int = 0,
    shuffle: bool = True,
) -> Recalibration:
    """Sets the moving statistics to those of `data` in `fit`'s batches (PreciseBN).

    The weights are left alone. The BatchNormalization layers run as in `fit` (each earlier
    layer normalizing with its batch's statistics) and every other layer in inference mode:
    dropout, noise and augmentation layers inside the model are off, so each layer's statistics
    describe what it receives in `fit`'s batches with dropout off (unless a custom layer holds
    BatchNormalization layers and adds noise of its own in training: that noise stays on). With
    `renorm=True` layers, whose moving averages shape what later layers receive in `fit`, it
    makes one pass more per renorm layer, so that every layer ends with the statistics of what
    it receives.

    Recalibrate on training data: either with training's augmentation, or without it and
    preprocessed as at test time. Recalibrating on the data you then score fits the statistics
    to it: judge on held-out data. Bad data loses nothing: NaN or Inf in the data, or in what any
    layer receives, stops it with an error naming the batch and the layer, and the model's
    statistics stay exactly as they were (an interrupt restores them too).

    Layers left alone, with the reason in `skipped` and `reasons`: frozen layers
    (`trainable=False`, unless `include_frozen=True`; or called with `training=False` by the
    model's `call`), layers the data never reaches, and layers whose moving statistics are still
    exactly 0 and 1, unless `include_never_updated=True`. Such a layer normalized with 0 and 1
    in training as well (a custom loop without `training=True`): retraining with
    `training=True` is the fix. The same statistics appear in a model cloned or rebuilt and then
    given trained weights (weight averaging does this): there `include_never_updated=True` is
    right.

    Args:
        model: A built Keras model or layer holding BatchNormalization layers.
        data: What you feed `fit`: NumPy arrays (a list or dict of them for several inputs), a
            `tf.data.Dataset`, a generator or a `keras.utils.PyDataset` yielding `x`, `(x, y)`
            or `(x, y, sample_weight)`; labels and weights are ignored. Arrays are shuffled
            (see `shuffle`); other data is read in its own order, so shuffle it as `fit` reads
            it. An infinite `tf.data.Dataset` or `PyDataset` needs `max_batches` or
            `max_samples`; an endless generator is read until they stop it.
        batch_size: The batch size you train with (an integer; under a distribution strategy,
            the per-replica batch unless your layers use `synchronized=True`). Arrays are cut
            into batches of this size; other data keeps its own batches.
        max_batches: Stop after this many batches (`None`: no limit).
        max_samples: Stop after this many samples. From arrays it takes a random subset, the
            same on every call (NumPy's `default_rng(0)`); from other data, the first samples.
            A cut that would leave a last batch of one sample drops it.
        estimator: `"batch_mean"` (the mean of the batches' means and biased variances: where
            `fit`'s moving average settles with the weights fixed, and what
            `diagnose_batchnorm` compares with, so that a layer just recalibrated with the same
            data and batch size is not flagged) or `"population"` (the pooled moments of
            everything seen). The pooled variance is larger by the variance of the batch means:
            for a layer whose inputs are independent across samples (the first
            BatchNormalization layer after a dense layer) about `1/(batch_size - 1)` of it, so
            at batch sizes 2 or 3 the diagnostic can flag such a layer recalibrated with
            `"population"`; after earlier BatchNormalization layers far less.
        include_frozen: Also update layers with `trainable=False`.
        include_never_updated: Also update layers whose statistics are still exactly 0 and 1.
        verbose: 0 (silent), 1 (a progress bar) or 2 (one line).
        shuffle: Shuffle arrays before cutting them into batches, as `fit` does, in the same
            order on every call (NumPy's `default_rng(0)`), so that arrays sorted by class give
            batches of every class. `False` keeps the given order (for arrays you arranged in
            batches yourself). Arrays that fit in one batch keep their order: a batch's
            statistics do not depend on it.

    Returns:
        A `Recalibration`: the number of layers updated, with `statistics`, `skipped`,
        `reasons`, `samples`, `batches`, `estimator` and `seconds`.

    Raises:
        TypeError: `model` is not a Keras model or layer; a count is not an integer; a flag is
            not a bool; the data is of a kind it cannot read.
        ValueError: an unknown estimator; the model is not built or has no layer to
            recalibrate; the data is empty, of another shape than the model takes, or gives a
            layer non-finite values or one value per channel; an infinite dataset without
            `max_batches` or `max_samples`. Nothing is changed.
        RuntimeError: the model runs in a traced graph (compile with `run_eagerly=True`).

    Example:

    ```python
    result = recalibrate_batchnorm(model, x_train, batch_size=32, verbose=1)
    print(result.skipped, result.reasons)
    model.evaluate(x_test, y_test)
    ```
    """
    _check_options(
        batch_size,
        max_batches,
        max_samples,
        estimator,
        include_frozen,
        include_never_updated,
        verbose,
        shuffle,
    )
    started, named = time.perf_counter(), _built(model, "recalibrate")
    reasons = _left_alone(named, include_frozen, include_never_updated)
    targets = {p: layer for p, layer in named.items() if p not in reasons}
    if not targets:
        raise ValueError("no BatchNormalization layer to recalibrate: " + _first_reasons(reasons))
    thawed = [layer for layer in targets.values() if not layer.trainable]
    total = _expected_batches(data, batch_size, max_batches, max_samples)
    saved = [(v, v.numpy()) for layer in targets.values() for v in layer.non_trainable_variables]
    renorm_layers = [layer for layer in targets.values() if getattr(layer, "renorm", False)]
    rounds = 1 + len(renorm_layers)
    if rounds > 1 and hasattr(data, "__next__"):
        raise ValueError(
            f"recalibrate_batchnorm: {len(renorm_layers)} renorm layer(s) need {rounds} passes "
            "over the data, and a generator or iterator can be read once: pass arrays, a "
            "tf.data.Dataset or a PyDataset"
        )
    reading = dict(
        batch_size=batch_size, max_batches=max_batches, max_samples=max_samples, shuffle=shuffle
    )
    try:  # renorm's statistics shape what later layers receive in fit: a pass per renorm layer
        for layer in thawed:
            layer.trainable = True
        for _ in range(rounds):
            progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
            written, samples, batches = _recalibrate_once(
                model, data, reading, targets, reasons, estimator, progress
            )
    except BaseException:  # an error or an interrupt: nothing changed
        for variable, value in saved:
            variable.assign(value)
        raise
    finally:
        for layer in thawed:
            layer.trainable = False
    return Recalibration(
        len(written),
        statistics=written,
        skipped=list(reasons),
        reasons=reasons,
        samples=samples,
        batches=batches,
        estimator=estimator,
        seconds=time.perf_counter() - started,
    )


def _left_alone(named: dict, include_frozen: bool, include_never_updated: bool) -> dict:
    """``path -> reason`` for the layers a recalibration leaves alone before reading data."""
    reasons = {p: _FROZEN for p, layer in named.items() if not (layer.trainable or include_frozen)}
    if not include_never_updated:
        for path, layer in named.items():
            if path not in reasons and _never_updated(layer):
                reasons[path] = _NEVER
    return reasons


def _first_reasons(reasons: dict) -> str:
    """The first three ``path: reason`` pairs, for an error message."""
    return "; ".join(f"{p!r}: {why}" for p, why in list(reasons.items())[:3])


def _expected_batches(data, batch_size, max_batches, max_samples):
    """The progress bar's target: the batches arrays, a sized dataset or a PyDataset give
    (``None``: unknown)."""
    known = None
    leaves = keras.tree.flatten(data) if isinstance(data, (np.ndarray, list, tuple, dict)) else []
    if leaves and all(isinstance(a, np.ndarray) and a.ndim for a in leaves):
        step = int(batch_size)
        samples = _size(data)
        if max_samples is not None and samples > max_samples:
            samples = _subset_size(int(max_samples), step)
        known = -(-samples // step)
    elif (
        max_samples is not None
    ):  # batches of the data's own sizes: where the cut falls is unknown
        known = None
    elif isinstance(data, tf.data.Dataset) and int(data.cardinality()) >= 0:
        known = int(data.cardinality())
    elif isinstance(data, keras.utils.PyDataset) and data.num_batches is not None:
        known = data.num_batches
    if known is None:
        return max_batches
    return min(known, max_batches or known)


def _recalibrate_once(model, data, reading, targets, reasons, estimator, progress):
    """One pass over ``data`` that writes the ``targets``' moving statistics.

    Adds to ``reasons`` the layers no batch statistic reached. Returns ``(path -> Moments
    written, samples, batches)``.
    """
    per_call = {path: [] for path in targets}
    reached, samples, batches = set(), 0, 0
    passes = _passes(model, data, **reading, where="recalibrate_batchnorm")
    for batches, size, records in passes:
        reached.update(records)
        for path in per_call:
            per_call[path] += [m for m in records.get(path, ()) if m.training]
        samples += size
        progress.update(batches)
    for path, calls in per_call.items():
        if not calls:
            reasons[path] = _FROZEN_BY_CALL if path in reached else _UNREACHED
    written = {p: _estimate(c, estimator) for p, c in per_call.items() if c}
    if not written:
        raise ValueError(
            "nothing to recalibrate, no layer normalized with batch statistics: "
            + _first_reasons(reasons)
        )
    for path, moments in written.items():
        _assign_moving(targets[path], moments.mean, moments.var)
    return written, samples, batches


def _estimate(calls: list[Moments], estimator: str) -> Moments:
    """The moments to write: pooled (``"population"``) or the mean of the batches'."""
    if estimator == "population":
        return _pooled(calls)
    mean = np.mean([m.mean for m in calls], axis=0)
    var = np.mean([m.var for m in calls], axis=0)
    return Moments(mean, var, sum(m.count for m in calls), True)


class PreciseBN(keras.callbacks.Callback):
    """Callback that recalibrates the BatchNormalization layers during `fit`.

    Before each validation pass (or at each epoch's end, without validation) it calls
    `recalibrate_batchnorm` on `data`, so that validation metrics, checkpoints and early
    stopping judge the weights, not the moving average's lag. List it before those callbacks.
    It reads the data every epoch: pass arrays, a `tf.data.Dataset` or a `PyDataset`, not a
    generator. Under a distribution strategy it calls the model directly, not per replica: give
    it the per-replica batch size (the global one if your layers use `synchronized=True`).

    Args:
        data: Training data, as for `recalibrate_batchnorm` (not a generator or iterator).
        max_samples: The samples each recalibration reads.
        batch_size: The batch size you train with.
        **options: Other options of `recalibrate_batchnorm` (`max_batches`, `estimator`,
            `include_frozen`, `include_never_updated`, `verbose`, `shuffle`).

    Attributes:
        results: The `Recalibration` of each recalibration, in order.

    Raises:
        TypeError: `data` is a generator or iterator; an option is not one
            `recalibrate_batchnorm` takes, or of the wrong type.
        ValueError: an option is out of range; the data is empty; when training starts, no
            BatchNormalization layer it would recalibrate.

    Example:

    ```python
    model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        callbacks=[PreciseBN(x_train, max_samples=1024, batch_size=32), checkpoint],
    )
    ```
    """

    def __init__(self, data, max_samples: int = 1024, batch_size: int = 32, **options):
        super().__init__()
        if hasattr(data, "__next__"):  # generators and iterators
            raise TypeError(
                "PreciseBN reads the data every epoch; a generator is used up after "
                "one pass: pass arrays, a tf.data.Dataset or a PyDataset"
            )
        self.options = dict(options, max_samples=max_samples, batch_size=batch_size)
        try:  # bad options and data fail here, not after an epoch of training
            _check_options(**self.options)
            if next(_batches(data, batch_size, max_batches=1), None) is None:
                raise ValueError(f"PreciseBN: {_EMPTY}")
        except TypeError as error:
            raise TypeError(f"PreciseBN takes recalibrate_batchnorm's options: {error}") from None
        self.data = data
        self.results = []
        self._in_fit = False
        self._done = False

    def _recalibrate(self):
        self.results.append(recalibrate_batchnorm(self.model, self.data, **self.options))
        self._done = True

    def on_train_begin(self, logs=None):
        _check_input_count(self.model, self.data, "PreciseBN")  # (x, y) for a one-input model
        if getattr(self.model, "built", False):  # nothing to recalibrate: say so before training
            frozen = self.options.get("include_frozen", False)
            if not any(layer.trainable or frozen for layer in batchnorm_layers(self.model)):
                raise ValueError(
                    "PreciseBN: no BatchNormalization layer it would recalibrate "
                    "(none, or all frozen: include_frozen=True updates those)"
                )
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
