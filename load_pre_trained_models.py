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
- `run`, what a per-model script runs once its options are read: train, or apply a model;
- applying a trained model: loading it (or the ensemble), Grad-CAM, --predict (which
  finds, cuts out and scores the faces of photos and videos) and --evaluate;
- the harness that runs the lesson safely: seeds, mixed precision, distribution, resuming
  an interrupted run, and Ctrl-C, with the callbacks that lose nothing;
- the command below.

Each per-model script (VGG16_finetuning.py and the three others) describes its base in a
ModelRecipe, reads its options with data_preprocessing.parse_arguments, then calls `run`.
Run this file on its own to see, for each model, which layers each freezing rule trains;
it builds the models without downloading any weights:

    python load_pre_trained_models.py
"""

import contextlib
import functools
import gc
import importlib
import json
import os
import shlex
import shutil
import sys
import time
import warnings
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
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
    FaceFrame,
    MIRRORED_SHARE_AT_MOST,
    UnreadableVideo,
    evaluation_flow,
    main_face,
    make_flows,
    model_input,
    perturb,
    read_upright,
    read_video_frames,
    smallest_searched_face,
)
from data_preprocessing import (
    CLASSES,
    DEMO_OUTPUT_DIR,
    ENSEMBLE,
    MODEL_SCRIPTS,
    OneLineArgumentParser,
    ProgressBar,
    UserError,
    ensure_demo_dataset,
    ensure_writable_folder,
    exits_on_user_error,
    load_dataset,
    load_evaluation_images,
    load_recipes,
    media_to_predict,
    one_run_at_a_time,
    printable,
    report_bad_files,
    warn_skipping,
    write_json_atomically,
    write_text_atomically,
    writing,
)
from plot_loss_accuracy_graph import (
    EVALUATION_PREFIX,
    FACE_AT_BORDER,
    FACE_TOO_SMALL,
    FRAME_NOT_DECODED,
    NO_FACE,
    UNREADABLE,
    RUN_OUTPUTS,
    THUMBNAIL_WIDTH,
    UNKNOWN_MARK,
    PredictionReport,
    Verdicts,
    classification_metrics,
    read_ensemble,
    read_history,
    shown_frame_positions,
    whose_verdicts,
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


def fine_tune(recipe, args, run_dir):
    """Fine-tune `recipe`'s pre-trained base to tell real faces from fakes, then test it.

    The script's main has checked the options, and the harness (`run`, below) has seeded
    the random generators, set the precision policy and the distribution strategy, and prepared
    run_dir, which may hold an interrupted run to resume.

    Args:
        recipe: a per-model script's ModelRecipe: which base, and how many conv layers to train.
        args: the checked command-line options (data_preprocessing.parse_arguments).
        run_dir: the folder for this model's outputs, OUTPUT_DIR/<model>/.

    Returns:
        The test metrics, as written to run_dir/metrics.json.
    """
    # 1. Load the pre-trained base: convolutional features learned on ImageNet, without its classifier.
    base = load_base(recipe, args.weights, args.img_size)
    # 2. Freeze it but for its last conv layers: the early, generic features stay as ImageNet made them.
    freeze_all_but_last_conv_layers(base, recipe, args.unfreeze_rule)
    # 3. Add the head: pixel scaling in front of the base, and a real/fake classifier on top.
    model = add_classification_head(base, recipe, args.preprocessing)
    # The images: checked once, then fed as raw pixels, augmented for training.
    dataset, flows = load_images(args)
    # (On a resume both fits run again, and each skips the epochs that its backup holds.)
    if args.warmup_epochs:
        # Optionally, train the new head alone first, with the whole base frozen: its random
        # weights would otherwise send large gradients into the pre-trained features.
        base.trainable = False
        compile_model(model, args.learning_rate)
        model.fit(flows["train"], validation_data=flows["valid"], epochs=args.warmup_epochs,
                  callbacks=training_callbacks(run_dir, args, phase="warmup"))
        # Then back to step 2: the last conv layers train again, now beside a trained head.
        freeze_all_but_last_conv_layers(base, recipe, args.unfreeze_rule)
    # 4. Compile: a change of the trainable layers takes effect only when the model is compiled.
    compile_model(model, args.fine_tune_learning_rate)
    # 5. Fit, counting epochs on from the warmup's: ModelCheckpoint keeps the model of the epoch
    # with the lowest validation loss.
    model.fit(flows["train"], validation_data=flows["valid"], initial_epoch=args.warmup_epochs, epochs=args.epochs,
              callbacks=training_callbacks(run_dir, args, phase="fine-tune"))
    # 6. Evaluate that best model on the test split, and write every output.
    return evaluate_best_model(recipe, args, run_dir, dataset, flows, last_model=model)


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


def load_images(args):
    """The checked dataset and its train, valid and test inputs (data_augmentation.make_flows)."""
    dataset = load_dataset(args.data_dir, args.output_dir / ".cache", args.subset, args.seed)
    report_bad_files(dataset.bad_files)
    if args.demo:
        print("Demo run on synthetic faces: its figures show that the pipeline works, they are not a benchmark.")
    return dataset, make_flows(dataset, args.img_size, args.batch_size, args.seed, args.pipeline)


def evaluate_best_model(recipe, args, run_dir, dataset, flows, last_model=None):
    """Test the model that ModelCheckpoint kept, and write every output and the results table.

    Args:
        recipe, args, run_dir: as for fine_tune.
        dataset, flows: the images and their inputs, from load_images.
        last_model: the model as training left it, kept (with a warning) if model.keras is
            missing or damaged although some epoch had a finite val_loss.

    Returns:
        The test metrics, as written to run_dir/metrics.json.
    """
    best_model = load_best_model(run_dir, last_model)
    valid_logits = predict_logits(best_model, flows["valid"])
    temperature = calibrate(best_model, valid_logits, dataset.images["valid"])
    calibration_skipped = too_few_to_calibrate(dataset.images["valid"])
    save_whole(best_model, run_dir / "model.keras")  # Calibrated, as it is shared.
    test_logits = predict_logits(best_model, flows["test"])
    test_predictions = predictions_table(dataset.images["test"], special.expit(test_logits / temperature))
    # The ensemble weighs each model by its validation AUC, and --predict's band comes from the
    # validation split too: the test split must not choose them.
    valid_predictions = predictions_table(dataset.images["valid"], special.expit(valid_logits / temperature))
    calibration = {"temperature": temperature, "test_p_fake_before": special.expit(test_logits), "skipped": calibration_skipped}
    metrics = write_run_outputs(run_dir, recipe, args, dataset, test_predictions, valid_predictions, calibration)
    write_results_table(args.output_dir)
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
            "path": [str(path) for path, _ in images],
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

    With --predict or --evaluate, apply the saved model and train nothing. Otherwise
    prepare the run (its data, folder, seeds, precision and strategy), then tell the
    lesson, `fine_tune`, or finish an interrupted run's evaluation.
    """
    if args.uses_demo_data and not args.predict:
        ensure_demo_dataset(args.data_dir)
    if args.predict:
        return predict_media(recipe, args)
    if args.evaluate:
        try:
            return evaluate_saved_model(recipe, args)
        except KeyboardInterrupt:
            pass
        # The interrupted input pipeline is let go now: left to Python's exit, TensorFlow would warn that it could not be.
        gc.collect()
        print("\nInterrupted; run the same command again to evaluate afresh")
        return 130
    if args.distribute == "multiworker":
        check_multiworker_cluster()
    # First, as MultiWorkerMirroredStrategy must be made before TensorFlow does any work.
    strategy = distribution_strategy(args.distribute)
    run_dir = ensure_writable_folder(args.output_dir / recipe.name)
    # A second run into the same folder would mix its epochs, history and model with this one's.
    with one_run_at_a_time(run_dir):
        metrics = train_and_test(recipe, args, run_dir, strategy)
    if metrics is None:  # Interrupted: the same command resumes it.
        return 130
    print(f"\nTest accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}")
    print(f"Wrote {run_dir}/: {', '.join(RUN_OUTPUTS)}")
    print(f"Results so far ({args.output_dir / 'results.md'}):\n{(args.output_dir / 'results.md').read_text()}")
    if args.demo:
        print_next_demo_step(recipe, args, run_dir)
    return 0


