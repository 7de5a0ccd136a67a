"""Which layers each model trains, the head, and where the base's weights come from."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPOSITORY_DIR
from data_preprocessing import UserError, load_recipes
from load_pre_trained_models import (
    base_of,
    build_model,
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
    assert trainable_layers == {"dense_1024", "p_fake"}


def test_original_resnet_unfroze_batch_normalization():
    model = small_model("ResNet50", "layers")
    assert base_of(model).get_layer("conv5_block3_3_bn").trainable


def test_head_outputs_a_float32_probability():
    model = small_model("VGG16")
    assert [type(layer).__name__ for layer in model.layers[-4:]] == [
        "GlobalAveragePooling2D", "Dense", "Dropout", "Dense"
    ]
    assert model.layers[-3].units == 1024 and model.layers[-2].rate == 0.5
    p_fake = model.predict(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)), verbose=0)
    assert p_fake.shape == (2, 1) and np.all((p_fake > 0) & (p_fake < 1))


def test_output_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small_model("VGG16")
        assert model.get_layer("dense_1024").compute_dtype == "float16"
        # In float16 or bfloat16, ImageNet's mean colour (123.68, ...) would lose its decimals.
        assert model.get_layer("pixel_scaling").compute_dtype == "float32"
        assert model.get_layer("p_fake").compute_dtype == "float32"
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
