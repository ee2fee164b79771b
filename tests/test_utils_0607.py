"""Unit tests of the helpers of notebooks 06-07 in ``utils.py``.

Run with ``python -m pytest tests/test_utils_0607.py -q`` from the repository root.
Expected values are computed independently with NumPy from what the layers actually receive.
"""

import html

import numpy as np
import pytest

import utils
from utils import keras

#: The classes of ``draw_patterns`` in label order (notebook 06 defines the same tuple).
PATTERN_CLASSES = ("horizontal", "vertical", "diagonal", "blob")

# ---------------------------------------------------------------------------
# draw_patterns
# ---------------------------------------------------------------------------


def test_draw_patterns_shapes_balance_and_dtype():
    images, labels = utils.draw_patterns(10, size=12, rng=np.random.default_rng(0))
    assert images.shape == (10, 12, 12, 1) and images.dtype == np.float32
    assert labels.shape == (10, len(PATTERN_CLASSES)) and labels.dtype == np.float32
    assert np.all(labels.sum(axis=1) == 1)
    counts = labels.sum(axis=0)
    assert counts.max() - counts.min() <= 1  # balanced classes


def test_draw_patterns_is_reproducible_with_a_generator_and_with_the_global_seed():
    a = utils.draw_patterns(8, rng=np.random.default_rng(3))
    b = utils.draw_patterns(8, rng=np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    np.random.seed(5)
    c = utils.draw_patterns(8)
    np.random.seed(5)
    d = utils.draw_patterns(8)
    assert all(np.array_equal(x, y) for x, y in zip(c, d, strict=True))


def test_draw_patterns_gain_and_offset_map_every_pixel():
    plain, labels = utils.draw_patterns(6, rng=np.random.default_rng(1))
    shifted, same_labels = utils.draw_patterns(
        6, gain=2.0, offset=1.0, rng=np.random.default_rng(1)
    )
    np.testing.assert_array_equal(labels, same_labels)
    np.testing.assert_allclose(shifted, 2.0 * plain + 1.0, rtol=1e-5, atol=1e-5)


def test_draw_patterns_without_noise_draws_the_class_pattern():
    images, labels = utils.draw_patterns(40, size=16, noise=0.0, rng=np.random.default_rng(2))
    for image, label in zip(images[..., 0], labels.argmax(axis=1), strict=True):
        name = PATTERN_CLASSES[label]
        rows_constant = np.allclose(image, image[:, :1])  # horizontal stripes: rows constant
        columns_constant = np.allclose(image, image[:1, :])
        # diagonal stripes: constant along the anti-diagonals, x + y fixed
        diagonal = np.allclose(image[1:, :-1], image[:-1, 1:])
        assert rows_constant == (name == "horizontal")
        assert columns_constant == (name == "vertical")
        assert diagonal == (name == "diagonal")


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        ({"count": 0}, ValueError, "count"),
        ({"count": -3}, ValueError, "count"),
        ({"count": 4, "size": 4}, ValueError, "size"),
        ({"count": 4, "noise": -1.0}, ValueError, "noise"),
        ({"count": 4, "gain": 0.0}, ValueError, "gain"),
        ({"count": 4, "gain": -1.0}, ValueError, "gain"),
        ({"count": 4, "noise": float("nan")}, ValueError, "noise"),
        ({"count": 4, "offset": float("inf")}, ValueError, "offset"),
        ({"count": 2.5}, TypeError, "count"),
        ({"count": "8"}, TypeError, "count"),
        ({"count": 4, "gain": "2"}, TypeError, "gain"),
    ],
)
def test_draw_patterns_rejects_bad_arguments_naming_only_the_bad_one(kwargs, error, named):
    with pytest.raises(error) as caught:
        utils.draw_patterns(**kwargs)
    message = str(caught.value)
    assert message.startswith(named)
    others = {"count", "size", "noise", "offset", "gain"} - {named}
    assert not any(other in message for other in others), message


# ---------------------------------------------------------------------------
# build_small_cnn
# ---------------------------------------------------------------------------


def test_build_small_cnn_layers_names_and_shapes():
    model = utils.build_small_cnn(size=16, num_classes=4, momentum=0.9, prefix="p_")
    names = [layer.name for layer in utils.batchnorm_layers(model)]
    assert names == ["p_bn1", "p_bn2", "p_bn3"]
    assert all(layer.momentum == 0.9 for layer in utils.batchnorm_layers(model))
    assert model.output.shape[1:] == (4,)
    assert model.get_layer("p_bn2").input.shape[1:] == (8, 8, 16)
    assert model.get_layer("p_bn3").input.shape[1:] == (16,)


