"""Which layers each model trains, the head, and where the base's weights come from."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPOSITORY_DIR
from data_augmentation import load_pixels
from data_preprocessing import UserError, load_recipes, make_demo_dataset
from plot_loss_accuracy_graph import expected_calibration_error
from load_pre_trained_models import (
    base_of,
    build_model,
    compile_model,
    fit_temperature,
    load_base,
    trainable_conv_layer_names,
)

RECIPES = {recipe.title: recipe for recipe in load_recipes()}

# The documented recipe: the last N Conv2D layers, in base.layers order.
EXPECTED_CONV_RULE = {
    "VGG16": ["block4_conv2", "block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3"],
    "VGG19": [f"block{block}_conv{index}" for block in (4, 5) for index in (1, 2, 3, 4)],
    # After clear_session, InceptionV3's 94 convolutions are named conv2d to conv2d_93.
    "InceptionV3": [f"conv2d_{index}" for index in (86, 90, 87, 88, 91, 92, 85, 93)],
    "ResNet50": [
        "conv4_block5_3_conv",
        "conv4_block6_1_conv", "conv4_block6_2_conv", "conv4_block6_3_conv",
        "conv5_block1_1_conv", "conv5_block1_2_conv", "conv5_block1_0_conv", "conv5_block1_3_conv",
        "conv5_block2_1_conv", "conv5_block2_2_conv", "conv5_block2_3_conv",
        "conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv",
    ],
}

# What the original code trained: the last K Keras layers, whatever they were.
EXPECTED_LAYERS_RULE = {
    "VGG16": ["block5_conv1", "block5_conv2", "block5_conv3"],
    "VGG19": ["block5_conv1", "block5_conv2", "block5_conv3", "block5_conv4"],
    "InceptionV3": [],
    "ResNet50": ["conv5_block2_3_conv", "conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv"],
}


def small_model(title, rule="conv"):
    recipe = RECIPES[title]
    return build_model(recipe, weights="none", img_size=max(32, recipe.min_img_size), unfreeze_rule=rule)


@pytest.mark.parametrize("title", EXPECTED_CONV_RULE)
def test_conv_rule_trains_exactly_the_documented_conv_layers(title):
    model = small_model(title, "conv")
    assert trainable_conv_layer_names(model) == EXPECTED_CONV_RULE[title]
    batch_norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert not any(layer.trainable for layer in batch_norms)


@pytest.mark.parametrize("title", EXPECTED_LAYERS_RULE)
def test_layers_rule_reproduces_the_original_code(title):
    model = small_model(title, "layers")
    assert trainable_conv_layer_names(model) == EXPECTED_LAYERS_RULE[title]


def test_original_inception_trains_only_the_head():
    model = small_model("InceptionV3", "layers")
    layers = [*base_of(model).layers, *model.layers]
    trainable_layers = {layer.name for layer in layers if layer.trainable and layer.weights and not isinstance(layer, keras.Model)}
    assert trainable_layers == {"dense_1024", "fake_logit"}


def test_original_resnet_unfroze_batch_normalization():
    model = small_model("ResNet50", "layers")
    assert base_of(model).get_layer("conv5_block3_3_bn").trainable


def test_head_ends_in_a_logit_a_frozen_temperature_scaling_and_a_sigmoid():
    model = small_model("VGG16")
    assert [layer.name for layer in model.layers[-6:]] == [
        "average_pool", "dense_1024", "dropout", "fake_logit", "temperature_scaling", "p_fake"
    ]
    assert model.get_layer("dense_1024").units == 1024 and model.get_layer("dropout").rate == 0.5
    scaling = model.get_layer("temperature_scaling")
    assert not scaling.trainable and scaling.get_weights()[0].tolist() == [[1.0]]  # T = 1 until it is fitted.
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    p_fake = model.predict(images, verbose=0)
    assert p_fake.shape == (2, 1) and np.all((p_fake > 0) & (p_fake < 1))
    # Dividing the logit by T = 2 moves p(fake) towards 0.5, on the same side of it.
    logits = keras.Model(model.inputs, model.get_layer("fake_logit").output).predict(images, verbose=0)
    scaling.set_weights([np.full((1, 1), 0.5, np.float32)])
    np.testing.assert_allclose(model.predict(images, verbose=0), 1 / (1 + np.exp(-logits / 2)), atol=1e-6)


def test_temperature_scaling_tames_an_over_confident_model():
    """Scores four times too sure of themselves: a temperature near 4 undoes that, on other images too."""
    rng = np.random.default_rng(0)

    def over_confident(count):
        labels = rng.integers(0, 2, count)
        # A feature drawn around +1.5 for fakes and -1.5 for real faces: 3 x feature is the true log-odds.
        feature = rng.normal(np.where(labels == 1, 1.5, -1.5), 1.0)
        return 4 * 3 * feature, labels

    (valid_logits, valid_labels), (test_logits, test_labels) = over_confident(2000), over_confident(2000)
    temperature = fit_temperature(valid_logits, valid_labels)
    assert 3.5 < temperature < 4.5
    before = expected_calibration_error(test_labels, 1 / (1 + np.exp(-test_logits)))
    after = expected_calibration_error(test_labels, 1 / (1 + np.exp(-test_logits / temperature)))
    assert after < before / 3


def test_output_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small_model("VGG16")
        assert model.get_layer("dense_1024").compute_dtype == "float16"
        # In float16 or bfloat16, ImageNet's mean colour (123.68, ...) would lose its decimals.
        assert model.get_layer("pixel_scaling").compute_dtype == "float32"
        for head_end in ("fake_logit", "temperature_scaling", "p_fake"):
            assert model.get_layer(head_end).compute_dtype == "float32"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_weights_file_is_loaded_into_the_base(tmp_path):
    recipe = RECIPES["VGG16"]
    saved = load_base(recipe, "none", 32)
    weights_file = tmp_path / "vgg16_base.weights.h5"
    saved.save_weights(weights_file)
    loaded = load_base(recipe, str(weights_file), 32)
    np.testing.assert_array_equal(loaded.get_layer("block5_conv3").kernel, saved.get_layer("block5_conv3").kernel)


# Keras warns about every layer it cannot match before it fails; that is what is tested.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_weights_of_another_model_are_refused_with_a_hint(tmp_path):
    weights_file = tmp_path / "vgg16_base.weights.h5"
    load_base(RECIPES["VGG16"], "none", 32).save_weights(weights_file)
    with pytest.raises(UserError, match="include_top=False weights of ResNet50"):
        load_base(RECIPES["ResNet50"], str(weights_file), 32)


def test_failed_imagenet_download_exits_2_with_the_file_name(tiny_split_root, tmp_path):
    # A proxy on a closed local port makes the download fail at once, online or not.
    environment = dict(
        os.environ,
        KERAS_HOME=str(tmp_path / "keras-home"),
        https_proxy="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    result = subprocess.run(
        [sys.executable, "VGG16_finetuning.py", "--data-dir", str(tiny_split_root), "--img-size", "32",
         "--output-dir", str(tmp_path / "out")],
        cwd=REPOSITORY_DIR, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in error_lines[0]
    assert str(tmp_path / "keras-home" / "models") in error_lines[0]
    assert "--weights none" in error_lines[0] and "--weights PATH" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_a_model_trained_too_long_on_noisy_labels_gets_a_temperature_above_1(tmp_path):
    """Trained for 25 epochs on 40 faces, a quarter of them mislabelled, VGG16 learns the labels by
    heart: sure of itself and often wrong on other faces. Its temperature, fitted on the validation
    faces, calibrates the test faces."""
    split_root = make_demo_dataset(tmp_path / "faces", {"train": 20, "valid": 20, "test": 20}, size=32)

    def faces(split):
        paths = sorted((split_root / split).rglob("*.jpg"))
        return np.stack([load_pixels(path, 32) for path in paths]), np.array([path.parent.name == "fake" for path in paths], float)

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = faces("train"), faces("valid"), faces("test")
    train_y = np.where(np.random.default_rng(0).random(len(train_y)) < 0.25, 1 - train_y, train_y)
    keras.utils.set_random_seed(1)
    model = small_model("VGG16")
    compile_model(model, 1e-4)
    model.fit(train_x, train_y, epochs=25, batch_size=8, verbose=0)
    logits = keras.Model(model.inputs, model.get_layer("fake_logit").output)
    valid_logits, test_logits = (logits.predict(x, verbose=0).ravel() for x in (valid_x, test_x))

    temperature = fit_temperature(valid_logits, valid_y)
    assert temperature > 1
    before = expected_calibration_error(test_y, 1 / (1 + np.exp(-test_logits)))
    after = expected_calibration_error(test_y, 1 / (1 + np.exp(-test_logits / temperature)))
    assert after <= before