def print_next_demo_step(recipe, args, run_dir):
    """After the demo, the command that applies its model to a face, with Grad-CAM."""
    face = pd.read_csv(run_dir / "predictions.csv").query("label == 'fake'")["path"].iloc[0]
    command = ["python", os.path.relpath(Path(__file__).with_name(MODEL_SCRIPTS[recipe.name])), "--demo"]
    if args.output_dir != DEMO_OUTPUT_DIR:
        command += ["--output-dir", str(args.output_dir)]
    # The demo's faces are drawn, and cropped as the dataset's: no face finder would find them.
    command += ["--predict", os.path.relpath(face), "--gradcam", str(args.output_dir / "gradcam"), "--faces", "off"]
    print(f"Next, score a demo face and see which regions drove the score (Grad-CAM):\n  {shlex.join(command)}")


# ---------------------------------------------------------------------------
# Applying a trained model: loading it, and Grad-CAM
# ---------------------------------------------------------------------------


def image_size(model):
    """The side of the square images a detector takes, as its input layer records it."""
    return model.input_shape[1]


def load_saved_model(model_file, name, title):
    """Load a detector that the script of the model `name` (its title, for messages) saved; refuse anything else with one line."""
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
    if model.name != f"{name}_deepfake_detector":
        raise UserError(
            f"{model_file} holds the model {model.name!r}, not {title}'s; "
            "pass it to its own script, or a model that this script trained"
        )
    # A model saved before the scaling moved into the model expects scaled pixels; fed raw
    # ones, it would print wrong scores without a warning.
    if PIXEL_SCALING not in [layer.name for layer in model.layers]:
        raise UserError(
            f"{model_file} was saved by an earlier version of these scripts, whose models took scaled pixels; "
            f"train {title} again to get a model that takes raw pixels"
        )
    return model


