"""Unit tests of ``utils.py``: every public helper, each against values known in advance.

Run with ``python -m pytest tests/test_utils.py -q`` from the repository root.
The network tests use a tiny model whose first layer is BatchNormalization, so
what that layer receives is the data itself and every statistic can be computed
with numpy. The ResNet50 builder is exercised twice at 32 x 32 (reproducibility).
The helpers that moved out of ``utils`` into the notebooks (plots, tables of remedies,
``BatchNormHistory``, the ResNet50 variants of notebook 05) are tested there, by nbval.
"""

import functools
import hashlib
import inspect
import io
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from IPython.display import HTML
from PIL import Image

import bn_toolkit
import utils
from utils import keras, tf

# Tests of what the toolkit computes on given batches: the arrays in their order (no shuffling)
# and the pooled estimate, as those tests' NumPy references compute them. The shuffled order and
# the default estimator have tests of their own.
recalibrate_in_order = functools.partial(
    utils.recalibrate_batchnorm, shuffle=False, estimator="population"
)
diagnose_in_order = functools.partial(utils.diagnose_batchnorm, shuffle=False)


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


def _installed():
    import PIL

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "pillow": PIL.__version__}


def test_version_keeps_leading_numbers():
    assert utils._version("2.21.0rc1") == (2, 21, 0)
    assert utils._version("3.14") == (3, 14)
    assert utils._version("10.0.0.dev0") == (10, 0, 0)
    assert utils._version("2.9.1") < utils._version("2.16")


@pytest.fixture
def determinism_restored():
    before = _determinism_enabled()
    yield
    _set_determinism(before)


def _minimum(**versions):
    """A ``MIN_VERSIONS`` table: the installed versions, except those given (with a reason)."""
    table = {name: (found, "reason") for name, found in _installed().items()}
    table.update(
        {name: (low, f"{name} needs {low} for the test") for name, low in versions.items()}
    )
    return table


def test_setup_passes_for_installed_packages(capsys, determinism_restored):
    for name, (low, _) in utils.MIN_VERSIONS.items():  # the real table
        assert utils._version(_installed()[name]) >= utils._version(low), name
    utils.setup(threads=None)
    assert "TensorFlow " + tf.__version__ in capsys.readouterr().out


def test_setup_names_the_old_package_and_the_fix(monkeypatch, determinism_restored):
    monkeypatch.setattr(utils, "MIN_VERSIONS", _minimum(tensorflow="999.0"))
    with pytest.raises(RuntimeError) as info:
        utils.setup(threads=None)
    message = str(info.value)
    assert f"tensorflow {tf.__version__}" in message and "999.0" in message
    assert "tensorflow needs 999.0 for the test" in message  # the reason is given
    assert "pip install -r requirements.txt" in message
    assert "keras" not in message  # only the too-old package is listed
    assert "pillow" not in message


def test_setup_lists_every_old_package(monkeypatch, determinism_restored):
    monkeypatch.setattr(
        utils, "MIN_VERSIONS", _minimum(tensorflow="999.0", keras="999.1", pillow="999.2")
    )
    with pytest.raises(RuntimeError) as info:
        utils.setup(threads=None)
    message = str(info.value)
    for name, found in _installed().items():
        assert f"{name} {found} is older than" in message


def test_setup_checks_versions_before_seeding(monkeypatch, determinism_restored):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    monkeypatch.setattr(utils, "MIN_VERSIONS", _minimum(keras="999.0"))
    with pytest.raises(RuntimeError, match="keras"):
        utils.setup(7, threads=None)
    assert np.random.rand() == expected  # not re-seeded by the failed setup


def test_setup_accepts_the_minimum_versions(monkeypatch, capsys, determinism_restored):
    monkeypatch.setattr(utils, "MIN_VERSIONS", _minimum())  # exactly the installed versions
    utils.setup(threads=None)
    assert "seed" in capsys.readouterr().out


