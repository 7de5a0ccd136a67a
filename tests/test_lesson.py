"""What fine-tuning promises, checked the way the Keras guide checks it: weights before and after fit.

- The model takes raw pixels: its first layer is the base's own preprocess_input.
- One fit changes the trainable conv kernels and leaves every frozen one as it was.
- Frozen batch normalization keeps its ImageNet statistics; the original's rule for
  ResNet50 let them drift.
- --warmup-epochs trains the head alone first, then fine-tunes at a tenth of the rate,
  and a run interrupted in its warmup resumes into its second phase.
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

import load_pre_trained_models
from conftest import REPOSITORY_DIR, CountEpochs, InterruptAfterEpoch, add_callback, assert_one_line_error, run_script
from data_preprocessing import load_recipes
from load_pre_trained_models import base_of, build_model, compile_model, pixel_scaling_layer

RECIPES = {recipe.title: recipe for recipe in load_recipes()}


def small_model(title, unfreeze_rule="conv"):
    recipe = RECIPES[title]
    return build_model(recipe, weights="none", img_size=max(32, recipe.min_img_size), unfreeze_rule=unfreeze_rule)


def fit_once(model):
    """One epoch of two batches of random raw pixels, at a rate high enough to move every trainable weight."""
    rng = np.random.default_rng(0)
    size = model.input_shape[1]
    images, labels = rng.uniform(0, 255, (8, size, size, 3)), np.array([0.0, 1.0] * 4)
    compile_model(model, learning_rate=1e-3)
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)


def conv_kernels(model):
    return {layer.name: layer.kernel.numpy() for layer in base_of(model).layers if isinstance(layer, keras.layers.Conv2D)}


def moving_statistics(model):
    return {
        layer.name: np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()])
        for layer in base_of(model).layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


# --- The model takes raw pixels -----------------------------------------------


@pytest.mark.parametrize("title", RECIPES)
def test_the_first_layer_is_the_bases_own_preprocess_input(title):
    recipe = RECIPES[title]
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    expected = load_pre_trained_models.application_module(recipe).preprocess_input(pixels.copy())
    np.testing.assert_allclose(pixel_scaling_layer(recipe)(pixels), expected, atol=1e-4)
    np.testing.assert_allclose(pixel_scaling_layer(recipe, "rescale")(pixels), pixels / 255, atol=1e-6)


def test_a_model_saved_before_it_took_raw_pixels_is_refused(tmp_path, capsys):
    # An earlier version's detector: the same name, no scaling layer in front of its base.
    base = load_pre_trained_models.load_base(RECIPES["VGG16"], "none", 32)
    p_fake = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(base.output))
    keras.Model(base.input, p_fake, name="vgg16_deepfake_detector").save(tmp_path / "old.keras")
    image = tmp_path / "face.png"
    keras.utils.save_img(image, np.zeros((32, 32, 3)))
    assert run_script("VGG16", None, tmp_path, "--predict", str(image), "--model", str(tmp_path / "old.keras")) == 2
    assert_one_line_error(capsys, "earlier version", "train VGG16 again")


# --- One fit changes exactly what is trainable --------------------------------


@pytest.mark.parametrize("title", RECIPES)
def test_fit_changes_the_trainable_conv_kernels_and_no_frozen_one(title):
    model = small_model(title)
    trainable = set(load_pre_trained_models.trainable_conv_layer_names(model))
    assert len(trainable) == RECIPES[title].trainable_conv_layers
    kernels_before, statistics_before = conv_kernels(model), moving_statistics(model)
    fit_once(model)
    kernels_after, statistics_after = conv_kernels(model), moving_statistics(model)
    for name in kernels_before:
        if name in trainable:
            assert not np.allclose(kernels_before[name], kernels_after[name]), f"{name} should have trained"
        else:
            np.testing.assert_array_equal(kernels_before[name], kernels_after[name], err_msg=f"{name} should stay frozen")
    # Frozen batch normalization (InceptionV3's and ResNet50's) keeps its ImageNet statistics.
    assert len(statistics_before) == {"VGG16": 0, "VGG19": 0, "InceptionV3": 94, "ResNet50": 53}[title]
    for name in statistics_before:
        np.testing.assert_array_equal(statistics_before[name], statistics_after[name], err_msg=name)


def test_the_original_rule_let_resnet50_batch_normalization_drift():
    model = small_model("ResNet50", "layers")
    before = moving_statistics(model)
    fit_once(model)
    after = moving_statistics(model)
    drifted = {name for name in before if not np.allclose(before[name], after[name])}
    # The last 14 Keras layers hold four batch normalization layers, which then train.
    assert drifted == {"conv5_block2_3_bn", "conv5_block3_1_bn", "conv5_block3_2_bn", "conv5_block3_3_bn"}


# --- Two phases: the head first, then the last conv layers --------------------


class RecordPhases(keras.callbacks.Callback):
    """For each fit: its first epoch, its learning rate, and whether the base's last conv kernel moved."""

    def __init__(self):
        super().__init__()
        self.fits = []

    def on_train_begin(self, logs=None):
        self.kernel = base_of(self.model).get_layer("block5_conv3").kernel.numpy()
        self.first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.first_epoch = epoch if self.first_epoch is None else self.first_epoch

    def on_train_end(self, logs=None):
        moved = not np.array_equal(self.kernel, base_of(self.model).get_layer("block5_conv3").kernel.numpy())
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.fits.append((self.first_epoch, pytest.approx(learning_rate), moved))


