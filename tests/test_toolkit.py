"""The toolkit, ``bn_toolkit.py``, alone (no ``utils.py``): ``diagnose_batchnorm``,
``recalibrate_batchnorm`` and ``PreciseBN`` on small models and data of this file's own, for the
cases a learner's model meets: a model trained long, the case's stale statistics, bad data, bad
statistics, a loop that forgot ``training=True``, float64, renorm, dropout, ``fit`` with
validation, class-sorted arrays and a layer served with batch statistics.

Expected values come from NumPy on the layer's actual input (captured by calling the sub-layers
by hand), never from the helper under test. Each test takes a few seconds at most; the trained
model of the false-alarm tests is trained once per module (1000 updates, about 3 s).
"""

import functools
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import bn_toolkit as toolkit

# Tests of what the toolkit computes on given batches: the arrays in their order (no shuffling)
# and the pooled estimate, as those tests' NumPy references compute them. The shuffled order and
# the default estimator have tests of their own.
recalibrate_in_order = functools.partial(
    toolkit.recalibrate_batchnorm, shuffle=False, estimator="population"
)
diagnose_in_order = functools.partial(toolkit.diagnose_batchnorm, shuffle=False)


L = keras.layers
SIZE = 8  # image side of the small CNN
DRAWS = 20  # random draws of the batch in the false-alarm tests


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)
    yield


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def _variables(model):
    return [v.numpy().copy() for v in model.variables]


def _assert_all_variables_equal(model, before):
    for v, b in zip(model.variables, before, strict=False):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


# ---------------------------------------------------------------------------
# Models and data of our own
# ---------------------------------------------------------------------------


def _images(n, rng, offset=0.0, gain=1.0):
    """Two classes of 8 x 8 images: a horizontal or a vertical ramp, plus pixel noise and a
    random brightness per image; one-hot labels."""
    labels = rng.integers(0, 2, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    ramps = np.where(labels[:, None, None] == 0, xx, yy)
    x = 2.0 * ramps + rng.normal(0, 0.5, (n, SIZE, SIZE)) + rng.normal(0, 0.3, (n, 1, 1))
    return (gain * x + offset)[..., None].astype(np.float32), np.eye(2, dtype=np.float32)[labels]


def _small_cnn():
    """conv1-bn1-ReLU-conv2 (stride 2)-bn2-ReLU-pool-softmax: two conv + BN layers."""
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            L.Conv2D(4, 3, padding="same", use_bias=False, name="conv1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv2"),
            L.BatchNormalization(name="bn2"),
            L.ReLU(),
            L.GlobalAveragePooling2D(),
            L.Dense(2, activation="softmax", name="out"),
        ],
        name="small_cnn",
    )


def _dense_net(features=8, name="dense_net"):
    """Dense-bn1-ReLU-Dense-bn2-softmax."""
    return keras.Sequential(
        [
            keras.Input((features,)),
            L.Dense(6, name="d1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.Dense(4, name="d2"),
            L.BatchNormalization(name="bn2"),
            L.Dense(2, activation="softmax", name="out"),
        ],
        name=name,
    )


def _tabular(n, features=8, seed=1, loc=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    x = (loc + scale * rng.standard_normal((n, features))).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(x[:, 0] > loc).astype(int)]
    return x, y


def _fit(model, x, y, epochs, batch_size, **compile_options):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", **compile_options
    )
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False)
    return model


@pytest.fixture(scope="module")
def trained_cnn():
    """The small CNN trained long: 1000 updates of batches of 16 from 512 images."""
    keras.utils.set_random_seed(0)
    x, y = _images(512, np.random.default_rng(0))
    model = _small_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=50,
    )
    batches = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(512, seed=0)
        .batch(16, drop_remainder=True)
        .repeat()
    )
    history = model.fit(batches, steps_per_epoch=1000, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1000
    assert history.history["accuracy"][-1] > 0.9  # it learned the two classes
    return model, x, y


def _first_batch(x, y, batch_size, draw):
    """The first batch of a shuffled loader (a new shuffle for each draw), as a dataset."""
    loader = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=1000 + draw, reshuffle_each_iteration=False)
        .batch(batch_size)
    )
    return loader.take(1)


def _labels_of(batch):
    return [int(c) for _, yb in batch for c in np.argmax(yb.numpy(), axis=1)]


# ---------------------------------------------------------------------------
# a. No false alarm on a model trained long
# ---------------------------------------------------------------------------

_SINGLE_CLASS = pytest.mark.xfail(
    strict=True,
    reason="toolkit false alarm: a small batch of one class only is flagged 'mismatch' (its "
    "within-batch spread cannot show the between-class variance the moving variance "
    "holds); see test_small_mixed_batches_are_never_flagged",
)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(2, marks=_SINGLE_CLASS),
        pytest.param(4, marks=_SINGLE_CLASS),
        8,
        16,
        64,
        "arrays",
    ],
)
def test_no_false_alarm_on_a_model_trained_long(trained_cnn, source):
    model, x, y = trained_cnn
    flagged, rows = [], 0
    for draw in range(DRAWS):
        if source == "arrays":  # a shuffled array, cut into batches of 32 by the helper
            order = np.random.default_rng(1000 + draw).permutation(len(x))[:128]
            result = toolkit.diagnose_batchnorm(model, x[order])
        else:
            result = toolkit.diagnose_batchnorm(model, _first_batch(x, y, source, draw))
        rows += len(result)
        flagged += [(draw, r.name, r.verdict) for r in result if r.flagged]
    assert rows == 2 * DRAWS
    print(
        f"false alarms, source {source}: {len(flagged)} of {rows} rows "
        f"({len(flagged) / rows:.1%}): {flagged}"
    )
    assert flagged == []


def test_the_trained_model_s_moving_statistics_are_right(trained_cnn):
    """So any flag in the test above is a false alarm: the moving statistics match the data's
    fit-mode statistics (batches of 16, as in training, averaged over all 512 images)."""
    model, x, _ = trained_cnn
    with (
        toolkit.frozen_moving_statistics(model),
        toolkit.recording_batchnorm_inputs(model) as records,
    ):
        for start in range(0, len(x), 16):
            model(x[start : start + 16], training=True)
    for path, (moving_mean, moving_var) in toolkit.moving_statistics(model).items():
        mean = np.mean([m.mean for m in records[path]], axis=0)
        var = np.mean([m.var for m in records[path]], axis=0)
        shift = np.abs(moving_mean - mean) / np.sqrt(var + 1e-3)
        log_gap = np.abs(toolkit.log_variance_ratio(moving_var, var))
        assert np.median(shift) < 0.05 and np.median(log_gap) < 0.05, (path, shift, log_gap)