def test_setup_seeds_and_enables_determinism(capsys, determinism_restored):
    # threads=None: fixing the pools raises once any earlier test has run a TensorFlow op;
    # the pools are tested in a fresh process below.
    _set_determinism(False)
    utils.setup(7, threads=None)
    assert _determinism_enabled()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "seed 7" in lines[0]
    assert "deterministic" in lines[0]

    first = np.random.rand()
    utils.setup(7, threads=None)
    assert np.random.rand() == first
    utils.setup(8, threads=None)
    assert np.random.rand() != first
    capsys.readouterr()


def test_setup_fixes_the_thread_pools_once(tmp_path):
    """In a fresh process: setup sizes both pools; once an op ran, other sizes need a restart."""
    import os
    import subprocess
    import sys

    script = tmp_path / "pools.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(utils.ROOT)!r})\n"
        "import utils\n"
        "utils.setup(threads=1)\n"
        "utils.tf.constant(1.0) + 1  # TensorFlow starts: the pools are fixed from here\n"
        "utils.setup(threads=1)  # the same sizes again: fine\n"
        "try:\n"
        "    utils.setup(threads=2)\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_NUM_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.endswith("| 1+1 threads") for line in lines[:2]] == [True, True], lines
    assert lines[2].startswith("RuntimeError:") and "restart" in lines[2], lines


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


def test_load_images_skips_hidden_entries_and_folders(tmp_path):
    _save_gray(tmp_path / "b.png", 1)
    _save_gray(tmp_path / "a.png", 2)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1 not an image")
    checkpoints = tmp_path / ".ipynb_checkpoints"
    checkpoints.mkdir()
    _save_gray(checkpoints / "a-checkpoint.png", 3)
    (tmp_path / "subfolder").mkdir()
    _save_gray(tmp_path / "subfolder" / "c.png", 4)

    # The hidden junk and the folders are not read (the private listing ``utils._image_files``
    # skips them), so loading succeeds with the two images only, in sorted order.
    images, labels, names = utils.load_images(tmp_path, size=8)
    assert names == ["a.png", "b.png"]
    assert images.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(labels, np.eye(2))


def test_load_images_missing_folder_and_file_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        utils.load_images(tmp_path / "nowhere")
    a_file = _save_gray(tmp_path / "a.png", 0)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        utils.load_images(a_file)


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
        layer.kernel.numpy() for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
    ]


