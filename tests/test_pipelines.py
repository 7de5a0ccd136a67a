"""The tf.data pipeline against the ImageDataGenerator flows, mixed precision, and distribution."""

import json
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import load_pre_trained_models
from conftest import REPOSITORY_DIR, run_script
from data_augmentation import (
    ImageDataGenerator,
    augmentation_matrix,
    image_generator_flows,
    make_flows,
    pillow_nearest_indices,
    random_augmentation_matrices,
    usable_cores,
    warped_images,
)
from data_preprocessing import CLASSES, load_dataset


def batches_of(inputs):
    """Every (images, labels) batch of a flow or a tf.data pipeline, as NumPy arrays."""
    if isinstance(inputs, tf.data.Dataset):
        return [(images.numpy(), labels.numpy()) for images, labels in inputs]
    return [inputs[index] for index in range(len(inputs))]


def all_images_and_labels(inputs):
    batches = batches_of(inputs)
    return np.concatenate([images for images, _ in batches]), np.concatenate([labels for _, labels in batches])


@pytest.mark.parametrize("img_size", [32, 24, 45])  # The tiny images are 32 pixels: as they are, and resized.
def test_both_pipelines_give_the_same_pixels_and_labels_without_augmentation(tiny_split_root, tmp_path, img_size):
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    flows = make_flows(dataset, img_size, batch_size=4, seed=0, pipeline="idg")
    pipelines = make_flows(dataset, img_size, batch_size=4, seed=0, pipeline="tfdata")
    for split in ("valid", "test"):
        flow_images, flow_labels = all_images_and_labels(flows[split])
        tfdata_images, tfdata_labels = all_images_and_labels(pipelines[split])
        assert tfdata_labels.tolist() == flow_labels.tolist()
        assert tfdata_labels.tolist() == [CLASSES.index(name) for _, name in dataset.images[split]]
        assert tfdata_images.shape == flow_images.shape == (len(flow_labels), img_size, img_size, 3)
        # Raw pixels: the model scales them itself.
        assert tfdata_images.min() >= 0 and tfdata_images.max() <= 255 and tfdata_images.max() > 1
        # The same pixels, resized or not: at 24 px, every third row and column of a 32-pixel
        # image falls exactly between two source pixels, where rounding picks one.
        np.testing.assert_allclose(tfdata_images, flow_images, atol=1e-3)


def test_tfdata_test_split_keeps_its_order_and_every_image(tiny_split_root, tmp_path):
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    pipelines = make_flows(dataset, img_size=32, batch_size=4, seed=0, pipeline="tfdata")
    batches = batches_of(pipelines["test"])
    # 6 test images in batches of 4: the last batch is partial, and nothing is dropped.
    assert [len(labels) for _, labels in batches] == [4, 2]
    labels = np.concatenate([labels for _, labels in batches])
    assert labels.tolist() == [CLASSES.index(name) for _, name in dataset.images["test"]]
    assert all(0 <= images.min() and images.max() <= 255 for images, _ in batches)


def test_tfdata_augments_only_training_anew_each_epoch_and_reproducibly(tiny_split_root, tmp_path):
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    pipelines = make_flows(dataset, img_size=32, batch_size=8, seed=3, pipeline="tfdata")
    first_epoch, second_epoch = (all_images_and_labels(pipelines["train"]) for _ in range(2))
    assert sorted(first_epoch[1]) == sorted(second_epoch[1]) == [0] * 4 + [1] * 4
    assert not np.allclose(first_epoch[0], second_epoch[0])
    same_seed = make_flows(dataset, img_size=32, batch_size=8, seed=3, pipeline="tfdata")
    np.testing.assert_array_equal(all_images_and_labels(same_seed["train"])[0], first_epoch[0])
    # Validation is neither augmented nor shuffled: two passes are identical.
    np.testing.assert_array_equal(*(all_images_and_labels(pipelines["valid"])[0] for _ in range(2)))