def test_small_mixed_batches_are_never_flagged(trained_cnn):
    """The same draws as above: the batches holding both classes give no flag at any size."""
    model, x, y = trained_cnn
    mixed = single = single_flagged = 0
    for batch_size in (2, 4, 8):
        for draw in range(DRAWS):
            batch = _first_batch(x, y, batch_size, draw)
            result = toolkit.diagnose_batchnorm(model, batch)
            if len(set(_labels_of(batch))) == 2:
                mixed += 1
                assert not any(r.flagged for r in result), (batch_size, draw, result)
            else:
                single += 1
                single_flagged += any(r.flagged for r in result)
    print(
        f"mixed batches: {mixed}, none flagged; single-class batches: {single}, "
        f"{single_flagged} flagged"
    )
    assert mixed >= 40


# ---------------------------------------------------------------------------
# b. The case: few updates, stale statistics
# ---------------------------------------------------------------------------


def test_case_like_model_with_few_updates_is_flagged():
    # As in the series' case: images of 0-255, a few updates of one batch of all images, so the
    # moving statistics (momentum 0.99) are still close to their start values.
    x, y = _images(32, np.random.default_rng(2), offset=128.0, gain=40.0)
    model = _fit(_small_cnn(), x, y, epochs=5, batch_size=32)
    assert int(model.optimizer.iterations.numpy()) == 5
    for data in (x, x[:4], tf.data.Dataset.from_tensor_slices((x, y)).batch(8)):
        rows = toolkit.diagnose_batchnorm(model, data)
        assert [r.name for r in rows] == ["bn1", "bn2"]
        assert all(r.flagged and not r.never_updated for r in rows), rows
        assert [r.verdict for r in rows] == ["mismatch", "mismatch"]
        assert rows[0].log_var_gap > 1 and rows[0].shift > 1  # far beyond any noise
    assert "2 of 2 BatchNormalization layers flagged" in toolkit.gaps_table_html(rows).data
    toolkit.recalibrate_batchnorm(model, x)  # trained: no include_never_updated needed
    assert [r.verdict for r in toolkit.diagnose_batchnorm(model, x)] == ["ok", "ok"]


# ---------------------------------------------------------------------------
# c. NaN or Inf in the data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["array", "tf.data"])
def test_one_bad_value_in_the_data_names_batch_and_layer_and_changes_nothing(bad, kind):
    x, y = _tabular(96)
    model = _fit(_dense_net(), x, y, epochs=2, batch_size=16)
    bad_x = x.copy()
    bad_x[40, 3] = bad  # sample 40: batch 3 of 16 samples (counting from 1)
    data = bad_x if kind == "array" else tf.data.Dataset.from_tensor_slices((bad_x, y)).batch(16)
    before, predicted = _variables(model), model.predict(x, verbose=0)
    with pytest.raises(ValueError, match=r"batch 3 \(counting from 1\): layer 'bn1'.*non-finite"):
        recalibrate_in_order(model, data, batch_size=16)
    _assert_all_variables_equal(model, before)  # every moving statistic bit-identical
    np.testing.assert_array_equal(model.predict(x, verbose=0), predicted)
    with pytest.raises(ValueError, match=r"batch 3 .*layer 'bn1'"):  # the diagnosis too
        diagnose_in_order(model, data, batch_size=16)
    _assert_all_variables_equal(model, before)
    # a NaN that reaches only the second layer (through the first's weights) names that one
    model.get_layer("d2").kernel.assign(np.full((6, 4), np.nan, np.float32))
    before = _variables(model)
    with pytest.raises(ValueError, match=r"batch 1 .*layer 'bn2'"):
        recalibrate_in_order(model, x, batch_size=16)
    _assert_all_variables_equal(model, before)


# ---------------------------------------------------------------------------
# d. NaN in the moving statistics
# ---------------------------------------------------------------------------


def test_nan_moving_variance_is_not_finite_never_ok():
    x, y = _tabular(64)
    model = _fit(_dense_net(), x, y, epochs=3, batch_size=16)
    bn1, bn2 = model.get_layer("bn1"), model.get_layer("bn2")
    healthy = {r.name: r.verdict for r in toolkit.diagnose_batchnorm(model, x)}

    variance = bn1.moving_variance.numpy()
    bn1.moving_variance.assign(np.full_like(variance, np.nan))
    rows = {r.name: r for r in toolkit.diagnose_batchnorm(model, x)}
    assert rows["bn1"].verdict == "not finite" and rows["bn1"].flagged
    assert not rows["bn1"].finite
    assert rows["bn2"].verdict == healthy["bn2"]  # fit mode: bn2 never sees bn1's moving stats
    assert "not finite" in toolkit.gaps_table_html(list(rows.values())).data

    one = variance.copy()
    one[2] = np.nan  # a single channel
    bn1.moving_variance.assign(one)
    assert toolkit.diagnose_batchnorm(model, x)[0].verdict == "not finite"
    bn1.moving_variance.assign(variance)
    mean = bn2.moving_mean.numpy().copy()
    mean[0] = np.inf
    bn2.moving_mean.assign(mean)
    assert [r.verdict for r in toolkit.diagnose_batchnorm(model, x)][1] == "not finite"

    # frozen and not finite: "not finite" first (the last layer: nothing after it sees it)
    bn2.trainable = False
    (row,) = [r for r in toolkit.diagnose_batchnorm(model, x) if r.name == "bn2"]
    assert row.frozen and row.verdict == "not finite"

    # recalibrating repairs the layers that train (it does not read the moving statistics)
    bn2.trainable = True
    bn1.moving_variance.assign(one)
    result = toolkit.recalibrate_batchnorm(model, x)
    assert int(result) == 2
    assert all(r.finite and r.verdict == "ok" for r in toolkit.diagnose_batchnorm(model, x))


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="toolkit bug: a frozen layer with NaN "
    "moving statistics feeds NaN to the next BN layer in the fit-mode pass, and "
    "diagnose_batchnorm raises 'batch 1 ... layer bn2 received non-finite values; "
    "check that batch of the data' instead of giving bn1 the verdict 'not finite'",
)
def test_frozen_layer_with_nan_moving_variance_before_another_layer_is_not_finite():
    x, y = _tabular(64)
    model = _fit(_dense_net(), x, y, epochs=3, batch_size=16)
    bn1 = model.get_layer("bn1")
    bn1.moving_variance.assign(np.full(6, np.nan, np.float32))
    bn1.trainable = False  # frozen: it normalizes with its moving statistics in fit too
    rows = {r.name: r for r in toolkit.diagnose_batchnorm(model, x)}
    assert rows["bn1"].verdict == "not finite"


# ---------------------------------------------------------------------------
# e. A custom training loop that forgot training=True
# ---------------------------------------------------------------------------


