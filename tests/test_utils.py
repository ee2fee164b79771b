"""Unit tests of ``utils.py``: every public helper, each against values known in advance.

Run with ``python -m pytest tests/test_utils.py -q`` from the repository root.
The network tests use a tiny model whose first layer is BatchNormalization, so
what that layer receives is the data itself and every statistic can be computed
with numpy. The ResNet50 builder is exercised once per variant at 32 x 32.
"""

import hashlib
import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # also set in conftest.py; repeated so this file stands alone

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import utils  # noqa: E402
from utils import keras, tf  # noqa: E402  (imported by utils with start-up noise silenced)

# ---------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------


def _save_gray(path, value, size=(8, 8)):
    """Save a uniform 8-bit grayscale PNG and return its path."""
    Image.new("L", size, int(value)).save(path)
    return path


def _noise_png_bytes(side=64, seed=0):
    """A real PNG whose pixel data (random, so incompressible) fills most of the file."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiny_model(name="tiny"):
    """Input (4, 4, 2) -> BatchNormalization -> global average -> Dense(2, softmax)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=name)


@pytest.fixture
def tiny():
    """A fresh tiny model (session cleared first) and its BatchNormalization layer."""
    keras.backend.clear_session()
    model = _tiny_model()
    return model, model.get_layer("bn")


@pytest.fixture
def data():
    """10 samples with per-channel mean about 5 and variance about 9, and one-hot labels."""
    rng = np.random.default_rng(42)
    x = (5.0 + 3.0 * rng.standard_normal((10, 4, 4, 2))).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(10) % 2]
    return x, y


def _np_moments(x):
    """numpy's per-channel mean and biased variance over samples, rows and columns."""
    x64 = np.asarray(x, dtype=np.float64)
    return x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _determinism_enabled():
    check = getattr(tf.config.experimental, "is_op_determinism_enabled", None)
    if check is None:  # not exported by every TensorFlow release
        from tensorflow.python.framework import config as tf_config

        check = tf_config.is_op_determinism_enabled
    return bool(check())


def _set_determinism(enabled):
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


# ---------------------------------------------------------------------------
# Setup: versions and seeds
# ---------------------------------------------------------------------------


def test_version_tuple_keeps_leading_numbers():
    assert utils._version_tuple("2.21.0rc1") == (2, 21, 0)
    assert utils._version_tuple("3.14") == (3, 14)
    assert utils._version_tuple("10.0.0.dev0") == (10, 0, 0)
    assert utils._version_tuple("2.9.1") < utils._version_tuple("2.16")


def test_check_versions_passes_for_installed_packages():
    import PIL

    found = utils.check_versions()
    assert found == {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "pillow": PIL.__version__,
    }


def test_check_versions_names_the_old_package_and_the_fix():
    installed = {"tensorflow": "2.10.0", "keras": "3.15.1", "pillow": "13.0.0"}
    with pytest.raises(RuntimeError) as info:
        utils.check_versions(installed=installed)
    message = str(info.value)
    assert "tensorflow 2.10.0" in message
    assert "pip install -r requirements.txt" in message
    assert "keras 3.15.1" not in message  # only the too-old package is listed
    assert "pillow" not in message


def test_check_versions_lists_every_old_package():
    installed = {"tensorflow": "2.15.1", "keras": "3.13.9", "pillow": "9.5.0"}
    with pytest.raises(RuntimeError) as info:
        utils.check_versions(installed=installed)
    message = str(info.value)
    for fragment in ("tensorflow 2.15.1", "keras 3.13.9", "pillow 9.5.0"):
        assert fragment in message


def test_check_versions_accepts_the_minimum_versions():
    minimum = {name: version for name, (version, _) in utils.MIN_VERSIONS.items()}
    assert utils.check_versions(installed=minimum) == minimum


@pytest.fixture
def determinism_restored():
    before = _determinism_enabled()
    yield
    _set_determinism(before)


def test_setup_seeds_and_enables_determinism(capsys, determinism_restored):
    _set_determinism(False)
    utils.setup(7)
    assert _determinism_enabled()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "seed 7" in lines[0]
    assert "deterministic" in lines[0]

    first = np.random.rand()
    utils.setup(7)
    assert np.random.rand() == first
    utils.setup(8)
    assert np.random.rand() != first
    capsys.readouterr()


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_load_images_sorted_names_and_identity_labels(tmp_path):
    for name, value in (("b.png", 100), ("c.png", 200), ("a.png", 10)):
        _save_gray(tmp_path / name, value)
    images, labels, names = utils.load_images(tmp_path, size=8)
    assert names == ["a.png", "b.png", "c.png"]
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), [10, 100, 200], atol=0.5)
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, np.eye(3))


def test_load_images_shape_dtype_and_range(tmp_path):
    # A sharp black/white edge, shrunk with Lanczos: ringing must be clipped to 0-255.
    edge = np.zeros((30, 30), dtype=np.uint8)
    edge[:, 15:] = 255
    Image.fromarray(edge).save(tmp_path / "edge.png")
    _save_gray(tmp_path / "gray.png", 128, size=(20, 12))
    images, labels, names = utils.load_images(tmp_path, size=16)
    assert images.shape == (2, 16, 16, 1)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 255.0
    assert labels.shape == (2, 2)
    assert names == ["edge.png", "gray.png"]


def test_image_files_skips_hidden_entries_and_folders(tmp_path):
    _save_gray(tmp_path / "b.png", 1)
    _save_gray(tmp_path / "a.png", 2)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1 not an image")
    checkpoints = tmp_path / ".ipynb_checkpoints"
    checkpoints.mkdir()
    _save_gray(checkpoints / "a-checkpoint.png", 3)
    (tmp_path / "subfolder").mkdir()
    _save_gray(tmp_path / "subfolder" / "c.png", 4)

    files = utils.image_files(tmp_path)
    assert [f.name for f in files] == ["a.png", "b.png"]
    # The hidden junk is not read, so loading succeeds with the two images only.
    images, labels, names = utils.load_images(tmp_path, size=8)
    assert names == ["a.png", "b.png"]
    assert images.shape == (2, 8, 8, 1)


def test_image_files_missing_folder_and_file_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        utils.image_files(tmp_path / "nowhere")
    a_file = _save_gray(tmp_path / "a.png", 0)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        utils.image_files(a_file)


def test_load_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        utils.load_images(tmp_path / "nowhere")


def test_load_images_needs_two_images(tmp_path):
    with pytest.raises(ValueError):
        utils.load_images(tmp_path)  # empty
    _save_gray(tmp_path / "only.png", 50)
    with pytest.raises(ValueError, match="1 image"):
        utils.load_images(tmp_path)