def saved_model_file(recipe, args):
    """--model FILE, --model FOLDER (its model.keras, beside its card), or the model that training wrote into OUTPUT_DIR/<model>/."""
    model_file = Path(args.model) if args.model else args.output_dir / recipe.name / "model.keras"
    if model_file.is_dir():
        model_file = model_file / "model.keras"
    if model_file.is_file():
        return model_file
    demo_model = DEMO_OUTPUT_DIR / recipe.name / "model.keras"
    if not args.model and not args.demo and demo_model.is_file():
        raise UserError(
            f"there is no model at {model_file}, but the demo's model is at {demo_model}: add --demo to use it"
        )
    raise UserError(
        f"there is no model at {model_file}; train {recipe.title} first (the same command without "
        "--predict or --evaluate, with the same --output-dir), or pass --model FILE"
    )


def load_ensemble(output_dir):
    """The (title, model) pairs of the results table's Ensemble row, and their weights."""
    members, weights = read_ensemble(output_dir)
    if len(members) < 2:
        raise UserError(
            f"the ensemble needs two or more models trained into {output_dir} on the same test images; "
            "train another model with the same --data-dir, --subset and --output-dir"
        )
    models, files = [], []
    for metrics in members:
        # A run folder is named after its model (recipe.name), unless it was renamed since.
        run_dir, title = Path(metrics["run_dir"]), metrics["model"]
        name = metrics.get("name", run_dir.name)
        files.append(run_dir / "model.keras")
        models.append((title, load_saved_model(files[-1], name, title)))
    return models, weights, files