def _loop(model, x, y, steps, batch_size, training):
    optimizer = keras.optimizers.SGD(0.05)
    loss_fn = keras.losses.CategoricalCrossentropy()
    for step in range(steps):
        s = slice((step * batch_size) % len(x), (step * batch_size) % len(x) + batch_size)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[s], model(x[s]) if training is None else model(x[s], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return float(loss)


def test_loop_without_training_true_is_never_updated_and_not_recalibrated():
    x, y = _tabular(128)
    model = _dense_net()
    _loop(model, x, y, steps=20, batch_size=32, training=None)  # forgot training=True
    bn1 = model.get_layer("bn1")
    np.testing.assert_array_equal(bn1.moving_mean.numpy(), np.zeros(6))
    np.testing.assert_array_equal(bn1.moving_variance.numpy(), np.ones(6))
    rows = toolkit.diagnose_batchnorm(model, x)
    assert [r.verdict for r in rows] == ["never updated", "never updated"], rows
    assert all(r.never_updated and r.flagged for r in rows)

    before, predicted = _variables(model), model.predict(x, verbose=0)
    with pytest.raises(ValueError, match="include_never_updated"):
        toolkit.recalibrate_batchnorm(model, x)
    _assert_all_variables_equal(model, before)
    np.testing.assert_array_equal(model.predict(x, verbose=0), predicted)

    result = toolkit.recalibrate_batchnorm(model, x, batch_size=128, include_never_updated=True)
    assert int(result) == 2 and result.skipped == []
    h = _np(model.get_layer("d1")(x))
    np.testing.assert_allclose(bn1.moving_mean.numpy(), h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), h.var(0), rtol=1e-5)

    # The same loop with training=True: the layers train, nothing to refuse.
    keras.utils.set_random_seed(0)
    model = _dense_net()
    _loop(model, x, y, steps=20, batch_size=32, training=True)
    assert not any(r.never_updated for r in toolkit.diagnose_batchnorm(model, x))
    assert int(toolkit.recalibrate_batchnorm(model, x)) == 2


# ---------------------------------------------------------------------------
# f. float64
# ---------------------------------------------------------------------------


def test_float64_model_moments_are_float64():
    rng = np.random.default_rng(3)
    x = 50.0 + rng.standard_normal((60, 5)) * [1.0, 2.0, 3.0, 0.5, 0.05]  # float64
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            L.BatchNormalization(name="bn_in", dtype="float64"),
            L.Dense(3, name="d", dtype="float64"),
            L.BatchNormalization(name="bn", dtype="float64"),
        ]
    )
    bn_in, bn = model.get_layer("bn_in"), model.get_layer("bn")
    assert bn.moving_mean.dtype == "float64"
    gamma, beta = bn_in.gamma.numpy(), bn_in.beta.numpy()
    kernel, bias = model.get_layer("d").kernel.numpy(), model.get_layer("d").bias.numpy()

    def expected(rows):
        """NumPy float64: bn_in's input is the data; bn's is Dense of bn_in's output."""
        normalized = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-3) * gamma + beta
        return rows, normalized @ kernel + bias

    # untrained on purpose (nothing to train for this check): recalibrate the start values
    result = recalibrate_in_order(model, x, batch_size=20, include_never_updated=True)
    seen_in, seen = [
        np.concatenate([expected(x[s : s + 20])[k] for s in range(0, 60, 20)]) for k in (0, 1)
    ]
    for path, values in (("bn_in", seen_in), ("bn", seen)):
        moments = result.statistics[path]
        assert moments.mean.dtype == np.float64 and moments.count == 60
        np.testing.assert_allclose(moments.mean, values.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(moments.var, values.var(0), rtol=1e-12)
        layer = model.get_layer(path)
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), values.mean(0), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(0), rtol=1e-12)
    with toolkit.recording_batchnorm_inputs(model) as records:
        model(x, training=False)
    np.testing.assert_allclose(records["bn_in"][0].var, x.var(0), rtol=1e-12)
    stats, _ = toolkit.batch_statistics(model, x)
    np.testing.assert_allclose(stats["bn"].mean, expected(x)[1].mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["bn"].var, expected(x)[1].var(0), rtol=1e-12)


# ---------------------------------------------------------------------------
# g. renorm with clipping: the order of the batches does not matter
# ---------------------------------------------------------------------------


def _renorm_net():
    clip = {"rmax": 1.5, "rmin": 0.6, "dmax": 0.5}
    return keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(6, name="d1"),
            L.BatchNormalization(renorm=True, renorm_clipping=clip, name="rn1"),
            L.ReLU(),
            L.Dense(4, name="d2"),
            L.BatchNormalization(renorm=True, renorm_clipping=clip, name="rn2"),
            L.Dense(2, activation="softmax"),
        ]
    )


def test_renorm_with_clipping_is_independent_of_batch_order():
    x, y = _tabular(96, loc=4.0, scale=3.0)
    model = _fit(_renorm_net(), x, y, epochs=1, batch_size=32)  # 3 updates: stale, clipped
    start = [v.numpy().copy() for v in model.non_trainable_variables]
    batches = x.reshape(6, 16, 8)
    backwards = batches[::-1].reshape(96, 8)
    paths = ("rn1", "rn2")

    def restore():
        for v, value in zip(model.non_trainable_variables, start, strict=False):
            v.assign(value)

    results = []
    for data in (x, backwards):
        restore()
        result = recalibrate_in_order(model, data, batch_size=16)
        assert int(result) == 2
        results.append(
            {
                p: (
                    model.get_layer(p).moving_mean.numpy(),
                    model.get_layer(p).moving_variance.numpy(),
                    model.get_layer(p).moving_stddev.numpy(),
                )
                for p in paths
            }
        )
    for p in paths:
        for a, b in zip(results[0][p], results[1][p], strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-7, err_msg=p)
    # rn1's input does not depend on any state: the NumPy moments of Dense d1
    h = _np(model.get_layer("d1")(x))
    np.testing.assert_allclose(results[0]["rn1"][1], h.var(0), rtol=1e-5)

    # The test has teeth: fit-mode passes that let the state run on (as fit does) depend on the
    # order, since the clipped renorm corrections of rn1 shape what rn2 receives.
    pooled = []
    for data in (batches, batches[::-1]):
        restore()
        with (
            toolkit.frozen_moving_statistics(model),
            toolkit.recording_batchnorm_inputs(model) as records,
        ):
            for batch in data:
                model(batch, training=True)
        pooled.append(toolkit._pooled(records["rn2"]).var)
    assert not np.allclose(pooled[0], pooled[1], rtol=1e-4)