def test_load_image_rejects_unreadable_files_by_name(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    whole = _noise_png_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    # The untruncated bytes do load: the failure below is the truncation's.
    (tmp_path / "whole.png").write_bytes(whole)
    assert utils.load_image(tmp_path / "whole.png", size=8).shape == (8, 8)

    for bad in (text, empty, truncated):
        with pytest.raises(ValueError) as info:
            utils.load_image(bad, size=8)
        assert bad.name in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        utils.load_image(empty, size=8)


def test_load_images_names_the_unreadable_file(tmp_path):
    _save_gray(tmp_path / "a.png", 10)
    _save_gray(tmp_path / "b.png", 20)
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="readme.txt"):
        utils.load_images(tmp_path, size=8)


def test_load_image_scales_16_bit_grayscale(tmp_path):
    for value, expected in ((65535, 255.0), (32768, 32768 * 255 / 65535), (0, 0.0)):
        path = tmp_path / f"deep_{value}.png"
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)
        with Image.open(path) as check:
            assert check.mode in ("I;16", "I")  # really a 16-bit file
        loaded = utils.load_image(path, size=8)
        np.testing.assert_allclose(loaded, expected, atol=0.05)


def test_load_image_composites_transparent_rgba_onto_white(tmp_path):
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)  # all black
    pixels[:, 4:, 3] = 255  # right half opaque; left half fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    loaded = utils.load_image(path, size=8)
    np.testing.assert_allclose(loaded[:, :4], 255.0, atol=0.5)
    np.testing.assert_allclose(loaded[:, 4:], 0.0, atol=0.5)


def test_load_image_palette_with_transparency_entry(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 50, 50, 50] + [0, 0, 0] * 254)
    image.paste(1, (4, 0, 8, 8))  # right half: opaque gray 50
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)  # palette entry 0 (black) is transparent
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 0
    loaded = utils.load_image(path, size=8)
    np.testing.assert_allclose(loaded[:, :4], 255.0, atol=0.5)
    np.testing.assert_allclose(loaded[:, 4:], 50.0, atol=0.5)


def test_load_image_applies_exif_orientation(tmp_path):
    # Stored 40 wide x 20 high: left half black, right half white.
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == 6

    # Upright, the picture is 20 wide x 40 high with the black half on top.
    loaded = utils.load_image(path, size=20)
    top, bottom = loaded[:10].mean(), loaded[10:].mean()
    left, right = loaded[:, :10].mean(), loaded[:, 10:].mean()
    assert top < 40 and bottom > 215
    assert abs(left - right) < 20  # ignoring EXIF would make left dark, right bright


def test_load_image_stretches_non_square_rgb_jpeg(tmp_path):
    path = tmp_path / "wide.jpg"
    Image.new("RGB", (30, 10), (255, 0, 0)).save(path, quality=95)
    loaded = utils.load_image(path, size=16)
    assert loaded.shape == (16, 16)
    assert loaded.dtype == np.float32
    # ITU-R 601 luma of pure red: 0.299 * 255 = 76.2
    np.testing.assert_allclose(loaded, 76.2, atol=4)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def _digest(arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _conv_kernels(model):
    return [
        layer.kernel.numpy()
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]


@pytest.fixture(scope="module")
def resnet_facts():
    """Build each ResNet50 variant once at 32 x 32 and keep small facts about it."""
    facts = {}
    probe = np.zeros((1, 32, 32, 1), dtype=np.float32)

    def summarize(model):
        bns = utils.batchnorm_layers(model)
        groups = [
            layer
            for layer in model.layers
            if isinstance(layer, keras.layers.GroupNormalization)
        ]
        return {
            "n_bn": len(bns),
            "momenta": {layer.momentum for layer in bns},
            "renorm": {bool(getattr(layer, "renorm", False)) for layer in bns},
            "clipping": [dict(getattr(layer, "renorm_clipping", None) or {}) for layer in bns],
            "n_group": len(groups),
            "group_sizes": {layer.groups for layer in groups},
            "input_shape": tuple(model.input_shape),
            "output_shape": tuple(model.output_shape),
            "weights": _digest(model.get_weights()),
            "convs": _digest(_conv_kernels(model)),
            "n_convs": len(_conv_kernels(model)),
            "probe": keras.ops.convert_to_numpy(model(probe, training=False)),
        }

    for key, kwargs in (
        ("batch", {"momentum": 0.9}),
        ("batch_again", {"momentum": 0.9}),
        ("group", {"normalization": "group"}),
        ("renorm", {"normalization": "renorm", "momentum": 0.8}),
        ("renorm_clipped", {"normalization": "renorm",
                            "renorm_clipping": {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}}),
    ):
        keras.backend.clear_session()
        model = utils.build_resnet50(3, size=32, **kwargs)
        facts[key] = summarize(model)
        del model
    keras.backend.clear_session()
    return facts


def test_build_resnet50_batch(resnet_facts):
    facts = resnet_facts["batch"]
    assert facts["n_bn"] == 53
    assert facts["momenta"] == {0.9}
    assert facts["renorm"] == {False}
    assert facts["input_shape"] == (None, 32, 32, 1)
    assert facts["output_shape"] == (None, 3)
    np.testing.assert_allclose(facts["probe"].sum(), 1.0, rtol=1e-5)


def test_build_resnet50_is_reproducible(resnet_facts):
    assert resnet_facts["batch"]["weights"] == resnet_facts["batch_again"]["weights"]
    np.testing.assert_array_equal(
        resnet_facts["batch"]["probe"], resnet_facts["batch_again"]["probe"]
    )


def test_build_resnet50_group(resnet_facts):
    facts = resnet_facts["group"]
    assert facts["n_bn"] == 0
    assert facts["n_group"] == 53
    assert facts["group_sizes"] == {32}
    assert facts["n_convs"] == resnet_facts["batch"]["n_convs"] == 53
    assert facts["convs"] == resnet_facts["batch"]["convs"]
    assert facts["output_shape"] == (None, 3)
    np.testing.assert_allclose(facts["probe"].sum(), 1.0, rtol=1e-5)


def test_build_resnet50_renorm(resnet_facts):
    facts = resnet_facts["renorm"]
    assert facts["n_bn"] == 53
    assert facts["renorm"] == {True}
    assert facts["momenta"] == {0.8}
    assert facts["convs"] == resnet_facts["batch"]["convs"]
    assert facts["output_shape"] == (None, 3)
    assert facts["clipping"] == [{}] * 53  # Keras then clips nothing
    clipped = resnet_facts["renorm_clipped"]
    assert clipped["clipping"] == [{"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}] * 53
    with pytest.raises(ValueError, match="renorm_clipping needs"):
        utils.build_resnet50(3, size=32, renorm_clipping={"rmax": 3.0})


def test_build_resnet50_rejects_unknown_normalization():
    with pytest.raises(ValueError, match="layer"):
        utils.build_resnet50(3, size=32, normalization="layer")


def test_compile_model(tiny):
    model, _ = tiny
    returned = utils.compile_model(model, learning_rate=0.01)
    assert returned is model
    assert model.run_eagerly is True
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    config = model.get_compile_config()
    assert config["loss"] == "categorical_crossentropy"
    assert config["metrics"] == ["accuracy"]


def _identity_softmax_model():
    """Input (2,) -> Dense(2, softmax) with identity kernel: the logits are the input."""
    keras.backend.clear_session()
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([np.eye(2, dtype=np.float32), np.zeros(2, dtype=np.float32)])
    return model


def test_loss_and_accuracy_from_model_tensor_uses_logits():
    model = _identity_softmax_model()
    logits = np.array([[100.0, -100.0], [1.0, 2.0]], dtype=np.float32)
    labels = np.array([[0, 1], [0, 1]], dtype=np.float32)
    # -log softmax(logits)[true class], by hand: 200 + log(1 + e^-200) and log(1 + e^-1).
    expected = (200.0 + np.log1p(np.exp(-200.0)) + np.log1p(np.exp(-1.0))) / 2
    loss, acc = utils.loss_and_accuracy(model(logits, training=False), labels)
    assert loss == pytest.approx(expected, rel=1e-5)  # not clipped at -ln(1e-7) = 16.1
    assert acc == 0.5
    utils.compile_model(model)
    evaluated_loss, evaluated_acc = model.evaluate(logits, labels, verbose=0)
    assert loss == pytest.approx(evaluated_loss, rel=1e-6)
    assert acc == pytest.approx(evaluated_acc)


def test_loss_and_accuracy_from_probabilities_is_clipped():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    labels = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    loss, acc = utils.loss_and_accuracy(probabilities, labels)
    assert loss == pytest.approx(-(np.log(0.7) + np.log(0.8)) / 2, rel=1e-5)
    assert acc == 1.0
    # A zero probability on the true class costs -ln(1e-7), not infinity.
    loss, acc = utils.loss_and_accuracy(
        np.array([[1.0, 0.0]], dtype=np.float32), np.array([[0.0, 1.0]], dtype=np.float32)
    )
    assert loss == pytest.approx(-np.log(1e-7), rel=1e-4)
    assert acc == 0.0


def test_accuracy_hand_computed():
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    labels = np.eye(3)[[0, 2, 2]]
    assert utils.accuracy(probabilities, labels) == pytest.approx(2 / 3)
    assert utils.accuracy(probabilities, np.eye(3)[[1, 0, 0]]) == 0.0
    assert utils.accuracy(probabilities, np.eye(3)[[0, 2, 1]]) == 1.0


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def test_batchnorm_layers_finds_nested_layers_in_order():
    keras.backend.clear_session()
    inner = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.BatchNormalization(name="inner_bn"),
            keras.layers.Conv2D(2, 1),
            keras.layers.GroupNormalization(groups=2, name="not_bn"),
        ],
        name="inner",
    )
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.BatchNormalization(name="first_bn")(inputs)
    x = inner(x)
    x = keras.layers.BatchNormalization(name="last_bn")(x)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)

    found = utils.batchnorm_layers(model)
    assert [layer.name for layer in found] == ["first_bn", "inner_bn", "last_bn"]
    assert all(isinstance(layer, keras.layers.BatchNormalization) for layer in found)
    assert utils.batchnorm_layers(inner)[0] is found[1]

    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert utils.batchnorm_layers(plain) == []