def prediction_models(recipe, args):
    """The (title, model) pairs to score with, their weights, a line per model that says whose verdicts
    these are (from its card), the mark its pictures carry (DEMO_MARK, UNKNOWN_MARK or None), and how
    p(fake) becomes a verdict: --threshold, or else the band of the model's card (none for an ensemble)."""
    if args.model == ENSEMBLE:
        models, weights, files = load_ensemble(args.output_dir)
    else:
        files = [saved_model_file(recipe, args)]
        models, weights = [(recipe.title, load_saved_model(files[0], recipe.name, recipe.title))], [1.0]
    described = [whose_verdicts(title, model_file) for (title, _), model_file in zip(models, files)]
    lines = [line for line, _, _ in described]
    if len(models) > 1:
        lines = [f"{line} (weight {weight:.2f})" for line, weight in zip(lines, weights)]
    marks = [mark for _, mark, _ in described if mark]
    # One member without a card, or trained on the demo, is enough to mark the ensemble's verdicts.
    mark = UNKNOWN_MARK if UNKNOWN_MARK in marks else (marks[0] if marks else None)
    if args.threshold is not None:
        verdicts = Verdicts(args.threshold, args.threshold)
    else:
        # No band was chosen for the ensemble's average: every face is uncertain without --threshold.
        verdicts = described[0][2] if len(models) == 1 else Verdicts(None, None, "no band was chosen for an ensemble")
    return models, weights, lines, mark, verdicts


def p_fake_of_pictures(models, weights, pictures):
    """The weighted p(fake) of uint8 RGB pictures of any size, each model reading them at its own size."""
    p_fake = np.zeros(len(pictures))
    for (_, model), weight in zip(models, weights):
        batch = np.stack([model_input(picture, image_size(model)) for picture in pictures])
        p_fake += weight * model.predict_on_batch(batch).ravel()
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


def grad_cam(model, batch):
    """Grad-CAM heat maps (Selvaraju et al., 2017) of a batch of raw pixels, one per image, scaled to 0-1.

    Each channel of the last conv feature map is weighted by the mean gradient of the
    fake score with respect to it; the weighted sum, without its negative part, shows where
    the features that raised p(fake) are.
    """
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
    gradients = tf.cast(tape.gradient(fake_score, features), "float32")
    features = tf.cast(features, "float32")
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    heatmaps = tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1)).numpy()
    peaks = heatmaps.max(axis=(1, 2), keepdims=True)
    return heatmaps / np.where(peaks > 0, peaks, 1)


# ---------------------------------------------------------------------------
# --predict on photos and videos: find the faces, cut them out, score them
# ---------------------------------------------------------------------------


def predict_media(recipe, args):
    """--predict: print p(fake) and a verdict for each face in each photo and video; train nothing.

    The order of work: list the photos and videos, take the outputs (locked, so that a
    second run given the same stops at once), load the model (or the ensemble), then judge
    each (find its faces, cut them out, score them) and report it as it is judged.
    """
    report = None
    try:
        images, videos, unreadable = media_to_predict(args.predict)
        report = PredictionReport(args, images + videos)
        models, weights, model_lines, mark, args.verdicts = prediction_models(recipe, args)
        report.start(mark)
        judge = MediaJudge(models, weights, args)
        faces = "each face found" if args.faces == "auto" else "each whole image"
        by = "the model" if len(models) == 1 else "the weighted ensemble of"
        print(f"p(fake) of {faces}; verdicts: {args.verdicts}; by {by}:")
        for line in model_lines:
            print(f"  {line}")
        videos_judged = judge_all(judge, report, images, videos, unreadable)
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
    print(f"Time: {judge.stopwatch.summary()}")
    return 0


def judge_all(judge, report, images, videos, unreadable):
    """Judge the photos, then the videos, reporting each as it is judged; return how many videos could be judged."""
    for path in unreadable:
        report.unreadable(path)
    for path, image, lines in judge.images(images):
        report.photo(path, image, lines)
    videos_judged = 0
    for path in videos:
        judged = judge_video(judge, path, functools.partial(report.frames, path))
        if judged is None:
            report.unreadable(path)
            continue
        lines, frames, thumbnails = judged
        # Every sighting of a face, judged or not: a face that shrinks for a while is still
        # followed; a face that was scored somewhere comes before a small one in the background.
        followed = main_face([line for line in lines if line.face is not None], counts=lambda line: line.p_fake is not None)
        report.video(path, lines, followed, frames, thumbnails)
        videos_judged += 1
    return videos_judged