# ---------------------------------------------------------------------------
# h. Dropout, noise and augmentation run in inference mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noisy",
    [
        lambda: L.Dropout(0.5, name="noisy"),
        lambda: L.GaussianNoise(1.0, name="noisy"),
        lambda: L.GaussianDropout(0.5, name="noisy"),
    ],
    ids=["Dropout", "GaussianNoise", "GaussianDropout"],
)
def test_recalibrated_variance_is_that_of_the_layer_input_without_dropout(noisy):
    x, y = _tabular(64)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(6, name="dense"),
            noisy(),
            L.BatchNormalization(name="bn"),
            L.Dense(2, activation="softmax"),
        ]
    )
    model = _fit(model, x, y, epochs=2, batch_size=16)  # fit: with dropout
    bn = model.get_layer("bn")
    trained_var = bn.moving_variance.numpy().copy()
    others = [
        v
        for v in model.non_trainable_variables
        if not any(v is w for w in bn.non_trainable_variables)
    ]
    before = [v.numpy().copy() for v in others]  # the seed generator's state among them
    recalibrate_in_order(model, x, batch_size=16)
    for v, b in zip(others, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    h = _np(model.get_layer("dense")(x))  # no dropout
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(0), rtol=1e-5)
    with_noise = _np(model.get_layer("noisy")(h.astype(np.float32), training=True)).var(0)
    assert not np.allclose(with_noise, h.var(0), rtol=0.1)  # dropout would have shown
    assert not np.allclose(trained_var, h.var(0), rtol=1e-3)


def test_augmentation_inside_a_nested_block_runs_in_inference_mode():
    rng = np.random.default_rng(5)
    x = (rng.uniform(0, 1, (32, 6, 6, 1))).astype(np.float32)
    augment = keras.Sequential(
        [L.RandomContrast(0.9), L.RandomBrightness(0.5, (0, 1))], name="augment"
    )
    inputs = keras.Input((6, 6, 1))
    features = L.Conv2D(3, 3, name="conv")(augment(inputs))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(features))
    # untrained on purpose: the check is what the layer receives
    recalibrate_in_order(model, x, batch_size=8, include_never_updated=True)
    h = _np(model.get_layer("conv")(x))  # the images as they are, not augmented
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var((0, 1, 2)), rtol=1e-4)
    assert not np.allclose(_np(augment(x, training=True)), x, atol=1e-3)  # it does augment


