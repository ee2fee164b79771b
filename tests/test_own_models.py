"""BatchNormalization helpers of ``utils.py`` on models and data pipelines of one's own.

Every case is a small model; the expected statistics are computed with NumPy from
the layer's actual input, captured by calling the sub-layers by hand or with a
``keras.Model`` sub-model, never with the helper under test.

Most models here are fresh, never trained: their moving statistics are still Keras's start
values (0 and 1), which ``recalibrate_batchnorm`` leaves alone by default. Those tests
recalibrate them on purpose, so they pass ``include_never_updated=True`` (``NEVER``).
"""

import functools

import numpy as np
import pytest

import utils
from utils import keras, tf

# Tests of what the toolkit computes on given batches: the arrays in their order (no shuffling)
# and the pooled estimate, as those tests' NumPy references compute them. The shuffled order and
# the default estimator have tests of their own.
recalibrate_in_order = functools.partial(
    utils.recalibrate_batchnorm, shuffle=False, estimator="population"
)
diagnose_in_order = functools.partial(utils.diagnose_batchnorm, shuffle=False)


EPS = 1e-3  # Keras's default BatchNormalization epsilon
# The model is untrained on purpose: recalibrate its start values (0 and 1) all the same.
NEVER = {"include_never_updated": True}


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def _moments(values, axes):
    values = np.asarray(values, dtype=np.float64)
    return values.mean(axis=axes), values.var(axis=axes)


def _normalize(values, axes, gamma, beta, eps=EPS):
    """Training-mode BatchNormalization in NumPy (batch statistics)."""
    mean, var = _moments(values, axes)
    return (values - mean) / np.sqrt(var + eps) * gamma + beta


def _data(n=100, features=8, seed=1, loc=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    x = (loc + scale * rng.standard_normal((n, features))).astype(np.float32)
    y = rng.standard_normal((n, 1)).astype(np.float32)
    return x, y


class Block(keras.layers.Layer):
    """Dense(16) then BatchNormalization, created in __init__ and called in call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(16, name="dense")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def _block_model():
    model = keras.Sequential(
        [keras.Input((8,)), Block(name="block"), keras.layers.Dense(1, name="out")], name="seq"
    )
    return model, model.get_layer("block")


def _block_input(block, x):
    return _np(block.dense(x))


# ---------------------------------------------------------------------------
# Finding the layers
# ---------------------------------------------------------------------------


def test_custom_layer_is_found_and_recalibrated():
    model, block = _block_model()
    assert utils.batchnorm_layers(model) == [block.bn]
    assert list(utils.named_batchnorm_layers(model)) == ["block/bn"]
    assert list(utils.moving_statistics(model)) == ["block/bn"]
    x, _ = _data()
    mean, var = _moments(_block_input(block, x), 0)

    rows = utils.diagnose_batchnorm(model, x)
    assert [r.name for r in rows] == ["block/bn"] and rows[0].verdict == "never updated"
    with pytest.raises(ValueError, match="include_never_updated"):
        utils.recalibrate_batchnorm(model, x, batch_size=100)  # left alone by default
    n = utils.recalibrate_batchnorm(model, x, batch_size=100, **NEVER)
    assert n == 1 and list(n.statistics) == ["block/bn"]
    np.testing.assert_allclose(block.bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(block.bn.moving_variance.numpy(), var, rtol=1e-5)
    assert utils.diagnose_batchnorm(model, x)[0].verdict == "ok"


class ListBlock(keras.layers.Layer):
    """Dense(4), then two BatchNormalization layers kept in a list."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name="dense")
        self.norms = [
            keras.layers.BatchNormalization(name="bn_a", gamma_initializer="ones"),
            keras.layers.BatchNormalization(name="bn_b"),
        ]

    def call(self, x, training=None):
        x = self.dense(x)
        for norm in self.norms:
            x = norm(x, training=training)
        return x


def test_list_of_layers_and_batch_size_dependence():
    model = keras.Sequential([keras.Input((8,)), ListBlock(name="lb"), keras.layers.Dense(1)])
    block = model.layers[0]
    block.norms[0].beta.assign([0.5, -1.0, 2.0, 0.0])
    block.norms[0].gamma.assign([2.0, 1.0, 0.5, 3.0])
    assert list(utils.named_batchnorm_layers(model)) == ["lb/bn_a", "lb/bn_b"]
    x, _ = _data(n=40)
    h = _block_input(block, x)
    gamma, beta = block.norms[0].gamma.numpy(), block.norms[0].beta.numpy()
    # bn_b's input: bn_a normalizing each batch of 10 with that batch's statistics.
    second = np.concatenate([_normalize(h[i : i + 10], 0, gamma, beta) for i in range(0, 40, 10)])
    recalibrate_in_order(model, x, batch_size=10, **NEVER)
    np.testing.assert_allclose(block.norms[0].moving_variance.numpy(), h.var(0), rtol=1e-5)
    np.testing.assert_allclose(block.norms[1].moving_mean.numpy(), second.mean(0), atol=1e-5)
    np.testing.assert_allclose(block.norms[1].moving_variance.numpy(), second.var(0), rtol=1e-4)


def test_nested_models_with_duplicate_names_get_unique_paths():
    def branch(name):
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(3, name="d"),
                keras.layers.BatchNormalization(name="bn"),
            ],
            name=name,
        )

    inputs = keras.Input((6,))
    left, right = branch("left"), branch("right")
    merged = keras.layers.Concatenate()([left(inputs), right(inputs)])
    top = keras.layers.BatchNormalization(name="bn")(merged)
    model = keras.Model(inputs, keras.layers.Dense(1)(top))
    named = utils.named_batchnorm_layers(model)
    assert list(named) == ["left/bn", "right/bn", "bn"]
    assert named["left/bn"] is left.get_layer("bn") and named["bn"] is model.get_layer("bn")

    x, _ = _data(n=30, features=6)
    seen, _ = utils.batch_statistics(model, x)
    for name, sub in (("left", left), ("right", right)):
        mean, var = _moments(_np(sub.get_layer("d")(x)), 0)
        np.testing.assert_allclose(seen[f"{name}/bn"].mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen[f"{name}/bn"].var, var, rtol=1e-5)
    # Top-level layer: its input captured with a sub-model.
    probe = keras.Model(inputs, merged)
    np.testing.assert_allclose(seen["bn"].var, _np(probe(x, training=True)).var(0), rtol=1e-4)