def judge_video(judge, path, report_frames):
    """A video's lines, (frames read, frames wanted) and thumbnails; None, with a warning, if it cannot be read.

    `report_frames` reports a batch of lines (prints them, writes their rows and overlays) as soon as they are judged.
    """
    try:
        lines, read, wanted, thumbnails = judge.video(path, report_frames)
    except UnreadableVideo as problem:
        warn_skipping(path, problem)
        return None
    if not read:
        warn_skipping(path, "none of its frames could be decoded")
        return None
    if read < wanted:
        # OpenCV estimates some containers' frame counts (mkv, webm) from their duration.
        print(f"warning: {printable(path)}: only {read} of {wanted} sampled frames could be decoded; "
              "the file may be cut off, or its frame count an estimate", file=sys.stderr)
    return lines, (read, wanted), thumbnails


@dataclass
class Line:
    """One line of --predict: a face, a whole image or frame with --faces off, or a picture with no face.

    A line without a p_fake says why in its note. `picture` is what was scored: the face cut out
    at the dataset's 256x256, or the whole image.
    """

    path: Path
    frame: int | None = None  # The frame's index in a video; None for a photo.
    face: int | None = None  # 1, 2, ... within the image or frame; None for the whole image.
    face_frame: FaceFrame | None = None
    confidence: float | None = None
    width: float | None = None  # The face's width, as MTCNN's box gives it.
    mirrored: float | None = None  # The share of the face's frame outside the picture, which the crop mirrors.
    picture: np.ndarray | None = None
    p_fake: float | None = None
    heatmap: np.ndarray | None = None  # With --gradcam, the first model's Grad-CAM map of the picture.
    note: str | None = None  # Why the line has no p_fake: NO_FACE, FACE_TOO_SMALL, FACE_AT_BORDER, FRAME_NOT_DECODED or UNREADABLE.


def read_when_still_there(path):
    """An image that was checked with the others, read upright; None, with a warning, if it has gone or changed since."""
    try:
        return read_upright(path)
    except Exception as error:  # Moved, deleted or rewritten mid-run: Pillow raises many kinds.
        warn_skipping(path, f"it can no longer be read ({error})")
        return None


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


# --predict holds at most about this many pixels of photos at once (600 MB in RGB).
HELD_PIXELS = 200_000_000


