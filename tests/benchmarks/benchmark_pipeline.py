"""Measure how fast each input pipeline feeds training, and what mixed precision gains.

On the same training images, it measures the images per second of:

- each input pipeline with the training augmentation: ImageDataGenerator in one thread,
  ImageDataGenerator with a worker per core, and tf.data;
- the decode-only limit: tf.data decoding and resizing, with no augmentation;
- training one model (VGG16 by default, at 224 px) fed by each pipeline, and fed from
  tensors already in memory, in float32 and in mixed precision.

Each measurement runs in a fresh process, so that each reports its own peak memory and
none warms the caches of the next; the input pipelines alone are timed three times each,
and the median counts. It takes about 10 minutes on a 2-core CPU. Pytest does
not collect it (its name does not start with test_); run it on demand:

    python tests/benchmarks/benchmark_pipeline.py                    # 2,000 generated 256x256 JPEGs
    python tests/benchmarks/benchmark_pipeline.py --data-dir datasets/real_vs_fake/real-vs-fake
    python tests/benchmarks/benchmark_pipeline.py --pipelines-only   # the input pipelines alone

Its last line is machine-readable:

    ratios: tfdata/idg=X tfdata/decode=Y fed/in-memory=Z bf16/fp32=W

What it measured
----------------
Before the augmentation was batched (each image warped alone by TensorFlow's
ImageProjectiveTransformV3), on the project's 2-core CPU (AMD EPYC with AVX-512 BF16, no GPU;
Python 3.11, TensorFlow 2.21), `python tests/benchmarks/benchmark_pipeline.py` gave, on
2026-11-26, with the pipelines feeding raw pixels and each model scaling them in its first
layer:

    | Measurement                                        | Images/s | Peak MiB |
    | ImageDataGenerator, 1 thread, augmented            |    180.4 |      730 |
    | ImageDataGenerator, a worker per core, augmented   |    298.2 |      827 |
    | tf.data, augmented                                 |    807.0 |      779 |
    | tf.data, decode and resize only                    |   2065.5 |      763 |
    | training fed by ImageDataGenerator workers         |      4.5 |     2552 |
    | training fed by tf.data                            |      4.7 |     2506 |
    | training from tensors in memory                    |      4.6 |     2273 |
    | training from tensors in memory, mixed precision   |      9.0 |     1705 |
    | training fed by tf.data, mixed precision           |      8.7 |     1749 |

    ratios: tfdata/idg=4.47 tfdata/decode=0.39 fed/in-memory=1.01 bf16/fp32=1.94

The three tf.data runs gave 790, 807 and 933 images/s. Before the scaling moved into the
model, the pipelines applied preprocess_input themselves, and VGG16's (which flips RGB to
BGR on tensors by stacking three slices) cost about a third of tf.data's rate: full runs
then gave 363 to 701 images/s for it (tfdata/idg 1.97 to 4.21). That rate also has two
modes on this virtual machine, about 700 or about 365 images/s in spells lasting minutes,
which is why each pipeline is timed three times. The other rows hardly change between runs.

So tf.data prepares augmented images about 4.5 times as fast as the original
single-threaded ImageDataGenerator. On a CPU the model is so slow that either pipeline
keeps up (training fed by tf.data runs at the rate from tensors in memory), and bfloat16
trains 1.9 times as fast as float32 on this processor: an epoch of the 100,000 training
images takes about 6 hours in float32 (100,000 / 4.6) and 3.2 in bfloat16 (100,000 / 9.0),
plus the 20,000 validation images.

Do the two pipelines train equally well? Before this change, with the same seed, VGG16
from random weights reached, on the 1,000-image faces-140k-sample at 64 px for 5 epochs,
AUC 0.60 and 0.64 (idg, seeds 1 and 2) against 0.54 and 0.58 (tfdata), all at accuracy
0.50, about 1.5 standard errors apart; and on --demo, accuracy 0.85, 0.75 and 0.70 (idg,
whose worker threads draw NumPy's augmentations in no fixed order) against 0.77 twice
(tfdata, which draws them from per-image seeds).

Since then the idg flows read their files through data_augmentation.ImageFlow instead of
Keras's flow_from_dataframe (which reads 16-bit greyscale images as white), with the same
ImageDataGenerator augmentation. Timed alone in one thread on 640 generated 256x256 JPEGs
at 224 px, three times each, on the same machine: ImageFlow 139, 199 and 212 images/s,
Keras's flow 164, 165 and 178; the same work, so the figures above stand.

After: tf.data resizes each image as the flows do, then warps whole batches with OpenCV,
the matrices drawn for a batch at once (data_augmentation.augmented_images). On the same kind
of machine, on 2026-12-07, while other work ran (load average 3 to 9), the wall-clock rates
swing by two, as above, so the pipelines were also compared by the CPU time they spend per
image, which the load hardly moves:

- in one process (a script timing the same three pipelines in turn on the same 2,000
  generated 256x256 JPEGs at 224 px, four rounds, load 4.0 to 4.6): decode-only 0.64 to 0.78
  CPU ms per image, augmented 1.00 to 1.11 (so, on cores of its own, 0.62 to 0.78 of
  decode-only's rate), the per-image warp before 1.46 to 1.48 (0.43 to 0.53); the
  wall-clock ratios of those rounds
  were 1.04, 1.08, 0.51 and 0.75 after, 0.47, 0.55, 0.87 and 0.31 before;
- with this script's own child processes (--measure), decode-only, then tf.data augmented,
  then the commit before's tf.data, five rounds back to back (load 3.4 to 9.0):
  tfdata/decode 0.56, 0.48, 1.00, 0.57 and 0.57 after; 0.24, 0.93, 0.48, 0.44 and 0.46 before;
- the whole benchmark, once (load 5.7 to 8.5 where sampled): tf.data augmented 885, 891
  and 983 images/s, decode-only 758, 796 and 1,278, so tfdata/decode=1.12, peak 1,133 MiB
  against 1,021; its training rows ran partly beside the test suite, and are not comparable.

On one core, in one process (load 3.2), OpenCV warped a batch of 224 px images in 0.22 ms
per image, TensorFlow's op in 1.30 to 1.34 ms. So the augmentation now adds 0.3 to 0.4 ms of
CPU time per image, about half the decoding's, where it added 0.7 to 0.9 ms. 
Then on a quiet machine (load 1.2 to 1.8, nothing else running), `--pipelines-only`, on
2026-12-07, the commit before this change and this change, back to back:

    | Measurement                                        | before (runs)          | after (runs)           |
    | ImageDataGenerator, 1 thread, augmented            | 289.3 (289, 289, 290)  | 287.4 (285, 287, 293)  |
    | ImageDataGenerator, a worker per core, augmented   | 422.3 (407, 422, 426)  | 414.4 (410, 414, 440)  |
    | tf.data, augmented                                 | 1376.7 (742-1390)      | 1874.5 (1635-1969)     |
    | tf.data, decode and resize only                    | 3086.5 (3049-3192)     | 3123.4 (3040-3167)     |

    ratios before: tfdata/idg=4.76 tfdata/decode=0.45
    ratios after:  tfdata/idg=6.52 tfdata/decode=0.60

(A first run after gave decode-only 1449, 1524 and 3251 images/s, the slow mode twice, and
tfdata/decode=1.20.) The 2026-11-26 table was measured on a machine then about twice as
slow (idg 180 against 289 images/s now); its training rows were not measured again.

On a GPU the model trains thousands of images per second and the input pipeline sets the
epoch time: 100,000 / min(pipeline rate, training rate) seconds. To get the figures there,
run the benchmark on the real images with --data-dir (its mixed precision is then
float16; --batch-size and --train-steps set the batch and how many steps are timed).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.keras.preprocessing.image import ImageDataGenerator  # noqa: E402

from data_augmentation import (  # noqa: E402
    TRAINING_AUGMENTATION,
    image_dataset,
    image_flow,
    resized_image,
    usable_cores,
)
from data_preprocessing import find_split_root, load_dataset, load_recipes, make_demo_dataset  # noqa: E402
from load_pre_trained_models import base_of, build_model, compile_model, precision_policy  # noqa: E402

# What each measurement is, as the table shows it.
MEASUREMENTS = {
    "idg": "ImageDataGenerator, 1 thread, augmented",
    "idg-workers": "ImageDataGenerator, a worker per core, augmented",
    "tfdata": "tf.data, augmented",
    "decode": "tf.data, decode and resize only",
    "train-idg": "training fed by ImageDataGenerator workers",
    "train-tfdata": "training fed by tf.data",
    "train-in-memory": "training from tensors in memory",
    "train-in-memory-mixed": "training from tensors in memory, mixed precision",
    "train-tfdata-mixed": "training fed by tf.data, mixed precision",
}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="a split root or Kaggle download; its train split is used")
    parser.add_argument("--images", type=int, default=2000, help="training images to use (default 2000)")
    parser.add_argument("--img-size", type=int, default=224, help="model input side in pixels (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--train-steps", type=int, default=6, help="timed training steps per measurement (default 6)")
    parser.add_argument("--model", default="VGG16", help="VGG16, VGG19, InceptionV3 or ResNet50 (default VGG16)")
    parser.add_argument(
        "--flops", action="store_true",
        help="print each model's multiply-adds per image, forward and in training, and the README's GPU estimates",
    )
    parser.add_argument("--pipelines-only", action="store_true",
                        help="time the input pipelines alone (about 2 minutes), not the training")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # Set for the child processes.
    parser.add_argument("--image-list", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# The images
# ---------------------------------------------------------------------------


def generated_images(folder, count):
    """Write `count` synthetic 256x256 JPEG faces, half real, half fake; return (path, class) pairs."""
    split_root = make_demo_dataset(folder, {"train": count // 2}, size=256)
    return sorted((path, path.parent.name) for path in split_root.glob("train/*/*.jpg"))


def training_images(data_dir, count, cache_dir):
    """Up to `count` checked training images of data_dir, as (path, class) pairs."""
    dataset = load_dataset(find_split_root(data_dir), cache_dir, subset=count // 2)
    return dataset.images["train"]


# ---------------------------------------------------------------------------
# One measurement, in a child process
# ---------------------------------------------------------------------------


# Batches drawn before the clock starts: more than the 10 that a pipeline may have made
# ahead while it started, so that every timed batch is made while it is timed.
PIPELINE_WARM_UP_BATCHES = 12
# Training steps before the clock starts: the first ones include tracing.
TRAINING_WARM_UP_STEPS = 2


def images_per_second(batches):
    """Draw every batch, and time those after the warm-up."""
    started, timed_images = None, 0
    for index, (images, _) in enumerate(batches):
        if index == PIPELINE_WARM_UP_BATCHES:
            started = time.perf_counter()
        if index >= PIPELINE_WARM_UP_BATCHES:
            timed_images += len(images)
    return timed_images / (time.perf_counter() - started)


def input_pipeline(kind, images, args):
    """The augmented training input of `kind`, as make_flows builds it: raw pixels, which the model scales."""
    if kind == "tfdata":
        return image_dataset(images, args.img_size, args.batch_size, True, True, seed=0)
    generator = ImageDataGenerator(**TRAINING_AUGMENTATION)
    flow = image_flow(images, generator, args.img_size, args.batch_size, shuffle=True, seed=0)
    flow.workers = usable_cores() if kind == "idg-workers" else 1
    return flow


def decode_only(images, args):
    """The decode-only limit: tf.data reading, decoding and resizing, in parallel."""
    paths = tf.data.Dataset.from_tensor_slices([str(path) for path, _ in images])
    decoded = paths.map(lambda path: resized_image(path, args.img_size), num_parallel_calls=tf.data.AUTOTUNE)
    return decoded.batch(args.batch_size).map(lambda batch: (batch, 0)).prefetch(tf.data.AUTOTUNE)


def pipeline_rate(kind, images, args):
    """Images per second that a pipeline delivers, with nothing consuming them."""
    if kind == "decode":
        return images_per_second(decode_only(images, args))
    pipeline = input_pipeline(kind, images, args)
    if kind == "idg":
        return images_per_second(pipeline[index] for index in range(len(pipeline)))
    if kind == "tfdata":
        return images_per_second(pipeline)
    # With workers, the flow is only drawn in parallel inside fit: time a model that costs nothing.
    return training_rate(pipeline_consumer(args), pipeline, args, PIPELINE_WARM_UP_BATCHES, len(pipeline))


def pipeline_consumer(args):
    """A model that costs nothing to train, so that fitting it times only its input."""
    inputs = keras.Input((args.img_size, args.img_size, 3))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    return model


class StepTimer(keras.callbacks.Callback):
    """Times the training steps that follow the warm-up steps."""

    def __init__(self, warm_up_steps):
        super().__init__()
        self.warm_up_steps = warm_up_steps

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.warm_up_steps - 1:
            self.started = time.perf_counter()
        self.finished = time.perf_counter()


def training_rate(model, inputs, args, warm_up_steps, total_steps):
    """Images per second that model.fit trains on, after the warm-up steps."""
    timer = StepTimer(warm_up_steps)
    model.fit(inputs, epochs=1, steps_per_epoch=total_steps, callbacks=[timer], verbose=0, shuffle=False)
    return (total_steps - warm_up_steps) * args.batch_size / (timer.finished - timer.started)


def in_memory_batches(images, args):
    """One batch held as tensors, repeated: training with no input cost at all."""
    batch_images, batch_labels = next(iter(input_pipeline("tfdata", images, args)))
    batch = (tf.constant(np.asarray(batch_images)), tf.constant(np.asarray(batch_labels)))
    return tf.data.Dataset.from_tensors(batch).repeat()


def model_training_rate(measurement, images, recipe, args):
    """Training images per second of the recipe's model, as the scripts build and compile it."""
    keras.mixed_precision.set_global_policy(precision_policy(measurement.endswith("-mixed")))
    # Random initial weights train exactly as fast as ImageNet's, and need no download.
    model = compile_model(build_model(recipe, "none", args.img_size), learning_rate=1e-4)
    feed = measurement.removeprefix("train-").removesuffix("-mixed")
    if feed == "in-memory":
        inputs = in_memory_batches(images, args)
    else:
        inputs = input_pipeline("idg-workers" if feed == "idg" else "tfdata", images, args)
        if feed == "tfdata":
            inputs = inputs.repeat()
    warm_up = TRAINING_WARM_UP_STEPS
    return training_rate(model, inputs, args, warm_up, warm_up + args.train_steps)