def test_resizing_picks_the_pixels_that_pillow_picks():
    for source_size, target_size in [(256, 224), (32, 24), (100, 75), (64, 96), (1023, 299)]:
        ramp = np.tile(np.arange(source_size, dtype=np.int32), (2, 1))
        pillow = np.asarray(Image.fromarray(ramp).resize((target_size, 2), Image.NEAREST))[0]
        np.testing.assert_array_equal(pillow_nearest_indices(source_size, target_size), pillow)


def test_the_warps_of_a_batch_follow_the_documented_augmentations():
    img_size = 100
    matrices = random_augmentation_matrices(tf.constant([0, 0], tf.int64), 300, img_size).numpy()
    assert matrices.shape == (300, 3, 3)
    linear = matrices[:, :2, :2]
    determinants = np.linalg.det(linear)
    # Half are flipped, and no zoom or shear squeezes the image beyond 0.8 x 0.8 or 1.2 x 1.2.
    assert 0.4 < (determinants < 0).mean() < 0.6
    assert np.all((np.abs(determinants) >= 0.64 * np.cos(0.2) - 1e-5) & (np.abs(determinants) <= 1.44 + 1e-5))
    # The center moves by the shift (at most 20 % of the side on each axis), rotated.
    center = np.array([(img_size - 1) / 2] * 2 + [1])
    moved = np.abs((matrices @ center)[:, :2] - center[:2])
    assert moved.max() <= 0.2 * img_size * np.sqrt(2) + 1e-3 and moved.max() > 0.15 * img_size
    # Rotation spans about +-20 degrees: compare the images of the x axis with and without flips.
    unflipped = linear[determinants > 0]
    angles = np.degrees(np.arctan2(unflipped[:, 1, 0], unflipped[:, 0, 0]))
    assert np.abs(angles).max() < 20 + 12 and np.abs(angles).max() > 15  # Shear tilts it a little more.
    # Each image of the batch has draws of its own, and the same seed draws them again.
    assert len(np.unique(matrices.round(4), axis=0)) == 300
    np.testing.assert_array_equal(random_augmentation_matrices(tf.constant([0, 0], tf.int64), 300, img_size), matrices)


def test_the_warp_keeps_the_images_when_the_matrices_are_the_identity():
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3)).astype(np.float32)
    warped = warped_images(tf.constant(images), tf.eye(3, batch_shape=[2])).numpy()
    np.testing.assert_allclose(warped, images, atol=1e-4)


def test_the_warp_transforms_as_image_data_generator_does():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.float32)
    angle, shift_x, shift_y, shear, zoom_x, zoom_y = 15, 3.0, -2.0, 0.15, 0.9, 1.1
    matrix = augmentation_matrix(np.radians(angle), shift_x, shift_y, shear, zoom_x, zoom_y, 1.0, 32)
    warped = warped_images(tf.constant(image[None]), matrix[None]).numpy()[0]
    # ImageDataGenerator's tx moves the image along x, its columns, whatever its name says.
    parameters = {"theta": angle, "tx": shift_x, "ty": shift_y, "shear": np.degrees(shear), "zx": zoom_x,
                  "zy": zoom_y, "flip_horizontal": True}
    expected = ImageDataGenerator(fill_mode="nearest").apply_transform(image, parameters)
    # OpenCV 5 reads each pixel at the exact point; OpenCV 4 rounds the point to 1/32 of a
    # pixel, which on this noise moves a value by up to 4.7 of 255. A point an eighth of a
    # pixel off would move one by 30.
    tolerance = 0.05 if int(cv2.__version__.split(".")[0]) >= 5 else 5
    np.testing.assert_allclose(warped, expected, atol=tolerance)