class MediaJudge:
    """Scores photos and video frames with the chosen models: each face found, or each whole picture."""

    def __init__(self, models, weights, args):
        self.models = models
        self.weights = weights
        self.args = args
        self.finder = FaceFinder() if args.faces == "auto" else None
        self.stopwatch = Stopwatch()
        self.warned = set()  # The inputs warned of a larger --min-face.

    def lines_of(self, picture, path, frame=None):
        """The lines of one upright image or video frame: its faces, or the whole picture with --faces off.

        The models know faces framed as the dataset frames them, nothing else: a picture
        without a face, a face too small to judge, or one whose frame lies too far past the
        picture's edge (MIRRORED_SHARE_AT_MOST) is listed with its note, not scored.
        """
        if self.finder is None:
            return [Line(path, frame, picture=picture)]
        self.warn_of_a_larger_min_face(picture, path)
        with self.stopwatch.timing("finding faces"):
            faces = self.finder.find(picture, self.args.min_face)
        if not faces:
            return [Line(path, frame, note=NO_FACE)]
        lines = []
        for number, face in enumerate(faces, start=1):
            face_frame = face.frame()
            line = Line(path, frame, face=number, face_frame=face_frame, confidence=face.confidence, width=face.width,
                        mirrored=face_frame.share_outside(*picture.shape[:2]))
            if face.width < self.args.min_face:
                line.note = FACE_TOO_SMALL
            elif line.mirrored > MIRRORED_SHARE_AT_MOST:
                line.note = FACE_AT_BORDER
            else:
                with self.stopwatch.timing("cutting out faces"):
                    line.picture = face_frame.crop(picture)
            lines.append(line)
        return lines

    def warn_of_a_larger_min_face(self, picture, path):
        """Say, once an input, where a picture is too large to search for faces as narrow as --min-face."""
        height, width = picture.shape[:2]
        smallest = smallest_searched_face(height, width, self.args.min_face)
        if smallest > self.args.min_face and path not in self.warned:
            self.warned.add(path)
            print(f"warning: {printable(path)}: in its {width}x{height} pixels, faces narrower than {smallest} px are not searched "
                  f"for, not {self.args.min_face} px as --min-face asks, to keep memory within bounds", file=sys.stderr)

    def score(self, lines):
        """Fill in the p(fake) of every line that has a picture, a batch at a time, and with --gradcam its heat map."""
        scorable = [line for line in lines if line.picture is not None]
        for start in range(0, len(scorable), self.args.batch_size):
            batch = scorable[start : start + self.args.batch_size]
            pictures = [line.picture for line in batch]
            with self.stopwatch.timing("scoring"):
                p_fake = p_fake_of_pictures(self.models, self.weights, pictures)
            heatmaps = [None] * len(batch)
            if self.args.gradcam:
                with self.stopwatch.timing("Grad-CAM"):
                    model = self.models[0][1]
                    heatmaps = grad_cam(model, np.stack([model_input(picture, image_size(model)) for picture in pictures]))
            for line, value, heatmap in zip(batch, p_fake, heatmaps):
                line.p_fake, line.heatmap = float(value), heatmap
        return lines

    def images(self, paths):
        """Yield (path, upright image, its lines, scored), scoring a batch of faces at a time.

        Images are held until their faces are scored, so a batch also ends once it holds
        HELD_PIXELS: a folder of phone photos would otherwise fill the memory.
        """
        batch = []
        for position, path in enumerate(paths):
            with self.stopwatch.timing("reading"):
                image = read_when_still_there(path)
            batch.append((path, image, [Line(path, note=UNREADABLE)] if image is None else self.lines_of(image, path)))
            batch_lines = [line for _, _, image_lines in batch for line in image_lines]
            held = sum(held_image.shape[0] * held_image.shape[1] for _, held_image, _ in batch if held_image is not None)
            faces_to_score = sum(line.picture is not None for line in batch_lines)
            if faces_to_score >= self.args.batch_size or held >= HELD_PIXELS or position == len(paths) - 1:
                self.score(batch_lines)
                yield from batch
                batch = []

    def video(self, path, report_frames):
        """A video's sampled frames, judged: (lines, frames read, frames wanted, thumbnails).

        Each batch of lines goes to `report_frames` as soon as it is judged, in frame order,
        and no frame, face or heat map is kept after; only with --annotate are the frames
        kept, as (index, thumbnail, scale) triples: a frame of 4K video takes 25 MB, its
        thumbnail a fraction of one.
        """
        lines, thumbnails, read, wanted = [], [], 0, 0
        shown = shown_frame_positions(self.args.frames)  # Those a contact sheet shows, of --frames sampled.
        reading = read_video_frames(path, self.args.frames)
        unscored = []
        while True:
            with self.stopwatch.timing("seeking and decoding"):
                index, frame = next(reading, (None, None))
            if index is None:
                break
            wanted += 1
            if frame is None:
                unscored.append(Line(path, index, note=FRAME_NOT_DECODED))
                continue
            read += 1
            unscored += self.lines_of(frame, path, index)
            if self.args.annotate and wanted - 1 in shown:
                scale = THUMBNAIL_WIDTH / frame.shape[1]
                thumbnails.append((index, cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), scale))
            # A batch is full of faces to score, or of frames (which may have none) to report.
            pictures, frames = sum(line.picture is not None for line in unscored), len({line.frame for line in unscored})
            if max(pictures, frames) >= self.args.batch_size:
                lines += self.score_and_let_go(unscored, report_frames)
                unscored = []
        lines += self.score_and_let_go(unscored, report_frames)
        return lines, read, wanted, thumbnails

    def score_and_let_go(self, lines, report_frames):
        """Score the lines and report them, then let their pictures and heat maps go."""
        self.score(lines)
        report_frames(lines)
        for line in lines:
            line.picture, line.heatmap = None, None
        return lines