def test_build_small_cnn_same_seed_same_weights():
    a = utils.build_small_cnn(seed=7)
    b = utils.build_small_cnn(seed=7)
    c = utils.build_small_cnn(seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    kernel_a, kernel_c = a.get_layer("conv1").kernel.numpy(), c.get_layer("conv1").kernel.numpy()
    assert not np.array_equal(kernel_a, kernel_c)


def test_build_small_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError):
        utils.build_small_cnn(size=4)
    with pytest.raises(ValueError):
        utils.build_small_cnn(num_classes=1)


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1, None, "0.9"])
def test_build_small_cnn_rejects_a_momentum_outside_keras_convention(momentum):
    with pytest.raises(ValueError, match="0 <= momentum < 1"):
        utils.build_small_cnn(momentum=momentum)


# ---------------------------------------------------------------------------
# per_batch_statistics
# ---------------------------------------------------------------------------


def test_per_batch_statistics_match_numpy_and_leave_the_model_untouched():
    model = utils.build_small_cnn(size=8, seed=1)
    images, _ = utils.draw_patterns(10, size=8, rng=np.random.default_rng(4))
    before = [w.numpy().copy() for w in model.weights]
    stats = utils.per_batch_statistics(model, images, 4)
    assert [len(stats[name]) for name in ("bn1", "bn2", "bn3")] == [3, 3, 3]  # 4 + 4 + 2
    # bn1 receives conv1's output; compute it independently for every batch
    conv = keras.Model(model.input, model.get_layer("conv1").output)
    for index, start in enumerate(range(0, 10, 4)):
        values = np.asarray(conv(images[start : start + 4]), dtype=np.float64)
        moments = stats["bn1"][index]
        np.testing.assert_allclose(moments.mean, values.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(moments.var, values.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6)
        assert moments.count == values.shape[0] * 8 * 8
    after = [w.numpy() for w in model.weights]
    assert all(np.array_equal(b, a) for b, a in zip(before, after, strict=False))


def test_per_batch_statistics_of_one_sample_after_a_dense_layer_have_zero_variance():
    model = utils.build_small_cnn(size=8, seed=1)
    images, _ = utils.draw_patterns(3, size=8, rng=np.random.default_rng(5))
    stats = utils.per_batch_statistics(model, images, 1)
    assert all(np.all(m.var == 0) for m in stats["bn3"])
    assert all(np.median(m.var) > 0 for m in stats["bn1"])


def test_per_batch_statistics_rejects_bad_arguments():
    model = utils.build_small_cnn(size=8)
    two = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="images is empty"):
        utils.per_batch_statistics(model, np.zeros((0, 8, 8, 1), np.float32), 4)
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        utils.per_batch_statistics(model, two, 0)
    for bad in (2.5, "4", None):
        with pytest.raises(TypeError, match="batch_size must be an integer"):
            utils.per_batch_statistics(model, two, bad)
    plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        utils.per_batch_statistics(plain, two, 1)


# ---------------------------------------------------------------------------
# html_table
# ---------------------------------------------------------------------------


def test_html_table_formats_and_escapes():
    table = utils.html_table(["name", "value"], [["a<b", 0.123456], ["c", 3]], caption="x & y")
    text = table.data
    assert "<caption>x &amp; y</caption>" in text
    assert "<td>a&lt;b</td>" in text and "<td>0.123</td>" in text and "<td>3</td>" in text
    assert text.count("<tr>") == 3
    assert html.unescape(text).count("a<b") == 1


def test_html_table_formats_numpy_floats_like_python_floats():
    text = utils.html_table(["a", "b"], [[np.float32(0.123456), np.float64(2.0 / 3)]]).data
    assert "<td>0.123</td>" in text and "<td>0.667</td>" in text


def test_html_table_rejects_rows_of_the_wrong_length():
    with pytest.raises(ValueError, match="row 0 has 1 cells; the header has 2"):
        utils.html_table(["a", "b"], [[1]])


def test_html_table_rejects_a_string_header_and_rows_that_are_not_lists():
    with pytest.raises(TypeError, match=r"must be (a )?lists?\b"):
        utils.html_table("ab", [[1, 2]])
    with pytest.raises(TypeError, match=r"must be (a )?lists?\b"):
        utils.html_table(["a", "b"], "12")
    with pytest.raises(TypeError, match="row 0 must be a list of 1 cells, got int"):
        utils.html_table(["a"], [1, 2])
