"""Fine-tune an ImageNet CNN to tell real faces from StyleGAN fakes: the lesson, applying a model, and the harness.

`fine_tune`, first below, tells the lesson in the steps of the Keras guide to transfer
learning and fine-tuning (https://keras.io/guides/transfer_learning/):

1. load the pre-trained base;
2. freeze all but its last N conv layers, with batch normalization kept frozen;
3. add the head: a layer that scales raw pixels in front, a real/fake classifier on top;
4. compile;
5. fit;
6. evaluate the best model on the test split and write the outputs.

With --warmup-epochs K, the head first trains alone for K epochs, as the guide teaches.
In order, this module then holds:

- the functions of the steps, in the order the lesson calls them, and what a detector is
  made of;
- `run`, what a per-model script runs once its options are read: train, or apply a model.
  The parsed options stop there: below it, functions take named values and settings;
- applying a trained model: loading it (or the ensemble) and Grad-CAM; the `Detector`,
  which finds, cuts out and scores the faces of photos and videos, from Python as from
  --predict; --predict, which prints and writes the detector's results; --predict
  --cluster, the same on the actors of a Ray cluster; --serve, which shows them on a
  local page; and --evaluate;
- --export: the model as ONNX, SavedModel and LiteRT files, each checked in its own runtime
  against Keras, and the OnnxModel that --predict judges with;
- the harness that runs the lesson safely: seeds, mixed precision, distribution, resuming
  an interrupted run, and Ctrl-C, with the callbacks that lose nothing;
- the command below.

Each per-model script (VGG16_finetuning.py and the three others) describes its base in a
ModelRecipe, reads its options with data_preprocessing.parse_arguments, then calls `run`.
Run this file on its own to see, for each model, which layers each freezing rule trains;
it builds the models without downloading any weights:

    python load_pre_trained_models.py

From Python, a trained detector judges photos and videos:

    from load_pre_trained_models import Detector
    detector = Detector.load("outputs/vgg16")     # a model's folder, a .keras file, or "ensemble"
    photo = detector.judge("photo.jpg")           # a path, an RGB numpy array or a PIL image
"""

import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import importlib
import itertools
import json
import math
import os
import queue
import shlex
import shutil
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections import Counter
from copy import copy as shallow_copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, special

from data_preprocessing import quiet_tensorflow_start

# Run on its own, this file loads TensorFlow itself: as quietly as the scripts do.
with quiet_tensorflow_start():
    import keras
    import tensorflow as tf

from data_augmentation import (
    FaceFinder,
    MIRRORED_SHARE_AT_MOST,
    UnreadableVideo,
    evaluation_flow,
    main_face,
    make_flows,
    model_input,
    perturb,
    read_upright,
    read_video_frames,
    rgb_pixels,
    smallest_searched_face,
)
from data_preprocessing import (
    CLASSES,
    DEFAULT_FRAMES,
    DEFAULT_MIN_FACE,
    DEMO_OUTPUT_DIR,
    ENSEMBLE,
    GRADCAM_NEEDS_KERAS,
    MODEL_SCRIPTS,
    OUTPUT_DIR,
    SMALLEST_FINDABLE_FACE,
    OneLineArgumentParser,
    ProgressBar,
    TrainingSettings,
    UserError,
    connect_to_ray,
    demo_image,
    ensure_demo_dataset,
    ensure_writable_folder,
    exits_on_user_error,
    files_for_cluster,
    is_folder_name,
    is_video,
    load_dataset,
    load_evaluation_images,
    load_recipes,
    media_to_predict,
    one_run_at_a_time,
    photo_problem,
    printable,
    recipe_named,
    report_bad_files,
    skipping_warning,
    uri_of,
    warn_skipping,
    write_json_atomically,
    write_text_atomically,
    writing,
)
from plot_loss_accuracy_graph import (
    CSV_COLUMNS,
    EVALUATION_PREFIX,
    FACE_AT_BORDER,
    FACE_TOO_SMALL,
    FRAME_NOT_DECODED,
    MODEL_CARD,
    NO_FACE,
    RUN_OUTPUTS,
    UNKNOWN_MARK,
    UNREADABLE,
    ClusterCsv,
    FaceResult,
    PageSettings,
    PictureResult,
    PredictionReport,
    ReportSettings,
    VideoResult,
    Verdicts,
    ensemble_band,
    classification_metrics,
    count_line,
    counted,
    read_card,
    read_ensemble,
    read_history,
    read_model_card,
    serve_page,
    video_line,
    whose_verdicts,
    write_card_section,
    write_results_table,
    write_run_outputs,
    write_test_outputs,
)


# The name of the model's first layer, which scales raw pixels as the base expects.
PIXEL_SCALING = "pixel_scaling"
# The names of the head's last layers: the fake score before the sigmoid, and its scaling by 1 / T.
FAKE_LOGIT = "fake_logit"
TEMPERATURE_SCALING = "temperature_scaling"


# ---------------------------------------------------------------------------
# The lesson: fine-tuning in six steps
# ---------------------------------------------------------------------------


def fine_tune(recipe, data, run_dir, training):
    """Fine-tune `recipe`'s pre-trained base to tell real faces from fakes, then test it.

    The script's main has checked the options, and the harness (`run`, below) has seeded
    the random generators, set the precision policy and the distribution strategy, checked
    the images, and prepared run_dir, which may hold an interrupted run to resume.

    Args:
        recipe: a per-model script's ModelRecipe: which base, and how many conv layers to train.
        data: the checked images and their train, valid and test inputs (load_images).
        run_dir: the folder for this model's outputs, OUTPUT_DIR/<model>/.
        training: how to train (data_preprocessing.TrainingSettings): the base's weights and
            image size, the epochs, the learning rates, the freezing rule, and the rest.

    Returns:
        The test metrics, as written to run_dir/metrics.json.
    """
    # 1. Load the pre-trained base: convolutional features learned on ImageNet, without its classifier.
    base = load_base(recipe, training.weights, training.img_size)
    # 2. Freeze it but for its last conv layers: the early, generic features stay as ImageNet made them.
    freeze_all_but_last_conv_layers(base, recipe, training.unfreeze_rule)
    # 3. Add the head: pixel scaling in front of the base, and a real/fake classifier on top.
    model = add_classification_head(base, recipe, training.preprocessing)
    # (On a resume both fits run again, and each skips the epochs that its backup holds.)
    if training.warmup_epochs:
        # Optionally, train the new head alone first, with the whole base frozen: its random
        # weights would otherwise send large gradients into the pre-trained features.
        base.trainable = False
        compile_model(model, training.learning_rate)
        model.fit(data.train, validation_data=data.valid, epochs=training.warmup_epochs,
                  callbacks=training_callbacks(run_dir, training, phase="warmup"))
        # Then back to step 2: the last conv layers train again, now beside a trained head.
        freeze_all_but_last_conv_layers(base, recipe, training.unfreeze_rule)
    # 4. Compile: a change of the trainable layers takes effect only when the model is compiled.
    compile_model(model, training.fine_tune_learning_rate)
    # 5. Fit, counting epochs on from the warmup's: ModelCheckpoint keeps the model of the epoch
    # with the lowest validation loss.
    model.fit(data.train, validation_data=data.valid, initial_epoch=training.warmup_epochs, epochs=training.epochs,
              callbacks=training_callbacks(run_dir, training, phase="fine-tune"))
    # 6. Evaluate that best model on the test split, and write every output.
    return evaluate_best_model(recipe, data, run_dir, training, last_model=model)


# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------


def application_module(recipe):
    """The keras.applications module of the recipe's base: its constructor and its preprocess_input."""
    return importlib.import_module(f"keras.applications.{recipe.keras_module}")


def keras_cache_dir():
    """Where Keras keeps downloaded weights."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def load_base(recipe, weights="imagenet", img_size=224):
    """Load the pre-trained convolutional base, without ImageNet's classifier on top.

    Args:
        recipe: the ModelRecipe that names the base.
        weights: "imagenet" (downloaded once, then cached by Keras), "none" (random initial
            weights, for tests and offline demos), or the path of a weights file.
        img_size: the side of the square RGB images, in pixels.

    Returns:
        The base: a keras.Model from scaled images to its last convolutional feature map.
    """
    constructor = getattr(application_module(recipe), recipe.constructor)
    input_shape = (img_size, img_size, 3)
    if weights == "none":
        return constructor(include_top=False, weights=None, input_shape=input_shape)
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as error:  # Keras raises a bare Exception when the download fails.
            raise UserError(
                f"could not get the ImageNet weights {recipe.imagenet_weights_file} ({error}); "
                f"Keras caches them in {keras_cache_dir()}: copy the file there, or pass "
                "--weights PATH to use a local copy, or --weights none to start from random weights"
            ) from None
    base = constructor(include_top=False, weights=None, input_shape=input_shape)
    try:
        base.load_weights(str(weights))
    except Exception as error:  # h5py and Keras raise several kinds for a wrong file.
        raise UserError(
            f"could not load {weights} into {recipe.title} ({error}); use the include_top=False "
            f"weights of {recipe.title}, such as {recipe.imagenet_weights_file}"
        ) from None
    return base


def freeze_all_but_last_conv_layers(base, recipe, unfreeze_rule="conv"):
    """Freeze the base except its last conv layers.

    Under "conv", the documented rule, the last N Conv2D layers train, N being
    recipe.trainable_conv_layers. Batch normalization layers stay frozen, and a frozen
    BatchNormalization layer also runs in inference mode in Keras: it keeps ImageNet's
    statistics instead of learning them anew from small batches. "layers" reproduces the
    original code, which trained the last K Keras layers whatever they were: for
    InceptionV3 these hold no weights at all, and for ResNet50 they include batch
    normalization.

    Args:
        base: the pre-trained base, from load_base.
        recipe: the ModelRecipe, with N and K.
        unfreeze_rule: "conv" or "layers".

    Returns:
        The layers left trainable.
    """
    if unfreeze_rule == "conv":
        conv_layers = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
        trainable = conv_layers[-recipe.trainable_conv_layers :]
    else:
        trainable = base.layers[-recipe.original_trainable_layers :]
    # Setting trainable on a model sets it on all of its layers, so the base itself is
    # switched back on (after a warmup) before each of its layers is set.
    base.trainable = True
    for layer in base.layers:
        layer.trainable = any(layer is chosen for chosen in trainable)
    return trainable


def add_classification_head(base, recipe, preprocessing="native"):
    """Put the pixel scaling in front of the base and the real/fake classifier on top.

    Args:
        base: the pre-trained base, from load_base, frozen as it should train.
        recipe: the ModelRecipe; it names the model and, for "native", the base's preprocess_input.
        preprocessing: "native", the base's own pixel scaling, or "rescale", the original's 1/255.

    Returns:
        The detector: a keras.Model from raw RGB pixels (0 to 255) to p(fake), the
        probability that the face is fake.
    """
    img_size = base.input_shape[1]
    pixels = keras.Input((img_size, img_size, 3), name="rgb_pixels")
    scaled = pixel_scaling_layer(recipe, preprocessing)(pixels)
    # Frozen layers run in inference mode by themselves; the "layers" rule, as the original
    # did, lets ResNet50's last batch normalization layers train, so no training=False here.
    features = base(scaled)
    features = keras.layers.GlobalAveragePooling2D(name="average_pool")(features)
    features = keras.layers.Dense(1024, activation="relu", name="dense_1024")(features)
    features = keras.layers.Dropout(0.5, name="dropout")(features)
    # float32 keeps the score exact even when the rest runs in mixed precision.
    logit = keras.layers.Dense(1, dtype="float32", name=FAKE_LOGIT)(features)
    # Temperature scaling (see calibrate): a frozen 1 / T, fitted after training; 1 until then.
    logit = keras.layers.Dense(
        1, use_bias=False, kernel_initializer="ones", trainable=False, dtype="float32", name=TEMPERATURE_SCALING
    )(logit)
    p_fake = keras.layers.Activation("sigmoid", dtype="float32", name="p_fake")(logit)
    return keras.Model(pixels, p_fake, name=f"{recipe.name}_deepfake_detector")


def pixel_scaling_layer(recipe, preprocessing="native"):
    """The model's first layer: it scales raw RGB pixels (0 to 255) as the base's weights expect.

    Inside the model, the scaling is saved with it: whoever loads model.keras feeds it
    plain pixels and cannot get the preprocessing wrong, and on a GPU it runs there.
    "rescale" is the original's 1/255, a Rescaling layer as in the Keras examples. Each
    base's own preprocess_input ("native") is an affine map of each pixel's three colour
    values: VGG and ResNet50 reorder RGB to BGR and subtract ImageNet's mean colour, and
    InceptionV3 maps 0..255 to -1..1. A frozen Dense(3) layer, which acts on the last
    axis (the colours), computes such a map exactly; its weights are read off
    preprocess_input itself. Both layers compute in float32, even in mixed precision.

    Args:
        recipe: the ModelRecipe whose preprocess_input to follow.
        preprocessing: "native" or "rescale".

    Returns:
        A Keras layer from raw pixels to scaled pixels, named "pixel_scaling".
    """
    if preprocessing == "rescale":
        return keras.layers.Rescaling(1 / 255, dtype="float32", name=PIXEL_SCALING)
    preprocess_input = application_module(recipe).preprocess_input
    # preprocess_input(x) = x @ kernel + bias: black gives the bias, each pure colour a row of the kernel.
    bias = preprocess_input(np.zeros((1, 3)))
    kernel = (preprocess_input(255 * np.eye(3)) - bias) / 255
    layer = keras.layers.Dense(3, trainable=False, dtype="float32", name=PIXEL_SCALING)
    layer.build((None, 3))
    layer.set_weights([kernel, bias[0]])
    return layer


def compile_model(model, learning_rate):
    """Compile the detector for binary classification.

    Args:
        model: the detector.
        learning_rate: Adam's learning rate; fine-tuning takes a small one, so that the
            pre-trained features change only a little.

    Returns:
        The model, compiled with Adam, binary cross-entropy and accuracy.
    """
    # Under mixed_float16, Keras scales the loss itself so that small gradients survive.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


@dataclass(frozen=True)
class TrainingData:
    """The checked images of a run, and the inputs model.fit reads them from: train and valid, and test for step 6."""

    dataset: object  # A data_preprocessing.Dataset.
    train: object
    valid: object
    test: object


def load_images(training):
    """The checked dataset of a run's TrainingSettings and its train, valid and test inputs (data_augmentation.make_flows)."""
    dataset = load_dataset(training.data_dir, training.output_dir / ".cache", training.subset, training.seed)
    report_bad_files(dataset.bad_files)
    if training.demo:
        print("Demo run on synthetic faces: its figures show that the pipeline works, they are not a benchmark.")
    flows = make_flows(dataset, training.img_size, training.batch_size, training.seed, training.pipeline)
    return TrainingData(dataset, flows["train"], flows["valid"], flows["test"])


