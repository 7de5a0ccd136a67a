"""From a file to the model's input: images read upright, the two training pipelines, faces cut out, video frames.

Every pipeline hands the model raw RGB pixels, 0 to 255: the model's own first layer
scales them as its pre-trained base expects (see load_pre_trained_models.py), so a saved
model needs no preprocessing code of ours. In order, this module holds:

1. reading an image upright, as its EXIF orientation says, and resized as Keras resizes it;
2. the training augmentation, and the two input pipelines that apply it to the same files:
   - "idg" (the default): the original project's Keras ImageDataGenerator, in flows that
     decode and augment in Python, one worker thread per CPU core;
   - "tfdata": a tf.data pipeline that decodes and resizes in parallel, then applies all
     five augmentations (rotation, shift, shear, zoom, flip) as one affine warp per image,
     drawn for a whole batch at once;
3. the images that --evaluate scores, perhaps blurred or JPEG-compressed first;
4. faces: the frame the dataset cuts a face out in (measured on the dataset; see
   FRAME_SIDE_PER_FACE_SCALE); MTCNN, whose stages FaceFinder runs itself, so that it
   searches a copy no larger than the search needs, a video's frames as one batch, and
   frames each face in the image itself; and the face followed across a video's frames
   (main_face: a sighting joins the nearest face last seen within twice its square's side,
   so that a face that shrinks, grows or is missed for a while stays one face);
5. a video's frames, sampled evenly, key frames preferred, read with PyAV in one pass;
6. the command below, which draws what the model trains on.

Only the training images are augmented, so that the model sees a slightly different
face every epoch; validation and test images are only resized.

    python data_augmentation.py                      # a grid of augmented training samples
    python data_augmentation.py --demo               # the same on the synthetic demo dataset
    python data_augmentation.py --pipeline tfdata    # as the tf.data pipeline augments them

It writes OUTPUT_DIR/augmentation_samples.png (default outputs/, or outputs/demo/ with --demo).
"""

import bisect
import contextlib
import functools
import math
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # Draw to files: training servers have no screen.
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageOps

from data_preprocessing import quiet_tensorflow_start

# Run on its own, this file loads TensorFlow itself: as quietly as the scripts do.
with quiet_tensorflow_start():
    import keras
    import tensorflow as tf

# Keras 3's own keras.preprocessing.image no longer has ImageDataGenerator; TensorFlow's
# copy of Keras does.
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from data_preprocessing import (
    CLASSES,
    SMALLEST_FINDABLE_FACE,
    SPLITS,
    OneLineArgumentParser,
    UserError,
    add_data_arguments,
    ensure_demo_dataset,
    ensure_writable_folder,
    exits_on_user_error,
    find_split_root,
    image_named_as_video,
    is_animated_image,
    load_dataset,
    positive_int,
    report_bad_files,
    resolve_data_options,
    save_figure,
)


# ---------------------------------------------------------------------------
# Reading an image upright, as the model reads it
# ---------------------------------------------------------------------------


# Pillow reads 16-bit greyscale images in these modes (and 32-bit integer ones in "I"); its
# convert("RGB"), which Keras' own flows call, clips their values to 255 and shows them white.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Transparent pixels are shown over this neutral grey, as a viewer shows them over its own
# background: the colours they hide are not part of the picture.
TRANSPARENT_BACKGROUND = (128, 128, 128)


def upright_rgb(image):
    """A Pillow image as a viewer shows it: turned upright by its EXIF orientation, and made 8-bit RGB.

    A phone stores a portrait photo on its side and records the turn in EXIF; grey and
    palette images are made RGB, and transparent pixels are laid over TRANSPARENT_BACKGROUND.
    A 16-bit greyscale image keeps the top 8 bits of each value, as OpenCV and TensorFlow
    read it, so it looks as its 8-bit version does.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_GREY_MODES:
        top_bits = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(np.clip(top_bits, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*TRANSPARENT_BACKGROUND, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def read_upright(path):
    """An image file's pixels as uint8 RGB, upright (see upright_rgb)."""
    with Image.open(path) as image:
        return np.asarray(upright_rgb(image))


def rgb_pixels(image):
    """An image handed over in memory, a PIL image or a numpy array of uint8 (height x width x 3, or grey),
    as upright 8-bit RGB pixels (see upright_rgb)."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise UserError(
                f"an image in memory must be RGB pixels, height x width x 3, of type uint8 (0 to 255); "
                f"this one is {'x'.join(map(str, array.shape))} of {array.dtype}"
            )
        image = Image.fromarray(array)
    return np.asarray(upright_rgb(image))


def model_input(image, img_size):
    """An RGB image (Pillow or uint8 array) as the model reads it: float32, 0 to 255, resized as Keras' load_img does.

    That is nearest-pixel resizing, which is what the models were trained on.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.size != (img_size, img_size):
        image = image.resize((img_size, img_size), Image.Resampling.NEAREST)
    return np.asarray(image, np.float32)


def load_pixels(path, img_size, frame=None):
    """An image file's pixels as the model reads them: upright RGB (see upright_rgb), resized to img_size.

    With a FaceFrame, the face is first cut out as the dataset frames its faces.
    """
    if frame is not None:
        return model_input(frame.crop(read_upright(path)), img_size)
    with Image.open(path) as image:
        return model_input(upright_rgb(image), img_size)


# ---------------------------------------------------------------------------
# The ImageDataGenerator flows (--pipeline idg, the default)
# ---------------------------------------------------------------------------


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


class ImageFlow(keras.utils.PyDataset):
    """Batches of image files, and their labels if given, as ImageDataGenerator's own flows make them.

    Each image is read with load_pixels (its face cut out first, where a frame is given), then, if a generator is given, randomly
    transformed and standardized by it, as its flow_from_dataframe would. (That flow reads
    16-bit greyscale images as white, hence this one.) Batches are prepared in parallel
    threads, one per usable core, and still handed over in order.
    """

    def __init__(self, paths, labels, img_size, batch_size, generator=None, shuffle=False, seed=None, frames=None):
        super().__init__(workers=usable_cores())
        self.paths, self.img_size, self.batch_size = [str(path) for path in paths], img_size, batch_size
        # With faces found (--evaluate --faces auto), the FaceFrame to cut out of each image.
        self.frames = [None] * len(self.paths) if frames is None else frames
        self.labels = None if labels is None else np.asarray(labels, np.float32)
        self.generator, self.shuffle = generator, shuffle
        self.random = np.random.default_rng(seed)
        self.order = np.arange(len(self.paths))
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index):
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = np.stack([
            self.transformed(load_pixels(self.paths[position], self.img_size, self.frames[position])) for position in chosen
        ])
        return images if self.labels is None else (images, self.labels[chosen])

    def transformed(self, image):
        """The image as the generator makes it: randomly transformed, then standardized."""
        if self.generator is None:
            return image
        return self.generator.standardize(self.generator.random_transform(image))

    def on_epoch_end(self):
        """Draw a new order of the images for the next epoch, if they are shuffled."""
        if self.shuffle:
            self.order = self.random.permutation(len(self.paths))