# ---------------------------------------------------------------------------
# i. PreciseBN inside fit with validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("validation_freq", [1, 2])
def test_precise_bn_recalibrates_before_each_validation(validation_freq):
    x, y = _tabular(128)
    xv, yv = _tabular(48, seed=7)
    model = _dense_net()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    precise = toolkit.PreciseBN(x, max_samples=96, batch_size=32)
    epochs = 2 * validation_freq  # the last epoch is validated
    history = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=16,
        validation_data=(xv, yv),
        validation_freq=validation_freq,
        verbose=0,
        callbacks=[precise],
    )
    assert len(precise.results) == epochs  # one per epoch, with or without validation
    assert all(
        isinstance(r, toolkit.Recalibration) and int(r) == 2 and r.samples == 96 and r.batches == 3
        for r in precise.results
    )
    # the last epoch was validated after recalibrating: evaluate now gives the same loss
    validated = history.history["val_loss"]
    assert len(validated) == 2
    evaluated = model.evaluate(xv, yv, batch_size=16, verbose=0)
    np.testing.assert_allclose(validated[-1], evaluated, rtol=1e-6)
    # the moving statistics are the recalibration of the final weights on the same data
    after_fit = toolkit.moving_statistics(model)
    for path, moments in precise.results[-1].statistics.items():
        np.testing.assert_allclose(after_fit[path][0], moments.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(after_fit[path][1], moments.var, rtol=1e-6)
    again = toolkit.recalibrate_batchnorm(model, x, max_samples=96, batch_size=32)
    for path, (mean, var) in toolkit.moving_statistics(model).items():
        np.testing.assert_array_equal(mean, after_fit[path][0], err_msg=path)
        np.testing.assert_array_equal(var, after_fit[path][1], err_msg=path)
        np.testing.assert_allclose(again.statistics[path].var, var, rtol=1e-6)


# ---------------------------------------------------------------------------
# A ragged last batch and the noise estimate
# ---------------------------------------------------------------------------


def _never_updated_block():
    model = keras.Sequential(
        [keras.Input((8,)), L.Dense(16, name="dense"), L.BatchNormalization(name="bn"), L.Dense(1)]
    )
    x, _ = _tabular(100)
    return model, x


def test_never_updated_layer_is_flagged_with_or_without_a_ragged_last_batch():
    model, x = _never_updated_block()
    for data, options in (
        (x, {}),
        (x, {"batch_size": 100}),
        (x[:96], {}),
        (x, {"batch_size": 25}),
        (x, {"batch_size": 50}),
    ):
        (row,) = toolkit.diagnose_batchnorm(model, data, **options)  # {}: 32, 32, 32 and 4
        assert row.verdict == "never updated", (options, row)
        assert row.shift > 0.5 and row.log_var_gap > 0.4


# ---------------------------------------------------------------------------
# A learner's bug reports: a few channels far off, arguments by analogy with fit, cut tails,
# infinite pipelines, one-shot iterators, NaN weights, noise in a custom block, a shared layer
# ---------------------------------------------------------------------------


def _tabular_bn(x):
    """BatchNormalization on raw features, its statistics set to the data's but for 3 of 10."""
    model = keras.Sequential([keras.Input((10,)), L.BatchNormalization(name="bn_in"), L.Dense(1)])
    mean, var = x.mean(axis=0), x.var(axis=0)
    bn = model.get_layer("bn_in")
    bn.moving_mean.assign((mean - np.r_[3.0, 2.0, 1.5, [0.0] * 7] * np.sqrt(var)).astype("f4"))
    bn.moving_variance.assign(var.astype("f4"))
    return model


def test_a_few_channels_far_off_are_flagged_though_the_median_is_fine():
    x = np.random.default_rng(1).normal(5.0, 2.0, (1024, 10)).astype("float32")
    (row,) = toolkit.diagnose_batchnorm(_tabular_bn(x), x)
    assert row.shift < 0.2 and row.log_var_gap < np.log(1.5)  # the median channel is fine
    assert row.flagged and row.channels_off == 3 and row.verdict == "mismatch"


def test_tolerances_are_keyword_only_and_batch_sizes_integers():
    x = np.random.default_rng(2).normal(0, 1, (64, 10)).astype("float32")
    model = _tabular_bn(x)
    with pytest.raises(TypeError, match="positional"):
        toolkit.diagnose_batchnorm(model, x, 32)
    y = np.zeros((64, 1), "float32")
    for call, hint in (
        (lambda: toolkit.recalibrate_batchnorm(model, x, y), "pass x alone"),
        (lambda: toolkit.recalibrate_batchnorm(model, x, batch_size=32.5), "float"),
    ):
        before = _variables(model)
        with pytest.raises(TypeError, match=f"batch_size must be an integer.*{hint}"):
            call()
        _assert_all_variables_equal(model, before)


def test_the_max_samples_cut_leaves_no_batch_of_one():
    x = np.random.default_rng(3).normal(0, 1, (2000, 10)).astype("float32")
    model = _tabular_bn(x)
    rows = toolkit.diagnose_batchnorm(model, x, batch_size=33)  # 1024 = 31 * 33 + 1
    assert rows[0].samples == 1023
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(31)
    assert toolkit.recalibrate_batchnorm(model, dataset, max_samples=1024).samples == 1023


def test_an_infinite_dataset_needs_a_limit_and_precise_bn_refuses_generators():
    x = np.random.default_rng(4).normal(0, 1, (64, 10)).astype("float32")
    model = _tabular_bn(x)
    endless = tf.data.Dataset.from_tensor_slices(x).batch(16).repeat()
    with pytest.raises(ValueError, match="infinite.*max_batches or max_samples"):
        toolkit.recalibrate_batchnorm(model, endless)
    assert toolkit.recalibrate_batchnorm(model, endless, max_batches=3).batches == 3
    with pytest.raises(TypeError, match="used up after one pass"):
        toolkit.PreciseBN(iter([x[:16], x[16:32]]))


def test_non_finite_gamma_or_beta_is_never_ok():
    x = np.random.default_rng(5).normal(0, 1, (64, 10)).astype("float32")
    model = _tabular_bn(x)
    bn = model.get_layer("bn_in")
    bn.moving_mean.assign(x.mean(axis=0))
    bn.beta.assign(np.full(10, np.nan, "float32"))
    (row,) = toolkit.diagnose_batchnorm(model, x)
    assert not row.finite and row.verdict == "not finite"


class _NoisyBlock(L.Layer):
    """A custom block without BatchNormalization inside that adds noise in training."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(8)

    def call(self, x, training=None):
        h = self.dense(x)
        return h + keras.random.normal(keras.ops.shape(h), stddev=3.0) if training else h


def test_a_custom_block_runs_in_inference_mode_during_recalibration():
    x = np.random.default_rng(6).normal(0, 1, (512, 6)).astype("float32")
    inputs = keras.Input((6,))
    block = _NoisyBlock()
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(block(inputs)))
    result = recalibrate_in_order(model, x, include_never_updated=True)
    served = _np(block.dense(x))
    np.testing.assert_allclose(result.statistics["bn"].var, served.var(axis=0), rtol=1e-4)


class _SharedBN(keras.Model):
    """One BatchNormalization layer called in fit's mode on one branch, in inference on the
    other."""

    def __init__(self):
        super().__init__()
        self.bn = L.BatchNormalization(name="shared_bn")

    def call(self, x, training=None):
        return self.bn(x, training=training) + self.bn(x * 3.0, training=False)


def test_a_shared_layer_trained_on_one_branch_is_diagnosed_as_fit_trains_it():
    x = np.random.default_rng(7).normal(2.0, 1.0, (256, 4)).astype("float32")
    model = _SharedBN()
    model(x[:2])
    (row,) = diagnose_in_order(model, x)
    assert not row.frozen and row.flagged  # fit trains it; only fit's calls make the reference
    per_batch = np.mean([x[i : i + 32].var(axis=0) for i in range(0, 256, 32)], axis=0)
    np.testing.assert_allclose(row.batch_var, np.median(per_batch), rtol=1e-4)


# ---------------------------------------------------------------------------
# Mistakes a learner makes, caught before any training or with the right hint
# ---------------------------------------------------------------------------


def test_precise_bn_refuses_bad_options_and_frozen_models_before_training():
    x, y = _tabular(64)
    with pytest.raises(TypeError, match="estimater"):
        toolkit.PreciseBN(x, estimater="population")  # a typo: refused at once, not after an epoch
    with pytest.raises(ValueError, match="batch_size=0"):
        toolkit.PreciseBN(x, batch_size=0)
    model = _dense_net()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    for layer in toolkit.batchnorm_layers(model):
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    before = _variables(model)
    with pytest.raises(ValueError, match="include_frozen"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[toolkit.PreciseBN(x)])
    _assert_all_variables_equal(model, before)  # not one step was taken
    precise = toolkit.PreciseBN(x, max_samples=64, include_frozen=True)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[precise])
    assert int(precise.results[0]) == 2


def test_wrapped_layers_keep_their_signature_and_a_traced_call_names_tf_function():
    x, _ = _tabular(32)
    model = _dense_net()
    model(x[:2])
    bn = model.get_layer("bn1")
    with toolkit.recording_batchnorm_inputs(model):
        parameters = inspect.signature(bn.call).parameters
        assert "training" in parameters and not any(p.startswith("_") for p in parameters)
        with pytest.raises(TypeError) as error:
            bn.call(x[:2, :6], traning=True)  # a typo in the keyword
        assert "_inner" not in str(error.value) and "_path" not in str(error.value)
        with pytest.raises(RuntimeError, match="tf.function"):
            tf.function(lambda batch: model(batch, training=True))(x[:4])
    assert "call" not in vars(bn)  # restored


# ---------------------------------------------------------------------------
# Models and pipelines a user wrote: custom signatures, shared layers, odd statistics
# ---------------------------------------------------------------------------


class _Gate(keras.layers.Layer):
    """Adds its inputs, given as ``*inputs``: ``training`` can only come as a keyword."""

    def call(self, *inputs, training=None):
        return keras.ops.add(inputs[0], inputs[1])


def test_a_layer_taking_star_inputs_keeps_its_second_input_during_recalibration():
    rng = np.random.default_rng(3)
    xa, xb = (rng.normal(0, 1, (64, 4)).astype("f4"), rng.normal(2, 3, (64, 4)).astype("f4"))
    ia, ib = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([ia, ib], L.BatchNormalization(name="bn")(_Gate()(ia, ib)))
    model([xa[:2], xb[:2]])
    recalibrate_in_order(model, [xa, xb], batch_size=16, include_never_updated=True)
    np.testing.assert_allclose(
        model.get_layer("bn").moving_variance.numpy(),
        (xa + xb).astype("f8").var(axis=0),
        rtol=1e-4,
    )


def _two_branches(shared_bn):
    ia, ib = keras.Input((4,)), keras.Input((4,))
    return keras.Model([ia, ib], L.Concatenate()([shared_bn(ia), shared_bn(ib)]))


def test_a_layer_shared_by_inputs_of_different_means_is_flagged_per_call():
    rng = np.random.default_rng(4)
    xa, xb = rng.normal(0, 1, (256, 4)).astype("f4"), rng.normal(10, 1, (256, 4)).astype("f4")
    model = _two_branches(L.BatchNormalization(name="shared"))
    model.compile(optimizer="adam", loss="mse")
    model.fit([xa, xb], np.zeros((256, 8), "f4"), epochs=20, batch_size=32, verbose=0)
    (row,) = toolkit.diagnose_batchnorm(model, [xa, xb])
    assert row.verdict == "mismatch" and row.shift > 2  # the moving mean sits between the two


def test_time_distributed_batchnorm_with_steps_of_different_means_is_flagged():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (256, 2, 4)).astype("f4") + np.array([0.0, 8.0], "f4")[None, :, None]
    model = keras.Sequential([keras.Input((2, 4)), L.TimeDistributed(L.BatchNormalization())])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.zeros_like(x), epochs=20, batch_size=32, verbose=0)
    (row,) = toolkit.diagnose_batchnorm(model, x)
    assert row.verdict == "mismatch"


def test_a_negative_moving_variance_has_a_verdict_of_its_own():
    x, _ = _tabular(256)
    model = _dense_net()
    model(x[:2])
    bn = model.get_layer("bn1")
    variance = np.full(6, 2.0, "f4")
    variance[0] = -0.5  # one channel written from outside; the others twice too large
    bn.moving_variance.assign(variance)
    row = toolkit.diagnose_batchnorm(model, x)[0]
    assert row.verdict == "negative variance" and row.flagged


def test_max_samples_draws_from_all_of_an_array_sorted_by_class():
    x, y = _tabular(1024)
    order = np.argsort(y[:, 1], kind="stable")  # all of class 0 first, as folder order gives
    model = _dense_net()
    model(x[:2])
    toolkit.recalibrate_batchnorm(
        model, x[order], batch_size=32, max_samples=256, include_never_updated=True
    )
    subset = toolkit.moving_statistics(model)["bn1"]
    toolkit.recalibrate_batchnorm(model, x, batch_size=32)
    full = toolkit.moving_statistics(model)["bn1"]
    assert np.all(np.abs(subset[0] - full[0]) < 0.3 * np.sqrt(full[1]))  # not one class only


def test_renorm_layers_are_right_after_one_recalibration():
    x, y = _tabular(256)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(6),
            L.BatchNormalization(renorm=True),
            L.ReLU(),
            L.Dense(4),
            L.BatchNormalization(renorm=True),
            L.Dense(2, activation="softmax"),
        ]
    )
    _fit(model, x, y, epochs=1, batch_size=32)
    toolkit.recalibrate_batchnorm(model, x, batch_size=32)
    rows = toolkit.diagnose_batchnorm(model, x, max_samples=256)
    assert not any(row.flagged for row in rows), rows


def test_never_updated_statistics_of_a_clone_are_explained():
    x, y = _tabular(128)
    model = _fit(_dense_net(), x, y, epochs=2, batch_size=16)
    clone = keras.models.clone_model(model)  # fresh statistics 0 and 1, weights set after
    clone.set_weights(
        [
            w
            if "moving" not in v.path
            else (np.zeros_like(w) if "mean" in v.path else np.ones_like(w))
            for w, v in zip(model.get_weights(), model.weights, strict=True)
        ]
    )
    with pytest.raises(ValueError, match="cloned or rebuilt.*include_never_updated=True"):
        toolkit.recalibrate_batchnorm(clone, x, batch_size=16)
    assert toolkit.recalibrate_batchnorm(clone, x, batch_size=16, include_never_updated=True) == 2


def test_bad_arguments_are_refused_with_a_clear_error():
    x, _ = _tabular(64)
    model = _dense_net()
    model(x[:2])
    before = _variables(model)
    cases = [
        (TypeError, "the model comes first", lambda: toolkit.diagnose_batchnorm(x, model)),
        (ValueError, "all finite", lambda: toolkit.diagnose_batchnorm(model, x, shift_tol=np.nan)),
        (ValueError, "all finite", lambda: toolkit.diagnose_batchnorm(model, x, noise=np.inf)),
        (
            TypeError,
            "batch_size must be an integer",
            lambda: toolkit.recalibrate_batchnorm(model, x, batch_size=None),
        ),
        (
            TypeError,
            "True or False",
            lambda: toolkit.recalibrate_batchnorm(model, x, include_frozen="no"),
        ),
        (
            ValueError,
            "lengths differ",
            lambda: toolkit.recalibrate_batchnorm(
                keras.Model(
                    [i := keras.Input((8,)), j := keras.Input((8,))],
                    L.BatchNormalization()(L.Add()([i, j])),
                ),
                [x[:32], x],
                batch_size=16,
                include_never_updated=True,
            ),
        ),
        (
            ValueError,
            "max_rows=-1",
            lambda: toolkit.gaps_table_html(toolkit.diagnose_batchnorm(model, x), max_rows=-1),
        ),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    _assert_all_variables_equal(model, before)


class _Skips(keras.Model):
    """Holds a built BatchNormalization layer that its call never uses."""

    def __init__(self):
        super().__init__()
        self.dense, self.bn = L.Dense(2), L.BatchNormalization()

    def call(self, x, training=None):
        return self.dense(x)


def test_data_that_reaches_no_batchnorm_layer_is_refused():
    x, _ = _tabular(32)
    model = _Skips()
    model(x[:2])
    model.bn.build((None, 8))
    with pytest.raises(ValueError, match="reached no BatchNormalization layer"):
        toolkit.diagnose_batchnorm(model, x)


class _AlwaysInference(L.BatchNormalization):
    """The fine-tuning recipe as a subclass: always normalizes with its moving statistics."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


class _Shifted(L.BatchNormalization):
    """A subclass that transforms its input before the base layer normalizes it."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs * 10.0 + 5.0, training=training, mask=mask)


def test_a_subclass_that_always_runs_in_inference_mode_is_frozen_and_left_alone():
    x, y = _tabular(256)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(4, name="d1"),
            _AlwaysInference(name="fixed"),
            L.Dense(4, name="d2"),
            L.BatchNormalization(name="bn"),
            L.Dense(2, activation="softmax"),
        ]
    )
    model(x[:2])
    model.get_layer("fixed").moving_mean.assign(np.full(4, 0.5, "f4"))
    model.get_layer("fixed").moving_variance.assign(np.full(4, 2.0, "f4"))
    _fit(model, x, y, epochs=2, batch_size=32)
    rows = {r.name: r for r in toolkit.diagnose_batchnorm(model, x)}
    assert rows["fixed"].frozen and rows["fixed"].in_fit == "frozen"
    result = toolkit.recalibrate_batchnorm(model, x, batch_size=32)
    assert int(result) == 1 and "fixed" in result.skipped
    np.testing.assert_array_equal(model.get_layer("fixed").moving_mean.numpy(), np.full(4, 0.5))


def test_a_subclass_is_recalibrated_on_what_its_base_layer_receives():
    x, _ = _tabular(128)
    model = keras.Sequential([keras.Input((8,)), _Shifted(name="shifted")])
    model(x[:2])
    toolkit.recalibrate_batchnorm(model, x, batch_size=32, include_never_updated=True)
    np.testing.assert_allclose(
        model.get_layer("shifted").moving_mean.numpy(),
        (x.astype("f8") * 10 + 5).mean(axis=0),
        rtol=1e-5,
    )


class _Endless(keras.utils.PyDataset):
    """An endless PyDataset cycling over 8 batches of 16."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    @property
    def num_batches(self):
        return None

    def __getitem__(self, index):
        start = (index % 8) * 16
        return self.x[start : start + 16]


def test_an_endless_pydataset_is_read_batch_after_batch():
    x, _ = _tabular(128)
    model = _dense_net()
    model(x[:2])
    toolkit.recalibrate_batchnorm(model, _Endless(x), max_batches=8, include_never_updated=True)
    toolkit.recalibrate_batchnorm(model, x, batch_size=16)  # the same 8 batches from the array
    expected = toolkit.moving_statistics(model)["bn1"][0]
    toolkit.recalibrate_batchnorm(model, _Endless(x), max_batches=8)
    np.testing.assert_allclose(toolkit.moving_statistics(model)["bn1"][0], expected, rtol=1e-5)


class _Spare(keras.Model):
    """A subclassed model holding a BatchNormalization layer its call never uses."""

    def __init__(self):
        super().__init__(name="spare_net")
        self.dense, self.bn, self.spare = (
            L.Dense(4),
            L.BatchNormalization(),
            L.BatchNormalization(),
        )

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_an_unused_unbuilt_layer_does_not_block_the_toolkit():
    x, y = _tabular(128)
    model = _Spare()
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y[:, :1].repeat(4, axis=1), epochs=1, batch_size=32, verbose=0)
    assert len(toolkit.diagnose_batchnorm(model, x)) == 1
    assert int(toolkit.recalibrate_batchnorm(model, x, batch_size=32)) == 1