def evaluate_best_model(recipe, data, run_dir, training, last_model=None):
    """Test the model that ModelCheckpoint kept, and write every output and the results table.

    Args:
        recipe, data, run_dir, training: as for fine_tune.
        last_model: the model as training left it, kept (with a warning) if model.keras is
            missing or damaged although some epoch had a finite val_loss.

    Returns:
        The test metrics, as written to run_dir/metrics.json.
    """
    best_model = load_best_model(run_dir, last_model)
    images = data.dataset.images
    valid_logits = predict_logits(best_model, data.valid)
    temperature = calibrate(best_model, valid_logits, images["valid"])
    calibration_skipped = too_few_to_calibrate(images["valid"])
    save_whole(best_model, run_dir / "model.keras")  # Calibrated, as it is shared.
    test_logits = predict_logits(best_model, data.test)
    test_predictions = predictions_table(images["test"], special.expit(test_logits / temperature))
    # The ensemble weighs each model by its validation AUC, and --predict's band comes from the
    # validation split too: the test split must not choose them.
    valid_predictions = predictions_table(images["valid"], special.expit(valid_logits / temperature))
    calibration = {"temperature": temperature, "test_p_fake_before": special.expit(test_logits), "skipped": calibration_skipped}
    metrics = write_run_outputs(run_dir, recipe, training, data.dataset, test_predictions, valid_predictions, calibration)
    write_results_table(training.output_dir)
    return metrics


def predict_logits(model, flow):
    """The fake score before temperature scaling and the sigmoid, for every image of an unshuffled flow."""
    logits_model = keras.Model(model.inputs, model.get_layer(FAKE_LOGIT).output)
    return logits_model.predict(flow, verbose=1).ravel().astype(float)


def calibrate(model, logits, images):
    """Fit one temperature on the validation split's logits and put it inside the model; return it.

    On a validation split too small to fit it on (too_few_to_calibrate), it stays 1.
    """
    labels = np.array([CLASSES.index(class_name) for _, class_name in images], float)
    temperature = 1.0 if too_few_to_calibrate(images) else fit_temperature(logits, labels)
    model.get_layer(TEMPERATURE_SCALING).set_weights([np.full((1, 1), 1 / temperature, np.float32)])
    return temperature


# Guo et al. fit the temperature on 5,000 validation images or more. On a handful, it follows
# chance: 4 images drove it to 0.12, or to its bound of 20, and made the test split's ECE worse.
# From 50 images, no one image weighs more than 2% of the fit, and 10 of each class keep either
# class from resting on two or three faces.
CALIBRATION_MIN_IMAGES = 50
CALIBRATION_MIN_PER_CLASS = 10


def too_few_to_calibrate(images):
    """Why the validation split's (path, class name) pairs are too few to fit a temperature on; None if they are enough."""
    counts = {class_name: sum(name == class_name for _, name in images) for class_name in CLASSES}
    if len(images) >= CALIBRATION_MIN_IMAGES and min(counts.values()) >= CALIBRATION_MIN_PER_CLASS:
        return None
    return (
        f"the validation split has {len(images)} images ({', '.join(f'{count} {name}' for name, count in counts.items())}), "
        f"fewer than the {CALIBRATION_MIN_IMAGES}, with {CALIBRATION_MIN_PER_CLASS} of each class, that a temperature is fitted on"
    )


def fit_temperature(logits, labels):
    """The temperature T that minimizes the cross-entropy of sigmoid(logit / T) on these images.

    Temperature scaling (Guo et al., 2017, On Calibration of Modern Neural Networks)
    divides the logit by T: an over-confident model gets T > 1, which pulls its p(fake)
    towards 0.5 without changing which side of 0.5 any face is on, so accuracy and AUC stay
    as they were.
    """

    def cross_entropy(log_temperature):
        scaled = logits / np.exp(log_temperature)
        return float(np.mean(np.logaddexp(0, scaled) - labels * scaled))

    # T between 1/20 and 20: beyond those the scores carry no ranking worth calibrating.
    fitted = optimize.minimize_scalar(cross_entropy, bounds=(-math.log(20), math.log(20)), method="bounded")
    return float(np.exp(fitted.x))


def load_best_model(run_dir, last_model=None):
    """The model with the lowest val_loss, as model.keras holds it."""
    model_file = run_dir / "model.keras"
    if not is_complete_model_file(model_file):
        if best_val_loss_so_far(run_dir) is None:
            epochs = len(read_history(run_dir / "history.csv"))
            raise TrainingDiverged(
                f"the validation loss was not a finite number in any of the {epochs} epochs, so there is "
                "no model to test; run again with a lower --learning-rate"
            )
        if last_model is None:
            raise UserError(f"{model_file} is missing; delete {run_dir / 'backup'} to train again")
        print("warning: model.keras is missing or damaged; it now holds the last epoch's model", file=sys.stderr)
        save_whole(last_model, model_file)
    # Only to predict: uncompiled, it comes without the optimizer's state.
    return keras.models.load_model(model_file, compile=False)


def save_whole(model, model_file):
    """Save a model to share into a temporary file, then rename it: a kill mid-save leaves the earlier file whole."""
    save_to_share(model, saving_file(model_file))
    os.replace(saving_file(model_file), model_file)


def save_to_share(model, path):
    """Save the model without its optimizer's state, which only training needs (and the backup keeps).

    A copy made from the model's configuration is not compiled, so it is saved without an
    optimizer: VGG16's file is then a third of the size.
    """
    copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    copy.save(path)


def saving_file(model_file):
    """Where a model is saved before it is renamed to model_file; it too ends in .keras, as Keras requires."""
    return model_file.with_name(f".saving-{model_file.name}")


def predict_split(model, flow, images):
    """p(fake) for every image of an unshuffled, labelled flow, which keeps the order of `images`."""
    return predictions_table(images, model.predict(flow, verbose=1).ravel().astype(float))


def predictions_table(images, p_fake):
    """predictions.csv's rows: each (path, class name) of `images` with its p(fake)."""
    return pd.DataFrame(
        {
            # Plain Python strings: a file name that is not UTF-8 holds surrogates, which the
            # Arrow strings that pandas 3 uses where pyarrow is installed (Ray brings it) refuse.
            "path": pd.Series([str(path) for path, _ in images], dtype=object),
            "label": [class_name for _, class_name in images],
            "p_fake": p_fake,
        }
    )


# ---------------------------------------------------------------------------
# What a detector is made of
# ---------------------------------------------------------------------------


def build_model(recipe, weights="imagenet", img_size=224, unfreeze_rule="conv", preprocessing="native"):
    """Steps 1 to 3 in one call, for the freezing report, the tests and the benchmark."""
    base = load_base(recipe, weights, img_size)
    freeze_all_but_last_conv_layers(base, recipe, unfreeze_rule)
    return add_classification_head(base, recipe, preprocessing)


def base_of(model):
    """The pre-trained base inside a detector: its one layer that is a model itself."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def trainable_conv_layer_names(model):
    return [
        layer.name for layer in base_of(model).layers if isinstance(layer, keras.layers.Conv2D) and layer.trainable
    ]


def count_trainable_parameters(model):
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


# ---------------------------------------------------------------------------
# What a per-model script runs
# ---------------------------------------------------------------------------


def run(recipe, args):
    """Run a per-model script with its checked options; return the process exit status.

    The parsed options stop here: each kind of run gets the plain values and settings it
    needs. With --predict or --evaluate, apply the saved model, and with --export write it
    for other runtimes; these train nothing. Otherwise
    prepare the run (its data, folder, seeds, precision and strategy), then tell the
    lesson, `fine_tune`, or finish an interrupted run's evaluation.
    """
    if args.predict:
        judging = JudgingOptions(
            faces=args.faces, min_face=args.min_face, threshold=args.threshold, gradcam=bool(args.gradcam), batch_size=args.batch_size
        )
        if args.cluster:
            return predict_on_cluster(
                recipe, args.predict, args.cluster, args.model, args.output_dir, args.demo, judging, args.frames, args.csv
            )
        outputs = ReportSettings(csv=args.csv, annotate=args.annotate, gradcam=args.gradcam, frames=args.frames)
        return predict_media(recipe, args.predict, args.model, args.output_dir, args.demo, judging, args.frames, outputs)
    if args.export:
        return export_model(recipe, saved_model_file(recipe, args.model, args.output_dir, args.demo), args.export)
    if args.serve:
        judging = JudgingOptions(faces=args.faces, min_face=args.min_face, threshold=args.threshold, batch_size=args.batch_size)
        page = PageSettings(host=args.host, port=args.port, frames=args.frames)
        return serve_detector(recipe, args.model, args.output_dir, args.demo, judging, page)
    if args.uses_demo_data:
        ensure_demo_dataset(args.data_dir)
    if args.evaluate:
        settings = EvaluationSettings(
            folder=args.evaluation_folder, data_dir=args.data_dir, output_dir=args.output_dir, model=args.model,
            demo=args.demo, subset=args.subset, seed=args.seed, batch_size=args.batch_size, faces=args.faces,
            min_face=args.min_face, threshold=args.threshold, jpeg_quality=args.jpeg_quality, blur=args.blur,
        )
        return evaluate_or_stop(recipe, settings)
    return train(recipe, TrainingSettings.from_options(args))


def evaluate_or_stop(recipe, settings):
    """--evaluate, which Ctrl-C ends with one line."""
    try:
        return evaluate_saved_model(recipe, settings)
    except KeyboardInterrupt:
        pass
    # The interrupted input pipeline is let go now: left to Python's exit, TensorFlow would warn that it could not be.
    gc.collect()
    print("\nInterrupted; run the same command again to evaluate afresh")
    return 130


def train(recipe, training):
    """Train and test `recipe`'s detector with its TrainingSettings, one run at a time in its folder, and say what it wrote."""
    if training.distribute == "multiworker":
        check_multiworker_cluster()
    # First, as MultiWorkerMirroredStrategy must be made before TensorFlow does any work.
    strategy = distribution_strategy(training.distribute)
    run_dir = ensure_writable_folder(training.output_dir / recipe.name)
    # A second run into the same folder would mix its epochs, history and model with this one's.
    with one_run_at_a_time(run_dir):
        metrics = train_and_test(recipe, training, run_dir, strategy)
    if metrics is None:  # Interrupted: the same command resumes it.
        return 130
    results = training.output_dir / "results.md"
    print(f"\nTest accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}")
    if metrics["learned_nothing"]:
        # Accuracy 0.5 and no error look like success: say plainly that the model is no use yet.
        print(f"This run learned nothing: {metrics['learned_nothing']}")
    print(f"Wrote {run_dir}/: {', '.join(RUN_OUTPUTS)}")
    print(f"Results so far ({results}):\n{results.read_text()}")
    if training.demo:
        print_next_demo_step(recipe, training.output_dir, run_dir)
    return 0


def print_next_demo_step(recipe, output_dir, run_dir):
    """After the demo, the command that applies its model to a face, with Grad-CAM."""
    face = pd.read_csv(run_dir / "predictions.csv").query("label == 'fake'")["path"].iloc[0]
    command = ["python", os.path.relpath(Path(__file__).with_name(MODEL_SCRIPTS[recipe.name])), "--demo"]
    if output_dir != DEMO_OUTPUT_DIR:
        command += ["--output-dir", str(output_dir)]
    # The demo's faces are drawn, and cropped as the dataset's: no face finder would find them.
    command += ["--predict", os.path.relpath(face), "--gradcam", str(output_dir / "gradcam"), "--faces", "off"]
    print(f"Next, score a demo face and see which regions drove the score (Grad-CAM):\n  {shlex.join(command)}")


# ---------------------------------------------------------------------------
# Applying a trained model: loading it, and Grad-CAM
# ---------------------------------------------------------------------------


def image_size(model):
    """The side of the square images a detector takes, as its input layer records it."""
    return model.input_shape[1]


# The name every detector of these scripts ends in: "vgg16_deepfake_detector", after its recipe's name.
DETECTOR_SUFFIX = "_deepfake_detector"


def load_saved_model(model_file, recipe=None):
    """Load a detector that one of the scripts saved (`recipe`'s, if given); refuse anything else with one line."""
    # Keras reads a .keras file's config whole: its declared sizes are checked before it may.
    problem = declared_size_problem(archive_contents(model_file)) if Path(model_file).suffix == ".keras" else None
    if problem:
        raise UserError(f"{model_file} cannot be a model that these scripts saved: {problem}; pass a .keras file that a run saved")
    if Path(model_file).suffix == ".keras" and not is_complete_model_file(model_file):
        raise UserError(
            f"{model_file} is not a complete .keras file (it was cut off, perhaps while it was copied or saved); "
            "copy it again, or train the model again"
        )
    try:
        # Only to predict: uncompiled, it comes without the optimizer's state.
        model = keras.models.load_model(model_file, compile=False)
    except Exception as error:  # Keras raises several kinds for a file that is not a model.
        raise UserError(f"could not load the model {model_file} ({error}); pass a .keras file that a run saved") from None
    check_detector_name(model, model_file, recipe)
    # A model saved before the scaling moved into the model expects scaled pixels; fed raw
    # ones, it would print wrong scores without a warning.
    if PIXEL_SCALING not in [layer.name for layer in model.layers]:
        title = recipe.title if recipe else "it"
        raise UserError(
            f"{model_file} was saved by an earlier version of these scripts, whose models took scaled pixels; "
            f"train {title} again to get a model that takes raw pixels"
        )
    return model


def check_detector_name(model, model_file, recipe=None):
    """Refuse a model that is not a detector of these scripts, or, given a recipe, not that script's."""
    if recipe is not None and model.name != f"{recipe.name}{DETECTOR_SUFFIX}":
        raise UserError(
            f"{model_file} holds the model {model.name!r}, not {recipe.title}'s; "
            "pass it to its own script, or a model that this script trained"
        )
    if recipe is None and not model.name.endswith(DETECTOR_SUFFIX):
        raise UserError(f"{model_file} holds the model {model.name!r}, not a detector that these scripts trained")


def title_of(model):
    """A detector's title, as its script's recipe gives it ("VGG16"), from the model's name."""
    name = model.name.removesuffix(DETECTOR_SUFFIX)
    return next((recipe.title for recipe in load_recipes() if recipe.name == name), name)