class TwinBlock(keras.layers.Layer):
    """Two BatchNormalization layers given the same name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.BatchNormalization(name="norm")
        self.second = keras.layers.BatchNormalization(name="norm")

    def call(self, x, training=None):
        return self.second(self.first(x, training=training) * 3.0, training=training)


def test_same_name_twice_in_a_custom_layer_and_a_shared_layer():
    model = keras.Sequential([keras.Input((5,)), TwinBlock(name="twin")])
    assert list(utils.named_batchnorm_layers(model)) == ["twin/norm", "twin/norm#2"]

    shared = keras.layers.BatchNormalization(name="shared")
    a, b = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([a, b], keras.layers.Add()([shared(a), shared(b)]))
    assert utils.batchnorm_layers(model) == [shared]  # reachable twice, listed once
    xa, _ = _data(n=12, features=4, seed=2)
    xb, _ = _data(n=12, features=4, seed=3, loc=-1.0)
    with utils.recording_batchnorm_inputs(model) as records:
        model([xa, xb], training=False)
    assert len(records["shared"]) == 2  # one record per call
    seen, _ = utils.batch_statistics(model, [xa, xb])
    both = np.concatenate([xa, xb]).astype(np.float64)
    assert seen["shared"].count == 24
    np.testing.assert_allclose(seen["shared"].var, both.var(0), rtol=1e-5)


def test_time_distributed_wrapper():
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="bn"), name="td"),
        ]
    )
    assert list(utils.named_batchnorm_layers(model)) == ["td/bn"]
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((20, 5, 3)) * [1.0, 2.0, 3.0] + 4.0).astype(np.float32)
    result = recalibrate_in_order(model, x, batch_size=20, **NEVER)
    assert result.statistics["td/bn"].count == 20 * 5
    bn = utils.batchnorm_layers(model)[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), x.astype(np.float64).var((0, 1)), rtol=1e-4
    )


def test_masked_positions_are_left_out_as_the_layer_leaves_them_out():
    model = keras.Sequential(
        [
            keras.Input((4, 2)),
            keras.layers.Masking(0.0),
            keras.layers.BatchNormalization(name="bn"),
        ]
    )
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, (6, 4, 2)).astype(np.float32)
    x[:, 3] = 0.0  # last time step masked in every sequence
    x[0, 2] = 0.0
    kept = np.concatenate([x[0, :2], x[1:, :3].reshape(-1, 2)]).astype(np.float64)
    seen, _ = utils.batch_statistics(model, x)
    assert seen["bn"].count == len(kept) == 17
    np.testing.assert_allclose(seen["bn"].mean, kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(seen["bn"].var, kept.var(0), rtol=1e-4)


def test_channels_first_axis_1():
    model = keras.Sequential(
        [keras.Input((3, 4, 5)), keras.layers.BatchNormalization(axis=1, name="bn")]
    )
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 3, 4, 5)) * np.array([1, 2, 3])[:, None, None]).astype(np.float32)
    seen, _ = utils.batch_statistics(model, x)
    mean, var = _moments(x, (0, 2, 3))
    assert seen["bn"].count == 6 * 4 * 5
    np.testing.assert_allclose(seen["bn"].mean, mean, atol=1e-6)
    np.testing.assert_allclose(seen["bn"].var, var, rtol=1e-5)


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.dense = keras.layers.Dense(4, name="dense")
        self.bn = MyNorm(name="bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class MyNorm(keras.layers.BatchNormalization):
    """A subclass of BatchNormalization: it counts too."""


def test_subclassed_model_and_batchnorm_subclass():
    model = SubclassedNet()
    x, _ = _data(n=16)
    model(x)
    assert list(utils.named_batchnorm_layers(model)) == ["bn"]
    with utils.recording_batchnorm_inputs(model) as records:
        model(x, training=True)
    np.testing.assert_allclose(records["bn"][0].var, _np(model.dense(x)).var(0), rtol=1e-5)
    assert records["bn"][0].training is True


# ---------------------------------------------------------------------------
# Input pipelines
# ---------------------------------------------------------------------------


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, i):
        s = slice(i * self.size, (i + 1) * self.size)
        return self.x[s], self.y[s]


def _pipelines(x, y):
    w = np.ones(len(x), np.float32)

    def generator():
        for i in range(0, len(x), 32):
            yield x[i : i + 32], y[i : i + 32]

    return {
        "array": x,
        "tf.data x": tf.data.Dataset.from_tensor_slices(x).batch(32),
        "tf.data (x, y)": tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
        "tf.data (x, y, w)": tf.data.Dataset.from_tensor_slices((x, y, w)).batch(32),
        "generator": generator(),
        "PyDataset": Batches(x, y, 32),
    }


@pytest.mark.parametrize("estimator", ["population", "batch_mean"])
def test_every_pipeline_gives_the_numpy_statistics(estimator):
    model, block = _block_model()
    x, y = _data(n=100)
    h = _block_input(block, x)
    starts = range(0, 100, 32)  # batches of 32, 32, 32 and 4
    if estimator == "population":
        mean, var = h.mean(0), h.var(0)
    else:
        mean = np.mean([h[s : s + 32].mean(0) for s in starts], axis=0)
        var = np.mean([h[s : s + 32].var(0) for s in starts], axis=0)
    for kind, data in _pipelines(x, y).items():
        block.bn.moving_mean.assign(np.zeros(16, np.float32))
        result = recalibrate_in_order(model, data, estimator=estimator, **NEVER)
        assert (result.samples, result.batches, int(result)) == (100, 4, 1), kind
        np.testing.assert_allclose(
            block.bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5, err_msg=kind
        )
        np.testing.assert_allclose(block.bn.moving_variance.numpy(), var, rtol=1e-5, err_msg=kind)


def test_estimators_differ_by_the_variance_of_batch_means():
    model, block = _block_model()
    x, _ = _data(n=64)
    x[32:] += 5.0  # two batches with different means
    h = _block_input(block, x)
    pop = recalibrate_in_order(model, x, batch_size=32, **NEVER).statistics["block/bn"]
    avg = recalibrate_in_order(model, x, batch_size=32, estimator="batch_mean")
    avg = avg.statistics["block/bn"]
    batch_means = np.stack([h[:32].mean(0), h[32:].mean(0)])
    np.testing.assert_allclose(pop.mean, avg.mean, rtol=1e-5, atol=1e-6)  # equal batches
    np.testing.assert_allclose(pop.var - avg.var, batch_means.var(0), rtol=1e-4, atol=1e-6)
    one = recalibrate_in_order(model, x, batch_size=64, estimator="batch_mean")
    np.testing.assert_allclose(one.statistics["block/bn"].var, pop.var, rtol=1e-6)


def test_limits_and_progress_bar(capsys):
    model, block = _block_model()
    x, _ = _data(n=100)
    h = _block_input(block, x)
    result = recalibrate_in_order(model, x, batch_size=16, max_samples=40, verbose=1, **NEVER)
    assert (result.samples, result.batches) == (40, 3)  # 16 + 16 + 8
    keep = np.sort(np.random.default_rng(0).choice(100, 40, replace=False))  # README's subset
    np.testing.assert_allclose(block.bn.moving_variance.numpy(), h[keep].var(0), rtol=1e-5)
    capsys.readouterr()  # the bar's total with max_samples: test_progress_bar_total_...
    result = recalibrate_in_order(model, x, batch_size=16, max_batches=2, verbose=1)
    assert (result.samples, result.batches) == (32, 2)
    assert "2/2" in capsys.readouterr().out
    np.testing.assert_allclose(block.bn.moving_mean.numpy(), h[:32].mean(0), atol=1e-5)

    def endless():
        while True:
            yield x[:10]

    assert recalibrate_in_order(model, endless(), max_batches=3).samples == 30


def test_progress_bar_total_with_max_samples(capsys):
    model, _ = _block_model()
    x, _ = _data(n=100)
    utils.recalibrate_batchnorm(model, x, batch_size=16, max_samples=40, verbose=1, **NEVER)
    assert "3/3" in capsys.readouterr().out  # 16 + 16 + 8; the old utils.py printed it


def test_multi_input_dict_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    merged = keras.layers.Concatenate()([a, b])
    model = keras.Model({"a": a, "b": b}, keras.layers.BatchNormalization(name="bn")(merged))
    rng = np.random.default_rng(6)
    xa = rng.normal(2, 3, (50, 3)).astype(np.float32)
    xb = rng.normal(-1, 0.5, (50, 2)).astype(np.float32)
    both = np.concatenate([xa, xb], axis=1).astype(np.float64)
    y = np.zeros((50, 1), np.float32)
    for data in (
        {"a": xa, "b": xb},
        tf.data.Dataset.from_tensor_slices(({"a": xa, "b": xb}, y)).batch(16),
    ):
        recalibrate_in_order(model, data, batch_size=16, **NEVER)
        bn = model.get_layer("bn")
        np.testing.assert_allclose(bn.moving_mean.numpy(), both.mean(0), rtol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), both.var(0), rtol=1e-4)
    rows = diagnose_in_order(model, {"a": xa, "b": xb})
    assert rows[0].verdict == "ok"


def test_mixed_precision_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, block = _block_model()
        x, _ = _data(n=32)
        h = _np(keras.ops.cast(block.dense(x), "float32"))  # the float16 input, as BN sees it
        utils.recalibrate_batchnorm(model, x, **NEVER)
        assert block.bn.moving_mean.dtype == "float32"
        np.testing.assert_allclose(block.bn.moving_mean.numpy(), h.mean(0), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(block.bn.moving_variance.numpy(), h.var(0), rtol=1e-3)
    finally:
        keras.config.set_dtype_policy(previous)


# ---------------------------------------------------------------------------
# Frozen and renorm layers; what must not change
# ---------------------------------------------------------------------------


def test_frozen_layer_is_left_alone_and_called_frozen():
    inputs = keras.Input((8,))
    frozen_bn = keras.layers.BatchNormalization(name="pretrained")
    h = keras.layers.Dense(6, name="d")(frozen_bn(inputs))
    out = keras.layers.BatchNormalization(name="head_bn")(h)
    model = keras.Model(inputs, out)
    x, _ = _data(n=50)
    frozen_bn.moving_mean.assign(np.full(8, 1.0, np.float32))  # as a pretrained layer's
    frozen_bn.moving_variance.assign(np.full(8, 9.0, np.float32))
    frozen_bn.trainable = False

    rows = {r.name: r for r in diagnose_in_order(model, x)}
    assert rows["pretrained"].frozen and rows["pretrained"].in_fit == "frozen"
    assert rows["pretrained"].verdict == "frozen, stale"
    assert rows["head_bn"].in_fit == "trains" and rows["head_bn"].verdict == "never updated"
    assert "frozen, stale" in utils.gaps_table_html(list(rows.values())).data

    with pytest.raises(ValueError, match="include_never_updated"):
        recalibrate_in_order(model, x)  # head_bn is at its start values: left alone
    result = recalibrate_in_order(model, x, **NEVER)
    assert int(result) == 1 and result.skipped == ["pretrained"]
    np.testing.assert_array_equal(frozen_bn.moving_variance.numpy(), np.full(8, 9.0))
    # head_bn's input: Dense of the frozen layer's inference-mode output, as in fit.
    probe = keras.Model(inputs, h)
    expected = _np(probe(x, training=True))
    np.testing.assert_allclose(
        model.get_layer("head_bn").moving_variance.numpy(), expected.var(0), rtol=1e-4
    )

    result = recalibrate_in_order(model, x, include_frozen=True)
    assert int(result) == 2 and frozen_bn.trainable is False
    np.testing.assert_allclose(
        frozen_bn.moving_variance.numpy(), x.astype(np.float64).var(0), rtol=1e-5
    )

    frozen_bn.trainable = False
    model.get_layer("head_bn").trainable = False
    with pytest.raises(ValueError, match="include_frozen"):
        recalibrate_in_order(model, x)


def test_renorm_layer_and_nothing_but_moving_statistics_changes():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(renorm=True, name="rn"),
            keras.layers.Dropout(0.5, seed=1),
            keras.layers.Dense(1),
        ]
    )
    x, _ = _data(n=40)
    h = _np(model.layers[0](x))
    rn = model.get_layer("rn")
    moving = {
        id(rn.moving_mean),
        id(rn.moving_variance),
        id(rn.moving_stddev),
        id(rn.renorm_mean),
        id(rn.renorm_stddev),
    }
    before = {id(v): v.numpy().copy() for v in model.variables}
    utils.recalibrate_batchnorm(model, x, batch_size=40, **NEVER)
    for v in model.variables:
        if id(v) not in moving:
            np.testing.assert_array_equal(v.numpy(), before[id(v)], err_msg=v.path)
    np.testing.assert_allclose(rn.moving_mean.numpy(), h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rn.moving_variance.numpy(), h.var(0), rtol=1e-5)
    np.testing.assert_allclose(rn.moving_stddev.numpy(), np.sqrt(h.var(0) + EPS), rtol=1e-5)
    np.testing.assert_allclose(rn.renorm_stddev.numpy(), np.sqrt(h.var(0) + EPS), rtol=1e-5)


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def test_errors_name_the_problem():
    model, _ = _block_model()
    x, y = _data(n=20)
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    for call in (utils.recalibrate_batchnorm, utils.diagnose_batchnorm):
        with pytest.raises(ValueError, match="no BatchNormalization"):
            call(plain, x)
    # The model is untrained: include_never_updated=True, so the data errors are reached.
    with pytest.raises(ValueError, match="include_never_updated"):
        utils.recalibrate_batchnorm(model, x)
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(8)
    for data in (x[:0], empty, iter(())):
        with pytest.raises(ValueError, match="no batch"):
            utils.recalibrate_batchnorm(model, data, **NEVER)
    with pytest.raises(ValueError, match="no batch"):
        utils.diagnose_batchnorm(model, empty)
    with pytest.raises(ValueError, match="one value per channel"):
        utils.recalibrate_batchnorm(model, x[:1], **NEVER)
    with pytest.raises(ValueError, match="one value per channel"):
        utils.recalibrate_batchnorm(model, x[:9], batch_size=4, **NEVER)  # 4, 4 and 1
    with pytest.raises(ValueError, match="one value per channel"):  # from a dataset alike
        batches = tf.data.Dataset.from_tensor_slices(x[:9]).batch(4)
        utils.recalibrate_batchnorm(model, batches, **NEVER)
    with pytest.raises(ValueError, match="one value per channel"):
        utils.diagnose_batchnorm(model, x[:1])
    with pytest.raises(ValueError, match="cannot take this data"):
        unbatched = tf.data.Dataset.from_tensor_slices(x)
        utils.recalibrate_batchnorm(model, unbatched, **NEVER)
    with pytest.raises(ValueError, match="cannot take this data"):
        utils.recalibrate_batchnorm(model, np.ones((4, 3), np.float32), **NEVER)
    with pytest.raises(TypeError):
        utils.recalibrate_batchnorm(model, "pictures/", **NEVER)
    with pytest.raises(ValueError, match="estimator"):
        utils.recalibrate_batchnorm(model, x, estimator="ema", **NEVER)
    with pytest.raises(ValueError, match="max_samples"):
        utils.recalibrate_batchnorm(model, x, max_samples=0, **NEVER)
    # A batch of one image is fine: the spatial axes give many values per channel.
    images = np.random.default_rng(0).normal(size=(1, 4, 4, 2)).astype(np.float32)
    conv = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization()])
    assert utils.recalibrate_batchnorm(conv, images, **NEVER) == 1
    # but diagnosing needs two samples, to tell a gap from sampling noise
    with pytest.raises(ValueError, match="2\\+ samples"):
        utils.diagnose_batchnorm(conv, images)
    # Nothing was written by the failed calls: never updated still.
    assert utils.diagnose_batchnorm(model, x)[0].never_updated


# ---------------------------------------------------------------------------
# Composition of recording blocks
# ---------------------------------------------------------------------------


def test_recordings_compose_and_restore_exactly():
    model, block = _block_model()
    x, _ = _data(n=20)
    bn = block.bn
    with utils.recording_batchnorm_inputs(model) as outer:
        model(x[:10], training=True)
        rows = utils.diagnose_batchnorm(model, x)  # probes: hidden from the outer block
        utils.recalibrate_batchnorm(model, x)
        with utils.recording_batchnorm_inputs(model) as inner:
            model(x, training=False)
        with utils.frozen_moving_statistics(model):
            model(x, training=True)
    assert len(rows) == 1
    assert len(inner["block/bn"]) == 1
    assert [m.count for m in outer["block/bn"]] == [10, 20]
    assert [m.training for m in outer["block/bn"]] == [True, False]
    assert "call" not in vars(bn)

    # A call attribute set by someone else before the block is put back, not deleted.
    calls = []

    def own_wrapper(*args, **kwargs):
        calls.append(1)
        return type(bn).call(bn, *args, **kwargs)

    bn.call = own_wrapper
    with utils.recording_batchnorm_inputs(model) as records:
        model(x)
    assert vars(bn)["call"] is own_wrapper and calls == [1] and len(records["block/bn"]) == 1
    del bn.call

    # A traced graph cannot be read: a clear error, and the layer is restored.
    with (
        pytest.raises(RuntimeError, match="run_eagerly"),
        utils.recording_batchnorm_inputs(model),
    ):
        tf.function(lambda v: model(v, training=True))(x)
    assert "call" not in vars(bn)


def test_probes_in_callbacks_inside_a_recording_of_fit():
    model = keras.Sequential(
        [keras.Input((8,)), Block(name="block"), keras.layers.Dense(2, activation="softmax")]
    )
    model.compile(optimizer="sgd", loss="categorical_crossentropy", run_eagerly=True)
    x, _ = _data(n=20)
    y = np.eye(2, dtype=np.float32)[np.arange(20) % 2]
    probed = []  # training-mode probes at the start and after each epoch, as notebook 04's

    def probe(*_):
        probed.append(utils.batch_statistics(model, x)[0])
        utils.diagnose_batchnorm(model, x, batch_size=10)

    history = keras.callbacks.LambdaCallback(on_train_begin=probe, on_epoch_end=probe)
    with utils.recording_batchnorm_inputs(model) as steps:
        model.fit(x, y, epochs=2, batch_size=10, verbose=0, callbacks=[history])
    assert len(probed) == 3  # epochs 0, 1 and 2
    assert all(p["block/bn"].count == 20 and p["block/bn"].training for p in probed)
    # The callback's training-mode probes are hidden: the recording holds fit's 4 steps.
    training_steps = [m for m in steps["block/bn"] if m.training]
    assert [m.count for m in training_steps] == [10, 10, 10, 10]
    assert "call" not in vars(model.layers[0].bn)


# ---------------------------------------------------------------------------
# Layers that a model's own call keeps in inference mode
# ---------------------------------------------------------------------------


class BackboneNet(keras.Model):
    """Calls its backbone with training=False: the backbone's BN stays in inference mode."""

    def build(self, input_shape):
        self.base = keras.Sequential(
            [keras.layers.Dense(4, name="d"), keras.layers.BatchNormalization(name="bn_base")],
            name="base",
        )
        self.head_bn = keras.layers.BatchNormalization(name="bn_head")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x, training=None):
        return self.out(self.head_bn(self.base(x, training=False), training=training))