def test_precise_bn_and_the_diagnostic_refuse_bad_options_at_once():
    x, _ = _tabular(64)
    model = _dense_net()
    model(x[:2])
    for bad in (
        {"estimator": "x"},
        {"max_batches": 0},
        {"include_frozen": 1},
        {"verbose": "loud"},
    ):
        with pytest.raises((TypeError, ValueError)):
            toolkit.PreciseBN(x, **bad)
    with pytest.raises(TypeError, match="cannot read batches"):
        toolkit.PreciseBN(lambda: x)
    with pytest.raises(TypeError, match="verbose"):
        toolkit.recalibrate_batchnorm(model, x, verbose=5)
    with pytest.raises(ValueError, match="shift_tol=0.2"):
        toolkit.diagnose_batchnorm(model, x, shift_tol="0.2")


# ---------------------------------------------------------------------------
# Data and models that fit reads otherwise than it looks
# ---------------------------------------------------------------------------


class NoTrainingArgument(keras.Model):
    """A subclassed model whose ``call`` takes no ``training``: ``fit`` then calls it without
    one, and its BatchNormalization layer runs in inference mode in ``fit`` too."""

    def __init__(self):
        super().__init__()
        self.dense, self.bn = L.Dense(4), L.BatchNormalization(name="bn")
        self.out = L.Dense(2, activation="softmax")

    def call(self, inputs):
        return self.out(self.bn(self.dense(inputs)))