# ---------------------------------------------------------------------------
# --evaluate: a saved model on another folder of faces
# ---------------------------------------------------------------------------


def evaluation_labels(recipe, args, folder):
    """An evaluation's folder name, eval-<data>[-jpeg<Q>][-blur<SIGMA>][-faces], and its figures' title."""
    # The --data-dir folder's name, or the name of the dataset around the test/ it holds.
    data = (Path(args.data_dir) if args.data_dir is not None else folder.parent).resolve().name
    perturbations = []
    if args.jpeg_quality is not None:
        perturbations.append((f"jpeg{args.jpeg_quality}", f"JPEG quality {args.jpeg_quality}"))
    if args.blur is not None:
        perturbations.append((f"blur{args.blur}", f"blur {args.blur}"))
    if args.faces == "auto":
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


def evaluate_saved_model(recipe, args):
    """--evaluate: measure a saved model on another folder of real and fake faces, perhaps perturbed."""
    model_file = saved_model_file(recipe, args)
    folder = args.evaluation_folder  # Found, and checked, with the options.
    images = load_evaluation_images(folder, args.output_dir / ".cache", args.subset, args.seed)
    model = load_saved_model(model_file, recipe.name, recipe.title)
    faces = find_evaluation_faces(images, args.min_face) if args.faces == "auto" else None
    eval_name, eval_title = evaluation_labels(recipe, args, folder)
    run_dir = ensure_writable_folder(evaluations_folder(model_file, args.output_dir, recipe.name))
    with one_run_at_a_time(run_dir):
        return write_evaluation(recipe, args, model, model_file, images, run_dir / eval_name, eval_title, faces)


@dataclass
class EvaluationFaces:
    """With --evaluate --faces auto: the images where a face was found, its frame in each, and the images without one."""

    images: list
    frames: list
    no_face: list


def find_evaluation_faces(images, min_face):
    """Find each labelled image's face, the widest where there are several; count the images with none to judge."""
    finder, found, frames, no_face = FaceFinder(), [], [], []
    print(f"Finding the faces in {len(images)} images")
    progress = ProgressBar(len(images), unit="image")
    for done, (path, class_name) in enumerate(images, start=1):
        faces = [face for face in finder.find(read_upright(path), min_face) if face.width >= min_face]
        if faces:
            found.append((path, class_name))
            frames.append(max(faces, key=lambda face: face.width).frame())
        else:
            no_face.append(str(path))
        progress.update(done)
    if no_face:
        print(f"warning: {len(no_face)} of {len(images)} images have no face of --min-face {min_face} px or more; "
              "they are left out, and listed in metrics.json", file=sys.stderr)
    for class_name in CLASSES:
        if not any(name == class_name for _, name in found):
            raise UserError(f"no face of --min-face {min_face} px or more was found in any {class_name}/ image; "
                            "lower --min-face, or evaluate whole images with --faces off")
    return EvaluationFaces(found, frames, no_face)


