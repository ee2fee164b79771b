"""Unit tests of how the series trains the case: ``utils.memorised`` and ``utils.StopWhenMemorised``.

Small models only (seconds). The expected answers are computed independently: the training-mode
batch statistics by NumPy from the layer's input, the class by ``np.argmax``.
"""

import keras
import numpy as np
import pytest

import utils


def _model(seed=0):
    """Input (6,) -> Dense(4) -> BatchNormalization -> Dense(3, softmax), compiled with Adam."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    normalized = keras.layers.BatchNormalization(name="bn")(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(normalized)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
    return model


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    x = (10 + 4 * rng.standard_normal((3, 6))).astype(np.float32)
    return x, np.eye(3, dtype=np.float32)


def _training_mode_classes(model, x):
    """The classes ``model(x, training=True)`` gives, computed with NumPy from the layer input."""
    dense, bn, head = (model.get_layer(n) for n in ("dense", "bn", "head"))
    h = x.astype(np.float64) @ dense.kernel.numpy() + dense.bias.numpy()
    z = (h - h.mean(0)) / np.sqrt(h.var(0) + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
    return np.argmax(z @ head.kernel.numpy() + head.bias.numpy(), axis=1)


def test_memorised_judges_the_training_mode_answer_and_leaves_statistics(data):
    x, y = data
    model = _model()
    before = [v.numpy().copy() for v in model.get_layer("bn").non_trainable_variables]
    expected = bool((_training_mode_classes(model, x) == np.arange(3)).all())
    assert utils.memorised(model, x, y) is expected
    model.fit(x, y, epochs=60, verbose=0)
    assert utils.memorised(model, x, y) is bool((_training_mode_classes(model, x) == np.arange(3)).all())
    assert utils.memorised(model, x, y)  # 60 Adam steps memorise three points
    after = [v.numpy() for v in model.get_layer("bn").non_trainable_variables]
    model.fit(x, y, epochs=1, verbose=0)  # fit still moves them: memorised() restored, not froze
    assert not np.array_equal(after[0], model.get_layer("bn").moving_mean.numpy())
    assert all(b.shape == a.shape for b, a in zip(before, after))


def test_memorised_restores_statistics_exactly(data):
    x, y = data
    model = _model()
    model.fit(x, y, epochs=3, verbose=0)
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    utils.memorised(model, x, y)
    for b, v in zip(before, model.non_trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_stop_when_memorised_runs_at_least_min_epochs_then_stops_at_first_memorised(data):
    x, y = data
    model = _model()
    stop = utils.StopWhenMemorised(x, y, min_epochs=4)
    history = model.fit(x, y, epochs=200, callbacks=[stop], verbose=0)
    epochs = len(history.history["loss"])
    assert stop.memorised and utils.memorised(model, x, y)
    assert stop.stopped_epoch == epochs == int(model.optimizer.iterations) >= 4
    if epochs > 4:  # it stopped at the *first* memorising epoch: one epoch less did not memorise
        again = _model()
        again.fit(x, y, epochs=epochs - 1, verbose=0)
        assert not utils.memorised(again, x, y)
    assert stop.model is None, "the callback lets go of the model"


def test_stop_when_memorised_reports_failure_when_budget_runs_out(data):
    x, y = data
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    memorised_at_start = utils.memorised(model, x, y)
    stop = utils.StopWhenMemorised(x, y, min_epochs=2)
    history = model.fit(x, y, epochs=3, callbacks=[stop], verbose=0)
    if not memorised_at_start:  # weights never move, so they never memorise
        assert not stop.memorised and stop.stopped_epoch == 3 == len(history.history["loss"])


def test_stop_when_memorised_rejects_bad_min_epochs(data):
    x, y = data
    with pytest.raises(ValueError, match="min_epochs"):
        utils.StopWhenMemorised(x, y, min_epochs=0)