def test_named_batchnorm_layers_gives_unique_paths():
    keras.backend.clear_session()
    inner = keras.Sequential(
        [keras.Input((4, 4, 2)), keras.layers.BatchNormalization(name="bn")], name="inner"
    )
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = inner(x)
    wrapped = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="bn"), name="td")
    model = keras.Model(inputs, wrapped(x))
    named = utils.named_batchnorm_layers(model)
    assert list(named) == ["bn", "inner/bn", "td/bn"]
    assert named["bn"] is model.get_layer("bn") and named["inner/bn"] is inner.get_layer("bn")
    assert list(named.values()) == utils.batchnorm_layers(model)
    assert list(utils.moving_statistics(model)) == list(named)
    assert utils.named_batchnorm_layers(keras.Sequential([keras.Input((3,))])) == {}


def test_log_variance_ratio_hand_computed():
    ratio = utils.log_variance_ratio([3.0, 0.5, 1.0], [1.0, 1.0, 1.0], eps=0.0)
    np.testing.assert_allclose(ratio, np.log([3.0, 0.5, 1.0]))
    # Symmetric: twice too large and half too small are equally far.
    assert abs(utils.log_variance_ratio(2.0, 1.0, 0.0)) == pytest.approx(
        abs(utils.log_variance_ratio(0.5, 1.0, 0.0))
    )
    # eps is added to both before the log: tiny variances count as equal.
    assert utils.log_variance_ratio(1e-8, 1e-6, eps=1e-3) == pytest.approx(
        np.log((1e-8 + 1e-3) / (1e-6 + 1e-3))
    )


def test_gaps_table_html():
    rows = [
        utils.LayerGap(0, "conv1_bn", 64, 9.0, 1.0, 0.1111, 1.6667, 0.2, 0.1, True),
        utils.LayerGap(1, "block/bn", 8, 2.0, 2.1, 0.01, 1.05, 0.05, 1.1, False, frozen=True),
        utils.LayerGap(2, "pre_bn", 8, 4.0, 0.5, 0.5, 0.125, 0.9, 0.1, True, frozen=True),
    ]
    table = utils.gaps_table_html(rows)
    assert table.startswith("<table") and table.count("<tr>") == 1 + 3
    assert "<b>mismatch</b>" in table and "<b>frozen, stale</b>" in table
    assert ">frozen<" in table and ">trains<" in table and "OFF" not in table
    assert "2 of 3 BatchNormalization layers flagged: 1 mismatch, 1 frozen, stale" in table
    short = utils.gaps_table_html(rows, max_rows=1)
    assert "block/bn" not in short and "... 2 more layers" in short


def test_gaps_table_html_rejects_a_model_and_names_what_to_pass():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(TypeError, match=r"rows of utils.diagnose_batchnorm\(model, x\)"):
        utils.gaps_table_html(model)