@pytest.fixture(scope="module")
def resnet_facts():
    """Build the ResNet50 twice at 32 x 32 and keep small facts about it."""
    facts = {}
    probe = np.zeros((1, 32, 32, 1), dtype=np.float32)

    def summarize(model):
        bns = utils.batchnorm_layers(model)
        return {
            "n_bn": len(bns),
            "momenta": {layer.momentum for layer in bns},
            "renorm": {bool(getattr(layer, "renorm", False)) for layer in bns},
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
    assert facts["n_convs"] == 53
    assert facts["input_shape"] == (None, 32, 32, 1)
    assert facts["output_shape"] == (None, 3)
    np.testing.assert_allclose(facts["probe"].sum(), 1.0, rtol=1e-5)


def test_build_resnet50_is_reproducible(resnet_facts):
    assert resnet_facts["batch"]["weights"] == resnet_facts["batch_again"]["weights"]
    assert resnet_facts["batch"]["convs"] == resnet_facts["batch_again"]["convs"]
    np.testing.assert_array_equal(
        resnet_facts["batch"]["probe"], resnet_facts["batch_again"]["probe"]
    )


def test_build_resnet50_has_no_normalization_variants():
    # GroupNormalization and renorm moved to notebook 05, which builds them in the open.
    parameters = inspect.signature(utils.build_resnet50).parameters
    assert list(parameters) == ["num_classes", "size", "momentum", "seed"]


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


def _gap(index, name, flagged, **fields):
    """A ``LayerGap`` built by hand; the numbers are arbitrary but distinct."""
    values = dict(
        channels=8,
        batch_var=9.0,
        moving_var=1.0,
        shift=0.5,
        log_var_gap=2.197,
        noise_shift=0.04,
        noise_log_var=0.06,
        samples=40,
        batches=2,
    )
    values.update(fields)
    return utils.LayerGap(index=index, name=name, flagged=flagged, **values)


def test_layer_gap_verdict_and_in_fit():
    assert _gap(0, "a", False).verdict == "ok"
    assert _gap(0, "a", True).verdict == "mismatch"
    assert _gap(0, "a", True, never_updated=True).verdict == "never updated"
    # Frozen comes first: fit normalized with the stale statistics too.
    assert _gap(0, "a", True, frozen=True, never_updated=True).verdict == "frozen, stale"
    assert _gap(0, "a", False, frozen=True).verdict == "ok"
    assert _gap(0, "a", True, frozen=True, finite=False).verdict == "not finite"
    assert _gap(0, "a", True, frozen=True).in_fit == "frozen"
    assert _gap(0, "a", True).in_fit == "trains"


def test_gaps_table_html():
    rows = [
        _gap(0, "conv1_bn", True, channels=64, shift=0.1111, log_var_gap=0.5108),
        _gap(1, "block/bn", False, batch_var=2.0, moving_var=2.1, frozen=True),
        _gap(2, "pre_bn", True, frozen=True),
    ]
    table = utils.gaps_table_html(rows)
    assert isinstance(table, HTML)  # an utils.html_table, shown by Jupyter
    text = table.data
    assert text.startswith("<table") and text.count("<tr>") == 1 + 3
    assert "<b>mismatch</b>" in text and "<b>frozen, stale</b>" in text
    assert "<td>ok</td>" in text  # not flagged: not bold
    assert ">frozen<" in text and ">trains<" in text and "OFF" not in text
    assert "<td>conv1_bn</td>" in text and "<td>0.111</td>" in text and "<td>0.511</td>" in text
    assert "2 of 3 BatchNormalization layers flagged: 1 mismatch, 1 frozen, stale" in text
    assert "(40 samples in 2 batches)" in text
    for column in ("layer", "in fit", "|log ratio|", "noise", "shift", "verdict"):
        assert f"<th>{column}</th>" in text
    short = utils.gaps_table_html(rows, max_rows=1).data
    assert "block/bn" not in short and "<td>...</td><td>2 more layers</td>" in short
    assert short.count("<tr>") == 1 + 1 + 1
    assert "2 of 3 BatchNormalization layers flagged" in short  # the caption counts all rows
    assert "0 of 0 BatchNormalization layers flagged (no data)" in utils.gaps_table_html([]).data


def test_gaps_table_html_on_diagnose_rows(tiny, data):
    model, _ = tiny
    x, _ = data
    text = utils.gaps_table_html(utils.diagnose_batchnorm(model, x)).data
    assert text.count("<tr>") == 2 and "<td>bn</td>" in text
    assert "<b>never updated</b>" in text
    assert "1 of 1 BatchNormalization layers flagged: 1 never updated" in text
    assert "(10 samples in 1 batches)" in text


def test_gaps_table_html_rejects_a_model_and_names_what_to_pass():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(TypeError, match=r"rows of utils.diagnose_batchnorm\(model, x\)"):
        utils.gaps_table_html(model)


def test_recalibration_counts_layers_and_keeps_details(tiny, data):
    model, bn = tiny
    x, _ = data
    # The tiny model was never trained, so its moving statistics are still 0 and 1, which
    # recalibrate_batchnorm leaves alone by default; here they stand for any stale statistics.
    result = recalibrate_in_order(model, x, batch_size=4, include_never_updated=True)
    assert isinstance(result, utils.Recalibration) and isinstance(result, int)
    assert result == 1 and f"{result}" == "1" and str(result) == "1"
    assert (result.samples, result.batches, result.estimator) == (10, 3, "population")
    assert result.skipped == [] and result.reasons == {}
    assert result.statistics["bn"].count == 10 * 4 * 4
    np.testing.assert_allclose(result.statistics["bn"].var, _np_moments(x)[1], rtol=1e-5)
    assert "1 layers updated from 10 samples in 3 batches" in repr(result)
    assert "estimator='population', 0 skipped" in repr(result)
    assert isinstance(result.seconds, float) and 0 < result.seconds < 60


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

    with pytest.raises(KeyError), utils.frozen_moving_statistics(model):
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
    with pytest.raises(RuntimeError), utils.recording_batchnorm_inputs(model):
        raise RuntimeError("boom")
    assert "call" not in vars(bn)


def test_diagnose_flags_fresh_layer_and_recalibration_fixes_it(tiny, data):
    model, bn = tiny
    x, _ = data
    mean, var = _np_moments(x)
    eps = float(bn.epsilon)

    rows = diagnose_in_order(model, x)  # 10 samples: one batch of the default 32
    assert len(rows) == 1
    row = rows[0]
    assert (row.index, row.name, row.channels) == (0, "bn", 2)
    assert (row.samples, row.batches) == (10, 1)
    assert row.flagged and row.never_updated and row.finite and not row.frozen
    assert row.verdict == "never updated" and row.in_fit == "trains"
    assert row.batch_var == pytest.approx(np.median(var), rel=1e-5)
    assert row.moving_var == pytest.approx(1.0)
    assert row.shift == pytest.approx(np.median(np.abs(mean) / np.sqrt(var + eps)), rel=1e-5)
    assert row.log_var_gap == pytest.approx(
        np.median(np.abs(np.log((1 + eps) / (var + eps)))), rel=1e-5
    )
    assert row.shift > 2 * row.noise_shift and row.log_var_gap > 2 * row.noise_log_var
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])  # untouched

    # 10 samples in batches of 3, 3, 3 and 1: the pooled moments are the population's.
    # include_never_updated: the untrained layer's 0 and 1 stand for stale statistics here.
    assert recalibrate_in_order(model, x, batch_size=3, include_never_updated=True) == 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4)

    row = diagnose_in_order(model, x)[0]
    assert not row.flagged and not row.never_updated and row.verdict == "ok"
    assert row.shift == pytest.approx(0.0, abs=1e-4)
    assert row.log_var_gap == pytest.approx(0.0, abs=1e-4)