def measure(args):
    """Run one measurement and print its result as a JSON line."""
    recipe = {recipe.title: recipe for recipe in load_recipes()}[args.model]
    images = [(Path(path), name) for path, name in json.loads(args.image_list.read_text())]
    if args.measure.startswith("train-"):
        rate = model_training_rate(args.measure, images, recipe, args)
    else:
        rate = pipeline_rate(args.measure, images, args)
    peak_memory_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux gives KiB.
    print(json.dumps({"images_per_second": rate, "peak_memory_mib": peak_memory_mib}))


# ---------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------


def run_child(measurement, image_list, argv):
    """Measure in a fresh Python process; return its result."""
    command = [sys.executable, __file__, *argv, "--measure", measurement, "--image-list", str(image_list)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"{measurement} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


# The pipelines alone take seconds: each is timed this many times, and the median counts.
# On a shared or virtual machine a single run can come out far slower than the others.
PIPELINE_RUNS = 3


def median_of_runs(measurement, image_list, argv):
    """The run with the median rate (and the highest peak memory) of a measurement's runs."""
    runs = 1 if measurement.startswith("train-") else PIPELINE_RUNS
    results = [run_child(measurement, image_list, argv) for _ in range(runs)]
    results.sort(key=lambda result: result["images_per_second"])
    if runs > 1:
        rates = ", ".join(f"{result['images_per_second']:.0f}" for result in results)
        print(f"    runs: {rates} images/s")
    median = dict(results[len(results) // 2])
    median["peak_memory_mib"] = max(result["peak_memory_mib"] for result in results)
    return median


def machine_description():
    """The cores, processor, GPUs and versions that the figures were measured with."""
    gpus = tf.config.list_physical_devices("GPU")
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.exists() else []
    processor = names[0] if names else platform.processor() or "unknown CPU"
    return (
        f"{os.cpu_count()} CPU cores ({processor}), {len(gpus)} GPU(s), "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}"
    )


# ---------------------------------------------------------------------------
# What training costs on a GPU, estimated from the models' arithmetic (--flops)
# ---------------------------------------------------------------------------

# Peak float16 throughput in TFLOP/s, as NVIDIA states it: the T4's tensor cores, the P100's FP16.
GPU_PEAK_TFLOPS = {"T4": 65.0, "P100": 18.7}
# The share of the peak that CNN training reaches in practice: an assumption, not a measurement.
ASSUMED_UTILIZATION = 0.3
# The Kaggle dataset's training and validation images per epoch.
TRAIN_IMAGES, VALID_IMAGES = 100_000, 20_000
# Images per second that the augmented tf.data pipeline gave on the 2-core CPU of the
# figures above (quiet, 2026-12-07): the GPU cannot train faster than this, unless the
# notebook has more cores.
INPUT_IMAGES_PER_SECOND = 1875


def multiply_adds(model):
    """(forward, backward) multiply-adds per image in a detector's Conv2D and Dense layers.

    The backward pass runs only from the top down to the first trainable layer, and costs
    about twice the forward pass of the layers it runs through (the gradients of their
    inputs and of their weights).
    """
    layers = [layer for layer in [*base_of(model).layers, *model.layers] if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    costs = []
    for layer in layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kernel_height, kernel_width = layer.kernel_size
            costs.append(height * width * kernel_height * kernel_width * layer.input.shape[-1] * channels_out)
        else:
            costs.append(layer.input.shape[-1] * layer.units)
    first_trained = next(position for position, layer in enumerate(layers) if layer.trainable)
    return sum(costs), 2 * sum(costs[first_trained:])


def print_gpu_estimates(img_size):
    """Each model's arithmetic per image, and the estimated minutes per epoch on Kaggle's GPUs."""
    for recipe in load_recipes():
        forward, backward = multiply_adds(build_model(recipe, weights="none", img_size=img_size))
        train_flops, valid_flops = 2 * (forward + backward), 2 * forward  # A multiply-add is 2 FLOPs.
        print(f"{recipe.title}: {train_flops / 1e9:.1f} GFLOPs per training image, {valid_flops / 1e9:.1f} per validation image")
        for gpu, peak in GPU_PEAK_TFLOPS.items():
            computing = (TRAIN_IMAGES * train_flops + VALID_IMAGES * valid_flops) / (peak * 1e12 * ASSUMED_UTILIZATION)
            reading = (TRAIN_IMAGES + VALID_IMAGES) / INPUT_IMAGES_PER_SECOND
            print(f"  {gpu}: about {max(computing, reading) / 60:.1f} min per epoch: {computing / 60:.1f} min of "
                  f"arithmetic at {ASSUMED_UTILIZATION:.0%} of {peak} TFLOP/s, {reading / 60:.1f} min of input")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    if args.measure:
        return measure(args)
    if args.flops:
        print_gpu_estimates(args.img_size)
        return 0

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if args.data_dir:
            images = training_images(args.data_dir, args.images, folder / "cache")
        else:
            print(f"Writing {args.images} synthetic 256x256 JPEGs ...", flush=True)
            images = generated_images(folder / "images", args.images)
            # Write the new files to disk now, so that the system does not do it mid-measurement.
            if hasattr(os, "sync"):
                os.sync()
        needed = args.batch_size * (PIPELINE_WARM_UP_BATCHES + max(4, args.train_steps))
        if len(images) < needed:
            sys.exit(f"error: {len(images)} images are too few to time; use --images {needed} or more")
        image_list = folder / "images.json"
        image_list.write_text(json.dumps([(str(path), name) for path, name in images]))
        print(f"{len(images)} images, batch {args.batch_size}, {args.img_size} px, {args.model}; {machine_description()}")

        results = {}
        measurements = {name: text for name, text in MEASUREMENTS.items() if not (args.pipelines_only and name.startswith("train-"))}
        for measurement, description in measurements.items():
            results[measurement] = median_of_runs(measurement, image_list, argv)
            print(f"  {description}: {results[measurement]['images_per_second']:.1f} images/s", flush=True)

    rate = {name: result["images_per_second"] for name, result in results.items()}
    print(f"\nMixed precision here is {precision_policy(True)}.\n")
    print("| Measurement | Images/s | Peak memory (MiB) |")
    print("|---|---:|---:|")
    for measurement, description in measurements.items():
        print(f"| {description} | {rate[measurement]:.1f} | {results[measurement]['peak_memory_mib']:.0f} |")
    ratios = f"tfdata/idg={rate['tfdata'] / rate['idg']:.2f} tfdata/decode={rate['tfdata'] / rate['decode']:.2f}"
    if not args.pipelines_only:
        ratios += (f" fed/in-memory={rate['train-tfdata'] / rate['train-in-memory']:.2f}"
                   f" bf16/fp32={rate['train-in-memory-mixed'] / rate['train-in-memory']:.2f}")
    print(f"\nratios: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