def test_a_model_without_a_training_argument_is_passed_as_fit_passes_it():
    x, y = _tabular(64)
    model = _fit(NoTrainingArgument(), x, y, epochs=2, batch_size=16)
    (row,) = toolkit.diagnose_batchnorm(model, x, batch_size=16)
    assert row.in_fit == "frozen"  # fit never normalized with batch statistics here
    before = _variables(model)
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        toolkit.recalibrate_batchnorm(model, x, batch_size=16)
    _assert_all_variables_equal(model, before)


def test_a_list_of_batches_for_a_model_with_one_input_is_refused():
    x, y = _tabular(64)
    model = _fit(_dense_net(), x, y, epochs=1, batch_size=16)
    before = _variables(model)
    batches = [x[i : i + 16] for i in range(0, 64, 16)]
    with pytest.raises(ValueError, match="4 arrays is read as one array per input"):
        toolkit.recalibrate_batchnorm(model, batches, batch_size=16)
    with pytest.raises(ValueError, match="the model takes 1"):
        toolkit.diagnose_batchnorm(model, batches)
    _assert_all_variables_equal(model, before)


def test_a_batch_whose_mask_keeps_nothing_is_named_and_changes_nothing():
    rng = np.random.default_rng(6)
    tokens = rng.integers(1, 20, (64, 10))
    tokens[16:32] = 0  # the second batch of 16 is all padding
    inputs = keras.Input((10,))
    embedded = L.Embedding(20, 4, mask_zero=True)(inputs)
    model = keras.Model(inputs, L.Dense(1)(L.Flatten()(L.BatchNormalization(name="bn")(embedded))))
    model(tokens[:2])
    before = _variables(model)
    for call in (toolkit.recalibrate_batchnorm, toolkit.diagnose_batchnorm):
        with pytest.raises(ValueError, match="batch 2 .* mask is all False"):
            call(
                model,
                tokens,
                batch_size=16,
                shuffle=False,  # the batches as given: the second one is all padding
                **{"include_never_updated": True} if call is toolkit.recalibrate_batchnorm else {},
            )
        _assert_all_variables_equal(model, before)


def test_renorm_layers_refuse_a_generator_they_would_read_twice():
    x, y = _tabular(96, loc=4.0, scale=3.0)
    model = _fit(_renorm_net(), x, y, epochs=2, batch_size=16)
    before = _variables(model)
    generator = (x[i : i + 16] for i in range(0, 96, 16))
    with pytest.raises(ValueError, match="generator or iterator can be read once"):
        toolkit.recalibrate_batchnorm(model, generator, batch_size=16)
    _assert_all_variables_equal(model, before)


# ---------------------------------------------------------------------------
# j. Batches as fit makes them, and a verdict that agrees with the recalibration
# ---------------------------------------------------------------------------


def _bn2_variance(model, x, **options):
    """bn2's moving variance after recalibrating on ``x`` (the model's statistics restored)."""
    with toolkit.frozen_moving_statistics(model):
        toolkit.recalibrate_batchnorm(model, x, batch_size=16, **options)
        return model.get_layer("bn2").moving_variance.numpy().copy()