def test_recalibrate_in_one_batch_makes_predict_match_training_mode(tiny, data):
    model, bn = tiny
    x, _ = data
    gamma_before = bn.gamma.numpy().copy()
    # Untrained model: its start statistics 0 and 1 stand for stale ones, so include them.
    utils.recalibrate_batchnorm(model, x, batch_size=32, include_never_updated=True)
    np.testing.assert_array_equal(bn.gamma.numpy(), gamma_before)  # no weight trained
    train = keras.ops.convert_to_numpy(model(x, training=True))
    infer = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(infer, train, rtol=1e-4, atol=1e-6)


def test_recalibrate_rejects_bad_arguments(tiny, data):
    model, bn = tiny
    x, _ = data
    # include_never_updated: the untrained layer must not be the reason for the errors.
    with pytest.raises(ValueError, match="no batch"):
        utils.recalibrate_batchnorm(model, x[:0], include_never_updated=True)
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        utils.recalibrate_batchnorm(model, x, batch_size=0, include_never_updated=True)
    with pytest.raises(ValueError, match="estimator"):
        utils.recalibrate_batchnorm(model, x, estimator="ema", include_never_updated=True)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])


def test_recalibrate_skips_never_updated_layers(tiny, data):
    model, bn = tiny
    x, y = data
    with pytest.raises(ValueError, match="no BatchNormalization layer to recalibrate") as info:
        utils.recalibrate_batchnorm(model, x)
    assert "'bn': never updated" in str(info.value)
    assert "include_never_updated=True" in str(info.value)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0, 1.0])

    # One training step moves the statistics off 0 and 1: then no flag is needed.
    utils.compile_model(model)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    result = utils.recalibrate_batchnorm(model, x)
    assert result == 1 and result.skipped == []
    np.testing.assert_allclose(bn.moving_mean.numpy(), _np_moments(x)[0], rtol=1e-4)


