"""README's plain-Keras recalibration gives the toolkit's pooled statistics."""

import re
from pathlib import Path

import keras
import numpy as np

import utils

ROOT = Path(__file__).resolve().parent.parent


def _recipe():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- recipe -->\n```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README recipe", "exec"), namespace)
    return code, namespace["recalibrate"]


def test_the_recipe_is_short_and_matches_recalibrate_batchnorm():
    code, recalibrate = _recipe()
    assert len(code.strip().splitlines()) <= 25
    x, y = utils.draw_patterns(128, rng=np.random.default_rng(0))
    model = utils.build_small_cnn(seed=1)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.get_layer("bn2").trainable = False  # frozen: both leave it alone
    frozen_before = utils.moving_statistics(model)["bn2"]
    with utils.frozen_moving_statistics(model):
        utils.recalibrate_batchnorm(model, x, batch_size=16)
        expected = utils.moving_statistics(model)
    recalibrate(model, [x[i:i + 16] for i in range(0, 128, 16)])
    got = utils.moving_statistics(model)
    for path in ("bn1", "bn3"):
        assert np.allclose(got[path][0], expected[path][0], rtol=1e-5, atol=1e-6)
        assert np.allclose(got[path][1], expected[path][1], rtol=1e-4, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(got["bn2"], frozen_before))
    assert [layer.momentum for layer in utils.batchnorm_layers(model)] == [0.99] * 3