def test_recalibration_counts_layers_and_keeps_details(tiny, data):
    model, bn = tiny
    x, _ = data
    result = utils.recalibrate_batchnorm(model, x, batch_size=4)
    assert isinstance(result, utils.Recalibration) and isinstance(result, int)
    assert result == 1 and f"{result}" == "1" and str(result) == "1"
    assert (result.samples, result.batches, result.estimator) == (10, 3, "population")
    assert result.skipped == [] and result.statistics["bn"].count == 10 * 4 * 4
    np.testing.assert_allclose(result.statistics["bn"].var, _np_moments(x)[1], rtol=1e-5)
    assert "1 layers updated from 10 samples in 3 batches" in repr(result)


def test_moments_merged_equals_moments_of_concatenation():
    rng = np.random.default_rng(3)
    a = rng.normal(2.0, 3.0, size=(7, 3))
    b = rng.normal(-1.0, 0.5, size=(12, 3))
    c = rng.normal(10.0, 1.0, size=(1, 3))

    def moments(values):
        return utils.Moments(values.mean(axis=0), values.var(axis=0), len(values))

    merged = moments(a).merged(moments(b)).merged(moments(c))
    together = np.concatenate([a, b, c])
    assert merged.count == 20
    np.testing.assert_allclose(merged.mean, together.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.var, together.var(axis=0), rtol=1e-12)
    # Order does not matter.
    other_order = moments(c).merged(moments(a).merged(moments(b)))
    np.testing.assert_allclose(other_order.var, merged.var, rtol=1e-12)


def test_moving_statistics_returns_the_variables(tiny):
    model, bn = tiny
    bn.moving_mean.assign(np.array([1.5, -2.0], dtype=np.float32))
    bn.moving_variance.assign(np.array([3.0, 0.25], dtype=np.float32))
    stats = utils.moving_statistics(model)
    assert list(stats) == ["bn"]
    mean, var = stats["bn"]
    assert mean.dtype == np.float64 and var.dtype == np.float64
    np.testing.assert_array_equal(mean, [1.5, -2.0])
    np.testing.assert_array_equal(var, [3.0, 0.25])


def test_batch_statistics_matches_numpy_and_leaves_moving_stats(tiny, data):
    model, bn = tiny
    x, _ = data
    mean, var = _np_moments(x)

    seen, outputs = utils.batch_statistics(model, x)
    assert list(seen) == ["bn"]
    np.testing.assert_allclose(seen["bn"].mean, mean, rtol=1e-6)
    np.testing.assert_allclose(seen["bn"].var, var, rtol=1e-6)
    assert seen["bn"].count == 10 * 4 * 4
    # Moving statistics untouched (a plain Keras training-mode call would move them).
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0, 1.0])
    outputs = keras.ops.convert_to_numpy(outputs)
    assert outputs.shape == (10, 2)
    np.testing.assert_allclose(
        outputs, keras.ops.convert_to_numpy(model(x, training=True)), rtol=1e-5
    )


def test_batch_statistics_inference_mode_output(tiny, data):
    model, _ = tiny
    x, _ = data
    seen, outputs = utils.batch_statistics(model, x, training=False)
    np.testing.assert_allclose(seen["bn"].mean, _np_moments(x)[0], rtol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
    )


def test_frozen_moving_statistics_restores_variables(tiny, data):
    model, bn = tiny
    x, _ = data
    with utils.frozen_moving_statistics(model):
        model(x, training=True)
        assert not np.allclose(bn.moving_mean.numpy(), 0.0)  # really changed inside
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0, 1.0])

    with pytest.raises(KeyError):
        with utils.frozen_moving_statistics(model):
            bn.moving_variance.assign([7.0, 7.0])
            raise KeyError("boom")
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0, 1.0])


def test_recording_batchnorm_inputs_one_record_per_call(tiny, data):
    model, bn = tiny
    x, _ = data
    before = keras.ops.convert_to_numpy(model(x, training=False))

    with utils.recording_batchnorm_inputs(model) as records:
        model(x[:4], training=False)
        model(x, training=True)
    calls = records["bn"]
    assert len(calls) == 2
    assert calls[0].count == 4 * 4 * 4 and calls[1].count == 10 * 4 * 4
    np.testing.assert_allclose(calls[0].mean, _np_moments(x[:4])[0], rtol=1e-6)
    np.testing.assert_allclose(calls[0].var, _np_moments(x[:4])[1], rtol=1e-6)
    np.testing.assert_allclose(calls[1].var, _np_moments(x)[1], rtol=1e-6)

    # The layer's own call is back: no instance attribute, no more recording,
    # and (moving statistics reset) the same inference output as before.
    assert "call" not in vars(bn)
    bn.moving_mean.assign([0.0, 0.0])
    bn.moving_variance.assign([1.0, 1.0])
    after = keras.ops.convert_to_numpy(model(x, training=False))
    assert len(records["bn"]) == 2
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_recording_batchnorm_inputs_restores_after_an_error(tiny, data):
    model, bn = tiny
    with pytest.raises(RuntimeError):
        with utils.recording_batchnorm_inputs(model):
            raise RuntimeError("boom")
    assert "call" not in vars(bn)


def test_diagnose_flags_fresh_layer_and_recalibration_fixes_it(tiny, data):
    model, bn = tiny
    x, _ = data
    mean, var = _np_moments(x)
    eps = float(bn.epsilon)

    rows = utils.diagnose_batchnorm(model, x)
    assert len(rows) == 1
    row = rows[0]
    assert (row.index, row.name, row.channels) == (0, "bn", 2)
    assert row.flagged
    assert row.batch_var == pytest.approx(np.median(var), rel=1e-5)
    assert row.moving_var == pytest.approx(1.0)
    assert row.shift == pytest.approx(np.median(np.abs(mean) / np.sqrt(var + eps)), rel=1e-5)
    assert row.var_ratio == pytest.approx(np.median((1 + eps) / (var + eps)), rel=1e-5)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])  # untouched

    # 10 samples in batches of 3, 3, 3 and 1: the pooled moments are the population's.
    assert utils.recalibrate_batchnorm(model, x, batch_size=3) == 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4)

    row = utils.diagnose_batchnorm(model, x)[0]
    assert not row.flagged
    assert row.shift == pytest.approx(0.0, abs=1e-4)
    assert row.var_ratio == pytest.approx(1.0, rel=1e-4)


def test_recalibrate_in_one_batch_makes_predict_match_training_mode(tiny, data):
    model, bn = tiny
    x, _ = data
    gamma_before = bn.gamma.numpy().copy()
    utils.recalibrate_batchnorm(model, x, batch_size=32)
    np.testing.assert_array_equal(bn.gamma.numpy(), gamma_before)  # no weight trained
    train = keras.ops.convert_to_numpy(model(x, training=True))
    infer = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(infer, train, rtol=1e-4, atol=1e-6)