def _two_batchnorm_model():
    """Input (4, 4, 2) -> BatchNormalization "trained" -> BatchNormalization "fresh" -> Dense."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.BatchNormalization(name="trained")(inputs)
    x = keras.layers.BatchNormalization(name="fresh")(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def test_recalibrate_updates_only_layers_that_were_updated_unless_asked(data):
    x, _ = data
    model = _two_batchnorm_model()
    trained, fresh = model.get_layer("trained"), model.get_layer("fresh")
    trained.moving_mean.assign([0.5, 0.5])  # as if fit had moved it
    result = utils.recalibrate_batchnorm(model, x)
    assert result == 1 and result.skipped == ["fresh"] and list(result.statistics) == ["trained"]
    assert result.reasons["fresh"].startswith("never updated")
    assert "skipped" in repr(result) and "1 skipped" in repr(result)
    np.testing.assert_allclose(trained.moving_mean.numpy(), _np_moments(x)[0], rtol=1e-4)
    np.testing.assert_array_equal(fresh.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(fresh.moving_variance.numpy(), [1.0, 1.0])

    both = utils.recalibrate_batchnorm(model, x, include_never_updated=True)
    assert both == 2 and both.skipped == []
    assert not np.allclose(fresh.moving_variance.numpy(), 1.0)


def test_recalibrate_runs_other_layers_in_inference_mode(data):
    x, _ = data
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    dropout = keras.layers.Dropout(0.5, name="dropout")
    noisy = keras.layers.GaussianNoise(1.0, name="noise")(dropout(inputs))
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, bn(noisy))
    bn.moving_mean.assign([1.0, 1.0])  # as if trained, so it is not skipped

    # In training mode, dropout and noise change what the layer receives ...
    seen, _ = utils.batch_statistics(model, x, training=True)
    assert not np.allclose(seen["bn"].var, _np_moments(x)[1], rtol=0.05)
    # ... but recalibration measures the data as predict will see it: both are switched off.
    result = utils.recalibrate_batchnorm(model, x)
    mean, var = _np_moments(x)
    np.testing.assert_allclose(result.statistics["bn"].mean, mean, rtol=1e-5)
    np.testing.assert_allclose(result.statistics["bn"].var, var, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4)
    # Their own call is back afterwards: training mode drops and adds noise again.
    assert "call" not in vars(dropout) and "call" not in vars(model.get_layer("noise"))
    assert "call" not in vars(bn)
    seen, _ = utils.batch_statistics(model, x, training=True)
    assert not np.allclose(seen["bn"].var, var, rtol=0.05)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_recalibrate_and_diagnose_name_the_batch_and_layer_of_non_finite_values(tiny, data, bad):
    model, bn = tiny
    x, _ = data
    x = x.copy()
    x[5, 1, 2, 0] = bad  # sample 5: the second batch of 4
    for call in (utils.recalibrate_batchnorm, utils.diagnose_batchnorm):
        with pytest.raises(ValueError, match=r"batch 2\b.*layer 'bn'") as info:
            kwargs = {"include_never_updated": True} if call is utils.recalibrate_batchnorm else {}
            call(model, x, batch_size=4, **kwargs)
        assert "NaN" in str(info.value) and call.__name__ in str(info.value)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), [0.0, 0.0])  # nothing changed
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0, 1.0])


def test_recalibrate_refuses_batches_of_one_value_per_channel(data):
    x, _ = data
    keras.backend.clear_session()
    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization(name="flat_bn")
    model = keras.Model(inputs, bn(inputs))
    flat = x.reshape(10, -1)[:, :3]
    # 10 samples in batches of 3, 3, 3 and 1: the last normalizes one value per channel.
    with pytest.raises(ValueError, match=r"batch 4\b.*layer 'flat_bn'.*one value"):
        utils.recalibrate_batchnorm(model, flat, batch_size=3, include_never_updated=True)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), [1.0, 1.0, 1.0])
    assert utils.recalibrate_batchnorm(model, flat, batch_size=5, include_never_updated=True) == 1


def test_diagnose_thresholds(tiny, data):
    model, bn = tiny
    x, _ = data
    mean, var = _np_moments(x)
    std = np.sqrt(var + float(bn.epsilon))

    bn.moving_mean.assign((mean + 0.3 * std).astype(np.float32))  # 0.3 std off
    bn.moving_variance.assign(var.astype(np.float32))
    row = utils.diagnose_batchnorm(model, x)[0]
    assert row.flagged and row.verdict == "mismatch"
    assert row.shift == pytest.approx(0.3, rel=1e-4)
    assert row.log_var_gap == pytest.approx(0, abs=1e-5)
    assert 2 * row.noise_shift < 0.3  # beyond the noise of one batch of 10 too
    assert not utils.diagnose_batchnorm(model, x, shift_tol=0.5)[0].flagged

    bn.moving_mean.assign(mean.astype(np.float32))
    bn.moving_variance.assign((2.0 * var).astype(np.float32))  # ratio 2
    row = utils.diagnose_batchnorm(model, x)[0]
    assert row.flagged and row.log_var_gap == pytest.approx(np.log(2.0), rel=1e-4)
    assert row.moving_var == pytest.approx(2 * row.batch_var, rel=1e-5)
    assert 2 * row.noise_log_var < np.log(2.0)
    assert not utils.diagnose_batchnorm(model, x, ratio_tol=2.5)[0].flagged

    for bad in ({"ratio_tol": 0.5}, {"shift_tol": -0.1}, {"noise": -1.0}):
        with pytest.raises(ValueError, match="must be"):
            utils.diagnose_batchnorm(model, x, **bad)


def test_diagnose_flags_only_gaps_beyond_the_noise_of_one_batch(tiny, data):
    model, bn = tiny
    x, _ = data
    mean, var = _np_moments(x)
    bn.moving_mean.assign(mean.astype(np.float32))
    bn.moving_variance.assign((2.0 * var).astype(np.float32))  # ratio 2: beyond ratio_tol 1.5
    # Batches of 4, 4 and 2 scatter far more than one batch of 10: within the noise.
    row = diagnose_in_order(model, x, batch_size=4)[0]
    assert (row.samples, row.batches) == (10, 3)
    assert np.log(1.5) < row.log_var_gap < 2 * row.noise_log_var
    assert not row.flagged and row.verdict == "ok"
    assert diagnose_in_order(model, x, batch_size=4, noise=0)[0].flagged  # fixed only
    # The reference is what the moving average estimates: the mean of the batches' moments.
    batch_vars = [_np_moments(x[s : s + 4])[1] for s in (0, 4, 8)]
    assert row.batch_var == pytest.approx(np.median(np.mean(batch_vars, axis=0)), rel=1e-5)
    # The noise decides only above the fixed tolerance: a huge noise factor flags nothing,
    # and a gap under the fixed tolerance is never flagged, however small the noise.
    assert not diagnose_in_order(model, x, noise=100)[0].flagged
    bn.moving_variance.assign((1.2 * var).astype(np.float32))
    assert not diagnose_in_order(model, x, noise=0)[0].flagged
    # The rule itself, on every row computed here.
    for kwargs in ({}, {"batch_size": 4}, {"batch_size": 3}, {"noise": 0.5}):
        r = diagnose_in_order(model, x, **kwargs)[0]
        noise = kwargs.get("noise", 2.0)
        assert r.flagged == bool(
            r.shift > max(0.2, noise * r.noise_shift)
            or r.log_var_gap > max(np.log(1.5), noise * r.noise_log_var)
        )


def test_diagnose_noise_is_the_scatter_of_one_batch(tiny, data):
    """The noise of one batch of 10, against the true scatter of many such batches' moments."""
    model, bn = tiny
    x, _ = data  # 10 samples of 4 x 4 values, independent N(5, 9) per channel
    row = utils.diagnose_batchnorm(model, x)[0]
    rng = np.random.default_rng(0)
    draws = 5.0 + 3.0 * rng.standard_normal((4000, 10 * 4 * 4))
    true_shift = draws.mean(axis=1).std() / 3.0  # in standard deviations
    true_log_var = np.log(draws.var(axis=1)).std()
    # At least the true scatter (the reference is an estimate too), not far beyond it.
    assert 1.0 <= row.noise_shift / true_shift <= 3.0
    assert 1.0 <= row.noise_log_var / true_log_var <= 3.0


