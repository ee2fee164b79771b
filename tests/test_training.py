"""Unit tests of how the series trains the case: ``utils.memorised`` and
``utils.StopWhenMemorised``.

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
    assert utils.memorised(model, x, y) is bool(
        (_training_mode_classes(model, x) == np.arange(3)).all()
    )
    assert utils.memorised(model, x, y)  # 60 Adam steps memorise three points
    after = [v.numpy() for v in model.get_layer("bn").non_trainable_variables]
    model.fit(x, y, epochs=1, verbose=0)  # fit still moves them: memorised() restored, not froze
    assert not np.array_equal(after[0], model.get_layer("bn").moving_mean.numpy())
    assert all(b.shape == a.shape for b, a in zip(before, after, strict=False))


def test_memorised_restores_statistics_exactly(data):
    x, y = data
    model = _model()
    model.fit(x, y, epochs=3, verbose=0)
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    utils.memorised(model, x, y)
    for b, v in zip(before, model.non_trainable_variables, strict=False):
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


def _small_resnet_stand_in(num_classes, seed=0, **_):
    """What ``utils.build_resnet50`` returns, in small: uncompiled, seeded, with
    BatchNormalization."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    normalized = keras.layers.BatchNormalization(name="bn")(hidden)
    return keras.Model(
        inputs, keras.layers.Dense(num_classes, activation="softmax", name="head")(normalized)
    )


def test_case_record_notes_each_epoch_without_changing_the_training(data, tmp_path, monkeypatch):
    x, y = data
    monkeypatch.setattr(utils, "CASE_DIR", tmp_path)
    plain = utils.compile_model(_small_resnet_stand_in(3))
    plain.fit(x, y, epochs=4, verbose=0)
    model = utils.compile_model(_small_resnet_stand_in(3))
    record = utils.CaseRecord(x, y)
    model.fit(x, y, epochs=4, verbose=0, callbacks=[record])
    assert all(
        np.array_equal(a, b) for a, b in zip(plain.get_weights(), model.get_weights(), strict=True)
    )
    assert record.updates == 4 and len(record.moving["bn"]) == len(record.batch["bn"]) == 5
    assert np.array_equal(record.moving["bn"][0][1], np.ones(4))  # Keras's start value
    assert np.array_equal(
        record.moving["bn"][-1][1], model.get_layer("bn").moving_variance.numpy()
    )
    h = (
        x.astype(np.float64) @ model.get_layer("dense").kernel.numpy()
        + model.get_layer("dense").bias.numpy()
    )
    assert np.allclose(record.batch["bn"][-1].var, h.var(axis=0), rtol=1e-5)
    assert np.allclose(record.fit_loss, record.train_loss[:-1], rtol=1e-4)
    assert [p.suffix for p in tmp_path.iterdir()] == [".pkl"]


def test_trained_case_reads_what_was_saved_and_trains_when_nothing_is(data, tmp_path, monkeypatch):
    x, y = data
    monkeypatch.setattr(utils, "CASE_DIR", tmp_path)
    monkeypatch.setattr(utils, "build_resnet50", _small_resnet_stand_in)
    monkeypatch.setattr(utils, "MAX_EPOCHS", 8)
    trained, first = utils.trained_case(x, y)  # nothing saved: trains, at least 5 updates
    (saved,) = tmp_path.iterdir()
    read, second = utils.trained_case(x, y)
    assert 5 <= first.updates == second.updates <= 8
    assert all(
        np.array_equal(a, b)
        for a, b in zip(trained.get_weights(), read.get_weights(), strict=True)
    )
    assert second.infer_loss == first.infer_loss and second.fit_loss == first.fit_loss
    saved.write_bytes(saved.read_bytes()[:100])  # a half-written file: trained again, not read
    again, third = utils.trained_case(x, y)
    assert third.infer_loss == first.infer_loss and len(saved.read_bytes()) > 100
    assert all(
        np.array_equal(a, b)
        for a, b in zip(trained.get_weights(), again.get_weights(), strict=True)
    )


def test_case_record_saves_only_the_case_s_recipe(data, tmp_path, monkeypatch):
    x, y = data
    monkeypatch.setattr(utils, "CASE_DIR", tmp_path)
    (tmp_path / "my_experiment.pkl").write_bytes(b"a learner's file")
    weighted = utils.compile_model(_small_resnet_stand_in(3))
    with pytest.warns(UserWarning, match="not the case's training"):  # fit's loss is weighted
        weighted.fit(
            x,
            y,
            epochs=3,
            verbose=0,
            class_weight={0: 10.0, 1: 1.0, 2: 1.0},
            callbacks=[utils.CaseRecord(x, y)],
        )
    resumed = utils.compile_model(_small_resnet_stand_in(3))
    with pytest.warns(UserWarning, match="not the case's training"):  # started at epoch 2
        resumed.fit(x, y, initial_epoch=2, epochs=4, verbose=0, callbacks=[utils.CaseRecord(x, y)])
    with pytest.raises(ValueError, match="one batch per epoch"):
        resumed.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[utils.CaseRecord(x, y)])
    assert [p.name for p in tmp_path.iterdir()] == ["my_experiment.pkl"]


def test_measure_remedy_refuses_what_it_cannot_judge(data):
    x, y = data
    model = utils.compile_model(_small_resnet_stand_in(3))
    with pytest.raises(ValueError, match="2\\+ images"):
        utils.measure_remedy("one", model, x[:1], y[:1], 1)
    with pytest.raises(TypeError, match="updates must be an integer"):
        utils.measure_remedy("half", model, x, y, 3.7)
    with pytest.raises(TypeError, match="list of RemedyResult"):
        utils.remedies_table([{"name": "a dict"}])
    row = utils.measure_remedy("as served", model, x, y, 1, training_mode=True)
    assert row.same_computation and row.mode_gap == 0.0
    assert utils.accuracy(np.full((3, 3), np.nan), y) == 0.0  # NaN outputs are never right
    rebuilt = utils.RemedyResult(**vars(row))  # as notebook 05 reads the deep dive's rows
    assert rebuilt == row and not rebuilt.right