def test_recalibrate_rejects_bad_arguments(tiny, data):
    model, _ = tiny
    x, _ = data
    with pytest.raises(ValueError):
        utils.recalibrate_batchnorm(model, x[:0])
    with pytest.raises(ValueError):
        utils.recalibrate_batchnorm(model, x, batch_size=0)


def test_diagnose_thresholds(tiny, data):
    model, bn = tiny
    x, _ = data
    mean, var = _np_moments(x)
    std = np.sqrt(var + float(bn.epsilon))

    bn.moving_mean.assign((mean + 0.3 * std).astype(np.float32))  # 0.3 std off
    bn.moving_variance.assign(var.astype(np.float32))
    assert utils.diagnose_batchnorm(model, x)[0].flagged
    assert not utils.diagnose_batchnorm(model, x, shift_tol=0.5)[0].flagged

    bn.moving_mean.assign(mean.astype(np.float32))
    bn.moving_variance.assign((2.0 * var).astype(np.float32))  # ratio 2
    row = utils.diagnose_batchnorm(model, x)[0]
    assert row.flagged and row.var_ratio == pytest.approx(2.0, rel=1e-4)
    assert row.worst_ratio == pytest.approx(2.0, rel=1e-4)
    assert not utils.diagnose_batchnorm(model, x, ratio_tol=2.5)[0].flagged

    with pytest.raises(ValueError):
        utils.diagnose_batchnorm(model, x, ratio_tol=0.5)


def test_format_gaps_table():
    rows = [
        utils.LayerGap(0, "conv1_bn", 64, 9.0, 1.0, 0.1111, 1.6667, 0.2, 0.1, True),
        utils.LayerGap(1, "conv2_bn", 256, 2.0, 2.1, 0.01, 1.05, 0.05, 1.1, False),
        utils.LayerGap(2, "conv3_bn", 256, 4.0, 0.5, 0.5, 0.125, 0.9, 0.1, True),
    ]
    lines = utils.format_gaps(rows).splitlines()
    assert len(lines) == 2 + 3 + 1
    assert "layer" in lines[0] and set(lines[1]) == {"-"}
    assert "conv1_bn" in lines[2] and lines[2].rstrip().endswith("mismatch")
    # |log ratio| column: |log 1.6667| = 0.511 (no log_var_gap given: taken from var_ratio).
    assert "0.111" in lines[2] and "0.511" in lines[2] and " trains " in lines[2]
    assert "conv2_bn" in lines[3] and lines[3].rstrip().endswith("ok")
    assert "OFF" not in "\n".join(lines)
    assert lines[-1] == "2 of 3 BatchNormalization layers flagged: 2 mismatch"

    short = utils.format_gaps(rows, max_rows=1).splitlines()
    assert len(short) == 2 + 1 + 1 + 1
    assert "conv2_bn" not in "\n".join(short)
    assert short[-2] == "... 2 more layers"
    assert short[-1] == "2 of 3 BatchNormalization layers flagged: 2 mismatch"


def test_format_gaps_on_diagnose_rows(tiny, data):
    model, _ = tiny
    x, _ = data
    table = utils.format_gaps(utils.diagnose_batchnorm(model, x))
    lines = table.splitlines()
    assert len(lines) == 4
    assert re.match(r"\s*0 bn\s", lines[2]) and lines[2].endswith("never updated")
    assert lines[-1] == "1 of 1 BatchNormalization layers flagged: 1 never updated"


def test_batchnorm_history_follows_the_moving_average_law(tiny, data):
    model, bn = tiny
    x, y = data
    m = 0.5
    bn.momentum = m
    utils.compile_model(model)
    history = utils.BatchNormHistory(x, y)
    model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=[history])

    mean, var = _np_moments(x)
    assert history.epochs == [0, 1, 2, 3]
    assert history.layer_names == ["bn"]
    assert len(history.moving["bn"]) == 4 and len(history.batch["bn"]) == 4
    for n, ((moving_mean, moving_var), seen) in enumerate(
        zip(history.moving["bn"], history.batch["bn"])
    ):
        # One update per epoch (one batch); BN's input is the data, never changing.
        np.testing.assert_allclose(moving_mean, (1 - m**n) * mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moving_var, m**n * 1.0 + (1 - m**n) * var, rtol=1e-5)
        np.testing.assert_allclose(seen.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(seen.var, var, rtol=1e-5)

    for values in (history.train_loss, history.infer_loss, history.train_acc, history.infer_acc):
        assert len(values) == 4
    # The last record describes the model as fit left it.
    infer_out = model(x, training=False)
    with utils.frozen_moving_statistics(model):
        train_out = model(x, training=True)
    train_loss, train_acc = utils.loss_and_accuracy(train_out, y)
    infer_loss, infer_acc = utils.loss_and_accuracy(infer_out, y)
    assert history.train_loss[-1] == pytest.approx(train_loss, rel=1e-5)
    assert history.infer_loss[-1] == pytest.approx(infer_loss, rel=1e-5)
    assert history.train_acc[-1] == train_acc
    assert history.infer_acc[-1] == infer_acc
    # Fresh moving statistics (0, 1) against data of mean 5: predict is off at epoch 0.
    assert history.infer_loss[0] != pytest.approx(history.train_loss[0], rel=1e-3)

    gap_var = history.gap()
    gap_mean = history.gap("mean")
    assert gap_var.shape == gap_mean.shape == (1, 4)
    eps = bn.epsilon
    assert history.epsilon == {"bn": eps}
    std = np.sqrt(var + eps)
    # Symmetric: |log((1 + eps) / (var + eps))|, however the variances compare.
    assert gap_var[0, 0] == pytest.approx(
        np.median(np.abs(np.log((1 + eps) / (var + eps)))), rel=1e-5
    )
    assert gap_mean[0, 0] == pytest.approx(np.median(mean / std), rel=1e-5)
    # The mean's gap halves with every update of momentum 0.5.
    np.testing.assert_allclose(gap_mean[0], gap_mean[0, 0] * m ** np.arange(4), rtol=1e-4)
    with pytest.raises(ValueError):
        history.gap("bad")
    with pytest.raises(ValueError, match="not replayed"):
        history.gap("var", momentum=0.9)


def test_batchnorm_history_replays_other_momenta(tiny, data):
    model, bn = tiny
    x, y = data
    bn.momentum = 0.5
    utils.compile_model(model)
    history = utils.BatchNormHistory(x, y, momenta=(0.5, 0.9))
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[history])
    mean, var = _np_moments(x)
    assert list(history.replayed) == [0.5, 0.9]
    for m in (0.5, 0.9):
        assert len(history.replayed[m]) == len(history.replayed_acc[m]) == 4
        for n, stats in enumerate(history.replayed[m]):
            np.testing.assert_allclose(stats["bn"][0], (1 - m**n) * mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats["bn"][1], m**n + (1 - m**n) * var, rtol=1e-5)
    # The momentum the model trained with is replayed exactly as Keras moved it.
    for (mean_k, var_k), stats in zip(history.moving["bn"], history.replayed[0.5]):
        np.testing.assert_allclose(stats["bn"][1], var_k, rtol=1e-5)
    np.testing.assert_allclose(history.gap("var", momentum=0.5), history.gap("var"), rtol=1e-4)
    np.testing.assert_allclose(history.replayed_loss[0.5], history.infer_loss, rtol=1e-4)
    # Replayed statistics are evaluated in inference mode; the model keeps its own.
    with utils.frozen_moving_statistics(model):
        utils.set_moving_statistics(model, history.replayed[0.9][-1])
        loss, acc = utils.loss_and_accuracy(model(x, training=False), y)
    assert history.replayed_loss[0.9][-1] == pytest.approx(loss, rel=1e-5)
    assert history.replayed_acc[0.9][-1] == acc
    np.testing.assert_allclose(bn.moving_variance.numpy(), history.moving["bn"][-1][1], rtol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        utils.BatchNormHistory(x, y, momenta=(1.0,))


def test_weight_steps_measures_each_update(tiny, data):
    model, _ = tiny
    x, y = data
    utils.compile_model(model, learning_rate=0.01)
    steps = utils.WeightSteps()
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[steps])
    after = [v.numpy() for v in model.trainable_variables]
    expected = sum(np.abs(a - b).sum() for a, b in zip(after, before)) / sum(a.size for a in after)
    assert steps.steps == [pytest.approx(expected, rel=1e-6)]
    # Adam's first update moves every weight with a non-zero gradient by the learning rate.
    assert 0 < steps.steps[0] <= 0.01 * 1.0001
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[steps])
    assert len(steps.steps) == 3 and steps.model is None