def test_diagnose_batch_size_default_and_minimum_samples(tiny, data):
    model, _ = tiny
    x, _ = data
    many = np.concatenate([x] * 4)  # 40 samples: 32 + 8 with the default batch_size
    row = utils.diagnose_batchnorm(model, many)[0]
    assert (row.samples, row.batches) == (40, 2)
    assert utils.diagnose_batchnorm(model, many, max_samples=12)[0].samples == 12
    assert utils.diagnose_batchnorm(model, x[:2])[0].samples == 2
    with pytest.raises(ValueError, match=r"2\+? samples"):
        utils.diagnose_batchnorm(model, x[:1])


def test_updates_needed():
    assert utils.updates_needed(0.99, 0.01) == 459
    assert utils.updates_needed(0.9, 0.01) == 44
    assert utils.updates_needed(0.5, 0.25) == 2  # 0.5**2 is exactly 0.25
    assert utils.updates_needed(0.99, 1.0) == utils.updates_needed(0.99, np.inf) == 0
    for m in (0.5, 0.9, 0.99, 0.999):
        for remaining in (0.01, 6.7e-4, 0.5):
            n = utils.updates_needed(m, remaining)
            assert m**n <= remaining < m ** (n - 1)
    for bad in ((1.0, 0.01), (0.0, 0.01), (0.9, 0.0), (0.9, -1.0)):
        with pytest.raises(ValueError, match="0 < momentum < 1"):
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
# Resources, PreciseBN, html_table's bold cells
# ---------------------------------------------------------------------------