def test_call_passing_training_false_is_frozen_in_fit_and_left_alone():
    x, _ = _data(n=16)
    model = BackboneNet()
    model(x)
    base_bn, head_bn = model.base.layers[-1], model.head_bn
    start = [v.numpy().copy() for v in (base_bn.moving_mean, base_bn.moving_variance)]
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.zeros((16, 2), np.float32), epochs=2, verbose=0)
    # fit left the backbone's statistics at the start values and moved the head's
    np.testing.assert_array_equal(base_bn.moving_mean.numpy(), start[0])
    np.testing.assert_array_equal(base_bn.moving_variance.numpy(), start[1])
    assert not np.all(head_bn.moving_mean.numpy() == 0.0)

    rows = {r.name: r for r in utils.diagnose_batchnorm(model, x)}
    base_row = rows["base/bn_base"]
    assert base_row.frozen and base_row.in_fit == "frozen" and base_row.never_updated
    assert base_row.flagged and base_row.verdict == "frozen, stale"  # frozen comes first
    assert rows["bn_head"].in_fit == "trains" and not rows["bn_head"].frozen

    # bn_base is still at its start values (0 and 1), so by default it is skipped as never
    # updated before any pass; with include_never_updated=True the pass shows that the model's
    # call keeps it in inference mode, and it is skipped for that.
    for include_frozen, include_never_updated in (
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ):
        result = utils.recalibrate_batchnorm(
            model,
            x,
            batch_size=16,
            include_frozen=include_frozen,
            include_never_updated=include_never_updated,
        )
        assert int(result) == 1 and result.skipped == ["base/bn_base"]
        if include_never_updated:
            assert "training=False" in result.reasons["base/bn_base"]
        else:
            assert "never updated" in result.reasons["base/bn_base"]
        np.testing.assert_array_equal(base_bn.moving_mean.numpy(), start[0])
        np.testing.assert_array_equal(base_bn.moving_variance.numpy(), start[1])
        head_input = _np(model.base(x, training=False))  # as in fit: backbone in inference
        np.testing.assert_allclose(
            head_bn.moving_mean.numpy(), head_input.mean(0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(head_bn.moving_variance.numpy(), head_input.var(0), rtol=1e-4)
    head_bn.trainable = False  # now no layer normalizes with batch statistics
    with pytest.raises(ValueError, match="no BatchNormalization layer to recalibrate"):
        utils.recalibrate_batchnorm(model, x, include_frozen=False)  # nothing left to try
    with pytest.raises(ValueError, match="nothing to recalibrate"):
        utils.recalibrate_batchnorm(model, x, include_frozen=False, **NEVER)  # tried: frozen
    np.testing.assert_array_equal(base_bn.moving_variance.numpy(), start[1])


def test_functional_training_false_is_overridden_and_trains_in_fit():
    x, _ = _data(n=16)
    base = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, name="d"),
            keras.layers.BatchNormalization(name="bn"),
        ],
        name="base",
    )
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(2)(base(inputs, training=False)))
    bn = base.get_layer("bn")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.zeros((16, 2), np.float32), epochs=1, verbose=0)
    assert not np.all(bn.moving_mean.numpy() == 0.0)  # fit trained it: not frozen
    (row,) = utils.diagnose_batchnorm(model, x)
    assert row.name == "base/bn" and row.in_fit == "trains" and not row.frozen
    result = utils.recalibrate_batchnorm(model, x, batch_size=16)
    assert int(result) == 1 and result.skipped == [] and result.reasons == {}
    seen = _np(base.get_layer("d")(x))
    np.testing.assert_allclose(bn.moving_variance.numpy(), seen.var(0), rtol=1e-4)