def test_updates_needed():
    assert utils.updates_needed(0.99) == 459
    assert utils.updates_needed(0.9) == 44
    assert utils.updates_needed(0.5, 0.25) == 2  # 0.5**2 is exactly 0.25
    for m in (0.5, 0.9, 0.99, 0.999):
        n = utils.updates_needed(m)
        assert m**n <= 0.01 < m ** (n - 1)
    for bad in ((1.0, 0.01), (0.0, 0.01), (0.9, 1.0), (0.9, 0.0)):
        with pytest.raises(ValueError, match="between 0 and 1"):
            utils.updates_needed(*bad)


def test_replay_moving_statistics_hand_computed():
    steps = {
        "a": [
            utils.Moments(np.array([2.0, 0.0]), np.array([4.0, 1.0]), 8),
            utils.Moments(np.array([4.0, 2.0]), np.array([1.0, 3.0]), 8),
        ],
        "b": [utils.Moments(np.array([10.0]), np.array([5.0]), 8)],
    }
    replayed = utils.replay_moving_statistics(steps, momentum=0.5)
    assert set(replayed) == {"a", "b"}
    # a: mean 0 -> 1 -> 2.5 and 0 -> 0 -> 1; variance 1 -> 2.5 -> 1.75 and 1 -> 1 -> 2.
    np.testing.assert_allclose(replayed["a"][0], [2.5, 1.0])
    np.testing.assert_allclose(replayed["a"][1], [1.75, 2.0])
    np.testing.assert_allclose(replayed["b"][0], [5.0])
    np.testing.assert_allclose(replayed["b"][1], [3.0])
    # Other start values.
    replayed = utils.replay_moving_statistics(steps, momentum=0.9, initial=(1.0, 2.0))
    np.testing.assert_allclose(replayed["b"][0], [0.9 * 1.0 + 0.1 * 10.0])
    np.testing.assert_allclose(replayed["b"][1], [0.9 * 2.0 + 0.1 * 5.0])


def test_replay_moving_statistics_matches_keras_fit(tiny, data):
    model, bn = tiny
    x, y = data
    m = 0.7
    bn.momentum = m
    utils.compile_model(model)
    with utils.recording_batchnorm_inputs(model) as steps:
        # 10 samples in batches of 4: 3 steps per epoch, 6 updates in all.
        model.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    assert len(steps["bn"]) == 6
    replayed = utils.replay_moving_statistics(steps, momentum=m)
    np.testing.assert_allclose(replayed["bn"][0], bn.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(replayed["bn"][1], bn.moving_variance.numpy(), rtol=1e-5)


def test_set_moving_statistics(tiny):
    model, bn = tiny
    utils.set_moving_statistics(model, {"bn": ([1.0, 2.0], np.array([3.0, 4.0]))})
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [3.0, 4.0])
    assert bn.moving_mean.dtype == "float32"
    # Round trip with moving_statistics.
    stats = utils.moving_statistics(model)
    utils.set_moving_statistics(model, {"bn": (np.zeros(2), np.ones(2))})
    utils.set_moving_statistics(model, stats)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [3.0, 4.0])
    # An unknown layer name is refused before anything is written.
    with pytest.raises(KeyError, match="nope"):
        utils.set_moving_statistics(
            model, {"bn": (np.zeros(2), np.ones(2)), "nope": (np.zeros(2), np.ones(2))}
        )
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 2.0])


# ---------------------------------------------------------------------------
# Plots and resources
# ---------------------------------------------------------------------------

_NON_INTERACTIVE = "ignore:.*non-interactive.*:UserWarning"


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_show_images():
    images = np.stack([np.full((6, 6, 1), v, dtype=np.float32) for v in (0, 128, 255)])
    names = ["a.png", "b.png", "c.png"]
    utils.show_images(images, names, np.eye(3, dtype=np.float32))
    figure = plt.gcf()
    assert len(figure.axes) == 3
    assert [ax.get_title() for ax in figure.axes] == [
        "a.png\nclass 0",
        "b.png\nclass 1",
        "c.png\nclass 2",
    ]
    plt.close("all")
    utils.show_images(images[:2], names[:2])
    assert [ax.get_title() for ax in plt.gcf().axes] == ["a.png", "b.png"]


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_history():
    history = {"loss": [2.0, 1.0, 0.1], "accuracy": [0.0, 0.5, 1.0]}
    utils.plot_history(history, "three epochs")
    figure = plt.gcf()
    ax_loss, ax_acc = figure.axes
    assert ax_loss.get_yscale() == "log"
    np.testing.assert_array_equal(ax_loss.lines[0].get_ydata(), history["loss"])
    np.testing.assert_array_equal(ax_acc.lines[0].get_ydata(), history["accuracy"])
    assert figure.get_suptitle() == "three epochs"


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_probabilities():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    utils.plot_probabilities(probabilities, ["a.png", "b.png", "c.png"], "predict")
    ax = plt.gcf().axes[0]
    heights = sorted(patch.get_height() for patch in ax.patches)
    assert heights == sorted(probabilities.ravel().tolist())
    assert ax.get_title() == "predict"