def test_resources():
    text = utils.resources()
    assert "s;" in text and "MB" in text
    assert re.fullmatch(r"this notebook took \d+ s; peak memory \d+ MB", text)


def test_html_table_shows_bold_cells_in_bold_and_escaped():
    # utils._Bold: the private str subclass gaps_table_html uses for flagged verdicts
    cell = utils._Bold("x<y")
    assert isinstance(cell, str) and cell == "x<y"
    text = utils.html_table(["a", "b"], [[cell, "plain"], [utils._Bold("1 & 2"), 0.5]]).data
    assert "<td><b>x&lt;y</b></td>" in text and "<td>plain</td>" in text
    assert "<td><b>1 &amp; 2</b></td>" in text and "<td>0.5</td>" in text
    assert text.count("<b>") == 2


def test_precise_bn_recalibrates_every_epoch(tiny, data):
    model, bn = tiny
    x, y = data
    utils.compile_model(model)
    precise = utils.PreciseBN(x, batch_size=10)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[precise])
    assert len(precise.results) == 2
    assert all(isinstance(r, utils.Recalibration) and r == 1 for r in precise.results)
    assert all((r.samples, r.batches) == (10, 1) and r.seconds >= 0 for r in precise.results)
    # The layer receives the data itself: after fit, its statistics are the data's, not
    # momentum 0.99's average of six updates, which would still be close to 0 and 1.
    mean, var = _np_moments(x)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4)

    small = utils.PreciseBN(x, max_samples=4, batch_size=2)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[small])
    assert (small.results[0].samples, small.results[0].batches) == (4, 2)
    # max_samples takes a subset of the arrays: the statistics are those of some 4 of the samples
    subsets = itertools.combinations(range(len(x)), 4)
    assert any(
        np.allclose(bn.moving_mean.numpy(), _np_moments(x[list(s)])[0], rtol=1e-4) for s in subsets
    )