def test_frozen_takes_precedence_over_never_updated_in_the_verdict():
    row = utils.LayerGap(
        0,
        "bn",
        4,
        batch_var=4.0,
        moving_var=1.0,
        shift=0.8,
        log_var_gap=float(np.log(4.0)),
        noise_shift=0.1,
        noise_log_var=0.2,
        flagged=True,
        frozen=True,
        never_updated=True,
        var_ratio=0.25,
    )
    assert row.verdict == "frozen, stale" and row.in_fit == "frozen"
    row.frozen = False
    assert row.verdict == "never updated"
    row.never_updated = False
    assert row.verdict == "mismatch"
    row.flagged = False
    assert row.verdict == "ok"
    row.finite = False  # a NaN or Inf, flagged or not, is never "ok"
    assert row.verdict == "not finite"
    row.flagged, row.frozen = True, True
    assert row.verdict == "not finite"


# ---------------------------------------------------------------------------
# Probes leave all non-trainable state alone
# ---------------------------------------------------------------------------


def _dropout_model():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6),
            keras.layers.Dropout(0.5),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )


def _dropout_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 32)]
    return x, y


def test_probes_leave_the_dropout_seed_state_alone():
    model = _dropout_model()
    x, y = _dropout_data()
    before = [v.numpy().copy() for v in model.variables]
    utils.diagnose_batchnorm(model, x)
    utils.batch_statistics(model, x)
    utils.memorised(model, x, y)
    with utils.frozen_moving_statistics(model):
        model(x, training=True)
    for v, b in zip(model.variables, before, strict=False):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