def _fitted_history(momentum, epochs=2, seed=42, momenta=()):
    """A BatchNormHistory of the tiny model fit on 10 samples (one batch per epoch)."""
    keras.backend.clear_session()
    rng = np.random.default_rng(seed)
    x = (5.0 + 3.0 * rng.standard_normal((10, 4, 4, 2))).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(10) % 2]
    model = _tiny_model()
    model.get_layer("bn").momentum = momentum
    utils.compile_model(model)
    history = utils.BatchNormHistory(x, y, momenta=momenta)
    model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0, callbacks=[history])
    return history


@pytest.fixture(scope="module")
def two_histories():
    return {0.5: _fitted_history(0.5, momenta=(0.9, 0.1)), 0.9: _fitted_history(0.9)}


def _gap_rows():
    return [
        utils.LayerGap(0, "conv1_bn", 64, 9.0, 1.0, 0.5, 0.11, 0.9, 0.1, True),
        utils.LayerGap(1, "conv2_bn", 256, 2.0, 2.1, 0.01, 1.05, 0.05, 1.1, False),
        utils.LayerGap(2, "conv3_bn", 256, 4.0, 0.5, 2.0, 0.125, 3.0, 0.1, True),
    ]


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_layer_gaps():
    rows = _gap_rows()
    utils.plot_layer_gaps(rows, "diagnosis")
    figure = plt.gcf()
    ax_var, ax_shift = figure.axes
    assert ax_var.get_yscale() == "linear" and ax_shift.get_yscale() == "log"
    # Top: the signed log variance ratio (median moving / batch), symmetric around 0.
    np.testing.assert_allclose(ax_var.lines[0].get_ydata(), np.log([0.11, 1.05, 0.125]))
    np.testing.assert_array_equal(ax_shift.lines[0].get_ydata(), [0.5, 0.01, 2.0])
    # The flagged layers (0 and 2) are marked in both panels.
    np.testing.assert_array_equal(ax_var.lines[1].get_xdata(), [0, 2])
    np.testing.assert_array_equal(ax_shift.lines[1].get_xdata(), [0, 2])
    # The diagnostic's default tolerances: a band of +-log(1.5) and a shift line at 0.2.
    band = ax_var.patches[0]
    np.testing.assert_allclose([band.get_y(), band.get_y() + band.get_height()],
                               [-np.log(1.5), np.log(1.5)])
    np.testing.assert_allclose(ax_shift.lines[2].get_ydata(), [0.2, 0.2])
    assert figure.get_suptitle() == "diagnosis"


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_activation_scale():
    train_rms = np.array([1.0, 1.2, 0.9])
    infer_rms = np.array([5.0, 50.0, 500.0])
    utils.plot_activation_scale(train_rms, infer_rms, "scale")
    (ax,) = plt.gcf().axes
    assert ax.get_yscale() == "log" and ax.get_title() == "scale"
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), train_rms)
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), infer_rms)


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_moving_vs_batch(two_histories):
    history = two_histories[0.5]
    utils.plot_moving_vs_batch(history, ["bn"], "one layer")
    figure = plt.gcf()
    ax_mean, ax_var = figure.axes
    assert ax_mean.get_title() == "bn" and ax_mean.get_yscale() == "linear"
    # The variance axis is logarithmic exactly when its label says so.
    assert (ax_var.get_yscale() == "log") == ax_var.get_ylabel().endswith("(log)")
    batch_mean = [np.median(m.mean) for m in history.batch["bn"]]
    moving_var = [np.median(v) for _, v in history.moving["bn"]]
    np.testing.assert_array_equal(ax_mean.lines[0].get_xdata(), history.epochs)
    np.testing.assert_allclose(ax_mean.lines[0].get_ydata(), batch_mean)
    np.testing.assert_allclose(ax_var.lines[1].get_ydata(), moving_var)
    assert figure.get_suptitle() == "one layer"


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_gap_heatmap(two_histories):
    history = two_histories[0.5]
    utils.plot_gap_heatmap(history, "heatmap")
    figure = plt.gcf()
    ax = figure.axes[0]
    assert len(figure.axes) == 2  # the heatmap and its colour bar
    np.testing.assert_allclose(ax.images[0].get_array(), history.gap("var"))
    assert ax.get_title() == "heatmap"
    figure.canvas.draw()  # the log colour scale must be valid


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_mode_losses(two_histories):
    history = two_histories[0.9]
    utils.plot_mode_losses(history, "losses")
    (ax,) = plt.gcf().axes
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), history.train_loss)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), history.infer_loss)


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_moving_average_law():
    updates = np.array([1, 2, 4, 8])
    measured = 1 - 0.5**updates
    utils.plot_moving_average_law(updates, measured, 0.5, "law")
    (ax,) = plt.gcf().axes
    law, points = ax.lines
    np.testing.assert_allclose(law.get_ydata(), 1 - 0.5 ** law.get_xdata())
    assert law.get_xdata().max() == 8
    np.testing.assert_array_equal(points.get_xdata(), updates)
    np.testing.assert_array_equal(points.get_ydata(), measured)


@pytest.mark.filterwarnings(_NON_INTERACTIVE)
def test_plot_gap_by_momentum(two_histories):
    history = two_histories[0.5]
    utils.plot_gap_by_momentum(history, 0.5, "momenta")
    figure = plt.gcf()
    ax_gap, ax_acc = figure.axes
    assert len(ax_gap.lines) == len(ax_acc.lines) == 3
    expected = [history.gap("var"), history.gap("var", 0.9), history.gap("var", 0.1)]
    for line, gaps in zip(ax_gap.lines, expected):
        np.testing.assert_allclose(line.get_ydata(), gaps.max(axis=0))
    for line, accs in zip(
        ax_acc.lines, [history.infer_acc, history.replayed_acc[0.9], history.replayed_acc[0.1]]
    ):
        np.testing.assert_allclose(line.get_ydata(), accs)
    assert [t.get_text() for t in ax_gap.get_legend().get_texts()] == [
        "momentum 0.5",
        "momentum 0.9",
        "momentum 0.1",
    ]