def write_evaluation(recipe, args, model, model_file, images, eval_dir, eval_title, faces=None):
    """Score the images (or their faces), perhaps perturbed, and write the evaluation's outputs into eval_dir."""
    folder = args.evaluation_folder
    perturbation = None
    if args.jpeg_quality is not None or args.blur:
        perturbation = functools.partial(perturb, jpeg_quality=args.jpeg_quality, blur_sigma=args.blur)
    if faces is not None:
        images = faces.images
    flow = evaluation_flow(images, image_size(model), args.batch_size, perturbation, None if faces is None else faces.frames)
    predictions = predict_split(model, flow, images)
    metrics = {
        "model": recipe.title,
        "model_file": str(model_file),
        "data_dir": str(folder),
        "jpeg_quality": args.jpeg_quality,
        "blur_sigma": args.blur,
        "faces": args.faces,
        **classification_metrics(predictions, 0.5 if args.threshold is None else args.threshold),
    }
    if faces is not None:
        metrics.update(min_face=args.min_face, n_no_face=len(faces.no_face), no_face=faces.no_face)
    eval_dir.mkdir(exist_ok=True)
    figures = write_test_outputs(eval_dir, eval_title, predictions, metrics)
    how_many = f"{metrics['n_test']} images" if faces is None else f"the faces of {metrics['n_test']} images"
    print(
        f"\n{recipe.title} on {folder} ({how_many}): accuracy {metrics['test_accuracy']:.4f}, "
        f"AUC {metrics['test_auc']:.4f}, AP {metrics['test_ap']:.4f}, EER {metrics['test_eer']:.4f}"
    )
    print(f"Wrote {eval_dir}/: metrics.json, predictions.csv, {', '.join(path.name for path in figures)}")
    return 0


# ---------------------------------------------------------------------------
# The harness: what runs the lesson safely
# ---------------------------------------------------------------------------


def train_and_test(recipe, args, run_dir, strategy):
    """Start, or resume, the run in run_dir, and tell the lesson; return its test metrics, or None if interrupted."""
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(precision_policy(args.mixed_precision))
    # Each input pipeline shuffles its own training images; Keras need not say it leaves them be.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    try:
        start_or_resume(run_dir, args)
        # Made in the strategy's scope, the model's variables are mirrored on every replica.
        with strategy.scope():
            if training_finished(run_dir):
                print("Training finished in an earlier session; evaluating its best model.")
                metrics = evaluate_best_model(recipe, args, run_dir, *load_images(args))
            else:
                metrics = fine_tune(recipe, args, run_dir)
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
            f"out of memory with --batch-size {args.batch_size} and --img-size {args.img_size}; "
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
    outputs = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    # Evaluations of the earlier model, and its TensorBoard logs, go with it.
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


def start_or_resume(run_dir, args):
    """Start a new run in run_dir, or check that the interrupted run there may be resumed with these options."""
    settings = {name: str(getattr(args, name)) for name in RESUMABLE_SETTINGS}
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
    if backed_up > args.epochs and not training_finished(run_dir):
        raise UserError(
            f"{run_dir} holds an interrupted run that has trained {backed_up} epochs, more than --epochs {args.epochs}; "
            f"run it again with --epochs {backed_up} or more to resume it, or delete {backup_dir} to train anew"
        )
    finished_epochs = epochs_of_finished_training(run_dir)
    if finished_epochs not in (None, args.epochs):
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


def training_callbacks(run_dir, args, phase):
    """The callbacks of one phase's fit, which lose nothing: the history, the best model, and a backup to resume from.

    Args:
        run_dir: OUTPUT_DIR/<model>/.
        args: the options; --patience adds early stopping to the fine-tuning phase.
        phase: "warmup" (the head alone) or "fine-tune".

    Returns:
        A list of Keras callbacks for model.fit.
    """
    backup_dir, best_so_far = run_dir / "backup", best_val_loss_so_far(run_dir)
    model_file = run_dir / "model.keras"
    callbacks = [
        HistoryLogger(run_dir / "history.csv", phase, args.unfreeze_rule),
        StopOnNaN(),
        # A later phase, or a resumed run, only replaces model.keras with a better model.
        SaveBestModel(
            model_file, backup_dir / BEST_MODEL_RECORD, monitor="val_loss",
            initial_value_threshold=val_loss_to_beat(model_file, backup_dir / BEST_MODEL_RECORD, best_so_far),
        ),
    ]
    if phase == "fine-tune":
        if args.patience:
            # After a resume, the patience counts again from the resumed epoch.
            callbacks.append(
                EarlyStoppingFromBest(best_so_far, monitor="val_loss", patience=args.patience, verbose=1)
            )
        callbacks.append(MarkTrainingFinished(backup_dir / "training-finished", args.epochs))
    else:
        backup_dir = backup_dir / "warmup"
    if args.tensorboard:
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