def test_class_sorted_arrays_give_the_statistics_of_shuffled_batches(trained_cnn):
    """bn2 comes after bn1, which normalizes each batch: one-class batches change what bn2
    receives. Shuffled by the toolkit, class-sorted arrays give mixed batches, as fit does."""
    model, x, y = trained_cnn
    by_class = x[np.argsort(y.argmax(axis=1), kind="stable")]
    mixed = _bn2_variance(model, x, shuffle=False)  # x is in random order: mixed batches
    shuffled = _bn2_variance(model, by_class)  # the default: shuffled before batching
    one_class = _bn2_variance(model, by_class, shuffle=False)  # every batch one class

    def distance(a):
        return float(np.median(np.abs(np.log(a / mixed))))

    assert distance(shuffled) < 0.05
    assert distance(one_class) > 3 * distance(shuffled)


def test_shuffling_is_the_same_on_every_call_and_leaves_numpy_alone(trained_cnn):
    model, x, _ = trained_cnn
    state = np.random.get_state()[1].copy()
    first, second = _bn2_variance(model, x), _bn2_variance(model, x)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("batch_size", [2, 4, 8, 32])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_a_layer_just_recalibrated_is_never_flagged(trained_cnn, kind, batch_size):
    if kind == "conv":
        model, x, _ = trained_cnn
        x = x[:256]
    else:
        x, y = _tabular(256)
        model = _fit(_dense_net(), x, y, epochs=3, batch_size=16)
    with toolkit.frozen_moving_statistics(model):
        toolkit.recalibrate_batchnorm(model, x, batch_size=batch_size)
        rows = toolkit.diagnose_batchnorm(model, x, batch_size=batch_size)
    assert [r.name for r in rows if r.flagged] == [], [(r.name, r.var_ratio) for r in rows]


@pytest.mark.parametrize("batch_size", [8, 32])
@pytest.mark.parametrize("error", ["variance x2", "mean + sigma/2"])
def test_a_recalibrated_layer_put_off_is_still_flagged(trained_cnn, error, batch_size):
    """The agreement comes from the estimate, not from wider tolerances."""
    model, x, _ = trained_cnn
    x = x[:256]
    with toolkit.frozen_moving_statistics(model):
        toolkit.recalibrate_batchnorm(model, x, batch_size=batch_size)
        bn = model.get_layer("bn2")
        mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        if error == "variance x2":
            bn.moving_variance.assign(2 * var)
        else:
            bn.moving_mean.assign(mean + 0.5 * np.sqrt(var + bn.epsilon))
        rows = {r.name: r for r in toolkit.diagnose_batchnorm(model, x, batch_size=batch_size)}
    assert rows["bn2"].flagged and not rows["bn1"].flagged


class AlwaysBatchStatistics(keras.Model):
    """A generator block as pix2pix builds it: its last layer always normalizes with batch
    statistics, in predict too."""

    def __init__(self):
        super().__init__()
        self.conv1 = L.Conv2D(4, 3, padding="same")
        self.bn1 = L.BatchNormalization(name="bn1")
        self.conv2 = L.Conv2D(4, 3, padding="same")
        self.bn2 = L.BatchNormalization(name="bn2")
        self.head = L.Dense(2, activation="softmax")

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        h = keras.ops.relu(self.bn2(self.conv2(h), training=True))  # always batch statistics
        return self.head(keras.ops.mean(h, axis=(1, 2)))


def test_a_layer_served_with_batch_statistics_has_its_own_verdict():
    x, y = _images(64, np.random.default_rng(2))
    model = AlwaysBatchStatistics()
    model(x[:2])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # 4 updates: bn1's statistics are stale
    before = _variables(model)
    rows = {r.name.split("/")[-1]: r for r in toolkit.diagnose_batchnorm(model, x, batch_size=16)}
    _assert_all_variables_equal(model, before)
    assert rows["bn2"].verdict == "batch statistics in predict" and not rows["bn2"].flagged
    assert rows["bn1"].verdict == "mismatch"
    assert not rows["bn1"].batch_statistics_in_predict


def _conv_model():
    inputs = keras.Input((SIZE, SIZE, 1))
    features = L.BatchNormalization(name="bn")(L.Conv2D(3, 3, name="conv")(inputs))
    return keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(features)))


def test_batches_of_one_image_use_the_scatter_between_batches():
    x, _ = _images(64, np.random.default_rng(4))
    model = _conv_model()
    result = toolkit.recalibrate_batchnorm(model, x, batch_size=1, include_never_updated=True)
    assert int(result) == 1
    row = toolkit.diagnose_batchnorm(model, x, batch_size=1)[0]
    assert row.verdict == "ok" and np.isfinite(row.noise_log_var)
    bn = model.get_layer("bn")
    bn.moving_variance.assign(bn.moving_variance.numpy() / 2800)
    row = toolkit.diagnose_batchnorm(model, x, batch_size=1)[0]
    assert row.flagged and row.verdict == "mismatch"
    with pytest.raises(ValueError, match="2\\+ samples"):  # one image: no scatter to judge by
        toolkit.diagnose_batchnorm(model, x[:1], batch_size=1)


def _stateful_model():
    inputs = keras.Input((5, 3), batch_size=8)
    sequence = L.LSTM(4, stateful=True, return_sequences=True, name="lstm")(inputs)
    features = L.Flatten()(L.BatchNormalization(name="bn")(sequence))
    return keras.Model(inputs, L.Dense(2, activation="softmax")(features))


def test_a_stateful_rnn_carries_the_same_state_after_the_toolkit():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(32, 5, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 32)]
    model = _fit(_stateful_model(), x, y, epochs=1, batch_size=8)
    lstm = model.get_layer("lstm")
    carried = [s.numpy().copy() for s in lstm.states]
    served = model.predict(x[:8], verbose=0)
    for state, value in zip(lstm.states, carried, strict=True):  # predict moved them too
        state.assign(value)
    bad = x.copy()
    bad[20, 1, 0] = np.nan  # batch 3 of 8
    toolkit.diagnose_batchnorm(model, x, batch_size=8)
    with pytest.raises(ValueError, match="non-finite"):
        toolkit.recalibrate_batchnorm(model, bad, batch_size=8, shuffle=False)
    for state, value in zip(lstm.states, carried, strict=True):
        np.testing.assert_array_equal(state.numpy(), value)
    np.testing.assert_array_equal(model.predict(x[:8], verbose=0), served)
    for state, value in zip(lstm.states, carried, strict=True):
        state.assign(value)
    toolkit.recalibrate_batchnorm(model, x, batch_size=8)  # the statistics change, the state not
    for state, value in zip(lstm.states, carried, strict=True):
        np.testing.assert_array_equal(state.numpy(), value)


def test_precise_bn_refuses_features_and_labels_before_training():
    x, y = _tabular(64)
    model = _dense_net()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    before = _variables(model)
    with pytest.raises(ValueError, match="one array per input"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[toolkit.PreciseBN((x, y), batch_size=16)])
    _assert_all_variables_equal(model, before)  # refused before the first update