def image_flow(images, generator, img_size, batch_size, shuffle, seed, frames=None):
    """An ImageFlow over (path, class name) pairs, with labels real = 0 and fake = 1."""
    labels = [CLASSES.index(class_name) for _, class_name in images]
    return ImageFlow([path for path, _ in images], labels, img_size, batch_size, generator, shuffle, seed, frames)


def usable_cores():
    """The CPU cores this process may use: a container or a job scheduler may allow fewer than the machine has."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no such limit to read.
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def image_generator_flows(dataset, img_size, batch_size, seed):
    """The train, valid and test ImageDataGenerator flows. Only training is augmented and shuffled."""
    training_generator = ImageDataGenerator(**TRAINING_AUGMENTATION)
    # The threads of the training flow draw the random augmentations in whichever order
    # they run, so --seed fixes the order of the images but not their augmentations.
    return {
        "train": image_flow(dataset.images["train"], training_generator, img_size, batch_size, True, seed),
        "valid": image_flow(dataset.images["valid"], None, img_size, batch_size, False, seed),
        # The test flow is never shuffled, so its predictions line up with its file names.
        "test": image_flow(dataset.images["test"], None, img_size, batch_size, False, seed),
    }


# ---------------------------------------------------------------------------
# The tf.data pipeline (--pipeline tfdata)
# ---------------------------------------------------------------------------


# The formats tf.io.decode_image reads. The image check also accepts others (TIFF, for one).
TFDATA_FORMATS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

# Where EXIF keeps an image's orientation: 1 is upright, 2 to 8 say how to turn or mirror it.
EXIF_ORIENTATION = 0x0112


def exif_orientation(path):
    """An image file's EXIF orientation, 1 to 8; 1 (upright) when it has none, or a damaged one."""
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # Pillow raises many kinds for a damaged EXIF block; the image itself was checked.
        return 1
    return orientation if orientation in range(1, 9) else 1


def exif_orientations(paths):
    """The EXIF orientation of each file, read by a thread per core.

    A JPEG keeps it in its header, which is all Pillow reads here; a PNG may keep it after
    the pixels, which Pillow then reads too.
    """
    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        return list(pool.map(exif_orientation, paths))


def turned_upright(image, orientation):
    """A decoded image turned as its EXIF orientation says, as Pillow's ImageOps.exif_transpose does."""
    transposed = lambda: tf.transpose(image, (1, 0, 2))  # noqa: E731  Mirrors across the main diagonal.
    return tf.switch_case(
        tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7),
        [
            lambda: image,  # 1: upright.
            lambda: image[:, ::-1],  # 2: mirrored left to right.
            lambda: image[::-1, ::-1],  # 3: turned 180 degrees.
            lambda: image[::-1],  # 4: mirrored top to bottom.
            transposed,  # 5: mirrored across the main diagonal.
            lambda: tf.image.rot90(image, k=3),  # 6: stored turned left; turned a quarter clockwise.
            lambda: transposed()[::-1, ::-1],  # 7: mirrored across the other diagonal.
            lambda: tf.image.rot90(image, k=1),  # 8: stored turned right; turned a quarter anticlockwise.
        ],
    )


