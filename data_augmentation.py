"""Augment the training images and feed every split to Keras as ImageDataGenerator flows.

The training images are randomly rotated, shifted, sheared, zoomed and flipped, so that
the model sees a slightly different face every epoch; validation and test images are
only preprocessed. Images to predict are read the same way as test images, and an
evaluation may blur or JPEG-compress them first to measure robustness. Run this file to look at what the model will see:

    python data_augmentation.py            # a grid of augmented training samples
    python data_augmentation.py --demo     # the same on the synthetic demo dataset

It writes OUTPUT_DIR/augmentation_samples.png (default outputs/).
"""

import contextlib
import io
import math
import sys

import cv2
import matplotlib

matplotlib.use("Agg")  # Draw to files: training servers have no screen.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

# Keras 3's own keras.preprocessing.image no longer has ImageDataGenerator; TensorFlow's
# copy of Keras does.
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from data_preprocessing import (
    CLASSES,
    OneLineArgumentParser,
    add_data_arguments,
    ensure_writable_folder,
    exits_on_user_error,
    find_split_root,
    load_dataset,
    positive_int,
    report_bad_files,
    resolve_data_options,
)

# The original project's augmentation. Its shear_range=0.2 dates from Keras 1, which read
# shear in radians; Keras 2 and later read degrees, where 0.2 is no shear at all. We keep
# the intended strength: 0.2 radians, about 11.5 degrees.
TRAINING_AUGMENTATION = dict(
    rotation_range=20,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=math.degrees(0.2),
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)


def perturb(image, jpeg_quality=None, blur_sigma=None):
    """Blur, then JPEG-compress, an RGB image of 0-255 floats, as CNNDetection tests robustness.

    The image is the one the model sees, already resized to --img-size, so that a sigma
    means the same number of model pixels whatever the source images' resolution.
    """
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if blur_sigma:
        # A (0, 0) kernel size lets OpenCV choose one wide enough for the sigma.
        pixels = cv2.GaussianBlur(pixels, (0, 0), blur_sigma)
    if jpeg_quality is not None:
        # OpenCV encodes BGR, so the channels are swapped there and back.
        _, encoded = cv2.imencode(".jpg", pixels[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        pixels = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    return pixels.astype(np.float32)


def preprocessing_options(preprocess_input, preprocessing, perturbation=None):
    """How pixels are scaled: the base model's own preprocess_input, or the original's 1/255.

    `perturbation`, a function of one image, runs first: on the pixels as they are read.
    """
    steps = [step for step in (perturbation, preprocess_input if preprocessing == "native" else None) if step]

    def preprocess(image):
        for step in steps:
            image = step(image)
        return image

    # ImageDataGenerator applies its preprocessing_function before its rescale.
    options = dict(preprocessing_function=preprocess)
    if preprocessing == "rescale":
        options["rescale"] = 1.0 / 255
    return options


def image_flow(images, generator, img_size, batch_size, shuffle, seed):
    """A Keras flow over (path, class name) pairs, with labels real = 0 and fake = 1."""
    frame = pd.DataFrame(
        {"filename": [str(path) for path, _ in images], "class": [name for _, name in images]}
    )
    return generator.flow_from_dataframe(
        frame,
        x_col="filename",
        y_col="class",
        classes=list(CLASSES),  # Fixes the label order; the default would sort fake before real.
        class_mode="binary",
        target_size=(img_size, img_size),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        validate_filenames=False,  # data_preprocessing has already decoded every file.
    )


def prediction_flow(paths, preprocess_input, preprocessing, img_size, batch_size, perturbation=None):
    """A flow of unlabelled images that reads and scales them exactly as the test flow does.

    Keras reads each file with Pillow (grey and palette images become RGB, an alpha
    channel is dropped) and resizes it to img_size with nearest-neighbour sampling, so
    a model gives an image the same p(fake) here as in its predictions.csv.
    """
    generator = ImageDataGenerator(**preprocessing_options(preprocess_input, preprocessing, perturbation))
    frame = pd.DataFrame({"filename": [str(path) for path in paths]})
    # Keras prints how many files it found; --predict's output is kept to one line per image.
    with contextlib.redirect_stdout(io.StringIO()):
        return generator.flow_from_dataframe(
            frame,
            x_col="filename",
            class_mode=None,
            target_size=(img_size, img_size),
            batch_size=batch_size,
            shuffle=False,
            validate_filenames=False,  # The caller has already decoded every file.
        )


def make_flows(dataset, preprocess_input, preprocessing, img_size, batch_size, seed):
    """The train, valid and test flows. Only training is augmented and shuffled."""
    scaling = preprocessing_options(preprocess_input, preprocessing)
    training_generator = ImageDataGenerator(**TRAINING_AUGMENTATION, **scaling)
    evaluation_generator = ImageDataGenerator(**scaling)
    return {
        "train": image_flow(dataset.images["train"], training_generator, img_size, batch_size, True, seed),
        "valid": image_flow(dataset.images["valid"], evaluation_generator, img_size, batch_size, False, seed),
        # The test flow is never shuffled, so its predictions line up with its file names.
        "test": image_flow(dataset.images["test"], evaluation_generator, img_size, batch_size, False, seed),
    }


def evaluation_flow(images, preprocess_input, preprocessing, img_size, batch_size, perturbation=None):
    """An unshuffled, labelled flow like the test flow, with an optional test-time perturbation."""
    generator = ImageDataGenerator(**preprocessing_options(preprocess_input, preprocessing, perturbation))
    return image_flow(images, generator, img_size, batch_size, shuffle=False, seed=0)


def save_augmentation_grid(images, path, img_size=224, columns=6, seed=42):
    """Draw each of a few training images, then augmented versions of it, one row per image."""
    generator = ImageDataGenerator(**TRAINING_AUGMENTATION, rescale=1.0 / 255)
    flow = image_flow(images, generator, img_size, batch_size=1, shuffle=False, seed=seed)
    figure, axes = plt.subplots(len(images), columns, figsize=(2 * columns, 2 * len(images)), squeeze=False)
    original = ImageDataGenerator(rescale=1.0 / 255)
    for row, (image_path, class_name) in enumerate(images):
        original_flow = image_flow([(image_path, class_name)], original, img_size, 1, False, seed)
        axes[row][0].imshow(original_flow[0][0][0])
        axes[row][0].set_title(f"{class_name} (original)", fontsize=9)
        for column in range(1, columns):
            batch, _ = flow[row]  # Each call draws a new random transform.
            axes[row][column].imshow(batch[0].clip(0, 1))
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("Training augmentation: rotation, shift, shear, zoom, horizontal flip")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@exits_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--img-size", type=positive_int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--rows", type=positive_int, default=4, help="how many training images to show (default 4)")
    args = resolve_data_options(parser.parse_args(argv))

    ensure_writable_folder(args.output_dir)
    split_root = find_split_root(args.data_dir)
    dataset = load_dataset(split_root, args.output_dir / ".cache", args.subset, args.seed)
    report_bad_files(dataset.bad_files)
    # Alternate real and fake images, so that the grid shows both classes.
    by_class = {name: [item for item in dataset.images["train"] if item[1] == name] for name in CLASSES}
    chosen = []
    for row in range(args.rows):
        candidates = by_class[CLASSES[row % 2]]
        chosen.append(candidates[(row // 2) % len(candidates)])
    path = save_augmentation_grid(chosen, args.output_dir / "augmentation_samples.png", args.img_size, seed=args.seed)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
