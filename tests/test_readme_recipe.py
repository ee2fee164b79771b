"""README's plain-Keras check and fix, run exactly as printed there."""

import re
from pathlib import Path

import keras
import numpy as np

import utils

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block(marker: str) -> str:
    return re.search(rf"## {marker}\n.*?```python\n(.*?)```", README, re.S).group(1)


def _trained_nested_model():
    """The small CNN inside an outer model (the recipe must reach nested models), trained a
    little, with one BatchNormalization layer frozen."""
    x, y = utils.draw_patterns(128, rng=np.random.default_rng(0))
    inner = utils.build_small_cnn(seed=1)
    model = keras.Sequential([keras.Input(x.shape[1:]), inner])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    inner.get_layer("bn2").trainable = False  # frozen: the fix leaves it alone
    return model, inner, x, y


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def test_the_fix_changes_only_the_moving_statistics_and_averages_the_batches():
    code = re.search(r"<!-- recipe -->\n```python\n(.*?)```", README, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    namespace = {}
    exec(compile(code, "README recipe", "exec"), namespace)
    model, inner, x, _ = _trained_nested_model()
    frozen = inner.get_layer("bn2")
    trained = [layer for layer in utils.batchnorm_layers(inner) if layer is not frozen]
    allowed = {id(v) for layer in trained for v in (layer.moving_mean, layer.moving_variance)}
    before = utils.moving_statistics(model)
    with utils.frozen_moving_statistics(model):  # the toolkit's estimate, then put back
        utils.recalibrate_batchnorm(model, x, batch_size=16, shuffle=False)  # the same batches
        expected = utils.moving_statistics(model)
    weights = _weights(model)
    namespace["recalibrate"](model, [x[i : i + 16] for i in range(0, 128, 16)])
    for variable, old, new in zip(model.weights, weights, _weights(model), strict=False):
        if id(variable) not in allowed:
            assert np.array_equal(old, new), f"{variable.path} changed"
    got = utils.moving_statistics(model)
    for path, (mean, variance) in got.items():
        if path.endswith("bn2"):
            assert np.array_equal(variance, before[path][1])
            continue
        assert not np.allclose(variance, before[path][1]), f"{path} was not recalibrated"
        assert np.allclose(mean, expected[path][0], rtol=1e-4, atol=1e-6), path
        assert np.allclose(variance, expected[path][1], rtol=1e-4, atol=1e-6), path
    assert [layer.momentum for layer in utils.batchnorm_layers(model)] == [0.99] * 3


def test_the_check_restores_the_model_and_prints_both_accuracies(capsys):
    model, _, x, y = _trained_nested_model()
    before = _weights(model)
    exec(
        compile(_block("Check your own model"), "README check", "exec"),
        {"model": model, "x_train": x, "y_train": y},
    )
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights(model), strict=False))
    printed = capsys.readouterr().out
    assert re.search(r"training mode: [0-9.]+\nserved: +[0-9.]+\n", printed), printed