def test_the_matrices_of_a_batch_are_those_of_each_image_alone():
    # Angle, shifts, shear, zooms and flip of two images.
    values = np.array([[0.1, 2.0, 1.0, 0.05, 0.9, 1.2, 1.0], [-0.3, -5.0, 0.0, -0.1, 1.1, 0.8, 0.0]], np.float32)
    batched = augmentation_matrix(*values.T, img_size=40).numpy()
    one_by_one = [augmentation_matrix(*image_values, img_size=40).numpy() for image_values in values]
    assert batched.shape == (2, 3, 3)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_tfdata_names_files_it_cannot_read(tiny_split_root, tmp_path, capsys):
    # A good TIFF: the image check accepts it, but tf.io cannot decode it.
    cv2.imwrite(str(tiny_split_root / "train" / "real" / "scan.tif"), np.zeros((32, 32, 3), np.uint8))
    output_dir = tmp_path / "outputs"
    assert run_script("VGG16", tiny_split_root, output_dir, "--pipeline", "tfdata", "--subset", "100") == 2
    assert "scan.tif" in capsys.readouterr().err


def test_flows_use_every_core_and_keep_the_test_order(tiny_split_root, tmp_path):
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    flows = image_generator_flows(dataset, img_size=32, batch_size=2, seed=0)
    assert all(flow.workers == usable_cores() for flow in flows.values())
    flows["test"].workers = 2  # Parallel even on a one-core machine.
    inputs = keras.Input((32, 32, 3))
    mean_pixel = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    predicted = mean_pixel.predict(flows["test"], verbose=0)
    one_by_one = [keras.utils.img_to_array(keras.utils.load_img(path)).mean(axis=(0, 1)) for path, _ in dataset.images["test"]]
    np.testing.assert_allclose(predicted, one_by_one, atol=1e-3)


def test_mixed_precision_trains_in_bfloat16_with_a_float32_output(tiny_split_root, tmp_path):
    output_dir = tmp_path / "outputs"
    assert run_script("VGG16", tiny_split_root, output_dir, "--mixed-precision", "--pipeline", "tfdata") == 0
    history = pd.read_csv(output_dir / "vgg16" / "history.csv")
    assert np.isfinite(history[["accuracy", "loss", "val_accuracy", "val_loss"]].to_numpy()).all()
    model = keras.models.load_model(output_dir / "vgg16" / "model.keras")
    assert load_pre_trained_models.base_of(model).get_layer("block5_conv3").compute_dtype == "bfloat16"
    assert model.get_layer("p_fake").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert np.isfinite(json.loads((output_dir / "vgg16" / "metrics.json").read_text())["test_loss"])


def test_mixed_precision_is_float16_on_a_gpu(monkeypatch):
    assert load_pre_trained_models.precision_policy(False) == "float32"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert load_pre_trained_models.precision_policy(True) == "mixed_float16"


def test_mirrored_strategy_trains_and_saves_on_two_cpu_devices(tiny_split_root, tmp_path):
    # TensorFlow splits the CPU in two only before it starts, so this runs in a new process.
    script = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path.insert(0, {str(REPOSITORY_DIR)!r})
        import VGG16_finetuning as script
        sys.exit(script.main(sys.argv[1:]))
    """)
    output_dir = tmp_path / "outputs"
    options = ["--data-dir", str(tiny_split_root), "--output-dir", str(output_dir), "--weights", "none",
               "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--distribute", "mirrored"]
    finished = subprocess.run([sys.executable, "-c", script, *options], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "on 2 replica(s)" in finished.stdout
    model = keras.models.load_model(output_dir / "vgg16" / "model.keras")
    assert model.output_shape == (None, 1)
    assert json.loads((output_dir / "vgg16" / "metrics.json").read_text())["n_test"] == 6


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}', "keras/issues/20585"),
        ("{not json", "TF_CONFIG is not valid JSON"),
    ],
)
def test_multiworker_stops_early_where_keras_cannot_train(tiny_split_root, tmp_path, monkeypatch, capsys, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    assert run_script("VGG16", tiny_split_root, tmp_path / "outputs", "--distribute", "multiworker") == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "outputs" / "vgg16").exists()