def saved_model_file(recipe, model, output_dir, demo=False):
    """--model FILE, --model FOLDER (its model.keras, beside its card), or the model that training wrote into OUTPUT_DIR/<model>/."""
    model_file = Path(model) if model else Path(output_dir) / recipe.name / "model.keras"
    if model_file.is_dir():
        model_file = model_file / "model.keras"
    if model_file.is_file():
        return model_file
    # Each message gives the whole path: a relative one depends on where the command was run from.
    if model:
        raise UserError(f"--model {model_file.absolute()} does not exist; check the path, or give the folder that holds model.keras")
    demo_model = DEMO_OUTPUT_DIR / recipe.name / "model.keras"
    if not demo and demo_model.is_file():
        raise UserError(
            f"there is no model at {model_file.absolute()}, but the demo's model is at {demo_model.absolute()}: "
            "add --demo to use it, or --output-dir to look elsewhere"
        )
    raise UserError(
        f"there is no model in {model_file.parent.absolute()} (looked for {model_file.name}); train {recipe.title} first "
        "(the same command without --predict, --evaluate or --serve), or give --output-dir the folder it was trained into, or --model FILE"
    )


@dataclass(frozen=True)
class Member:
    """A model a detector scores with, its weight in the average, and what its card says of it (WhoseVerdicts)."""

    title: str
    model: object  # A keras.Model, or an OnnxModel, from raw RGB pixels to p(fake).
    file: Path
    card: object
    weight: float = 1.0


def load_member(model_file, recipe=None, weight=1.0):
    """A Member from a model file (.keras, or a model.onnx that --export wrote) and the card beside it."""
    if Path(model_file).suffix == ".onnx":
        model = OnnxModel.load(model_file)
        check_detector_name(model, model_file, recipe)
    else:
        model = load_saved_model(model_file, recipe)
    title = recipe.title if recipe else title_of(model)
    return Member(title, model, Path(model_file), whose_verdicts(title, model_file), weight)


def load_ensemble(output_dir):
    """The Members of the results table's Ensemble row, each with its weight."""
    members, weights = read_ensemble(output_dir)
    if len(members) < 2:
        raise UserError(
            f"the ensemble needs two or more models trained into {Path(output_dir).absolute()} on the same test images; "
            "train another model with the same --data-dir, --subset and --output-dir, or give --output-dir the folder they were trained into"
        )
    loaded = []
    for metrics, weight in zip(members, weights):
        # A run folder is named after its model (recipe.name), unless it was renamed since.
        run_dir = Path(metrics["run_dir"])
        recipe = recipe_named(metrics.get("name", run_dir.name))
        loaded.append(load_member(run_dir / "model.keras", recipe, weight))
    return loaded


def p_fake_of_pictures(members, pictures):
    """The weighted p(fake) of uint8 RGB pictures of any size, each model reading them at its own size."""
    p_fake = np.zeros(len(pictures))
    for member in members:
        batch = np.stack([model_input(picture, image_size(member.model)) for picture in pictures])
        p_fake += member.weight * member.model.predict_on_batch(batch).ravel()
    return p_fake


# Grad-CAM lives here rather than with the figures in plot_loss_accuracy_graph.py because it
# runs the model and takes TensorFlow gradients; that module only draws its result.
def gradcam_layer(base):
    """The base's last conv feature map: what feeds the head's average pooling.

    For ResNet50 and InceptionV3 that is the base's output, the activation or
    concatenation after the last convolutions. VGG ends with a max pooling, which only
    halves the map, so Grad-CAM uses the conv layer before it, as in the Grad-CAM paper.
    """
    position = len(base.layers) - 1
    while isinstance(base.layers[position], (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        position -= 1
    return base.layers[position]


def grad_cam(model, batch, toward="fake"):
    """Grad-CAM heat maps (Selvaraju et al., 2017) of a batch of raw pixels, one per image, scaled to 0-1.

    Each channel of the last conv feature map is weighted by the mean gradient of the
    score `toward` a class with respect to it; the weighted sum, without its negative part,
    shows where the features that raised that score are. The score toward "fake" is the
    fake logit; toward "real", minus the logit, so that the map shows what lowered p(fake).
    `toward` is one class for the whole batch, or one per image. A map that is zero
    everywhere says that nothing in the image raised that score.
    """
    towards = [toward] * len(batch) if isinstance(toward, str) else list(toward)
    if set(towards) - {"fake", "real"} or len(towards) != len(batch):
        raise ValueError(f"toward={toward!r}: give 'fake' or 'real', or one of them per image")
    # +1 where the map explains "fake", -1 where it explains "real".
    signs = tf.constant([[1.0 if each == "fake" else -1.0] for each in towards])
    base = base_of(model)
    feature_map_and_output = keras.Model(base.inputs, [gradcam_layer(base).output, base.output])
    # A model saved before the head ended in a logit has its fake score in its output layer.
    output_layer = model.get_layer(FAKE_LOGIT if FAKE_LOGIT in [layer.name for layer in model.layers] else "p_fake")
    scaled = model.get_layer(PIXEL_SCALING)(tf.convert_to_tensor(batch, tf.float32))
    with tf.GradientTape() as tape:
        # Watching the input records every layer, the frozen ones too.
        tape.watch(scaled)
        features, base_output = feature_map_and_output(scaled, training=False)
        head_features = model.get_layer("dense_1024")(model.get_layer("average_pool")(base_output))
        # The score before the sigmoid, as in the paper: once p(fake) saturates at 0 or 1,
        # its own gradient vanishes and the map would go blank.
        fake_score = tf.matmul(tf.cast(head_features, "float32"), output_layer.kernel) + output_layer.bias
        explained_score = signs * fake_score
    gradients = tf.cast(tape.gradient(explained_score, features), "float32")
    features = tf.cast(features, "float32")
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    heatmaps = tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1)).numpy()
    peaks = heatmaps.max(axis=(1, 2), keepdims=True)
    return heatmaps / np.where(peaks > 0, peaks, 1)


# ---------------------------------------------------------------------------
# The detector: find the faces of photos and videos, cut them out, score them
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgingOptions:
    """How a Detector judges, with the command line's defaults (see --help).

    faces: "auto" finds each face and judges it; "off" scores whole pictures, for faces
        already cropped as the dataset crops them.
    min_face: a face narrower than this many pixels is listed as too small, not scored.
    threshold: None gives the band of the model's card (real, uncertain, fake); a value T,
        two-way verdicts at T.
    gradcam: also compute each score's Grad-CAM heat map: the evidence for its verdict
        (for "real" where it is real, for "fake" where it is fake or uncertain).
    batch_size: faces, or pictures, scored at once.
    """

    faces: str = "auto"
    min_face: int = DEFAULT_MIN_FACE
    threshold: float | None = None
    gradcam: bool = False
    batch_size: int = 32

    def __post_init__(self):
        mistakes = [
            (self.faces not in ("auto", "off"), f"faces={self.faces!r}: use 'auto' or 'off'"),
            (self.min_face < SMALLEST_FINDABLE_FACE, f"min_face={self.min_face}: the face finder finds no face narrower than {SMALLEST_FINDABLE_FACE} px"),
            (self.threshold is not None and not 0 <= self.threshold <= 1, f"threshold={self.threshold}: a p(fake) is between 0 and 1"),
            (self.batch_size < 1, f"batch_size={self.batch_size}: use 1 or more"),
        ]
        for is_wrong, message in mistakes:
            if is_wrong:
                raise UserError(message)


# A batch of photos holds at most about this many pixels, and a detector two batches at
# once (one scored while the next is read): 600 MB in RGB.
HELD_PIXELS = 100_000_000


class Detector:
    """A trained deepfake detector, loaded once, that judges photos and videos.

        detector = Detector.load("outputs/vgg16")     # a model's folder, a .keras file, or "ensemble"
        photo = detector.judge("photo.jpg")           # a path, an RGB numpy array or a PIL image
        clip = detector.judge_video("clip.mp4", frames=32)

    The models know faces framed as the dataset frames them, nothing else: each face is
    found with MTCNN, levelled, cut out as the dataset cuts its faces and scored. A picture
    without a face, a face too small to judge or cut by the border, and an unreadable input
    get no p_fake, only the note that says why. Results are PictureResult and VideoResult
    (plot_loss_accuracy_graph.py), which also carry the model's mark (a demo model, or one
    without a card) and the band their verdicts were given with. A detector prints nothing,
    writes nothing and keeps no global state: what a command line prints as a warning is in
    a result's `warnings`.
    """

    def __init__(self, members, judging=JudgingOptions()):
        if judging.gradcam and len(members) > 1:
            raise UserError("Grad-CAM explains one model, and the ensemble has several: load one model to draw it")
        if judging.gradcam and isinstance(members[0].model, OnnxModel):
            raise UserError(GRADCAM_NEEDS_KERAS)
        self.members, self.options = members, judging
        marks = [member.card.mark for member in members if member.card.mark]
        # One member without a card, or trained on the demo, is enough to mark the ensemble's verdicts.
        self.mark = UNKNOWN_MARK if UNKNOWN_MARK in marks else (marks[0] if marks else None)
        if judging.threshold is not None:
            self.band = Verdicts(judging.threshold, judging.threshold)
        elif len(members) == 1:
            self.band = members[0].card.band
        else:
            # Chosen as a single model's band is, on the members' weighted validation p(fake).
            self.band = ensemble_band([member.file.parent for member in members], [member.weight for member in members])
        self.finder = FaceFinder() if judging.faces == "auto" else None
        self.stopwatch = Stopwatch()
        self.name = model_name(members, self.mark)

    @classmethod
    def load(cls, model, *, output_dir=OUTPUT_DIR, recipe=None, **options):
        """Load a trained detector.

        Args:
            model: a model's folder (its model.keras beside its card, README.md), a .keras
                file, or "ensemble": every model trained into `output_dir`, weighted by its
                validation AUC (see plot_loss_accuracy_graph.ensemble_weights).
            output_dir: where "ensemble" finds its models.
            recipe: a script's ModelRecipe, to refuse a model of another script.
            **options: JudgingOptions: faces, min_face, threshold, gradcam, batch_size.

        Returns:
            A Detector.

        Raises:
            UserError: no model there, a file that is not a whole detector of these scripts,
                or an option out of range; its message says what to do.
        """
        judging = JudgingOptions(**options)
        if str(model) == ENSEMBLE:
            return cls(load_ensemble(Path(output_dir)), judging)
        model_file = Path(model) / "model.keras" if Path(model).is_dir() else Path(model)
        if not model_file.is_file():
            raise UserError(f"there is no model at {model_file.absolute()}; give a model's folder or its .keras file")
        return cls([load_member(model_file, recipe)], judging)

    def with_gradcam(self):
        """This detector, with its models and face finder, that also computes each score's Grad-CAM heat map."""
        if len(self.members) > 1:
            raise UserError("Grad-CAM explains one model, and the ensemble has several: load one model to draw it")
        explaining = shallow_copy(self)
        explaining.options = dataclasses.replace(self.options, gradcam=True)
        return explaining

    def header(self):
        """The lines that say how the verdicts are given, and whose they are (from each model's card)."""
        faces = "each face found" if self.finder else "each whole image"
        by = "the model" if len(self.members) == 1 else "the weighted ensemble of"
        lines = [member.card.line for member in self.members]
        if len(self.members) > 1:
            lines = [f"{line} (weight {member.weight:.2f})" for line, member in zip(lines, self.members)]
        return [f"p(fake) of {faces}; verdicts: {self.band}; by {by}:", *(f"  {line}" for line in lines)]

    def judge(self, image):
        """Judge one photo: a path, an RGB numpy array (height x width x 3, uint8, 0 to 255) or a PIL image.

        Returns a PictureResult: a FaceResult per face found, in reading order (or one for the
        whole picture with faces="off"), or the note that says why nothing was judged.
        """
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.exists():
                raise UserError(f"{printable(path)}: no such file or folder; check the path")
            if path.is_dir() or is_video(path):
                kind = "a folder" if path.is_dir() else "a video"
                raise UserError(f"{printable(path)} is {kind}; judge() takes one photo (judge_video() takes a video)")
            problem = photo_problem(path)
            return self.unreadable(path, problem) if problem else next(self.judge_photos([path]))
        picture = self.found(rgb_pixels(image), path=None)
        self.score(picture.faces)
        return picture

    def judge_photos(self, paths):
        """Yield a PictureResult for each photo file, in order, scoring the faces of several photos in one batch.

        While one batch is scored, the next is read and its faces found, in a thread of its own.
        """
        for batch in made_ahead(lambda stopped: self.photo_batches(list(paths), stopped)):
            self.score([face for picture in batch for face in picture.faces])
            yield from batch

    def photo_batches(self, paths, stopped):
        """Yield the photos in batches of PictureResults, their faces found together and cut out, not yet scored.

        Photos are held until their faces are scored, so a batch ends once it is full
        (is_full): a folder of phone photos would otherwise fill the memory. Once the event
        `stopped` is set, no further photo is read.
        """
        batch = []
        for position, path in enumerate(paths):
            if stopped.is_set():
                return
            batch.append(self.read(path))
            if is_full(batch, self.options.batch_size) or position == len(paths) - 1:
                yield self.with_faces(batch)
                batch = []

    def read(self, path):
        """A photo file's PictureResult, holding its pixels; an UNREADABLE one if it can no longer be read."""
        try:
            with self.stopwatch.timing("reading"):
                image = read_upright(path)
        except Exception as error:  # Moved, deleted or rewritten since it was listed: Pillow raises many kinds.
            return self.unreadable(path, f"it can no longer be read ({error})")
        return self.result(path, min_face=self.min_face(), image=image)

    def judge_video(self, path, frames=DEFAULT_FRAMES, on_batch=None):
        """Judge a video, or an animated GIF or WebP, on `frames` frames spread evenly over it.

        Returns a VideoResult: a PictureResult per sampled frame, and the video's p_fake and
        verdict. `on_batch`, if given, is called with each batch of frames (PictureResults)
        as soon as they are judged, with their pixels, crops and heat maps, which are let go
        after it: a command line reports them as it goes, and memory stays flat.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"{printable(path)}: no such file or folder; check the path")
        video = VideoResult(path, [], self.band, self.mark, self.name, min_face=self.min_face())
        try:
            self.judge_frames(video, read_video_frames(path, frames), on_batch or (lambda pictures: None))
        except UnreadableVideo as problem:
            video.note, video.reason = UNREADABLE, str(problem)
            return video
        if not video.frames_read:
            video.note, video.reason = UNREADABLE, "none of its frames could be decoded"
            return video
        if video.frames_read < video.frames_wanted:
            # OpenCV estimates some containers' frame counts (mkv, webm) from their duration.
            video.warnings.append(f"only {video.frames_read} of {video.frames_wanted} sampled frames could be decoded; "
                                  "the file may be cut off, or its frame count an estimate")
        self.sum_up(video)
        return video

    def judge_frames(self, video, reading, on_batch):
        """Judge the frames that `reading` yields, a batch at a time, into `video`.

        While one batch is scored, the next is read and its faces found, in a thread of its own.
        """
        for batch in made_ahead(lambda stopped: self.frame_batches(video, reading, stopped)):
            video.frames += self.scored_and_let_go(batch, on_batch)

    def frame_batches(self, video, reading, stopped):
        """Yield the frames that `reading` yields in batches of PictureResults, their faces found together
        and cut out, not yet scored. A batch ends as a batch of photos does (is_full).

        Once the event `stopped` is set, no further frame is read.
        """
        waiting = []
        while not stopped.is_set():
            with self.stopwatch.timing("seeking and decoding"):
                index, frame = next(reading, (None, None))
            if index is None:
                break
            video.frames_wanted += 1
            if frame is None:
                waiting.append(self.result(video.path, note=FRAME_NOT_DECODED, frame=index))
                continue
            video.frames_read += 1
            waiting.append(self.result(video.path, frame=index, min_face=self.min_face(), image=frame))
            if is_full(waiting, self.options.batch_size):
                yield self.with_faces(waiting)
                waiting = []
        yield self.with_faces(waiting)

    def scored_and_let_go(self, pictures, on_batch):
        """Score the pictures' faces and hand them to on_batch, then let their pixels, crops and heat maps go."""
        self.score([face for picture in pictures for face in picture.faces])
        on_batch(pictures)
        for picture in pictures:
            picture.image = None
            for face in picture.faces:
                face.crop, face.heatmap = None, None
        return pictures

    def sum_up(self, video):
        """A video's p(fake) and verdict: the mean over the frames of the face seen most, or of the whole frames."""
        faces = [face for picture in video.frames for face in picture.faces]
        if self.finder is None:
            scored = [face for face in faces if face.p_fake is not None]
        else:
            # Every sighting of a face, judged or not: a face that shrinks for a while is still
            # followed; a face that was scored somewhere comes before a small one in the background.
            video.followed = main_face(faces, counts=lambda face: face.p_fake is not None)
            scored = [face for face in video.followed if face.p_fake is not None]
        if not scored:
            video.note = FACE_TOO_SMALL if video.followed else NO_FACE
            return
        video.p_fake = float(np.mean([face.p_fake for face in scored]))
        video.verdict = self.band(video.p_fake)

    def min_face(self):
        """The narrowest face judged; None where faces are not searched."""
        return self.options.min_face if self.finder else None

    def result(self, path, **facts):
        """A PictureResult of this detector: its band, mark and name, and the facts given."""
        return PictureResult(path, [], self.band, self.mark, self.name, **facts)

    def unreadable(self, path, reason):
        return self.result(path, note=UNREADABLE, reason=reason)

    def found(self, image, path, frame=None):
        """A PictureResult of an upright RGB picture, not yet scored: its faces (or the whole picture), cut out."""
        return self.with_faces([self.result(path, frame=frame, min_face=self.min_face(), image=image)])[0]

    def with_faces(self, pictures):
        """The PictureResults, their faces (or whole pictures) cut out of the pixels they hold, not yet scored.

        The faces of all the pictures are searched together (FaceFinder.find_in_each): MTCNN
        takes a video's frames, all of one size, as one batch. A picture without pixels (one
        that could not be read) is left as it is.
        """
        readable = [picture for picture in pictures if picture.image is not None]
        if self.finder is None:
            for picture in readable:
                picture.faces = [FaceResult(None, frame=picture.frame, crop=picture.image)]
            return pictures
        with self.stopwatch.timing("finding faces"):
            found = self.finder.find_in_each([picture.image for picture in readable], self.options.min_face)
        for picture, faces in zip(readable, found):
            picture.warnings += search_warnings(picture.image, self.options.min_face)
            picture.faces = faces_to_judge(faces, picture.image, self.options.min_face, picture.frame)
            if not picture.faces:
                picture.note = NO_FACE
        return pictures

    def score(self, faces):
        """Fill in the p(fake) and verdict of every face that was cut out, a batch at a time, and with Grad-CAM its heat map."""
        scorable = [face for face in faces if face.crop is not None]
        for start in range(0, len(scorable), self.options.batch_size):
            batch = scorable[start : start + self.options.batch_size]
            crops = [face.crop for face in batch]
            with self.stopwatch.timing("scoring"):
                p_fake = p_fake_of_pictures(self.members, crops)
            verdicts = [self.band(float(value)) for value in p_fake]
            heatmaps, evidence = [None] * len(batch), [None] * len(batch)
            if self.options.gradcam:
                # Each map shows the evidence for the verdict given: a face called real gets the
                # regions that lowered p(fake), which a map of the evidence for fake leaves blank.
                evidence = [evidence_shown_for(verdict) for verdict in verdicts]
                with self.stopwatch.timing("Grad-CAM"):
                    model = self.members[0].model
                    heatmaps = grad_cam(model, np.stack([model_input(crop, image_size(model)) for crop in crops]), toward=evidence)
            for face, value, verdict, heatmap, heatmap_of in zip(batch, p_fake, verdicts, heatmaps, evidence):
                face.p_fake, face.verdict, face.heatmap, face.heatmap_of = float(value), verdict, heatmap, heatmap_of