def test_warmup_trains_the_head_alone_then_fine_tunes_at_a_tenth_of_the_rate(tiny_split_root, tmp_path, monkeypatch):
    recorder = RecordPhases()
    add_callback(monkeypatch, recorder)
    output_dir = tmp_path / "outputs"
    assert run_script("VGG16", tiny_split_root, output_dir, "--warmup-epochs", "1", "--epochs", "2",
                      "--learning-rate", "1e-3") == 0
    # The warmup leaves the base as ImageNet made it; the second phase trains its last conv layers.
    assert recorder.fits == [(0, 1e-3, False), (1, 1e-4, True)]
    history = pd.read_csv(output_dir / "vgg16" / "history.csv")
    assert history["phase"].tolist() == ["warmup", "fine-tune"]
    metrics = json.loads((output_dir / "vgg16" / "metrics.json").read_text())
    assert (metrics["warmup_epochs"], metrics["fine_tune_learning_rate"], metrics["epochs_run"]) == (1, 1e-4, 2)


@pytest.mark.parametrize(
    "warmup_epochs, stopped_after, phases",
    [
        # Stopped in the warmup: the rest of the warmup, then the second phase from its start.
        (2, 0, ["warmup", "warmup", "fine-tune"]),
        # Stopped in the second phase: the warmup's backup says it is done, and nothing is repeated.
        (1, 1, ["warmup", "fine-tune", "fine-tune"]),
    ],
)
def test_an_interrupted_two_phase_run_resumes_where_it_stopped(
    tiny_split_root, tmp_path, monkeypatch, capsys, warmup_epochs, stopped_after, phases
):
    output_dir = tmp_path / "outputs"
    options = ("--warmup-epochs", str(warmup_epochs), "--epochs", "3")
    add_callback(monkeypatch, InterruptAfterEpoch(stopped_after))
    assert run_script("VGG16", tiny_split_root, output_dir, *options) == 130
    assert "Run the same command again to resume" in capsys.readouterr().out
    monkeypatch.undo()
    # Resumed with other settings, its history would mix two runs: refused, and the run is kept.
    assert run_script("VGG16", tiny_split_root, output_dir, *options, "--unfreeze-rule", "layers") == 2
    assert_one_line_error(capsys, "made with --unfreeze-rule conv", "delete that folder")

    counter = CountEpochs()
    add_callback(monkeypatch, counter)
    assert run_script("VGG16", tiny_split_root, output_dir, *options) == 0
    assert counter.epochs_begun == list(range(stopped_after + 1, 3))  # No epoch is trained twice.
    history = pd.read_csv(output_dir / "vgg16" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["phase"].tolist() == phases
    metrics = json.loads((output_dir / "vgg16" / "metrics.json").read_text())
    # Both sessions' epochs count.
    assert metrics["epochs_run"] == 3 and metrics["train_seconds"] == pytest.approx(history["seconds"].sum(), abs=0.1)


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--warmup-epochs", "2", "--epochs", "2"], ["--warmup-epochs 2", "--epochs 2"]),
        (["--fine-tune-learning-rate", "1e-5"], ["--fine-tune-learning-rate", "add --warmup-epochs"]),
        (["--warmup-epochs", "-1"], ["--warmup-epochs", "0 or more"]),
        (["--predict", "face.jpg", "--warmup-epochs", "2"], ["--warmup-epochs", "--predict and --evaluate train none"]),
    ],
)
def test_warmup_mistakes_are_one_line_errors(capsys, tiny_split_root, tmp_path, options, fragments):
    assert run_script("VGG16", tiny_split_root, tmp_path / "out", *options) == 2
    assert_one_line_error(capsys, *fragments)


# --- The command line answers before TensorFlow loads -------------------------


def test_help_and_option_mistakes_answer_without_loading_tensorflow():
    checks = (
        "import sys, VGG16_finetuning\n"
        "status = VGG16_finetuning.main(['--epochs', '0'])\n"
        "print(status, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", checks], cwd=REPOSITORY_DIR, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"]
    helped = subprocess.run([sys.executable, "VGG16_finetuning.py", "--help"], cwd=REPOSITORY_DIR,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--warmup-epochs" in helped.stdout
    assert helped.stderr == ""  # No TensorFlow start-up line.