def test_stop_when_memorised_leaves_a_seeded_training_bit_identical():
    def train(with_probes):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = _dropout_model()
        model.compile(optimizer="sgd", loss="categorical_crossentropy")
        x, y = _dropout_data()
        stop = utils.StopWhenMemorised(x, y, min_epochs=1)
        probe = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: utils.diagnose_batchnorm(model, x)
        )
        model.fit(
            x,
            y,
            epochs=3,
            batch_size=32,
            verbose=0,
            shuffle=False,
            callbacks=[stop, probe] if with_probes else [],
        )
        return [v.numpy() for v in model.weights], stop

    plain, _ = train(False)
    probed, stop = train(True)
    assert stop.stopped_epoch == 3 and not stop.memorised  # probed after every epoch
    assert len(plain) == len(probed)
    for a, b in zip(plain, probed, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Models not built yet, and writing statistics by hand
# ---------------------------------------------------------------------------


class InitNet(keras.Model):
    def __init__(self):
        super().__init__(name="init_net")
        self.dense = keras.layers.Dense(3)
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class BuildNet(InitNet):
    def __init__(self):
        keras.Model.__init__(self, name="build_net")

    def build(self, input_shape):
        self.dense = keras.layers.Dense(3)
        self.bn = keras.layers.BatchNormalization(name="bn")


def test_unbuilt_models_raise_call_the_model_first():
    x, _ = _data(n=16)
    first = "call the model on one batch of your data first"
    for model in (InitNet(), BuildNet()):
        probes = [  # model=model: each probe binds this iteration's model (called just below)
            lambda model=model: utils.diagnose_batchnorm(model, x),
            lambda model=model: utils.recalibrate_batchnorm(model, x, batch_size=8),
            lambda model=model: utils.batch_statistics(model, x),
            lambda model=model: utils.moving_statistics(model),
            lambda model=model: utils.set_moving_statistics(model, {}),
            lambda model=model: utils.frozen_moving_statistics(model).__enter__(),
            lambda model=model: utils.recording_batchnorm_inputs(model).__enter__(),
        ]
        for probe in probes:
            with pytest.raises(ValueError, match=first):
                probe()
        assert not model.built
        model(x)  # built: the moving statistics exist, at the start values
        (row,) = utils.diagnose_batchnorm(model, x)
        assert row.name == "bn" and row.never_updated
        np.testing.assert_array_equal(model.bn.moving_mean.numpy(), np.zeros(3))


def test_set_moving_statistics_checks_everything_before_writing():
    inputs = keras.Input((4,))
    a, b = keras.layers.BatchNormalization(name="a"), keras.layers.BatchNormalization(name="b")
    model = keras.Model(inputs, b(keras.layers.Dense(3)(a(inputs))))
    good = (np.ones(4), np.full(4, 2.0))
    bad_inputs = [
        {"a": good, "b": (np.zeros(4), np.ones(4))},  # b has 3 channels
        {"a": good, "b": (np.zeros(3), np.ones((3, 1)))},
        {"a": good, "b": np.zeros(3)},
        {"a": good, "b": (np.zeros(3), -np.ones(3))},
    ]
    for stats in bad_inputs:
        with pytest.raises(ValueError, match=r"'b'.*\(3,\)|'b'.*finite"):
            utils.set_moving_statistics(model, stats)
        np.testing.assert_array_equal(a.moving_mean.numpy(), np.zeros(4))  # nothing written
        np.testing.assert_array_equal(a.moving_variance.numpy(), np.ones(4))
    with pytest.raises(KeyError, match="nope"):
        utils.set_moving_statistics(model, {"a": good, "nope": good})
    utils.set_moving_statistics(model, {"a": good, "b": (np.full(3, 5.0), np.full(3, 7.0))})
    np.testing.assert_array_equal(a.moving_variance.numpy(), np.full(4, 2.0))
    np.testing.assert_array_equal(b.moving_mean.numpy(), np.full(3, 5.0))


def test_time_distributed_batch_mean_averages_each_time_step_call():
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="bn"), name="td"),
        ]
    )
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((20, 5, 3)) * np.arange(1.0, 6.0)[:, None] + 4.0).astype(np.float32)
    result = recalibrate_in_order(model, x, batch_size=10, estimator="batch_mean", **NEVER)
    # one call per time step and batch: 2 batches x 5 steps, each over 10 samples
    calls = x.astype(np.float64).reshape(2, 10, 5, 3)
    expected_var = calls.var(axis=1).mean(axis=(0, 1))
    expected_mean = calls.mean(axis=1).mean(axis=(0, 1))
    assert result.statistics["td/bn"].count == 20 * 5
    bn = utils.batchnorm_layers(model)[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_var, rtol=1e-4)
    assert not np.allclose(expected_var, x.astype(np.float64).var((0, 1)), rtol=0.05)
