"""The phenomenon and its main fix do not hang on one seed.

For three seeds (the series' own and its two neighbours), five epochs of the case reach training
accuracy 1.0 while ``predict`` answers one class for all images; recalibration then makes
``predict`` equal the training-mode output and gets every image right. (Some other seeds bounce:
Adam's steps on raw 0-255 pixels leave the model wrong after the fifth update, in both modes. The
gap between the modes appears with every seed; see README.)
"""

import numpy as np
import pytest

import utils


@pytest.fixture(scope="module")
def data():
    return utils.load_images(utils.ROOT / "data" / "train")


@pytest.mark.parametrize("seed", [utils.SEED - 1, utils.SEED, utils.SEED + 1])
def test_phenomenon_and_recalibration_hold(seed, data):
    images, labels, _ = data
    utils.release_memory()
    model = utils.compile_model(utils.build_resnet50(len(labels), seed=seed))
    history = model.fit(images, labels, epochs=5, verbose=0)
    assert history.history["accuracy"][-1] == 1.0
    assert len(set(model.predict(images, verbose=0).argmax(axis=1).tolist())) == 1

    utils.recalibrate_batchnorm(model, images)
    with utils.frozen_moving_statistics(model):
        training = model(images, training=True).numpy()
    served = model.predict(images, verbose=0)
    np.testing.assert_allclose(served, training, atol=1e-4)
    assert utils.accuracy(served, labels) == 1.0
    del model, history
    utils.release_memory()