def test_resources():
    text = utils.resources()
    assert "s;" in text and "MB" in text
    assert re.fullmatch(r"this notebook took \d+ s; peak memory \d+ MB", text)


def test_every_public_helper_is_tested():
    """Fails when utils.py gains a public function or class that no test file calls."""
    import inspect

    here = Path(inspect.getsourcefile(test_every_public_helper_is_tested)).parent
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted(here.glob("test_*.py")))
    public = [
        name
        for name, value in vars(utils).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == utils.__name__
    ]
    untested = [name for name in public if f"utils.{name}" not in source]
    assert public and not untested, f"no test calls: {untested}"


# --- remedies: measurement, table, plot, memory -------------------------------------------


def test_measure_remedy_inference_mode_leaves_statistics(tiny, data):
    model, bn = tiny
    x, y = data
    before = utils.moving_statistics(model)
    result = utils.measure_remedy("fresh", model, x, y, updates=7, extra="none", seconds=1.25)
    after = utils.moving_statistics(model)
    np.testing.assert_array_equal(before["bn"][0], after["bn"][0])
    np.testing.assert_array_equal(before["bn"][1], after["bn"][1])
    served = keras.ops.convert_to_numpy(model(x, training=False))
    train = keras.ops.convert_to_numpy(model(x, training=True))
    utils.set_moving_statistics(model, before)
    assert isinstance(result, utils.RemedyResult)
    assert result.name == "fresh" and result.updates == 7 and result.seconds == 1.25
    assert result.extra == "none"
    assert result.memorised == (utils.accuracy(train, y) == 1.0)
    assert result.predicted == np.argmax(served, axis=1).tolist()
    assert result.accuracy == utils.accuracy(served, y)
    assert result.mode_gap == pytest.approx(np.abs(train - served).max(), abs=1e-6)
    # inference mode answers each sample alone exactly as in the batch
    truth = np.argmax(y, axis=1)
    assert result.alone_right == [p == t for p, t in zip(np.argmax(served, axis=1), truth)]
    assert result.alone_predicted == np.argmax(served, axis=1).tolist()
    assert result.same_computation is False
    assert utils.measure_remedy("unmeasured", model, x, y, 7).seconds is None


def test_measure_remedy_same_computation(tiny, data):
    model, _ = tiny
    x, y = data
    # A model without BatchNormalization computes the same thing in both modes.
    inputs = keras.Input(x.shape[1:])
    plain = keras.Model(inputs, keras.layers.Dense(y.shape[1], activation="softmax")(
        keras.layers.Flatten()(inputs)))
    result = utils.measure_remedy("plain", plain, x, y, 1, same_computation=True)
    assert result.same_computation and result.mode_gap < 1e-6
    assert "n/a: same computation" in utils.remedies_table_html([result])
    # Claiming it for a BatchNormalization model whose modes differ is an error that says so.
    with pytest.raises(ValueError, match="differ by"):
        utils.measure_remedy("bn", model, x, y, 1, same_computation=True)


def test_measure_remedy_training_mode_serves_training_outputs(tiny, data):
    model, _ = tiny
    x, y = data
    before = utils.moving_statistics(model)
    result = utils.measure_remedy("train", model, x, y, 1, training_mode=True)
    np.testing.assert_array_equal(utils.moving_statistics(model)["bn"][1], before["bn"][1])
    assert result.mode_gap == 0.0 and result.same_computation
    with utils.frozen_moving_statistics(model):
        served = keras.ops.convert_to_numpy(model(x, training=True))
    assert result.predicted == np.argmax(served, axis=1).tolist()


def test_measure_remedy_after_recalibration_has_no_gap(tiny, data):
    model, _ = tiny
    x, y = data
    utils.recalibrate_batchnorm(model, x)
    result = utils.measure_remedy("recal", model, x, y, 1)
    assert result.mode_gap < 1e-5


def test_remedies_table_html_and_plot_remedies():
    rows = [
        utils.RemedyResult("a <baseline>", 5, True, [0, 0, 0], 1 / 3, 825.7,
                           [True, False, False], 1.0, "none", 13.2),
        utils.RemedyResult("b fixed", 5, True, [0, 1, 2], 1.0, 7e-5,
                           [True, True, True], 0.0, "1 training-mode pass", 0.4),
        utils.RemedyResult("c failed", 20, False, [1, 1, 1], 1 / 3, 3.4,
                           [False, True, False], 0.0, "20 updates", 50.0),
    ]
    table = utils.remedies_table_html(rows)
    assert table.startswith("<table") and table.endswith("</table>")
    assert table.count("<tr>") == 4 and "<th>updates</th>" in table
    assert "a &lt;baseline&gt;" in table  # names are escaped
    assert "<td>0 0 0</td>" in table and "1 of 3 right" in table and "3 of 3 right" in table
    assert "825.7" not in table and "826" in table  # 3 significant digits
    # Only the failed training is marked, and no seconds appear (they vary).
    assert table.count("training failed") == 1 and "c failed" in table.split("training failed")[0]
    assert "13.2" not in table and "50.0" not in table
    utils.plot_remedies(rows, "title")
    import matplotlib.pyplot as plt

    labels = [t.get_text() for t in plt.gcf().axes[0].get_yticklabels()]
    assert labels == ["a <baseline>", "b fixed", "c failed (training failed)"]


def test_release_memory_clears_the_session():
    keras.backend.clear_session()
    first = keras.layers.Dense(1)
    utils.release_memory()
    second = keras.layers.Dense(1)
    assert first.name == second.name  # the name counter started again


def test_binder_url_uses_the_repository():
    assert utils.binder_url().startswith(f"https://mybinder.org/v2/gh/{utils.REPOSITORY}/HEAD")
    assert utils.binder_url("notebooks/01_load_images.ipynb").endswith(
        "?urlpath=lab/tree/notebooks/01_load_images.ipynb"
    )


def test_load_images_raises_only_the_documented_types(tmp_path):
    """Whatever the bad input, the learner meets FileNotFoundError or ValueError, never Pillow's own."""
    cases = {"missing": None, "empty": [], "one": ["a.png"], "junk": ["a.png", "b.bin"]}
    for name, files in cases.items():
        folder = tmp_path / name
        if files is not None:
            folder.mkdir()
            for f in files:
                if f.endswith(".png"):
                    _save_gray(folder / f, 10)
                else:
                    (folder / f).write_bytes(bytes(range(256)))
        with pytest.raises((FileNotFoundError, ValueError)) as info:
            utils.load_images(folder)
        assert type(info.value) in (FileNotFoundError, ValueError)