def test_precise_bn_recalibrates_before_validation_and_only_inside_fit(tiny, data):
    model, bn = tiny
    x, y = data
    utils.compile_model(model)
    precise = utils.PreciseBN(x, batch_size=10)
    history = model.fit(
        x, y, epochs=2, batch_size=4, validation_data=(x, y), verbose=0, callbacks=[precise]
    )
    assert len(precise.results) == 2  # once per epoch: before validation, not again at its end
    np.testing.assert_allclose(bn.moving_mean.numpy(), _np_moments(x)[0], rtol=1e-4)
    # Validation judged the recalibrated statistics, as evaluate does now.
    loss, _ = model.evaluate(x, y, verbose=0, callbacks=[precise])
    assert history.history["val_loss"][-1] == pytest.approx(loss, rel=1e-5)
    assert len(precise.results) == 2  # evaluate alone does not recalibrate


def _defined_in(module):
    """Public functions and classes defined in ``module`` (not imported into it)."""
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    ]


def test_every_public_helper_is_tested():
    """Fails when utils.py or bn_toolkit.py gains a public function or class that no test file
    calls (the toolkit's as ``utils.NAME``, the same object, or as ``bn_toolkit.NAME``)."""
    here = Path(inspect.getsourcefile(test_every_public_helper_is_tested)).parent
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted(here.glob("test_*.py")))
    public, toolkit = _defined_in(utils), _defined_in(bn_toolkit)
    untested = [name for name in public if f"utils.{name}" not in source]
    untested += [
        name
        for name in toolkit
        if f"utils.{name}" not in source and f"bn_toolkit.{name}" not in source
    ]
    assert public and toolkit and not untested, f"no test calls: {untested}"


def test_utils_re_exports_the_whole_toolkit_as_the_same_objects():
    """``utils.NAME`` is ``bn_toolkit.NAME`` for every public name of the toolkit, and its
    ``__all__`` lists exactly them: one implementation, wherever a learner imports it from."""
    toolkit = _defined_in(bn_toolkit)
    assert sorted(bn_toolkit.__all__) == sorted(toolkit)
    other = [n for n in toolkit if getattr(utils, n, None) is not getattr(bn_toolkit, n)]
    assert other == [], f"utils.NAME is not bn_toolkit.NAME for {other}"
    assert not set(toolkit) & set(_defined_in(utils)), "defined in both modules"


# --- memory and errors --------------------------------------------------------------------


def test_release_memory_clears_the_session():
    keras.backend.clear_session()
    first = keras.layers.Dense(1)
    utils.release_memory()
    second = keras.layers.Dense(1)
    assert first.name == second.name  # the name counter started again


def test_load_images_raises_only_the_documented_types(tmp_path):
    """Whatever the bad input, the learner meets FileNotFoundError or ValueError, never Pillow's
    own."""
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


def test_weights_digest_follows_every_weight_and_moving_statistic():
    first, second = utils.build_small_cnn(), utils.build_small_cnn()  # the same seed
    assert utils.weights_digest(first) == utils.weights_digest(second)
    second.get_layer("bn3").moving_variance.assign(
        second.get_layer("bn3").moving_variance.numpy() * 2
    )
    assert utils.weights_digest(first) != utils.weights_digest(second)
    third = utils.build_small_cnn()
    kernel = third.get_layer("conv1").kernel
    kernel.assign(np.nextafter(kernel.numpy(), np.inf))  # one last bit in every value
    assert utils.weights_digest(first) != utils.weights_digest(third)