def evidence_shown_for(verdict):
    """Whose evidence a face's Grad-CAM shows: "real" for a face called real; "fake" for one called fake, or uncertain,
    as the question an uncertain verdict leaves open is whether anything in it looks fake."""
    return "real" if verdict == "real" else "fake"


def model_name(members, mark):
    """The model of a detector, as the CSV names it: its file, or the ensemble's files with their weights, and its mark in short."""
    if len(members) == 1:
        name = str(members[0].file)
    else:
        name = "ensemble of " + " + ".join(f"{member.weight:.2f} x {member.file}" for member in members)
    return f"{name} ({mark.split(':')[0]})" if mark else name


# Pictures are read, searched and scored in steps of at most this many, so that the next
# step is read and searched while this one is scored. With a clip's 32 frames in one step,
# nothing overlapped: on 2 quiet cores, judging the MPEG-4 clip of benchmark_video.py took
# 1.83 times the scoring alone; in steps of 8, 1.42. (Alone, the network scored the clip's
# 32 faces as fast in batches of 8 as in one: 2.0 s against 1.9.)
PICTURES_PER_STEP = 8


def is_full(pictures, batch_size):
    """Whether a step of pictures to judge is full: it holds batch_size or PICTURES_PER_STEP pictures, or HELD_PIXELS pixels."""
    held = sum(picture.image.size // 3 for picture in pictures if picture.image is not None)
    return len(pictures) >= min(batch_size, PICTURES_PER_STEP) or held >= HELD_PIXELS


def faces_to_judge(found, image, min_face, frame=None, cut_out=True):
    """The faces that FaceFinder found in an upright RGB image, in reading order, as FaceResults not yet scored.

    A face that can be judged is cut out as the dataset frames its faces (unless not
    `cut_out`); one narrower than `min_face`, or whose frame lies too far past the image's
    edge (MIRRORED_SHARE_AT_MOST), keeps the note that says why it is not judged.
    """
    faces = []
    for number, face in enumerate(found, start=1):
        face_frame = face.frame()
        result = FaceResult(number, box=face.box, face_frame=face_frame, confidence=face.confidence,
                            mirrored=face_frame.share_outside(*image.shape[:2]), frame=frame)
        if face.width < min_face:
            result.note = FACE_TOO_SMALL
        elif result.mirrored > MIRRORED_SHARE_AT_MOST:
            result.note = FACE_AT_BORDER
        elif cut_out:
            result.crop = face_frame.crop(image)
        faces.append(result)
    return faces


def search_warnings(image, min_face):
    """What to say where an image is too large to search for faces as narrow as `min_face`: nothing, or one warning."""
    height, width = image.shape[:2]
    smallest = smallest_searched_face(height, width, min_face)
    if smallest <= min_face:
        return []
    return [f"in its {width}x{height} pixels, faces narrower than {smallest} px are not searched for, not {min_face} px "
            "as --min-face asks, to keep memory within bounds"]


class Stopwatch:
    """Seconds spent in each stage of the work, added up over every input."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def timing(self, stage):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def summary(self):
        return ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.seconds.items())


def made_ahead(making):
    """Yield what the iterator `making(stopped)` yields, making the next item in a thread while the caller works on this one.

    At most two items exist at once: the one the caller holds and the one being made.
    Whatever making one raises (KeyboardInterrupt included) is raised here, after the items
    made before it. When the caller stops early (Ctrl-C), the event `stopped` is set, which
    the iterator checks as often as it can, and the thread is waited for.
    """
    handed, stopped, room = queue.Queue(), threading.Event(), threading.Semaphore(2)
    items = making(stopped)

    def make():
        try:
            while not stopped.is_set():
                if not room.acquire(timeout=0.1):
                    continue
                item = next(items, made_ahead)  # The function itself marks the end: no item is it.
                handed.put((item, None))
                if item is made_ahead:
                    return
        except BaseException as error:  # Handed over, to be raised in the caller's thread.
            handed.put((None, error))
        finally:
            if hasattr(items, "close"):
                items.close()

    maker = threading.Thread(target=make, name="made_ahead", daemon=True)
    maker.start()
    try:
        while True:
            item, error = handed.get()
            if error is not None:
                raise error
            if item is made_ahead:
                return
            yield item
            room.release()  # The caller is done with this one.
    finally:
        stopped.set()
        maker.join()


# ---------------------------------------------------------------------------
# --predict: the detector's results, printed and written as they come
# ---------------------------------------------------------------------------


def predict_media(recipe, paths, model, output_dir, demo, judging, frames, outputs):
    """--predict: print p(fake) and a verdict for each face in each photo and video; train nothing.

    The order of work: list the photos and videos, take the outputs (`outputs`, a
    ReportSettings; locked, so that a second run given the same stops at once), load the
    detector (--model, the ensemble of `output_dir`'s models, or the model trained there),
    then judge each input with `frames` frames a video and `judging`'s JudgingOptions, and report it as it is judged.
    """
    report = None
    try:
        images, videos, unreadable = media_to_predict(paths)
        report = PredictionReport(outputs, images + videos)
        detector = load_detector(recipe, model, output_dir, demo, judging)
        report.start(detector.name)
        print("\n".join(detector.header()))
        videos_judged = judge_all(detector, report, images, videos, unreadable, frames)
    except KeyboardInterrupt:
        # Ctrl-C: what was judged is printed, and in the CSV, which grows as it goes.
        print(f"\nInterrupted. {report.stop() if report else ''}".rstrip())
        return 130
    finally:
        if report:
            report.stop()
    if not images and not videos_judged:
        raise UserError("none of the files given to --predict is a readable image or video; see the warnings above")
    report.finish()
    print(f"Time: {detector.stopwatch.summary()}")
    return 0


def load_detector(recipe, model, output_dir, demo, judging):
    """The Detector of --model (a file or folder, or the ensemble of `output_dir`'s models), or of the model trained there."""
    model_file = ENSEMBLE if model == ENSEMBLE else saved_model_file(recipe, model, output_dir, demo)
    return Detector.load(model_file, output_dir=output_dir, recipe=recipe, **dataclasses.asdict(judging))


def judge_all(detector, report, images, videos, unreadable, frames):
    """Judge the photos, then the videos, reporting each as it is judged; return how many videos could be judged."""
    for path in unreadable:
        report.unreadable(path)
    for picture in detector.judge_photos(images):
        warn_of(picture)
        if picture.note == UNREADABLE:
            warn_skipping(picture.path, picture.reason)
        report.photo(picture)
    videos_judged = 0
    for path in videos:
        warned = set()

        def report_frames(pictures, warned=warned):
            for picture in pictures:
                warn_of(picture, warned)
            report.frames(pictures)

        video = detector.judge_video(path, frames, on_batch=report_frames)
        if video.note == UNREADABLE:
            warn_skipping(path, video.reason)
            report.unreadable(path, video.reason)
            continue
        warn_of(video)
        report.video(video)
        videos_judged += 1
    return videos_judged


def warn_of(result, warned=None):
    """Print a result's warnings, each once per input (`warned` holds those said already)."""
    warnings = warnings_of(result, warned)
    if warnings:
        print(warnings, file=sys.stderr)


# ---------------------------------------------------------------------------
# --serve: the detector on a local page
# ---------------------------------------------------------------------------


def serve_detector(recipe, model, output_dir, demo, judging, page):
    """--serve: load the detector once, as --predict does, then judge what is dropped on its page until Ctrl-C.

    `page` is a PageSettings: where the page listens and how much it takes at once.
    """
    try:
        detector = load_detector(recipe, model, output_dir, demo, judging)
    except KeyboardInterrupt:
        print("\nInterrupted.")
        return 130
    print("\n".join(detector.header()))
    return serve_page(detector, page, judge_uploads)


def judge_uploads(detector, report, paths, frames, gradcam=False):
    """Judge the files of one request of the page into its `report`, as --predict judges its files."""
    images, videos, unreadable = media_to_predict(paths, required=False)
    judge_all(detector.with_gradcam() if gradcam else detector, report, images, videos, unreadable, frames)


# ---------------------------------------------------------------------------
# --predict --cluster: the same judging, by the actors of a Ray cluster
# ---------------------------------------------------------------------------


# The files a cluster's workers import our code from: Ray ships them, so that a node needs only the packages.
SHIPPED_MODULES = tuple(
    Path(__file__).with_name(name)
    for name in ("data_preprocessing.py", "data_augmentation.py", "plot_loss_accuracy_graph.py", "load_pre_trained_models.py")
)

# The columns of the rows a cluster's actors return, by pyarrow type: the CSV's, then what the terminal
# says of a row, the warnings of its file, what the closing count counts it as, and whether it is its file's last.
CLUSTER_ROW_TYPES = {
    "path": "string", "frame": "int64", "face": "int64", "crop_x": "int64", "crop_y": "int64", "crop_size": "int64",
    "mirrored": "float64", "confidence": "float64", "p_fake": "float64", "verdict": "string", "note": "string",
    "model": "string", "said": "string", "warning": "string", "counted": "string", "last": "bool_",
}

# Files in a block of the input, at most: a block is what a worker that dies takes with it, to be judged again.
FILES_PER_BLOCK = 64


@dataclass(frozen=True)
class ShippedModel:
    """What each actor of a cluster builds its Detector from: the .keras file's bytes (a Ray object) and its
    card's text, never a path that only the driver has; and how it judges."""

    model_bytes: object  # A ray.ObjectRef of the .keras file's bytes.
    card: str | None  # The model card beside the file (README.md); None for a model without one.
    model_file: Path  # The file as the driver named it, as the CSV's model column names it.
    recipe: object
    judging: JudgingOptions
    frames: int


class JudgeOnWorker:
    """A Ray actor: a Detector built once from a ShippedModel, that judges batches of files into their rows,
    as --predict on one machine would (a row per face, per picture without one, per unreadable file)."""

    def __init__(self, shipped, tally=None):
        import ray

        # Keras reads the model whole: its copy on this worker's disk goes once it is loaded.
        with tempfile.TemporaryDirectory(prefix="deepfake-detector-") as folder:
            model_file = Path(folder) / "model.keras"
            model_file.write_bytes(ray.get(shipped.model_bytes))
            if shipped.card is not None:
                model_file.with_name(MODEL_CARD).write_text(shipped.card, encoding="utf-8")
            member = load_member(model_file, shipped.recipe)
        self.detector = Detector([dataclasses.replace(member, file=shipped.model_file)], shipped.judging)
        self.frames = shipped.frames
        self.tally = tally  # A ClusterTally actor told of each batch's files, for the progress bar; or None.

    def __call__(self, batch):
        """The rows of a batch of files ({"path": [...]}), as a pyarrow Table of CLUSTER_ROW_TYPES."""
        import pyarrow

        with tempfile.TemporaryDirectory(prefix="deepfake-inputs-") as downloads:
            rows = self.rows_of(batch["path"].tolist(), Path(downloads))
        schema = pyarrow.schema([(column, getattr(pyarrow, kind)()) for column, kind in CLUSTER_ROW_TYPES.items()])
        table = pyarrow.Table.from_pylist(rows, schema=schema)
        if self.tally is not None:
            self.tally.merge.remote(ClusterTally.of_rows(table.to_pylist()))
        return table

    def rows_of(self, paths, downloads):
        """The rows of each file of `paths`, the photos' faces scored together; a URI is read from its copy in `downloads`."""
        rows, photos = [], {}
        for number, path in enumerate(paths):
            local, problem = local_copy(path, downloads / f"{number}{Path(path).suffix}")
            if problem is None and not is_video(local):
                problem = photo_problem(local)
            if problem is not None:
                rows += unreadable_rows(path, problem, self.detector.name)
            elif is_video(local):
                rows += self.video_rows(path, local)
            else:
                photos[path] = local
        for path, picture in zip(photos, self.detector.judge_photos(photos.values())):
            rows += photo_rows(path, picture)
        return rows

    def video_rows(self, path, local):
        """A video's rows, as judge_all reports them: its frames' rows, then its own (or the unreadable one)."""
        rows, warned = [], set()

        def keep(pictures):
            for picture in pictures:
                picture.path = path
                rows.extend(picture_rows(picture, warnings_of(picture, warned), counted=[None] * len(picture.rows())))

        video = self.detector.judge_video(local, self.frames, on_batch=keep)
        if video.note == UNREADABLE:
            return marked_last(rows + unreadable_rows(path, video.reason, self.detector.name))
        video.path = path
        own = dict(video.rows()[0], said=video_line(video), warning=warnings_of(video), counted=video.verdict or video.note)
        return marked_last(rows + [own])


def local_copy(path, copy):
    """Where a worker reads `path`: itself, or for a URI its `copy`, read through pyarrow; and why it cannot, or None."""
    import pyarrow.fs

    uri = uri_of(path)
    if uri is None:
        return Path(path), None
    try:
        filesystem, inside = pyarrow.fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(inside) as source:
            copy.write_bytes(source.read())
    except (OSError, ValueError) as error:  # pyarrow's own errors derive from these.
        return copy, f"it can no longer be read ({error})"
    return copy, None


def photo_rows(path, picture):
    """A photo's rows, as judge_all reports them, and the warnings it prints of it."""
    picture.path = path
    warning = warnings_of(picture)
    if picture.note == UNREADABLE:
        warning = "\n".join(filter(None, [warning, skipping_warning(path, picture.reason)]))
    counted = [face.verdict or face.note for face in picture.faces] or [picture.note]
    return marked_last(picture_rows(picture, warning, counted))


def picture_rows(picture, warning, counted):
    """A picture's CSV rows, each with its printed line and what the count counts; the warning goes with the first."""
    return [
        dict(row, said=said, warning=warning if number == 0 else None, counted=kind)
        for number, (row, said, kind) in enumerate(zip(picture.rows(), picture.lines(), counted))
    ]


def unreadable_rows(path, reason, model):
    """The row of a file that cannot be read, as PredictionReport.unreadable writes it."""
    row = dict(path=str(path), note=UNREADABLE, model=model)
    return [dict(row, said=None, warning=skipping_warning(path, reason), counted=UNREADABLE, last=True)]


def marked_last(rows):
    return [dict(row, last=number == len(rows) - 1) for number, row in enumerate(rows)]


def warnings_of(result, warned=None):
    """The warnings of a result not in `warned` (which gets them), as lines of one text; None where there are none."""
    said = [warning for warning in result.warnings if warned is None or warning not in warned]
    if warned is not None:
        warned.update(said)
    return "\n".join(f"warning: {printable(result.path)}: {warning}" for warning in said) or None


@dataclass(frozen=True)
class ActorPlan:
    """How many actors judge, and what each holds of its node: CPUs and GPUs."""

    count: int
    cpus: float
    gpus: float


def actor_plan(cpus, gpus, nodes):
    """One actor per GPU, or one per node without GPUs, as TensorFlow already uses every core of its node.

    Each takes at most a CPU, and one CPU of the cluster stays free to read with: where
    actors hold every CPU, Ray Data waits for ever ("backpressured: ResourceBudget").
    """
    count = int(gpus) or nodes
    return ActorPlan(count, cpus=max(0.0, min(1.0, (cpus - 1) / count)), gpus=1.0 if gpus else 0.0)


@dataclass
class ClusterTally:
    """What a cluster's run has judged so far: files, scored faces, rows with a note, unreadable files, and the
    closing count's verdicts and reasons."""

    files: int = 0
    faces: int = 0
    notes: int = 0
    failures: int = 0
    counts: Counter = dataclasses.field(default_factory=Counter)

    def add(self, rows):
        """Count a file's rows."""
        self.files += 1
        self.faces += sum(row["face"] is not None and row["p_fake"] is not None for row in rows)
        self.notes += sum(row["note"] is not None and row["note"] != UNREADABLE for row in rows)
        self.failures += any(row["note"] == UNREADABLE for row in rows)
        self.counts.update(row["counted"] for row in rows if row["counted"])

    def progress(self):
        return f"{counted(self.faces, 'face')}, {counted(self.notes, 'note')}, {counted(self.failures, 'failure')}"

    @classmethod
    def of_rows(cls, rows):
        """The tally of the rows of whole files, each file's rows together."""
        tally = cls()
        for _, file_rows in itertools.groupby(rows, key=lambda row: row["path"]):
            tally.add(list(file_rows))
        return tally

    def merge(self, other):
        """Add another tally's counts: as an actor, the progress of every worker's batches."""
        self.files, self.faces = self.files + other.files, self.faces + other.faces
        self.notes, self.failures = self.notes + other.notes, self.failures + other.failures
        self.counts.update(other.counts)

    def so_far(self):
        return self


def predict_on_cluster(recipe, inputs, address, model, output_dir, demo, judging, frames, csv_file):
    """--predict --cluster: judge the files of `inputs` on the Ray cluster at `address` (LOCAL_RAY: one started here).

    Each actor builds its Detector once from the model's bytes and card, which Ray ships
    (ShippedModel). Ray Data streams the paths to the actors and their rows back, a block at
    a time: the driver keeps no list of results. With `csv_file`, a file's rows are appended
    as soon as they come (ClusterCsv), under a progress bar, and put in order at the end;
    a file already in the CSV is not judged again. Where `csv_file` is a folder, Ray writes
    the rows there as shards (CSV files), and summary.json closes it. Without, the rows' lines are printed.
    """
    model_file = saved_model_file(recipe, model, output_dir, demo)
    shards = csv_file if csv_file and is_folder_name(csv_file) else None
    table = ClusterCsv(csv_file) if csv_file and not shards else None
    try:
        ray = connect_to_ray(address, SHIPPED_MODULES)
        try:
            return judge_on_cluster(ray, recipe, inputs, model_file, judging, frames, table, shards)
        finally:
            ray.shutdown()
    finally:
        if table:
            table.close()


def judge_on_cluster(ray, recipe, inputs, model_file, judging, frames, table, shards):
    """Judge, with the Ray module `ray` already connected, the files of `inputs` not yet in `table` (a ClusterCsv or None),
    into the folder `shards` where it is not None."""
    # Loaded here first, so that a model that cannot judge stops the run with one line before the cluster works.
    detector = Detector.load(model_file, recipe=recipe, **dataclasses.asdict(judging))
    print("\n".join(detector.header()))
    judged_before = table.judged if table else set()
    files = [path for path in files_for_cluster(inputs) if path not in judged_before]
    if judged_before:
        print(f"{table.path} holds the rows of {counted(len(judged_before), 'file')}: judging the {counted(len(files), 'other')}")
    card_file = Path(model_file).with_name(MODEL_CARD)
    shipped = ShippedModel(ray.put(Path(model_file).read_bytes()), card_file.read_text(encoding="utf-8") if card_file.is_file() else None,
                           Path(model_file), recipe, judging, frames)
    resources = ray.cluster_resources()
    nodes = sum(node["Alive"] for node in ray.nodes())
    plan = actor_plan(resources.get("CPU", 0), resources.get("GPU", 0), nodes)
    tally = ClusterTally()
    try:
        if shards:
            tally = write_shards(ray, files, shipped, plan, shards)
        elif files:
            judge_files(ray, files, shipped, plan, table, tally)
    except KeyboardInterrupt:
        resume = f"; {table.path} holds their rows: run the same command again to judge the rest" if table else ""
        if shards:
            resume = f"; {shards} holds shards of their rows, without summary.json: judge again into a new folder"
        print(f"\nInterrupted. {counted(tally.files, 'file')} judged{resume}")
        return 130
    except ray.exceptions.RayError as error:
        last_line = str(error).strip().splitlines()[-1]
        raise UserError(f"the cluster's workers could not judge ({last_line}); every node needs this project's "
                        "requirements: pip install -r requirements.txt") from None
    print(count_line(tally.files, tally.counts))
    if table:
        table.put_in_order()
        print(f"Wrote {table.path}: {counted(table.rows, 'row')}, in order of path, frame and face")
    return 0


def judged_rows(ray, files, shipped, plan, tally=None):
    """The Ray Dataset of the rows of `files`, judged by a pool of JudgeOnWorker actors (`plan`), which tell `tally`."""
    blocks = min(len(files), max(4 * plan.count, math.ceil(len(files) / FILES_PER_BLOCK)))
    return ray.data.from_items([{"path": path} for path in files], override_num_blocks=blocks).map_batches(
        JudgeOnWorker, fn_constructor_args=(shipped, tally), batch_size=judging_batch(shipped), batch_format="numpy",
        # Ray Data spreads the actors over the nodes, and gives them max_restarts=-1 and max_task_retries=-1:
        # an actor whose worker or node dies starts again elsewhere, and its batches are judged again.
        compute=ray.data.ActorPoolStrategy(size=plan.count), num_cpus=plan.cpus, num_gpus=plan.gpus,
    )


def judge_files(ray, files, shipped, plan, table, tally):
    """Stream `files` through a pool of JudgeOnWorker actors (`plan`); write or print each file's rows once all are in."""
    rows = judged_rows(ray, files, shipped, plan)
    progress = ProgressBar(len(files), unit="file") if table else None
    waiting = {}  # The rows of files whose last row has not come yet.
    for block in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in block.to_pylist():
            waiting.setdefault(row["path"], []).append(row)
            if row["last"]:
                file_judged(waiting.pop(row["path"]), table, tally)
        if progress:
            progress.update(tally.files, tally.progress())


def write_shards(ray, files, shipped, plan, folder):
    """Judge `files` into CSV shards that Ray Data writes in `folder`, under a progress bar; then write its
    summary.json, counted from the shards, and return that tally.

    The bar's counts come from the actors as they judge (a ClusterTally actor, which takes no CPU);
    a batch judged again, where a node died, is counted twice there, but not in the summary.
    """
    progress = ProgressBar(len(files), unit="file")
    if files:
        reported = ray.remote(num_cpus=0)(ClusterTally).remote()
        rows = judged_rows(ray, files, shipped, plan, reported).select_columns(list(CSV_COLUMNS))
        failed = []
        writer = threading.Thread(target=catching(rows.write_csv, failed), args=(str(folder),), daemon=True)
        writer.start()
        while writer.is_alive():
            writer.join(timeout=0.5)
            so_far = ray.get(reported.so_far.remote())
            progress.update(min(so_far.files, len(files) - 1), so_far.progress())
        if failed:
            raise failed[0]
    shard_files = sorted(folder.glob("*.csv"))
    tally = tally_of_shards(shard_files)
    progress.update(len(files), tally.progress())
    summary = dict(dataclasses.asdict(tally), counts=dict(tally.counts), shards=len(shard_files), model=str(shipped.model_file),
                   columns=list(CSV_COLUMNS))
    write_json_atomically(folder / "summary.json", summary)
    print(f"Wrote {folder}: {counted(len(shard_files), 'shard')} of {counted(tally.rows, 'row')}, and summary.json")
    return tally


def catching(function, failed):
    """`function`, that puts what it raises in the list `failed`: a thread's error, for the thread that waits on it."""

    def call(*arguments):
        try:
            function(*arguments)
        except Exception as error:  # noqa: BLE001 - raised again by the waiting thread.
            failed.append(error)

    return call


def tally_of_shards(shard_files):
    """The count of the rows in CSV shards, read a shard at a time; a file is counted once, by its rows' path."""
    import pyarrow
    import pyarrow.csv

    types = {column: getattr(pyarrow, CLUSTER_ROW_TYPES[column])() for column in CSV_COLUMNS}
    read = pyarrow.csv.ConvertOptions(column_types=types, include_columns=list(CSV_COLUMNS), strings_can_be_null=True)
    tally, paths = ClusterShardTally(), set()
    for shard in shard_files:
        rows = pyarrow.csv.read_csv(shard, convert_options=read).to_pylist()
        # The closing count counts each photo's face or note, and each video's own row (frame empty), as --predict does.
        tally.merge(ClusterTally.of_rows([dict(row, counted=row["verdict"] or row["note"] if row["frame"] is None else None) for row in rows]))
        paths.update(row["path"] for row in rows)
        tally.rows += len(rows)
    tally.files = len(paths)
    return tally


@dataclass
class ClusterShardTally(ClusterTally):
    """A ClusterTally of a folder's shards, which also counts their rows."""

    rows: int = 0


def judging_batch(shipped):
    """Files an actor judges at once: as many as its detector scores faces at once, at most FILES_PER_BLOCK."""
    return min(shipped.judging.batch_size, FILES_PER_BLOCK)


def file_judged(rows, table, tally):
    """A file's rows: appended to the CSV, or printed as --predict prints them; and counted."""
    tally.add(rows)
    if table:
        table.add(rows)
        return
    for row in rows:
        if row["warning"]:
            print(row["warning"], file=sys.stderr)
        if row["said"]:
            print(row["said"])


# ---------------------------------------------------------------------------
# --evaluate: a saved model on another folder of faces
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationSettings:
    """What --evaluate measures, and how: the folder of real/ and fake/ faces, perhaps perturbed, and the model."""

    folder: Path  # Holds real/ and fake/: a folder given with --data-dir, or a dataset's test/.
    data_dir: Path | None  # As given, to name the evaluation.
    output_dir: Path
    model: str | None = None  # --model, or None for OUTPUT_DIR/<model>/model.keras.
    demo: bool = False
    subset: int | None = None
    seed: int = 42
    batch_size: int = 32
    faces: str = "off"
    min_face: int = DEFAULT_MIN_FACE
    threshold: float | None = None
    jpeg_quality: int | None = None
    blur: float | None = None


def evaluation_labels(recipe, settings):
    """An evaluation's folder name, eval-<data>[-jpeg<Q>][-blur<SIGMA>][-faces], and its figures' title."""
    # The --data-dir folder's name, or the name of the dataset around the test/ it holds.
    data = (Path(settings.data_dir) if settings.data_dir is not None else settings.folder.parent).resolve().name
    perturbations = []
    if settings.jpeg_quality is not None:
        perturbations.append((f"jpeg{settings.jpeg_quality}", f"JPEG quality {settings.jpeg_quality}"))
    if settings.blur is not None:
        perturbations.append((f"blur{settings.blur}", f"blur {settings.blur}"))
    if settings.faces == "auto":
        perturbations.append(("faces", "faces cut out"))
    name = "-".join([f"{EVALUATION_PREFIX}{data}", *(short for short, _ in perturbations)])
    title = ", ".join([f"{recipe.title} on {data}", *(spelled_out for _, spelled_out in perturbations)])
    return name, title


# Where --evaluate files its evaluations of a model from elsewhere: OUTPUT_DIR/evaluations/<its name>/.
EVALUATIONS_DIR = "evaluations"


def evaluations_folder(model_file, output_dir, name):
    """The folder of --evaluate's eval-* folders for model_file, the model of the script `name` (vgg16, ...).

    The model that training wrote into OUTPUT_DIR/<name>/ is evaluated there, beside its run's
    outputs, which a later run sets aside with them. A model from elsewhere (--model) is
    evaluated in OUTPUT_DIR/evaluations/<its name>/, named for its folder (one that holds
    model.keras and its card) or for its file: not in OUTPUT_DIR/<name>/, where a later training
    run would set the evaluation aside as its own, nor beside the model, whose folder may be
    read-only (Kaggle's inputs) or someone else's, and where no output of these scripts goes.
    """
    run_dir, model_file = Path(output_dir) / name, Path(model_file).resolve()
    if model_file.parent == run_dir.resolve():
        return run_dir
    named_for = model_file.parent.name if model_file.name == "model.keras" else model_file.stem
    return Path(output_dir) / EVALUATIONS_DIR / (named_for or model_file.stem)


def evaluate_saved_model(recipe, settings):
    """--evaluate: measure a saved model on another folder of real and fake faces, perhaps perturbed."""
    model_file = saved_model_file(recipe, settings.model, settings.output_dir, settings.demo)
    images = load_evaluation_images(settings.folder, settings.output_dir / ".cache", settings.subset, settings.seed)
    model = load_saved_model(model_file, recipe)
    faces = find_evaluation_faces(images, settings.min_face) if settings.faces == "auto" else None
    eval_name, eval_title = evaluation_labels(recipe, settings)
    run_dir = ensure_writable_folder(evaluations_folder(model_file, settings.output_dir, recipe.name))
    with one_run_at_a_time(run_dir):
        return write_evaluation(recipe, settings, model, model_file, images, run_dir / eval_name, eval_title, faces)


@dataclass
class EvaluationFaces:
    """With --evaluate --faces auto: the images where a face was found, its frame in each, and the images without one."""

    images: list
    frames: list
    no_face: list


# Images whose faces are searched together in --evaluate --faces auto.
EVALUATION_SEARCH_BATCH = 32


def read_in_batches(images):
    """Yield the (path, class name) pairs with their upright pixels, ((path, class name), pixels), in lists
    of EVALUATION_SEARCH_BATCH at most, holding no more than HELD_PIXELS pixels."""
    batch, held = [], 0
    for path, class_name in images:
        pixels = read_upright(path)
        batch.append(((path, class_name), pixels))
        held += pixels.size // 3
        if len(batch) == EVALUATION_SEARCH_BATCH or held >= HELD_PIXELS:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def find_evaluation_faces(images, min_face):
    """Find each labelled image's face by the detector's own face path (the widest it can judge, where
    there are several); count the images with none to judge."""
    finder, found, frames, no_face = FaceFinder(), [], [], []
    print(f"Finding the faces in {len(images)} images")
    progress = ProgressBar(len(images), unit="image")
    done = 0
    for batch in read_in_batches(images):
        # The faces of a batch of images are searched together: the dataset's are all of one size.
        for ((path, class_name), image), faces_found in zip(batch, finder.find_in_each([image for _, image in batch], min_face)):
            faces = [face for face in faces_to_judge(faces_found, image, min_face, cut_out=False) if face.note is None]
            if faces:
                found.append((path, class_name))
                frames.append(max(faces, key=lambda face: face.width).face_frame)
            else:
                no_face.append(str(path))
        done += len(batch)
        progress.update(done)
    if no_face:
        print(f"warning: {len(no_face)} of {len(images)} images have no face of --min-face {min_face} px or more; "
              "they are left out, and listed in metrics.json", file=sys.stderr)
    for class_name in CLASSES:
        if not any(name == class_name for _, name in found):
            raise UserError(f"no face of --min-face {min_face} px or more was found in any {class_name}/ image; "
                            "lower --min-face, or evaluate whole images with --faces off")
    return EvaluationFaces(found, frames, no_face)


def write_evaluation(recipe, settings, model, model_file, images, eval_dir, eval_title, faces=None):
    """Score the images (or their faces), perhaps perturbed, and write the evaluation's outputs into eval_dir."""
    perturbation = None
    if settings.jpeg_quality is not None or settings.blur:
        perturbation = functools.partial(perturb, jpeg_quality=settings.jpeg_quality, blur_sigma=settings.blur)
    if faces is not None:
        images = faces.images
    flow = evaluation_flow(images, image_size(model), settings.batch_size, perturbation, None if faces is None else faces.frames)
    predictions = predict_split(model, flow, images)
    metrics = {
        "model": recipe.title,
        "model_file": str(model_file),
        "data_dir": str(settings.folder),
        "jpeg_quality": settings.jpeg_quality,
        "blur_sigma": settings.blur,
        "faces": settings.faces,
        **classification_metrics(predictions, 0.5 if settings.threshold is None else settings.threshold),
    }
    if faces is not None:
        metrics.update(min_face=settings.min_face, n_no_face=len(faces.no_face), no_face=faces.no_face)
    eval_dir.mkdir(exist_ok=True)
    figures = write_test_outputs(eval_dir, eval_title, predictions, metrics)
    how_many = f"{metrics['n_test']} images" if faces is None else f"the faces of {metrics['n_test']} images"
    print(
        f"\n{recipe.title} on {settings.folder} ({how_many}): accuracy {metrics['test_accuracy']:.4f}, "
        f"AUC {metrics['test_auc']:.4f}, AP {metrics['test_ap']:.4f}, EER {metrics['test_eer']:.4f}"
    )
    print(f"Wrote {eval_dir}/: metrics.json, predictions.csv, {', '.join(path.name for path in figures)}")
    return 0


# ---------------------------------------------------------------------------
# --export: the model for other runtimes, each file checked against Keras
# ---------------------------------------------------------------------------


# An exported file must give Keras' p(fake) to within this, or it is not kept; float32
# arithmetic in another order differs by about 1e-7.
EXPORT_TOLERANCE = 1e-4
# The images each exported file is checked on.
CHECK_IMAGES = 32
# The names of an exported model's input (N x S x S x 3 float32, RGB 0 to 255) and output (N x 1), in every runtime.
EXPORT_INPUT, EXPORT_OUTPUT = "rgb_pixels", "p_fake"


class ExportFailed(UserError):
    """A model that cannot be exported, or whose exported file does not give Keras' p(fake): one line, exit status 1."""

    exit_status = 1


class OnnxModel:
    """A detector exported to ONNX, run by onnxruntime.

    It has what scoring needs of a Keras model (a name, an input shape and predict_on_batch),
    so that a model.onnx judges faces through the same path as model.keras.
    """

    def __init__(self, session):
        self.session = session
        self.name = session.get_modelmeta().graph_name
        self.input_shape = tuple(side if isinstance(side, int) else None for side in session.get_inputs()[0].shape)

    @classmethod
    def load(cls, path):
        import onnxruntime  # Only for ONNX models: it takes a while to import.

        try:
            session = onnxruntime.InferenceSession(str(path), providers=onnxruntime.get_available_providers())
        except Exception as error:  # onnxruntime raises its own kinds for a file it cannot run.
            raise UserError(f"onnxruntime cannot run {path} ({first_line(error)}); pass a model.onnx that --export wrote") from None
        return cls(session)

    def predict_on_batch(self, batch):
        return self.session.run([EXPORT_OUTPUT], {EXPORT_INPUT: np.asarray(batch, np.float32)})[0]


def run_onnx(path):
    """A function from raw pixels to p(fake), run by onnxruntime."""
    return OnnxModel.load(path).predict_on_batch


def run_saved_model(path):
    """A function from raw pixels to p(fake), run by TensorFlow from the SavedModel's serving signature."""
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda batch: serve(**{EXPORT_INPUT: tf.constant(batch)})[EXPORT_OUTPUT].numpy()


def run_litert(path):
    """A function from raw pixels to p(fake), run by the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter  # Only for LiteRT files.

    run = Interpreter(model_path=str(path)).get_signature_runner()
    return lambda batch: run(**{EXPORT_INPUT: batch})[EXPORT_OUTPUT]


@dataclass(frozen=True)
class ExportFormat:
    """A runtime's file: its title, its name beside model.keras, Keras' name for the format, the runtime that
    checks it (`run`, from the file to a function of raw pixels), and the lines that use it, for the card."""

    title: str
    file_name: str
    keras_format: str
    runtime: str
    run: object
    usage: tuple


EXPORTS = {
    "onnx": ExportFormat("ONNX", "model.onnx", "onnx", "onnxruntime", run_onnx, (
        "import onnxruntime",
        'session = onnxruntime.InferenceSession("model.onnx")',
        f'p_fake = session.run(["{EXPORT_OUTPUT}"], {{"{EXPORT_INPUT}": faces}})[0]',
    )),
    "saved_model": ExportFormat("SavedModel", "saved_model", "tf_saved_model", "TensorFlow", run_saved_model, (
        "import tensorflow as tf  # TensorFlow Serving serves a copy of saved_model/ as MODEL/1/",
        'serve = tf.saved_model.load("saved_model").signatures["serving_default"]',
        f'p_fake = serve({EXPORT_INPUT}=tf.constant(faces))["{EXPORT_OUTPUT}"].numpy()',
    )),
    "litert": ExportFormat("LiteRT", "model.tflite", "litert", "LiteRT", run_litert, (
        "from ai_edge_litert.interpreter import Interpreter",
        'run = Interpreter(model_path="model.tflite").get_signature_runner()',
        f'p_fake = run({EXPORT_INPUT}=faces)["{EXPORT_OUTPUT}"]',
    )),
}
EXPORTED_FILES = tuple(export_format.file_name for export_format in EXPORTS.values())


@dataclass(frozen=True)
class ExportCheck:
    """An exported file as it was checked: its size, SHA-256 and export time, and its runtime's largest
    difference from Keras' p(fake) on the check's images."""

    format: str
    file: Path
    size: int
    sha256: str
    seconds: float
    largest_difference: float
    checked_on: str

    def record(self):
        """What metrics.json and the card's front matter keep of it."""
        return {
            "file": self.file.name, "runtime": EXPORTS[self.format].runtime, "size_bytes": self.size, "sha256": self.sha256,
            "export_seconds": round(self.seconds, 1), "largest_difference": self.largest_difference, "checked_on": self.checked_on,
        }


@dataclass(frozen=True)
class CheckImages:
    """The raw pixels each exported file is checked on (N x S x S x 3 float32, RGB 0 to 255), and where they come from."""

    pixels: np.ndarray
    source: str


def export_model(recipe, model_file, formats):
    """--export: write the model in each format beside its file, check each against Keras, and list them in its card.

    Args:
        recipe: the script's ModelRecipe, to refuse a model of another script.
        model_file: the .keras file (saved_model_file), beside its card.
        formats: names of EXPORTS, in order.

    Returns:
        The exit status, 0. A failure raises a UserError, and leaves no file half-written.
    """
    if model_file.suffix != ".keras":
        raise UserError(f"--export reads a .keras model, and {model_file} is not one; give --model the model.keras a run saved, or its folder")
    if read_model_card(model_file) is None:
        raise UserError(
            f"{model_file} has no model card ({MODEL_CARD}) beside it: its exported files could not say what it was trained on, "
            "nor give its verdicts' band; export the folder that its run wrote, which holds both"
        )
    ensure_writable_folder(model_file.parent, "--model (a copy of its folder where files can be written)")
    model = load_saved_model(model_file, recipe)
    refuse_low_precision(model, model_file, formats)
    images = check_images(model_file.parent, image_size(model))
    expected = model.predict_on_batch(images.pixels).ravel()
    print(f"Exporting {model_file}; each file is checked against Keras' p(fake) on {images.source}")
    for name in formats:
        check = export_and_check(model, model_file, name, images, expected)
        record_exports(model_file, {name: check.record()})
        print(f"{check.file}: {check.size / 2**20:.1f} MB, exported in {check.seconds:.1f} s; "
              f"{EXPORTS[name].runtime} gives p(fake) within {check.largest_difference:.1e} of Keras'")
    print(f"Listed in {model_file.with_name(MODEL_CARD)}, each with its SHA-256 and the lines that run it")
    return 0


def refuse_low_precision(model, model_file, formats):
    """Refuse, before any export, a model that computes in float16 or bfloat16 where onnxruntime or LiteRT is asked for.

    A model trained with --mixed-precision keeps its layers' policy. Exported from it, the
    ONNX file has bfloat16 convolutions that onnxruntime refuses to load, and the LiteRT file
    needs TensorFlow's own ops, which the LiteRT interpreter lacks; the SavedModel runs.
    """
    compute_dtypes = {layer.dtype_policy.compute_dtype for layer in [*model.layers, *base_of(model).layers]} - {"float32"}
    refused = [EXPORTS[name].title for name in formats if name in ("onnx", "litert")]
    if compute_dtypes and refused:
        raise ExportFailed(
            f"{model_file} computes in {', '.join(sorted(compute_dtypes))} (it was trained with --mixed-precision), which "
            f"{' and '.join(refused)} cannot run; --export saved_model writes it, or train it again without --mixed-precision"
        )


def check_images(run_dir, img_size):
    """The pixels that exported files are checked on: the run's test images where predictions.csv lists them
    and they can be read, half of each class, or else CHECK_IMAGES drawn demo faces."""
    paths = test_images_of_run(run_dir)
    if paths:
        return CheckImages(np.stack([model_input(read_upright(path), img_size) for path in paths]), f"{len(paths)} of the run's test images")
    rng = np.random.default_rng(0)
    faces = [demo_image(rng, CLASSES[number % 2]) for number in range(CHECK_IMAGES)]
    return CheckImages(np.stack([model_input(face, img_size) for face in faces]), f"{CHECK_IMAGES} drawn demo faces")


def test_images_of_run(run_dir):
    """Up to CHECK_IMAGES test images that a run's predictions.csv lists, half of each class; none where one is missing."""
    try:
        table = pd.read_csv(run_dir / "predictions.csv")
        paths = [Path(path) for path in table.groupby("label").head(CHECK_IMAGES // 2)["path"]]
    except (OSError, KeyError, ValueError):  # No such file, or one that is not the run's table.
        return []
    return paths if paths and all(path.is_file() for path in paths) else []


def export_and_check(model, model_file, name, images, expected):
    """Export the model as EXPORTS[name] under a temporary name beside model_file, check it in its own runtime,
    then rename it; return its ExportCheck.

    A file that cannot be made, or that its runtime cannot run or that gives a p(fake) more
    than EXPORT_TOLERANCE from Keras' (`expected`), is removed, and an ExportFailed says why.
    """
    export_format = EXPORTS[name]
    final = model_file.with_name(export_format.file_name)
    # It keeps the file's ending, which LiteRT requires.
    temporary = model_file.with_name(f".exporting-{export_format.file_name}")
    remove_path(temporary)
    try:
        with writing(final):
            started = time.perf_counter()
            write_export(model, model_file, export_format, temporary)
            seconds = time.perf_counter() - started
            difference = largest_difference(export_format, temporary, images, expected)
            check = ExportCheck(name, final, size_of(temporary), sha256_of(temporary), seconds, difference, images.source)
            put_in_place(temporary, final)
    except BaseException:
        remove_path(temporary)
        raise
    return check


def write_export(model, model_file, export_format, path):
    """Export the model to `path`: its input named, of any batch size, its output named p_fake."""
    img_size = image_size(model)
    # A dict names the output in every format: "p_fake", not "output_0" or "Identity:0".
    named = keras.Model(model.inputs, {EXPORT_OUTPUT: model.outputs[0]}, name=model.name)
    signature = [keras.InputSpec(shape=(None, img_size, img_size, 3), dtype="float32", name=EXPORT_INPUT)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Keras' patch of tf2onnx for NumPy 2 warns of np.object.
            named.export(str(path), format=export_format.keras_format, input_signature=signature, verbose=False)
        if export_format.keras_format == "onnx":
            describe_onnx_file(path, model.name)
    except OSError:
        raise  # `writing` says the disk is full, or what else stopped the write.
    except Exception as error:  # The exporters raise many kinds.
        if "No space left on device" in str(error):  # TensorFlow's file system reports it in its own errors.
            raise OSError(errno.ENOSPC, "No space left on device") from None
        raise ExportFailed(
            f"{model_file} could not be exported to {export_format.title} ({first_line(error)}); "
            f"nothing was written. Check that Keras and {export_format.runtime}'s packages are at requirements.txt's versions"
        ) from None


def describe_onnx_file(path, model_name):
    """Name the ONNX graph after the detector, as --predict checks it, and its batch dimension N."""
    import onnx  # Installed with tf2onnx, which Keras exports ONNX with.

    described = onnx.load(str(path))
    described.graph.name = model_name
    for value in [*described.graph.input, *described.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(described, str(path))


def largest_difference(export_format, path, images, expected):
    """The largest difference between the exported file's p(fake), run in its runtime, and Keras'; ExportFailed if
    the runtime cannot run it, or if the difference is above EXPORT_TOLERANCE."""
    try:
        p_fake = np.asarray(export_format.run(path)(images.pixels), float).ravel()
    except Exception as error:  # Each runtime raises its own kinds.
        raise ExportFailed(
            f"{export_format.runtime} cannot run the exported {export_format.title} file ({first_line(error)}); it was not kept"
        ) from None
    difference = float(np.max(np.abs(p_fake - expected)))
    if not difference <= EXPORT_TOLERANCE:  # NaN too.
        raise ExportFailed(
            f"{export_format.runtime} gives a p(fake) {difference:.1e} away from Keras' on {images.source}, more than "
            f"{EXPORT_TOLERANCE:g}; the {export_format.title} file was not kept. Check that its packages are at requirements.txt's versions"
        )
    return difference


def first_line(error):
    """An error's message, first line only, as a one-line message quotes it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def files_of(path):
    """A file, or the files under a folder, in the order of their paths."""
    return sorted(file for file in path.rglob("*") if file.is_file()) if path.is_dir() else [path]


def size_of(path):
    return sum(file.stat().st_size for file in files_of(path))


def sha256_of(path):
    """A file's SHA-256; for a folder, that of the `sha256sum` lines of its files, by path, as
    `find . -type f -printf '%P\n' | sort | xargs sha256sum | sha256sum` prints it inside the folder."""
    if not path.is_dir():
        return file_sha256(path)
    lines = "".join(f"{file_sha256(file)}  {file.relative_to(path).as_posix()}\n" for file in files_of(path))
    return hashlib.sha256(lines.encode()).hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def put_in_place(temporary, final):
    """Rename `temporary` to `final`; a folder there already is first moved aside, and removed once replaced."""
    if not final.is_dir():
        os.replace(temporary, final)
        return
    aside = final.with_name(f".replaced-{final.name}")
    remove_path(aside)
    final.rename(aside)
    temporary.rename(final)
    remove_path(aside)


def remove_path(path):
    """Remove a file or a folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def record_exports(model_file, records):
    """Add the ExportCheck records ({format: record}) to metrics.json beside the model, where there is one, and to its card."""
    metrics_file = model_file.with_name("metrics.json")
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        metrics["exports"] = {**metrics.get("exports", {}), **records}
        write_json_atomically(metrics_file, metrics)
    front, _ = read_card(model_file)
    # Files exported earlier stay listed, unless they are gone since.
    exports = {name: record for name, record in {**front.get("exports", {}), **records}.items()
               if model_file.with_name(record["file"]).exists()}
    write_card_section(model_file, "Exported files", exports_section(exports), "exports", exports)


def exports_section(exports):
    """The card's lines on its exported files: a table of their sizes, SHA-256 and checked differences, and how to run each."""
    lines = [
        f"Each file gives the p(fake) of model.keras, as its own runtime computed it on the images named, to within the "
        f"largest difference shown (at most {EXPORT_TOLERANCE:g}). Input `{EXPORT_INPUT}`: N x S x S x 3 float32, RGB pixels "
        f"0 to 255 of faces framed as the dataset frames them; output `{EXPORT_OUTPUT}`: N x 1.", "",
        "| File | Runtime | Size | SHA-256 | Largest difference | Checked on |", "|---|---|---|---|---|---|",
    ]
    names = [name for name in EXPORTS if name in exports]
    for name in names:
        record = exports[name]
        file_name = record["file"] + ("/" if name == "saved_model" else "")
        lines.append(f"| {file_name} | {record['runtime']} | {record['size_bytes'] / 2**20:.1f} MB | `{record['sha256']}` | "
                     f"{record['largest_difference']:.1e} | {record['checked_on']} |")
    if "saved_model" in exports:
        lines += ["", "The SHA-256 of saved_model/ is that of `sha256sum`'s lines for its files, sorted by path."]
    for name in names:
        lines += ["", f"{EXPORTS[name].title}, in {EXPORTS[name].runtime} (`faces` as the input above):", "", "```python",
                  *EXPORTS[name].usage, "```"]
    return lines


# ---------------------------------------------------------------------------
# The harness: what runs the lesson safely
# ---------------------------------------------------------------------------


def train_and_test(recipe, training, run_dir, strategy):
    """Start, or resume, the run in run_dir, and tell the lesson; return its test metrics, or None if interrupted."""
    keras.utils.set_random_seed(training.seed)
    keras.mixed_precision.set_global_policy(precision_policy(training.mixed_precision))
    # Each input pipeline shuffles its own training images; Keras need not say it leaves them be.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    try:
        start_or_resume(run_dir, training)
        # Made in the strategy's scope, the model's variables are mirrored on every replica.
        with strategy.scope():
            # The images: checked once, then fed as raw pixels, augmented for training.
            data = load_images(training)
            if training_finished(run_dir):
                print("Training finished in an earlier session; evaluating its best model.")
                metrics = evaluate_best_model(recipe, data, run_dir, training)
            else:
                metrics = fine_tune(recipe, data, run_dir, training)
    except KeyboardInterrupt:
        if len(read_history(run_dir / "history.csv")):
            print("\nInterrupted. Run the same command again to resume after the last finished epoch.")
        else:
            print("\nInterrupted before the first epoch finished; the same command starts it again.")
        return None
    except TrainingDiverged:
        # Its backup could only resume a run that cannot go on; the corrected command starts afresh.
        shutil.rmtree(run_dir / "backup", ignore_errors=True)
        raise
    except (tf.errors.ResourceExhaustedError, MemoryError):
        raise UserError(
            f"out of memory with --batch-size {training.batch_size} and --img-size {training.img_size}; "
            "run again with a smaller --batch-size (or --img-size)"
        ) from None
    # Every output is written: the run is complete, and neither its backup nor a save cut
    # off by a kill is needed any more.
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    saving_file(run_dir / "model.keras").unlink(missing_ok=True)
    return metrics


def precision_policy(mixed_precision):
    """float32, or the mixed policy that this machine computes fastest in."""
    if not mixed_precision:
        return "float32"
    # GPUs have fast float16 units; recent CPUs (AVX-512 BF16, AMX) have bfloat16 ones.
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def distribution_strategy(distribute):
    """TensorFlow's own strategy for --distribute; the default one trains on one device."""
    if distribute == "mirrored":
        # Every visible GPU; on a machine without one, the CPU devices TensorFlow was told to make.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if distribute == "multiworker":
        # Reads the cluster and this worker's place in it from the TF_CONFIG variable.
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def check_multiworker_cluster():
    """Stop before any work where --distribute multiworker cannot train, and say what to do instead.

    Keras 3 cannot yet fit a model under MultiWorkerMirroredStrategy across machines
    (keras-team/keras#20585): its first step reduces the input batch in a way that only a
    single-machine strategy supports. When Keras fixes that, this check goes, and every
    worker but the chief needs an output folder of its own, so that no two write one file.
    """
    try:
        cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec().as_dict()
    except ValueError as error:  # json.JSONDecodeError is a ValueError.
        raise UserError(f"TF_CONFIG is not valid JSON ({error}); the README's Speed section shows one") from None
    workers = sum(len(tasks) for task_type, tasks in cluster.items() if task_type in ("chief", "worker"))
    if workers > 1:
        raise UserError(
            f"TF_CONFIG names {workers} workers, but Keras {keras.version()} cannot yet train across machines "
            "(model.fit fails under MultiWorkerMirroredStrategy: https://github.com/keras-team/keras/issues/20585); "
            "train on one machine with --distribute mirrored"
        )


# What a resumed run must share with the interrupted one, or its history would mix two setups.
RESUMABLE_SETTINGS = (
    "data_dir", "subset", "seed", "img_size", "batch_size", "learning_rate", "warmup_epochs",
    "fine_tune_learning_rate", "weights", "preprocessing", "unfreeze_rule", "pipeline", "mixed_precision",
)

# Raised when a backup made by earlier code cannot be resumed: version 2 models take raw
# pixels, and version 3 models end in a logit, temperature scaling and the sigmoid.
BACKUP_FORMAT = 3


def set_aside_previous_run(run_dir):
    """Move an earlier run's outputs aside, so that a new run neither loses nor mixes with them.

    A finished run (one with metrics.json) goes to previous/; an attempt that never got as
    far as its test (it diverged, or its backup was deleted) goes to unfinished/, so that
    previous/ still holds the last finished run. One of each is kept, not more.
    """
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    outputs = [run_dir / name for name in (*RUN_OUTPUTS, *EXPORTED_FILES) if (run_dir / name).exists()]
    # Evaluations of the earlier model, its exported files and its TensorBoard logs go with it.
    outputs += sorted(run_dir.glob(f"{EVALUATION_PREFIX}*")) + [path for path in [run_dir / "logs"] if path.exists()]
    if not outputs:
        return
    finished = (run_dir / "metrics.json").exists()
    aside_dir = run_dir / ("previous" if finished else "unfinished")
    shutil.rmtree(aside_dir, ignore_errors=True)
    aside_dir.mkdir()
    for path in outputs:
        path.rename(aside_dir / path.name)
    print(f"Moved the {'previous run' if finished else 'unfinished attempt'}'s outputs to {aside_dir}")
    write_results_table(run_dir.parent)  # Its row leaves the results table with them.


def start_or_resume(run_dir, training):
    """Start a new run in run_dir, or check that the interrupted run there may be resumed with these TrainingSettings."""
    settings = {name: str(getattr(training, name)) for name in RESUMABLE_SETTINGS}
    backup_dir = run_dir / "backup"
    settings_file = backup_dir / "settings.json"
    if settings_file.exists() and not finished_an_epoch(backup_dir):
        print(f"The run interrupted in {run_dir} had not finished an epoch: there is nothing to resume, starting afresh")
        shutil.rmtree(backup_dir)
    if not settings_file.exists():
        set_aside_previous_run(run_dir)
        write_json_atomically(settings_file, {"backup_format": BACKUP_FORMAT, **settings})
        return
    earlier = json.loads(settings_file.read_text())
    if earlier.get("backup_format") != BACKUP_FORMAT:
        raise UserError(
            f"{settings_file.parent} holds a run interrupted under an earlier version of these scripts, "
            "which cannot be resumed; delete that folder to start a new run"
        )
    changed = [f"--{name.replace('_', '-')} {earlier.get(name)}" for name in settings if settings[name] != earlier.get(name)]
    if changed:
        raise UserError(
            f"{settings_file.parent} holds an interrupted run made with {', '.join(changed)}; run it again "
            "with those to resume it, or delete that folder to start a new run"
        )
    backed_up = epochs_backed_up(backup_dir)
    if backed_up > training.epochs and not training_finished(run_dir):
        raise UserError(
            f"{run_dir} holds an interrupted run that has trained {backed_up} epochs, more than --epochs {training.epochs}; "
            f"run it again with --epochs {backed_up} or more to resume it, or delete {backup_dir} to train anew"
        )
    finished_epochs = epochs_of_finished_training(run_dir)
    if finished_epochs not in (None, training.epochs):
        raise UserError(
            f"{run_dir} holds a run that finished training with --epochs {finished_epochs} and was stopped while "
            f"testing; run it again with --epochs {finished_epochs} to test it, or delete {backup_dir} to train anew"
        )
    print(f"Resuming the interrupted run in {run_dir}")


def finished_an_epoch(backup_dir):
    """True if a backup holds a finished epoch, in either phase.

    BackupAndRestore writes an epoch's weights, then the number of the epoch they end:
    without that number, the weights may have been cut off by a kill.
    """
    return any(backup_dir.rglob("training_metadata.json*"))


def epochs_backed_up(backup_dir):
    """How many epochs, of both phases, the backup of an interrupted run holds."""
    epochs = [0]
    for metadata in backup_dir.rglob("training_metadata.json"):
        try:
            epochs.append(int(json.loads(metadata.read_text())["epoch"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # Cut off by a kill: the phase falls back (PhaseBackup), and counts no epoch here.
    return max(epochs)


def training_finished(run_dir):
    """True once an earlier session of this run finished training (and was stopped while evaluating)."""
    return (run_dir / "backup" / "training-finished").exists()


def epochs_of_finished_training(run_dir):
    """The --epochs that a run finished training with, as its mark records; None if it has not finished."""
    if not training_finished(run_dir):
        return None
    recorded = (run_dir / "backup" / "training-finished").read_text().strip()
    return int(recorded) if recorded.isdigit() else None


def is_complete_model_file(path):
    """True if `path` is a whole .keras file, not one cut off mid-write or mid-copy, nor one no model could be.

    A .keras file is a zip archive whose directory of contents comes last: a file cut
    off anywhere has none, and reading the directory takes no time even for a large model.
    """
    contents = archive_contents(path)
    return any(content.filename == "model.weights.h5" for content in contents) and declared_size_problem(contents) is None


def archive_contents(path):
    """What a zip file's directory says it holds (ZipInfo: each file's name, size, and size stored), nothing
    decompressed; empty for a file that is no whole zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.infolist()
    except (OSError, zipfile.BadZipFile):
        return []


# No model of these scripts comes near these sizes. VGG19's model.keras, the largest, holds a
# config.json of about 30 kB and 0.6 GB of weights; Keras stores them uncompressed. Keras reads
# config.json and metadata.json whole into memory, so a few MB of a zip declaring GB (a zip
# bomb) would take memory without limit: these are checked first, from the declared sizes.
LARGEST_MODEL_CONFIG = 10 * 2**20  # config.json or metadata.json, and any file stored compressed.
LARGEST_MODEL_CONTENTS = 4 * 2**30  # everything in the file.
# Deflate compresses at most about 1,000 times; a file past LARGEST_MODEL_CONFIG that expands more
# than this is a bomb (Keras' own check, at 4 GB, uses the same ratio).
LARGEST_EXPANSION = 100


def declared_size_problem(contents):
    """Why the contents of a .keras file (archive_contents) cannot be a model's, from their declared sizes; None if they can."""
    for content in contents:
        megabytes = f"{content.file_size / 2**20:,.0f} MB"
        if content.filename in ("config.json", "metadata.json") and content.file_size > LARGEST_MODEL_CONFIG:
            return f"its {content.filename} declares {megabytes}, where a model's takes under {LARGEST_MODEL_CONFIG // 2**20} MB"
        if content.file_size > LARGEST_MODEL_CONFIG and content.file_size > LARGEST_EXPANSION * content.compress_size:
            return f"its {content.filename} declares {megabytes}, {content.file_size // max(content.compress_size, 1):,} times what it stores"
    total = sum(content.file_size for content in contents)
    if total > LARGEST_MODEL_CONTENTS:
        return f"its contents declare {total / 2**30:,.1f} GB, where a model's take under {LARGEST_MODEL_CONTENTS // 2**30} GB"
    return None


# Beside the backup: the epoch and val_loss of the model in model.keras (see SaveBestModel).
BEST_MODEL_RECORD = "best-model.json"


def best_val_loss_so_far(run_dir):
    """The lowest val_loss in the history, which patience counts from; None before any finite one."""
    val_loss = read_history(run_dir / "history.csv")["val_loss"].astype(float)
    finite = val_loss[np.isfinite(val_loss)]
    return float(finite.min()) if len(finite) else None


def val_loss_to_beat(model_file, record_file, best_so_far):
    """The val_loss of the model in model_file, as its record says; None if there is no such model.

    A run of an earlier version of these scripts has no record: the history's best stands in.
    """
    if not is_complete_model_file(model_file):
        if best_so_far is not None:
            print(f"warning: {model_file}, the best model so far, is missing or damaged; the next epoch's model replaces it")
        return None
    try:
        return float(json.loads(record_file.read_text())["val_loss"])
    except (OSError, ValueError, KeyError):
        return best_so_far


class HistoryLogger(keras.callbacks.Callback):
    """Writes history.csv as CSVLogger does, one row per epoch, with each epoch's phase and wall time.

    Unlike CSVLogger, it rewrites the whole file after each epoch, through a temporary
    file: a kill never leaves half a row, and an epoch that a resumed run trains again (a
    kill can fall between an epoch's row and its backup) replaces its earlier row.
    """

    def __init__(self, history_file, phase, unfreeze_rule):
        super().__init__()
        self.history_file, self.phase, self.unfreeze_rule = history_file, phase, unfreeze_rule

    def on_train_begin(self, logs=None):
        self.announced = False

    def announce(self):
        """Say what this phase trains, once it has an epoch to train (a resume may have none)."""
        self.announced = True
        trains = "the head alone"
        if self.phase != "warmup":
            conv_layers = len(trainable_conv_layer_names(self.model))
            trains = f"{conv_layers} conv layers ({self.unfreeze_rule} rule) and the head"
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        print(
            f"{self.phase}: training {trains}, {count_trainable_parameters(self.model):,} parameters, "
            f"in {keras.mixed_precision.global_policy().name} on {replicas} replica(s)"
        )

    def on_epoch_begin(self, epoch, logs=None):
        if not self.announced:
            self.announce()
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = round(time.perf_counter() - self.started, 1)
        row = {"epoch": epoch, **{name: float(value) for name, value in sorted((logs or {}).items())}}
        row.update(phase=self.phase, seconds=seconds)
        history = read_history(self.history_file)
        history = history[history["epoch"].astype(int) < epoch]  # Rows of this epoch or later are replaced.
        rows = [*history.to_dict("records"), row]
        write_text_atomically(self.history_file, pd.DataFrame(rows).to_csv(index=False))


class SaveBestModel(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that keeps the best model whole: it saves into a temporary file, then renames it.

    A kill during a save, which takes seconds for a large model, leaves the previous
    best model as it was, instead of a file cut off halfway. Once renamed, the model's
    val_loss is recorded beside the run's backup: a resumed run must beat that model,
    whatever the history says of an epoch that the kill made it train again.
    """

    def __init__(self, model_file, record_file, **kwargs):
        self.model_file, self.record_file = Path(model_file), Path(record_file)
        self.saving_file = saving_file(self.model_file)
        super().__init__(str(self.saving_file), save_best_only=True, **kwargs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.saving_file.unlink(missing_ok=True)  # A save that a kill cut off is no model.

    def on_epoch_end(self, epoch, logs=None):
        best_before = self.best
        with writing(self.model_file, self.saving_file):
            super().on_epoch_end(epoch, logs)
            if self.best == best_before:  # No better model, so nothing was saved.
                return
            save_to_share(self.model, self.saving_file)  # Keras saved it with its optimizer's state.
        os.replace(self.saving_file, self.model_file)
        write_json_atomically(self.record_file, {"epoch": epoch + 1, self.monitor: float(self.best)})
        # Keras starts from None or from infinity, depending on its version.
        improved = "is" if best_before is None or np.isinf(best_before) else f"improved from {best_before:.4f} to"
        print(f"Epoch {epoch + 1}: {self.monitor} {improved} {self.best:.4f}; saved {self.model_file}")


class PhaseBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore for one phase of a run that may have two.

    Keras remembers, on the model, the epoch that a backup restored, and a second fit
    would start from it; forgetting it lets each phase start at its own first epoch,
    or at the one its own backup restores.
    """

    # What reading a cut-off backup raises: h5py an OSError, a cut-off epoch number a ValueError or KeyError.
    UNREADABLE = (OSError, ValueError, KeyError)

    def on_train_begin(self, logs=None):
        self.model._initial_epoch = None
        try:
            super().on_train_begin(logs)
        except self.UNREADABLE as error:
            if not self.restored_the_backup_before(logs):
                self.start_phase_again(error)

    def restored_the_backup_before(self, logs):
        """Resume from the backup before the last (.bkp) where the last cannot be read; False if that cannot be read either."""
        copies = {self._prev_weights_path: self._weights_path, self._prev_training_metadata_path: self._training_metadata_path}
        if not all(Path(copy).exists() for copy in copies):
            return False
        try:
            for copy, path in copies.items():
                shutil.copyfile(copy, path)
            super().on_train_begin(logs)
        except self.UNREADABLE:
            return False
        print(f"warning: the last backup in {self.backup_dir} could not be read; resuming from the one before it", file=sys.stderr)
        return True

    def start_phase_again(self, error):
        """Fall back to the start of this phase, when its backup cannot be read.

        Keras falls back to the backup before the last (.bkp) by itself where the weights
        cannot be read; a kill while the phase's first backup was written leaves no such
        copy, and one while the epoch's number was written leaves a file that is no JSON.
        The model then holds the last usable state: the warmup's end for the fine-tuning,
        the new model for the warmup.
        """
        for path in (self._weights_path, self._training_metadata_path, self._prev_weights_path, self._prev_training_metadata_path):
            Path(path).unlink(missing_ok=True)
        self.model._initial_epoch = None
        print(f"warning: the backup in {self.backup_dir} could not be read ({error}); "
              "this phase trains again from its first epoch", file=sys.stderr)

    def on_epoch_end(self, epoch, logs=None):
        # A backup cut off by a full disk is left for Keras to fall back from, as a kill's is.
        with writing(self.backup_dir):
            super().on_epoch_end(epoch, logs)


class TrainingDiverged(UserError):
    """The loss is not a number any more: the run cannot go on, and its backup is deleted."""


class StopOnNaN(keras.callbacks.Callback):
    """Stops the run with one line, instead of training on, and testing, a model whose loss is NaN."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {float(loss)}: the learning rate is too high for this model; "
                "run again with a lower --learning-rate (the run then starts afresh)"
            )


class EarlyStoppingFromBest(keras.callbacks.EarlyStopping):
    """EarlyStopping that counts its patience from the best val_loss so far.

    Keras' own starts with no best, so after a warmup or a resume its first epoch would
    always count as an improvement, even one worse than the model that is kept.
    """

    def __init__(self, best_so_far, **kwargs):
        super().__init__(**kwargs)
        self.best_so_far = best_so_far

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.best_so_far is not None:
            self.best = self.best_so_far


class MarkTrainingFinished(keras.callbacks.Callback):
    """Leaves a mark once the last phase ends, so that a session stopped while evaluating does not train on.

    The mark records --epochs, so that a later command can tell whether it asks for the same training.
    """

    def __init__(self, mark_file, epochs):
        super().__init__()
        self.mark_file, self.epochs = mark_file, epochs

    def on_train_end(self, logs=None):
        write_text_atomically(self.mark_file, str(self.epochs))


def training_callbacks(run_dir, training, phase):
    """The callbacks of one phase's fit, which lose nothing: the history, the best model, and a backup to resume from.

    Args:
        run_dir: OUTPUT_DIR/<model>/.
        training: the TrainingSettings; --patience adds early stopping to the fine-tuning phase.
        phase: "warmup" (the head alone) or "fine-tune".

    Returns:
        A list of Keras callbacks for model.fit.
    """
    backup_dir, best_so_far = run_dir / "backup", best_val_loss_so_far(run_dir)
    model_file = run_dir / "model.keras"
    callbacks = [
        HistoryLogger(run_dir / "history.csv", phase, training.unfreeze_rule),
        StopOnNaN(),
        # A later phase, or a resumed run, only replaces model.keras with a better model.
        SaveBestModel(
            model_file, backup_dir / BEST_MODEL_RECORD, monitor="val_loss",
            initial_value_threshold=val_loss_to_beat(model_file, backup_dir / BEST_MODEL_RECORD, best_so_far),
        ),
    ]
    if phase == "fine-tune":
        if training.patience:
            # After a resume, the patience counts again from the resumed epoch.
            callbacks.append(
                EarlyStoppingFromBest(best_so_far, monitor="val_loss", patience=training.patience, verbose=1)
            )
        callbacks.append(MarkTrainingFinished(backup_dir / "training-finished", training.epochs))
    else:
        backup_dir = backup_dir / "warmup"
    if training.tensorboard:
        # A folder per phase, so that TensorBoard shows the warmup and the fine-tuning as two
        # runs; epochs count on across both, and across a resume.
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs" / phase)))
    # Last, so that an epoch counts as done only once its row and checkpoint are written.
    # The backup is kept until every output is written (see train_and_test); a run stopped before
    # then resumes from it when the same command is run again.
    callbacks.append(PhaseBackup(str(backup_dir), double_checkpoint=True, delete_checkpoint=False))
    return callbacks


# ---------------------------------------------------------------------------
# python load_pre_trained_models.py
# ---------------------------------------------------------------------------


def describe_freezing(recipe):
    """A few lines that say what each rule trains in `recipe`'s base."""
    lines = [f"{recipe.title}"]
    for rule in ("conv", "layers"):
        keras.backend.clear_session()  # Restarts Keras' layer names (conv2d, conv2d_1, ...).
        model = build_model(recipe, weights="none", img_size=224, unfreeze_rule=rule)
        names = trainable_conv_layer_names(model)
        lines.append(
            f"  --unfreeze-rule {rule:<6}: {len(names):>2} trainable conv layers, "
            f"{count_trainable_parameters(model):>11,} trainable parameters with the head: "
            f"{', '.join(names) or '(none)'}"
        )
    return "\n".join(lines)


@exits_on_user_error
def main(argv=None):
    OneLineArgumentParser(
        description="Build each of the four models with random weights (nothing is downloaded) and print, "
        "for each freezing rule, which conv layers train and how many parameters. It writes nothing."
    ).parse_args(argv)
    for recipe in load_recipes():
        print(describe_freezing(recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