def decode_image(path, orientation=1):
    """The pixels of an image file as uint8 RGB, whatever its format and size, turned upright by its EXIF orientation."""
    data = tf.io.read_file(path)
    image = tf.cond(
        tf.io.is_jpeg(data),
        # The accurate inverse DCT gives exactly the pixels that Pillow, and so the flows, read.
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    return turned_upright(image, orientation)


def pillow_nearest_indices(source_size, target_size):
    """The source pixel that Pillow's nearest-pixel resize reads for each target pixel.

    Pillow steps through the source by adding the scale again and again in double
    precision, so where a target pixel's center falls exactly between two source pixels,
    the rounding of those sums picks one. Taking the same steps gives exactly its pixels.
    """
    scale = source_size / target_size
    positions = np.add.accumulate(np.r_[scale / 2, np.full(target_size - 1, scale)])
    return np.minimum(positions.astype(np.int64), source_size - 1)


def resized_image(path, img_size, orientation=1):
    """Decode and resize an image exactly as ImageDataGenerator's flows do, with Pillow's nearest pixel."""
    image = decode_image(path, orientation)
    height, width = tf.unstack(tf.shape(image)[:2])
    rows = tf.numpy_function(pillow_nearest_indices, [height, img_size], tf.int64)
    columns = tf.numpy_function(pillow_nearest_indices, [width, img_size], tf.int64)
    image = tf.gather(tf.gather(image, rows, axis=0), columns, axis=1)
    return tf.cast(tf.ensure_shape(image, (img_size, img_size, 3)), tf.float32)


def matrix_3x3(*first_two_rows):
    """Affine transforms as 3x3 matrices, from the entries of their first two rows.

    Each entry is a number, or a vector with one value per transform: the result is then
    one matrix (3 x 3), or one per transform (transforms x 3 x 3).
    """
    values = [tf.cast(value, tf.float32) for value in first_two_rows]
    shape = functools.reduce(tf.broadcast_dynamic_shape, [tf.shape(value) for value in values])
    zero, one = tf.zeros(shape), tf.ones(shape)
    entries = [tf.broadcast_to(value, shape) for value in values] + [zero, zero, one]
    return tf.reshape(tf.stack(entries, axis=-1), tf.concat([shape, [3, 3]], axis=0))


def augmentation_matrix(angle, shift_x, shift_y, shear, zoom_x, zoom_y, flip, img_size):
    """The 3x3 matrix that rotates, shifts, shears, zooms and flips an img_size image.

    Angles are in radians, shifts in pixels, and flip is 0 or 1; each is a number, or a
    vector with one value per image, which gives one matrix per image. The matrix maps
    each output pixel (x, y) to the point of the image it is read from, and composes the
    steps as ImageDataGenerator does: rotate, shift, shear, zoom, all about the image center.
    """
    center = (img_size - 1) / 2
    transform = (
        matrix_3x3(1, 0, center, 0, 1, center)
        @ matrix_3x3(tf.cos(angle), -tf.sin(angle), 0, tf.sin(angle), tf.cos(angle), 0)
        @ matrix_3x3(1, 0, shift_x, 0, 1, shift_y)
        @ matrix_3x3(1, -tf.sin(shear), 0, 0, tf.cos(shear), 0)
        @ matrix_3x3(zoom_x, 0, 0, 0, zoom_y, 0)
        @ matrix_3x3(1, 0, -center, 0, 1, -center)
    )
    # The flip comes last, so it mirrors the output: x is read from img_size - 1 - x.
    return transform @ matrix_3x3(1 - 2 * flip, 0, flip * (img_size - 1), 0, 1, 0)


def random_augmentation_matrices(seed, count, img_size):
    """`count` augmentation_matrix draws, (count, 3, 3), following TRAINING_AUGMENTATION as ImageDataGenerator draws them.

    Each image's angle, shifts, shear, zooms and flip are drawn independently, all of a
    batch at once from one stateless seed: the same seed gives the same matrices.
    """
    seeds = tf.random.experimental.stateless_split(seed, 6)

    def uniform(index, bound, shape=(count,)):
        return tf.random.stateless_uniform(shape, seeds[index], -bound, bound)

    angle = uniform(0, math.radians(TRAINING_AUGMENTATION["rotation_range"]))
    shift_x = uniform(1, TRAINING_AUGMENTATION["width_shift_range"]) * img_size
    shift_y = uniform(2, TRAINING_AUGMENTATION["height_shift_range"]) * img_size
    shear = uniform(3, math.radians(TRAINING_AUGMENTATION["shear_range"]))
    zoom_x, zoom_y = tf.unstack(1 + uniform(4, TRAINING_AUGMENTATION["zoom_range"], shape=(2, count)))
    flip = tf.cast(tf.random.stateless_uniform((count,), seeds[5]) < 0.5, tf.float32)
    return augmentation_matrix(angle, shift_x, shift_y, shear, zoom_x, zoom_y, flip, img_size)


# OpenCV reads the pixels whose neighbours lie past the edge in a slower way: with the edge
# pixels first repeated this far out, the warp of a 224 px image takes 0.21 ms instead of 0.40
# (measured on one core of the project's AMD EPYC, OpenCV 5.0).
EDGE_PADDING = 16


def warp_with_opencv(images, matrices):
    """NumPy images (images x side x side x 3, float32), each read through its 3x3 matrix.

    Bilinear, as ImageDataGenerator's warp, and the edge pixels repeated beyond the image,
    as its fill_mode="nearest". OpenCV 5 interpolates at the exact point (within 0.01 of
    TensorFlow's ImageProjectiveTransformV3, in a sixth of its time); OpenCV 4 rounds the
    point to 1/32 of a pixel.
    """
    side = images.shape[2], images.shape[1]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # The matrix maps output pixels to input points.
    # In the padded image, every point lies EDGE_PADDING pixels further right and down.
    into_padded = np.float32([[0, 0, EDGE_PADDING], [0, 0, EDGE_PADDING]])
    warped = np.empty_like(images)
    for image, matrix, output in zip(images, matrices, warped):
        padded = cv2.copyMakeBorder(image, *[EDGE_PADDING] * 4, cv2.BORDER_REPLICATE)
        cv2.warpAffine(padded, matrix[:2] + into_padded, side, dst=output, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    return warped


def warped_images(images, matrices):
    """A batch of images (float32), each warped by its 3x3 augmentation_matrix."""
    warped = tf.numpy_function(warp_with_opencv, [images, matrices], tf.float32, stateful=False)
    return tf.ensure_shape(warped, images.shape)


def augmented_images(images, seed):
    """A batch of resized images (float32), each randomly rotated, shifted, sheared, zoomed and flipped.

    The five augmentations of TRAINING_AUGMENTATION make one affine warp per image, drawn
    for the whole batch from one stateless seed.
    """
    count, img_size = tf.shape(images)[0], images.shape[1]
    return warped_images(images, random_augmentation_matrices(seed, count, img_size))


def check_tfdata_formats(images):
    """Stop before training if tf.data could not decode some of the files, counting them all."""
    unreadable = [path for path, _ in images if path.suffix.lower() not in TFDATA_FORMATS]
    if unreadable:
        raise UserError(
            f"--pipeline tfdata reads JPEG, PNG, BMP, GIF and WebP files, not {unreadable[0]} "
            f"({len(unreadable)} such files); convert them, or use the default --pipeline idg"
        )


def image_dataset(images, img_size, batch_size, shuffle, augment, seed):
    """A batched tf.data pipeline over (path, class name) pairs, with labels real = 0 and fake = 1."""
    paths = [str(path) for path, _ in images]
    labels = [float(CLASSES.index(name)) for _, name in images]
    # TensorFlow's decoders ignore EXIF, so each image's orientation is read here, once.
    dataset = tf.data.Dataset.from_tensor_slices(((paths, exif_orientations(paths)), labels))
    if shuffle:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def load(path_and_orientation, label):
        path, orientation = path_and_orientation
        return resized_image(path, img_size, orientation), label

    def augment_batch(images_and_labels, batch_seed):
        images, labels = images_and_labels
        return augmented_images(images, batch_seed), labels

    # Each image is decoded and resized as ImageDataGenerator's flows do, then batched.
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if augment:
        # A pair of seeds per batch, new every epoch, draws its images' warps: the draws are
        # then reproducible however the parallel calls are scheduled.
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, batch_seeds).map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
    # The next batches are prepared while the model trains on this one.
    return dataset.prefetch(tf.data.AUTOTUNE)


def tfdata_pipelines(dataset, img_size, batch_size, seed):
    """The train, valid and test tf.data pipelines. Only training is augmented and shuffled."""
    check_tfdata_formats([image for split in SPLITS for image in dataset.images[split]])
    return {
        "train": image_dataset(dataset.images["train"], img_size, batch_size, True, True, seed),
        "valid": image_dataset(dataset.images["valid"], img_size, batch_size, False, False, seed),
        # Never shuffled, so that its predictions line up with dataset.images["test"].
        "test": image_dataset(dataset.images["test"], img_size, batch_size, False, False, seed),
    }


PIPELINES = {"idg": image_generator_flows, "tfdata": tfdata_pipelines}


def make_flows(dataset, img_size, batch_size, seed, pipeline="idg"):
    """The train, valid and test inputs of the chosen pipeline, ready for model.fit.

    Args:
        dataset: the checked images, a data_preprocessing.Dataset.
        img_size: the side, in pixels, that every image is resized to.
        batch_size: images per batch; the last batch of a split may be smaller.
        seed: seeds the shuffling and, for tf.data, the augmentation.
        pipeline: "idg" (ImageDataGenerator) or "tfdata".

    Returns:
        {"train": ..., "valid": ..., "test": ...}: batches of (raw RGB pixels as float32, label),
        with only "train" augmented and shuffled.
    """
    return PIPELINES[pipeline](dataset, img_size, batch_size, seed)


# ---------------------------------------------------------------------------
# Images to predict or evaluate, perhaps perturbed (--predict, --evaluate)
# ---------------------------------------------------------------------------


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


def evaluation_flow(images, img_size, batch_size, perturbation=None, frames=None):
    """An unshuffled, labelled flow like the test flow, with an optional test-time perturbation of each image.

    With `frames`, one FaceFrame per image, each image's face is cut out and scored instead.
    """
    generator = None if perturbation is None else ImageDataGenerator(preprocessing_function=perturbation)
    return image_flow(images, generator, img_size, batch_size, shuffle=False, seed=0, frames=frames)


# ---------------------------------------------------------------------------
# Faces: framed as the dataset frames them, found, and followed across frames
# ---------------------------------------------------------------------------
# The models learn from the dataset's faces: 256x256 crops, aligned as FFHQ aligns its
# photos. A face in a group photo or a video frame is scored only once it is cut out the
# same way: found by MTCNN, levelled by its eyes, and framed as the dataset frames faces.


DATASET_FRAME_SIDE = 256

# Where the dataset's faces sit in their 256x256 frame, as MTCNN's landmarks place them,
# measured on the 1,000 images of faces-140k-sample (medians; measure them again with
# `python tests/benchmarks/measure_face_framing.py`):
# - the eyes are level (mean angle -0.02 degrees, sd 1.6), their midpoint at x 127.5;
# - the frame's side is 2.00 times FFHQ's face scale, max(2 x eye distance, 1.8 x
#   eye-to-mouth distance): the steadiest of the scales tried (relative sd 3.3%; the eye
#   distance alone, 6.9%; the box width, 5.1%), and the factor FFHQ's own alignment uses;
# - the frame's centre lies 0.12 of the eye-to-mouth distance from the eyes toward the
#   mouth (FFHQ's alignment: 0.1).
# So a face elsewhere is framed by the same rules, from its own landmarks.
FRAME_SIDE_PER_FACE_SCALE = 2.00
FRAME_CENTRE_TOWARD_MOUTH = 0.12
# A frame that reaches past the image's edge is filled by mirroring, as FFHQ's alignment
# does. The face (its FFHQ scale) spans the middle half of the frame's side, so a strip of
# up to a quarter of the frame along one edge mirrors only hair and background; past it,
# the mirror shows a second eye or half a face, and the face is not judged.
MIRRORED_SHARE_AT_MOST = 0.25


@dataclass(frozen=True)
class FaceFrame:
    """The square a face is cut out in: its centre and side in pixels, turned by `angle` degrees to level the eyes."""

    centre_x: float
    centre_y: float
    side: float
    angle: float = 0.0

    @property
    def square(self):
        """(x, y, size): the frame's square before it is turned, in whole pixels of the image, as the CSV gives it."""
        # Pixel i covers i - 0.5 to i + 0.5, so the first pixel inside starts half a pixel in.
        return round(self.centre_x - self.side / 2 + 0.5), round(self.centre_y - self.side / 2 + 0.5), round(self.side)

    def corners(self):
        """The four corners of the turned square, in pixels of the image, clockwise from the top left."""
        turn = math.radians(self.angle)
        along, down = np.array([math.cos(turn), math.sin(turn)]), np.array([-math.sin(turn), math.cos(turn)])
        half = self.side / 2
        centre = np.array([self.centre_x, self.centre_y])
        return [centre + half * (x * along + y * down) for x, y in ((-1, -1), (1, -1), (1, 1), (-1, 1))]

    def scaled(self, factor):
        """The same frame in an image resized by `factor`."""
        return FaceFrame(self.centre_x * factor, self.centre_y * factor, self.side * factor, self.angle)

    def share_outside(self, height, width, samples=32):
        """The share of the frame that lies outside an image of height x width: what `crop` fills by mirroring."""
        steps = (np.arange(samples) + 0.5) / samples - 0.5
        turn = math.radians(self.angle)
        along, down = np.array([math.cos(turn), math.sin(turn)]), np.array([-math.sin(turn), math.cos(turn)])
        points = np.array([self.centre_x, self.centre_y]) + self.side * (
            steps[:, None, None] * along + steps[None, :, None] * down
        )
        x, y = points[..., 0], points[..., 1]
        inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
        return float(1 - inside.mean())

    def crop(self, image, side=DATASET_FRAME_SIDE):
        """Cut the frame out of an RGB image, levelled, at the dataset's 256x256; outside the image, mirror it."""
        centre, scale = np.array([self.centre_x, self.centre_y]), self.side / side
        if scale > 1:
            # A large face: average its pixels down first, as a warp that shrinks would skip
            # some; only the region the turned square can reach is shrunk.
            reach = math.ceil(self.side * 0.75)
            left, top = (max(0, int(value) - reach) for value in centre)
            region = image[top : int(centre[1]) + reach + 1, left : int(centre[0]) + reach + 1]
            image = cv2.resize(region, None, fx=1 / scale, fy=1 / scale, interpolation=cv2.INTER_AREA)
            # Pixel centres sit half a pixel in, before and after the resize.
            centre = (centre - (left, top) + 0.5) / scale - 0.5
            scale = 1.0
        turn = math.radians(self.angle)
        rotation = scale * np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
        # Maps each output pixel to the point of the image it is read from.
        offset = centre - rotation @ np.full(2, (side - 1) / 2)
        matrix = np.hstack([rotation, offset[:, None]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        return cv2.warpAffine(image, matrix, (side, side), flags=flags, borderMode=cv2.BORDER_REFLECT)


@dataclass(frozen=True)
class Face:
    """A face MTCNN found, in pixels of the upright image: its box (x, y, width, height), its confidence and five landmarks."""

    box: tuple
    confidence: float
    landmarks: dict  # left_eye, right_eye, nose, mouth_left, mouth_right: (x, y), left and right as seen.

    @property
    def width(self):
        return self.box[2]

    def geometry(self):
        """What the framing is measured by: the eye and mouth midpoints, their distances, the eye line's angle.

        The face scale is FFHQ's: max(2 x eye distance, 1.8 x eye-to-mouth distance).
        """
        point = {name: np.array(position) for name, position in self.landmarks.items()}
        eyes = (point["left_eye"] + point["right_eye"]) / 2
        mouth = (point["mouth_left"] + point["mouth_right"]) / 2
        eye_line = point["right_eye"] - point["left_eye"]
        eye_distance, eye_to_mouth = float(np.linalg.norm(eye_line)), float(np.linalg.norm(mouth - eyes))
        return dict(
            eyes=eyes,
            mouth=mouth,
            eye_distance=eye_distance,
            eye_to_mouth=eye_to_mouth,
            angle=math.degrees(math.atan2(eye_line[1], eye_line[0])),
            face_scale=max(2 * eye_distance, 1.8 * eye_to_mouth),
        )

    def frame(self):
        """The square the dataset would frame this face in (see FRAME_SIDE_PER_FACE_SCALE)."""
        geometry = self.geometry()
        centre = geometry["eyes"] + FRAME_CENTRE_TOWARD_MOUTH * (geometry["mouth"] - geometry["eyes"])
        side = FRAME_SIDE_PER_FACE_SCALE * geometry["face_scale"]
        return FaceFrame(float(centre[0]), float(centre[1]), side, geometry["angle"])


# Faces are searched in a copy of the image no longer than this (a 1080p frame becomes
# 640x360), as MTCNN's time grows with the pixels, unless a face of --min-face pixels would
# then be smaller than MTCNN's smallest (SMALLEST_FINDABLE_FACE). Every crop is still cut
# from the full image.
SEARCH_SIDE = 640
# MTCNN takes about 0.12 GB of memory for each million pixels it searches (1.69 GB at 8
# million, 0.98 GB at 2, with TensorFlow loaded), so no more than this many are searched,
# whatever --min-face asks: a photo of any size is judged within 3 GiB.
SEARCH_PIXELS_AT_MOST = 8_000_000


def scale_for_min_face(height, width, min_face):
    """How much to shrink an image before searching it: as far as SEARCH_SIDE, keeping --min-face findable."""
    return min(1.0, max(SEARCH_SIDE / max(height, width), SMALLEST_FINDABLE_FACE / min_face))


def search_scale(height, width, min_face):
    """scale_for_min_face, or less where SEARCH_PIXELS_AT_MOST would be passed."""
    return min(scale_for_min_face(height, width, min_face), math.sqrt(SEARCH_PIXELS_AT_MOST / (height * width)))


def smallest_searched_face(height, width, min_face):
    """The width of the narrowest face that is searched for in an image: --min-face, or more in a very large image."""
    scale = search_scale(height, width, min_face)
    return min_face if scale >= scale_for_min_face(height, width, min_face) else math.ceil(SMALLEST_FINDABLE_FACE / scale)


# MTCNN's boxes on a suit patch had confidences of 0.81 to 0.87; at 0.90, 6 of the 1,000
# faces of faces-140k-sample are dropped too, at 0.95, 24. The astronaut's face scores 0.999
# at any size. (`python tests/benchmarks/measure_face_confidence.py` measures them again.)
MIN_FACE_CONFIDENCE = 0.90


def in_reading_order(faces):
    """Faces in rows, top to bottom, each row left to right: face 1 is the top left one.

    A face whose centre lies above the bottom of the row's first face joins that row, so
    that faces side by side share a row though their heights differ.
    """
    rows = []
    for face in sorted(faces, key=lambda face: face.box[1] + face.box[3] / 2):
        x, y, width, height = face.box
        if rows and y + height / 2 <= rows[-1][0].box[1] + rows[-1][0].box[3]:
            rows[-1].append(face)
        else:
            rows.append([face])
    return [face for row in rows for face in sorted(row, key=lambda face: face.box[0])]


# MTCNN's candidate faces are rows of 16 numbers: the index of their image in the batch,
# the box (x1, y1, x2, y2), the confidence, then the five landmarks' x and their y.
NO_CANDIDATE = np.empty((0, 16))
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


# The output network places a face from the candidate box it is given, and its answer moves
# with that box; the candidates of a reduced copy are not a full-size search's. Given its
# own box once more, it lands nearer: against a full-size search of 24 scenes, crops moved
# by up to 14.3 % of their side (mean 2.5 %) and p_fake by 0.060 after one pass, 7.4 %
# (1.9 %) and 0.021 after two. More passes wander rather than settle (three: 4.0 % (0.9),
# four: 6.0 % (1.4), six: 5.9 % (1.1)), as the network's landmarks move by a pixel or two
# from one box to the next (tests/benchmarks/measure_face_search_size.py). A pass costs
# about 1 ms a face.
OUTPUT_PASSES = 2


def as_one_graph(network, side=None):
    """One of MTCNN's networks, run as one TensorFlow graph of any batch size, for images side x side
    pixels (any size where `side` is None: the proposal network is all convolutions).

    mtcnn calls its networks eagerly, and then Keras runs each small layer as an operation
    of its own: on a 1080p frame that overhead took half the search's time (see
    tests/benchmarks/benchmark_video.py). Traced once, the graph gives the same numbers.
    """
    return tf.function(network, input_signature=[tf.TensorSpec((None, side, side, 3), tf.float32)])


def normalized(pixels):
    """RGB pixels (0 to 255) as MTCNN's networks take them: float32, from -1 to 1."""
    return (tf.cast(pixels, tf.float32) - 127.5) / 128


def patches_in_full_image(image, candidates, side=48):
    """The square patches, side x side, of the candidate boxes, cut from the full-size image, normalized.

    Only the patches are normalized, not the image. Past the image's edge a patch is
    mid-grey, as mtcnn pads it. An image of more than SEARCH_PIXELS_AT_MOST pixels is read
    only in the region that holds every candidate, shrunk if need be. Returns the patches,
    and the candidates' boxes in the region's pixels, with the region's offset and shrink.
    """
    height, width = image.shape[:2]
    left, top, right, bottom = 0, 0, width, height
    if height * width > SEARCH_PIXELS_AT_MOST:
        left, top = (max(0, math.floor(candidates[:, column].min())) for column in (1, 2))
        right, bottom = min(width, math.ceil(candidates[:, 3].max())), min(height, math.ceil(candidates[:, 4].max()))
    region = image[top:bottom, left:right]
    shrink = min(1.0, math.sqrt(SEARCH_PIXELS_AT_MOST / max(1, region.shape[0] * region.shape[1])))
    if shrink < 1:
        region = cv2.resize(region, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
    boxes = (candidates[:, 1:5] - [left, top, left, top]) * shrink
    region_height, region_width = region.shape[:2]
    # As mtcnn's extract_patches: boxes (y1, x1, y2, x2) as shares of the region's sides.
    shares = boxes[:, [1, 0, 3, 2]] / [region_height, region_width, region_height, region_width]
    patches = tf.image.crop_and_resize(region[None], shares, np.zeros(len(boxes), np.int32), (side, side),
                                       extrapolation_value=127.5)
    return normalized(patches), boxes, (left, top), shrink


class FaceFinder:
    """MTCNN (Zhang et al., 2016), as the mtcnn package ships it with its weights: nothing is downloaded.

    Its first two networks search a reduced copy of each image (see search_scale): the
    proposal network slides over a pyramid of the copy, and the refinement network keeps
    the candidate faces. The output network then places each face's box and landmarks from
    the full-size image's own pixels, as a search of the full-size image would: the crop
    moved by up to 9 % of its side when the reduced copy framed it too (see
    tests/benchmarks/measure_face_search_size.py). Frames of one size are searched together.
    """

    def __init__(self):
        # Imported here, so that TensorFlow loads MTCNN's three small networks only when faces are searched.
        from mtcnn.stages import StageONet, StagePNet, StageRNet

        self.proposal, self.refinement, self.output = StagePNet(), StageRNet(), StageONet()
        # The refinement and output networks take patches of 24 and 48 px, which their dense layers need to know.
        for stage, side in ((self.proposal, None), (self.refinement, 24), (self.output, 48)):
            stage._model = as_one_graph(stage.model, side)

    def find(self, image, min_face, min_confidence=None):
        """The faces in an upright RGB image that MTCNN is at least `min_confidence` sure of
        (MIN_FACE_CONFIDENCE by default), in reading order, in the image's own pixels."""
        return self.find_in_each([image], min_face, min_confidence)[0]

    def find_in_each(self, images, min_face, min_confidence=None):
        """The faces of each image, as find gives them. Images of one size, as a video's frames, are searched
        together (searched_together)."""
        min_confidence = MIN_FACE_CONFIDENCE if min_confidence is None else min_confidence
        found = [[] for _ in images]
        for numbers in searched_together(images, min_face):
            candidates = self.search([images[number] for number in numbers], min_face)
            for row in candidates[candidates[:, 5] >= min_confidence]:
                found[numbers[int(row[0])]].append(face_of_row(row))
        return [in_reading_order(faces) for faces in found]

    def search(self, images, min_face):
        """MTCNN's candidate faces (rows, in the images' own pixels) in upright RGB images of one size."""
        scale = search_scale(*images[0].shape[:2], min_face)
        copies = [reduced_copy(image, scale) for image in images]
        batch = normalized(np.stack(copies))
        shapes = np.array([copy.shape for copy in copies])
        candidates = self.proposal(images_normalized=batch, images_oshapes=shapes)
        if len(candidates):
            candidates = self.refinement(images_normalized=batch, bboxes_batch=candidates)
        # Running a network on no candidate, TensorFlow would print a warning that reads like an error.
        faces = [self.placed(image, candidates[candidates[:, 0] == number], scale) for number, image in enumerate(images)]
        return np.concatenate([NO_CANDIDATE, *faces])

    def placed(self, image, candidates, scale):
        """The output network's faces, from the candidates found in a copy of `image` reduced by `scale`,
        placed in the full-size image, each given its own box again until OUTPUT_PASSES are done."""
        from mtcnn.utils.bboxes import resize_to_square

        faces = candidates.astype(np.float64)
        faces[:, 1:5] /= scale
        for _ in range(OUTPUT_PASSES):
            if not len(faces):
                return NO_CANDIDATE
            # The next pass's candidates are squares, as the refinement network gives them.
            faces = self.output_pass(image, resize_to_square(faces[:, :6].copy()))
        return faces

    def output_pass(self, image, candidates):
        """mtcnn's own last stage, on patches of the full-size image (patches_in_full_image): the faces, in its pixels."""
        from mtcnn.utils.bboxes import adjust_bboxes, pick_matches, replace_confidence, smart_nms_from_bboxes
        from mtcnn.utils.landmarks import adjust_landmarks

        patches, candidates[:, 1:5], (left, top), shrink = patches_in_full_image(image, candidates)
        offsets, landmarks, confidences = self.output.model(patches)
        landmarks = adjust_landmarks(landmarks, candidates)
        faces = adjust_bboxes(replace_confidence(candidates, confidences), offsets)
        faces = np.concatenate([faces, landmarks], axis=-1)
        faces = pick_matches(faces, scores_column=5, score_threshold=0.8)  # mtcnn's threshold_onet.
        faces = np.array(smart_nms_from_bboxes(faces, threshold=0.7, method="min", initial_sort=True), dtype=np.float64)
        if not len(faces):
            return NO_CANDIDATE
        # Back in the image's pixels: the boxes, then the five landmarks' x and their y.
        faces[:, 1:5] = faces[:, 1:5] / shrink + [left, top, left, top]
        faces[:, 6:11], faces[:, 11:16] = faces[:, 6:11] / shrink + left, faces[:, 11:16] / shrink + top
        return faces


def reduced_copy(image, scale):
    """The copy of an image that is searched: shrunk by `scale`, or the image itself at 1."""
    return image if scale == 1 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


# Images of one size are searched together up to this many pixels of their reduced copies:
# 8 frames of 640x360. On 1080p frames, a batch of 1 took 37 ms of processor time a frame,
# of 4 or 8 27 ms, of 16 or 32 30 to 31 ms, and the peak memory grew from 1.2 to 1.8 GB.
SEARCHED_TOGETHER_PIXELS = 2_000_000


def searched_together(images, min_face):
    """The indices of the images, in groups of one size to search as one batch: no more than
    SEARCHED_TOGETHER_PIXELS pixels of reduced copies in a group (but an image larger than
    that alone), and no image too thin to hold a face."""
    groups, pixels = {}, {}
    for number, image in enumerate(images):
        if min(image.shape[:2]) < SMALLEST_FINDABLE_FACE:
            continue  # No face fits in a strip this thin, which shrinking for the search would leave empty.
        height, width = image.shape[:2]
        searched = height * width * search_scale(height, width, min_face) ** 2
        if image.shape in groups and pixels[image.shape] + searched > SEARCHED_TOGETHER_PIXELS:
            yield groups.pop(image.shape)
        if image.shape not in groups:
            groups[image.shape], pixels[image.shape] = [], 0
        groups[image.shape].append(number)
        pixels[image.shape] += searched
    yield from groups.values()


def face_of_row(row):
    """A Face from one of MTCNN's rows, in whole pixels as mtcnn reports its faces. Its box, (x, y, width,
    height), is not cut at the image's edge, so that a face partly outside keeps its width."""
    x1, y1, x2, y2 = row[1:5]
    box = tuple(float(value) for value in np.round([x1, y1, x2 - x1, y2 - y1]))
    points = row[6:16]
    landmarks = {name: (float(points[number]), float(points[5 + number])) for number, name in enumerate(LANDMARKS)}
    return Face(box=box, confidence=float(row[5]), landmarks=landmarks)


# Sampled frames can be seconds apart, and a face may shrink, grow, or be missed for a
# while, so two sightings are taken for the same face when the centre of either lies within
# the other's square grown to this many times its side: about where it was, whatever its size.
SAME_FACE_REACH = 2


def grown(square, factor=SAME_FACE_REACH):
    """A (x, y, size) square grown by `factor` about its centre."""
    x, y, size = square
    return (x - (factor - 1) * size / 2, y - (factor - 1) * size / 2, factor * size)


def centre_inside(square, other):
    """Whether the centre of the (x, y, size) square `other` lies inside `square`."""
    x, y, size = square
    other_x, other_y, other_size = other
    centre_x, centre_y = other_x + other_size / 2, other_y + other_size / 2
    return x <= centre_x <= x + size and y <= centre_y <= y + size


def same_face(earlier, later):
    """Whether two face squares of different frames can be one face that stayed about where it was."""
    return centre_inside(grown(earlier), later) or centre_inside(grown(later), earlier)


def centre_distance(first, second):
    (x1, y1, size1), (x2, y2, size2) = first, second
    return math.hypot(x1 + size1 / 2 - x2 - size2 / 2, y1 + size1 / 2 - y2 - size2 / 2)


def main_face(sightings, counts=lambda sighting: True):
    """The sightings of the face seen in the most frames of a video, followed from frame to frame.

    Each sighting is a face with its `frame` (the frame's index) and its `face_frame` (a
    FaceFrame), in the order of the frames. A sighting joins the face last seen nearest to
    it, in an earlier frame, if they can be the same face (same_face); otherwise it starts a
    face of its own. Frames in which a face was missed leave a gap, not a new face. A face
    with a sighting that `counts` comes before one without, however often that one was seen.
    """
    tracks = []
    for sighting in sightings:
        square = sighting.face_frame.square
        candidates = [
            track for track in tracks
            if track[-1].frame != sighting.frame and same_face(track[-1].face_frame.square, square)
        ]
        if candidates:
            min(candidates, key=lambda track: centre_distance(track[-1].face_frame.square, square)).append(sighting)
        else:
            tracks.append([sighting])
    return max(tracks, key=lambda track: (any(map(counts, track)), len(track)), default=[])


# ---------------------------------------------------------------------------
# A video's frames, sampled evenly
# ---------------------------------------------------------------------------


# FFmpeg's own lines ("moov atom not found") would come before the one line that says a
# video cannot be read; OpenCV reads this when it first loads FFmpeg. A user's own level is kept.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


class UnreadableVideo(Exception):
    """A video that cannot be opened, or whose frames cannot be decoded."""


def sampled_frame_indices(frame_count, frames, key_frames=()):
    """`frames` frame indices spread evenly over a video, one in each of as many equal parts of it.

    In each part, the key frame nearest its middle, where the part has one: it decodes on
    its own, without the frames before it. Otherwise the part's middle frame.
    """
    count, key_frames = min(frames, frame_count), sorted(key_frames)
    chosen = []
    for part in range(count):
        # The part holds the frames from part * frame_count / count, up to the next part's first.
        first, after = -(-part * frame_count // count), -(-(part + 1) * frame_count // count)
        middle = int((part + 0.5) * frame_count / count)
        keys = key_frames[bisect.bisect_left(key_frames, first) : bisect.bisect_left(key_frames, after)]
        chosen.append(min(keys, key=lambda key: abs(key - middle)) if keys else middle)
    return chosen


def read_video_frames(path, frames, decoded=None):
    """Yield (index, upright RGB frame) for `frames` frames spread evenly over a video, or an animated GIF or WebP.

    A video is read in one pass (see read_sampled_frames); the index of every frame it
    decodes, sampled or not, is added to the list `decoded` if one is given. A frame that
    cannot be decoded (in a file cut off) comes as None.
    """
    if is_animated_image(path):
        yield from read_animation_frames(path, frames)
        return
    with path_ffmpeg_can_open(path) as openable:
        yield from read_sampled_frames(openable, frames, decoded if decoded is not None else [])


@contextlib.contextmanager
def path_ffmpeg_can_open(path):
    """`path` as a string FFmpeg can open: itself, or, for a file name that is not UTF-8, a link to it with a plain name.

    FFmpeg takes a path as a C string of UTF-8, and PyAV cannot pass it a name that is no
    UTF-8 (Python keeps its bytes as surrogate escapes). The link is made in a temporary
    folder, removed after. (Windows' names are always Unicode: there, no link is needed.)
    """
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory() as folder:
            suffix = Path(path).suffix if Path(path).suffix.isascii() else ""
            link = Path(folder) / f"video{suffix}"
            link.symlink_to(Path(path).absolute())
            yield str(link)
        return
    yield name


@dataclass(frozen=True)
class VideoIndex:
    """Where a video's frames are, read from its packets without decoding them.

    timestamps: each frame's presentation time stamp, in the order frames are shown.
    key_frames: the indices of the frames that decode on their own.
    frame_count: the frames the container declares, or, where it declares none, the frames found.
    """

    timestamps: list
    key_frames: list
    frame_count: int

    def key_frame_before(self, index):
        """The last key frame at or before frame `index`; 0 where there is none."""
        position = bisect.bisect_right(self.key_frames, index)
        return self.key_frames[position - 1] if position else 0


def video_index(container, stream):
    """The VideoIndex of a video stream: its packets are read, none decoded, then the container is rewound."""
    stamped = []
    for packet in container.demux(stream):
        stamp = packet.pts if packet.pts is not None else packet.dts
        if packet.size and stamp is not None:
            # A packet cut short (the end of a file cut off) is no key frame to prefer.
            stamped.append((stamp, packet.is_keyframe and not packet.is_corrupt))
    container.seek(0)
    stamped.sort()
    timestamps = [stamp for stamp, _ in stamped]
    key_frames = [index for index, (_, is_key) in enumerate(stamped) if is_key]
    # A file cut off declares frames it no longer holds: they are sampled, and reported as not decoded.
    return VideoIndex(timestamps, key_frames, max(stream.frames, len(timestamps)))


def read_video_index(path):
    """The VideoIndex of a video file: where its frames and key frames are."""
    import av

    with av.open(str(path)) as container:
        return video_index(container, container.streams.video[0])


def read_sampled_frames(path, frames, decoded):
    """Yield (index, upright RGB frame) for `frames` frames spread evenly over a video that FFmpeg reads.

    The frames are chosen knowing where the key frames are (sampled_frame_indices), and
    read in one forward pass with a decoding thread per core: before each sampled frame the
    video skips ahead to the key frame before it, unless it is already decoding past that
    key frame, so no frame is decoded twice. A phone's video is turned upright by its
    rotation tag.
    """
    import av  # Imported here, so that the scripts start without loading FFmpeg's libraries.

    problem = image_named_as_video(path)  # FFmpeg opens a single image too, as a video of one frame.
    if problem:
        raise UnreadableVideo(problem)
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError):
        raise UnreadableVideo("not a video FFmpeg can open") from None
    with container:
        if not container.streams.video:
            raise UnreadableVideo("not a video: it has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # Decodes several frames, or parts of one, at once.
        try:
            index = video_index(container, stream)
        except av.FFmpegError as error:
            raise UnreadableVideo(f"its frames cannot be read ({error})") from None
        if not index.timestamps:
            raise UnreadableVideo("none of its frames could be read")
        position = {stamp: number for number, stamp in enumerate(index.timestamps)}
        wanted = sampled_frame_indices(index.frame_count, frames, index.key_frames)
        yield from decoded_in_one_pass(container, stream, index, position, wanted, decoded)


def decoded_in_one_pass(container, stream, index, position, wanted, decoded):
    """Yield (index, upright RGB frame or None) for each wanted frame, in order, decoding forward only."""
    decoding, last = iter(()), -1  # The decoder's frames, and the index of the last one decoded.
    wanted_frames = set(wanted)
    for target in wanted:
        if target >= len(index.timestamps):
            yield target, None  # Declared by the container, but cut off.
            continue
        key = index.key_frame_before(target)
        if last < key:
            # Skip ahead: the frames between the last decoded and the key frame are not needed.
            container.seek(index.timestamps[key], stream=stream, backward=True)
            decoding = frames_decoded(container, stream, position, wanted_frames)
        picture = None
        for frame in decoding:
            number = position.get(frame.pts, last + 1)
            decoded.append(number)
            last = number
            if number >= target:
                picture = upright_frame(frame) if number == target else None
                break
        yield target, picture


def frames_decoded(container, stream, position, wanted):
    """The decoder's frames from where the container stands; a packet that cannot be decoded is passed over.

    A frame that no other frame refers to (most B-frames) is skipped unless it is wanted:
    nothing needs it. In H.264 with a key frame every 250 frames, that left 952 of 1,800
    frames to decode, in 2.1 s of processor time instead of 3.6.
    """
    import av

    context = stream.codec_context
    for packet in container.demux(stream):
        context.skip_frame = "DEFAULT" if position.get(packet.pts) in wanted else "NONREF"
        try:
            yield from packet.decode()
        except av.InvalidDataError:  # A damaged packet: the frames after it may still decode.
            continue


def upright_frame(frame):
    """A decoded frame as RGB pixels, turned as its rotation tag says a player shows it."""
    pixels = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4  # Counterclockwise, as FFmpeg's display matrix gives it.
    return np.ascontiguousarray(np.rot90(pixels, quarter_turns)) if quarter_turns else pixels


def read_animation_frames(path, frames):
    """Yield (index, upright RGB frame) for `frames` frames spread evenly over an animated GIF or WebP."""
    try:
        animation = Image.open(path)
        frame_count = animation.n_frames  # Pillow reads through the file to count them.
    except Exception as error:  # Gone since it was listed, or cut off: Pillow raises many kinds.
        raise UnreadableVideo(f"its frames cannot be read ({error})") from None
    with animation:
        for index in sampled_frame_indices(frame_count, frames):
            try:
                animation.seek(index)
                # Each frame is drawn over the ones before it, as a browser shows it.
                yield index, np.asarray(upright_rgb(animation.convert("RGBA")))
            except (OSError, EOFError, ValueError):  # A frame cut off or damaged.
                yield index, None


# ---------------------------------------------------------------------------
# python data_augmentation.py
# ---------------------------------------------------------------------------


def augmented_versions(image_path, class_name, count, img_size, seed, pipeline):
    """`count` randomly augmented versions of one image, as `pipeline` trains on them, in 0-1."""
    if pipeline == "tfdata":
        image = resized_image(str(image_path), img_size, exif_orientation(image_path))
        copies = tf.repeat(image[None], count, axis=0)
        return list(augmented_images(copies, tf.constant([seed, 0], tf.int64)).numpy() / 255)
    generator = ImageDataGenerator(**TRAINING_AUGMENTATION, rescale=1.0 / 255)
    flow = image_flow([(image_path, class_name)], generator, img_size, batch_size=1, shuffle=False, seed=seed)
    return [flow[0][0][0] for _ in range(count)]  # Each call draws a new random transform.


def save_augmentation_grid(images, path, img_size=224, columns=6, seed=42, pipeline="idg"):
    """Draw each of a few training images, then augmented versions of it, one row per image."""
    figure, axes = plt.subplots(len(images), columns, figsize=(2 * columns, 2 * len(images)), squeeze=False)
    original = ImageDataGenerator(rescale=1.0 / 255)
    for row, (image_path, class_name) in enumerate(images):
        original_flow = image_flow([(image_path, class_name)], original, img_size, 1, False, seed)
        axes[row][0].imshow(original_flow[0][0][0])
        axes[row][0].set_title(f"{class_name} (original)", fontsize=9)
        versions = augmented_versions(image_path, class_name, columns - 1, img_size, seed + row, pipeline)
        for column, version in enumerate(versions, start=1):
            axes[row][column].imshow(version.clip(0, 1))
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(f"Training augmentation ({pipeline}): rotation, shift, shear, zoom, horizontal flip")
    return save_figure(figure, path)


@exits_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(
        description="Draw what the model trains on: a few training images of the dataset, each followed by "
        "random augmentations of it (rotation, shift, shear, zoom, flip), as --pipeline makes them. "
        "It writes OUTPUT_DIR/augmentation_samples.png."
    )
    add_data_arguments(parser)
    parser.add_argument("--img-size", type=positive_int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--rows", type=positive_int, default=4, help="how many training images to show (default 4)")
    parser.add_argument(
        "--pipeline", choices=list(PIPELINES), default="idg", help="whose augmentation to draw (default idg)"
    )
    args = resolve_data_options(parser.parse_args(argv))
    if args.uses_demo_data:
        ensure_demo_dataset(args.data_dir)

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
    path = save_augmentation_grid(
        chosen, args.output_dir / "augmentation_samples.png", args.img_size, seed=args.seed, pipeline=args.pipeline
    )
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
