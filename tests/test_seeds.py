"""The phenomenon and its main fix do not hang on one seed.

For eight seeds, the case is trained as the notebooks train it: five epochs, then one more at a
time until the final weights get every image right in training mode (``utils.StopWhenMemorised``,
at most 20 epochs). Then ``predict`` must fail on the very images the weights memorise, and
recalibration must make ``predict`` equal the training-mode output and get every image right.
The number of updates each seed used is printed (``pytest -s``), for the README.
"""

import numpy as np
import pytest

import utils

SEEDS = list(range(8))
MAX_EPOCHS = utils.MAX_EPOCHS


@pytest.fixture(scope="module")
def data():
    return utils.load_images(utils.ROOT / "data" / "train")


@pytest.mark.parametrize("seed", SEEDS)
def test_phenomenon_and_recalibration_hold(seed, data):
    images, labels, _ = data
    utils.release_memory()
    utils.setup(seed)
    model = utils.compile_model(utils.build_resnet50(len(labels), seed=seed))
    stop = utils.StopWhenMemorised(images, labels, min_epochs=5)
    model.fit(images, labels, epochs=MAX_EPOCHS, callbacks=[stop], verbose=0)
    print(f"seed {seed}: {stop.stopped_epoch} updates")
    assert stop.memorised, f"seed {seed}: not memorised after {MAX_EPOCHS} updates"
    assert utils.memorised(model, images, labels)
    probabilities = model.predict(images, verbose=0)
    # The phenomenon on any CPU: predict is wrong on an image the weights memorise. Which classes
    # it gives (one for all, in the recording's runs) is printed, not asserted.
    print(f"seed {seed}: predict gave classes {probabilities.argmax(axis=1).tolist()}")
    assert utils.accuracy(probabilities, labels) < 1.0

    result = utils.recalibrate_batchnorm(model, images)
    # fit updated every layer, so none is left alone as never updated (or for any reason)
    assert result == len(utils.batchnorm_layers(model)) == 53 and result.skipped == []
    with utils.frozen_moving_statistics(model):
        training = model(images, training=True).numpy()
    served = model.predict(images, verbose=0)
    np.testing.assert_allclose(served, training, atol=1e-4)
    assert utils.accuracy(served, labels) == 1.0
    del model, stop
    utils.release_memory()
