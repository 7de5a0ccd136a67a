"""Load an ImageNet CNN, unfreeze its last conv layers, add a real/fake head, and fine-tune it.

Each per-model script (VGG16_finetuning.py and the three others) describes its model
as a ModelRecipe and hands it to `fine_tune`, which tells the rest of the story:

1. find and check the images (data_preprocessing.py),
2. build the augmented flows (data_augmentation.py),
3. load the pre-trained base, freeze all but its last conv layers, add the head,
4. train with callbacks that keep the history, the best model and a backup to resume from,
5. evaluate the best model on the test split and write every output
   (plot_loss_accuracy_graph.py draws the curves and the results table).

The same scripts apply a trained model afterwards, without training:

- `--predict PATH ...` prints p(fake) and a verdict for image files and folders
  (`--model ensemble` averages every trained model; `--gradcam DIR` draws heat maps);
- `--evaluate --data-dir D` measures a saved model on another folder of real/ and fake/
  faces, optionally blurred (`--blur`) or JPEG-compressed (`--jpeg-quality`).

Run this file on its own to see, for each model, which layers each freezing rule
trains; it builds the models without downloading any weights:

    python load_pre_trained_models.py
"""

import functools
import importlib
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn import metrics as sklearn_metrics

from data_augmentation import evaluation_flow, make_flows, perturb, prediction_flow
from data_preprocessing import (
    OneLineArgumentParser,
    UserError,
    add_data_arguments,
    checked_number,
    ensure_writable_folder,
    evaluation_folder,
    exits_on_user_error,
    files_to_predict,
    find_split_root,
    jpeg_quality,
    load_dataset,
    load_evaluation_images,
    non_negative_float,
    positive_int,
    probability,
    readable_images,
    report_bad_files,
    resolve_data_options,
    write_json_atomically,
    write_text_atomically,
)
from plot_loss_accuracy_graph import (
    EVALUATION_PLOTS,
    classification_metrics,
    ensemble_members,
    ensemble_weights,
    plot_evaluation,
    plot_history,
    read_history,
    read_runs,
    save_gradcam_overlay,
    true_labels,
    write_results_table,
)

# The per-model scripts, in the order of the results table.
MODEL_SCRIPTS = ("VGG16_finetuning", "VGG19_finetuning", "inceptionV3_finetuning", "resnet50_finetuning")


@dataclass(frozen=True)
class ModelRecipe:
    """What differs between the four models; everything else is shared."""

    title: str  # As the results table shows it, e.g. "VGG16".
    name: str  # The output folder, e.g. "vgg16".
    application: Callable  # The keras.applications constructor.
    preprocess_input: Callable  # The pixel scaling the ImageNet weights were trained with.
    trainable_conv_layers: int  # The documented recipe: train the last N Conv2D layers.
    original_trainable_layers: int  # What the original code did: train the last K Keras layers.
    imagenet_weights_file: str  # The file Keras downloads for include_top=False.
    min_img_size: int = 32  # The smallest input the base accepts.


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def keras_cache_dir():
    """Where Keras keeps downloaded weights."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def existing_weights_file(weights):
    """The path that --weights names, if it is neither imagenet nor none."""
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights} is neither imagenet, none, nor an existing weights file")
    return path


def load_base(recipe, weights, img_size):
    """The pre-trained convolutional base, without ImageNet's classifier on top.

    `weights` is "imagenet" (downloaded once, then cached by Keras), "none" (random
    initial weights, for tests and offline demos) or the path of a weights file.
    """
    input_shape = (img_size, img_size, 3)
    if weights == "none":
        return recipe.application(include_top=False, weights=None, input_shape=input_shape)
    if weights == "imagenet":
        try:
            return recipe.application(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as error:  # Keras raises a bare Exception when the download fails.
            raise UserError(
                f"could not get the ImageNet weights {recipe.imagenet_weights_file} ({error}); "
                f"Keras caches them in {keras_cache_dir()}: copy the file there, or pass "
                "--weights PATH to use a local copy, or --weights none to start from random weights"
            ) from None
    path = existing_weights_file(weights)
    base = recipe.application(include_top=False, weights=None, input_shape=input_shape)
    try:
        base.load_weights(str(path))
    except Exception as error:  # h5py and Keras raise several kinds for a wrong file.
        raise UserError(
            f"could not load {path} into {recipe.title} ({error}); use the include_top=False "
            f"weights of {recipe.title}, such as {recipe.imagenet_weights_file}"
        ) from None
    return base


def unfreeze_last_layers(base, recipe, unfreeze_rule):
    """Freeze the base except its last layers.

    "conv" trains the last N Conv2D layers, as the project documents. Batch
    normalization layers stay frozen, so they keep their ImageNet statistics and run in
    inference mode. "layers" reproduces the original code, which trained the last K
    Keras layers whatever they were: for InceptionV3 these hold no weights at all.
    """
    if unfreeze_rule == "conv":
        conv_layers = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
        trainable = conv_layers[-recipe.trainable_conv_layers :]
    else:
        trainable = base.layers[-recipe.original_trainable_layers :]
    for layer in base.layers:
        layer.trainable = False
    for layer in trainable:
        layer.trainable = True


def add_classification_head(base, recipe):
    """Pool the features and add the documented head; the output is p(fake)."""
    features = keras.layers.GlobalAveragePooling2D(name="average_pool")(base.output)
    features = keras.layers.Dense(1024, activation="relu", name="dense_1024")(features)
    features = keras.layers.Dropout(0.5, name="dropout")(features)
    # float32 keeps the probability exact even when the rest runs in mixed precision.
    p_fake = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="p_fake")(features)
    return keras.Model(base.input, p_fake, name=f"{recipe.name}_deepfake_detector")


def build_model(recipe, weights="imagenet", img_size=224, unfreeze_rule="conv"):
    base = load_base(recipe, weights, img_size)
    unfreeze_last_layers(base, recipe, unfreeze_rule)
    return add_classification_head(base, recipe)


def compile_model(model, learning_rate):
    # Under mixed_float16, Keras scales the loss itself so that small gradients survive.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    return model


def trainable_conv_layer_names(model):
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.trainable]


def count_trainable_parameters(model):
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


# ---------------------------------------------------------------------------
# Command-line options
# ---------------------------------------------------------------------------

DOCUMENTED_DEFAULTS = dict(epochs=10, batch_size=32, img_size=224, weights="imagenet")
# Small enough to train on a laptop CPU in a minute or two, with nothing to download.
DEMO_DEFAULTS = dict(epochs=5, batch_size=16, img_size=64, weights="none")


# Rates such as --learning-rate.
positive_float = checked_number(float, lambda value: value > 0, "more than 0")


def build_parser(recipe):
    parser = OneLineArgumentParser(
        description=f"Fine-tune {recipe.title}'s last {recipe.trainable_conv_layers} conv layers "
        "to tell real faces from StyleGAN fakes.",
    )
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default 10; 5 with --demo)")
    parser.add_argument("--batch-size", type=positive_int, help="images per batch (default 32; 16 with --demo)")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-4, help="Adam's learning rate (default 1e-4)")
    parser.add_argument(
        "--img-size",
        type=positive_int,
        help=f"image side in pixels (default 224; 64 with --demo; at least {recipe.min_img_size})",
    )
    parser.add_argument(
        "--weights",
        help="imagenet, none, or the path of a weights file for the base (default imagenet; none with --demo)",
    )
    parser.add_argument(
        "--preprocessing",
        choices=["native", "rescale"],
        default="native",
        help="native: the base model's own preprocess_input (default); rescale: the original's 1/255",
    )
    parser.add_argument(
        "--unfreeze-rule",
        choices=["conv", "layers"],
        default="conv",
        help=f"conv: train the last {recipe.trainable_conv_layers} conv layers (default); "
        f"layers: the original code's last {recipe.original_trainable_layers} Keras layers",
    )
    parser.add_argument("--patience", type=positive_int, help="stop after N epochs without a better val_loss")
    speed = parser.add_argument_group("speed and scale")
    speed.add_argument(
        "--pipeline",
        choices=["idg", "tfdata"],
        default="idg",
        help="idg: the original's ImageDataGenerator flows (default); "
        "tfdata: a tf.data pipeline with the same augmentations, several times faster",
    )
    speed.add_argument(
        "--mixed-precision",
        action="store_true",
        help="compute in bfloat16 on a CPU or float16 on a GPU, keeping the weights and p(fake) in float32",
    )
    speed.add_argument(
        "--distribute",
        choices=["none", "mirrored", "multiworker"],
        default="none",
        help="mirrored: every visible GPU of this machine; multiworker: every machine in TF_CONFIG "
        "(--batch-size is then the global batch, split across them)",
    )
    add_prediction_arguments(parser)
    return parser


def add_prediction_arguments(parser):
    """The options that apply a trained model instead of training one."""
    group = parser.add_argument_group("applying a trained model (no training)")
    group.add_argument(
        "--predict", nargs="+", type=Path, metavar="PATH",
        help="print p(fake) and the verdict for these image files and every image in these folders",
    )
    group.add_argument(
        "--evaluate", action="store_true",
        help="measure the saved model on --data-dir: a folder holding real/ and fake/, or a dataset's test/",
    )
    group.add_argument(
        "--model", metavar="FILE",
        help="the .keras model to use (default OUTPUT_DIR/<model>/model.keras); "
        "with --predict, 'ensemble' averages every model trained into OUTPUT_DIR",
    )
    group.add_argument("--threshold", type=probability, default=0.5, help="p(fake) from which an image is called fake (default 0.5)")
    group.add_argument("--csv", type=Path, metavar="FILE", help="with --predict: also write the lines to this CSV file")
    group.add_argument("--gradcam", type=Path, metavar="DIR", help="with --predict: write a Grad-CAM heat map of each image to DIR")
    group.add_argument("--jpeg-quality", type=jpeg_quality, metavar="Q", help="with --evaluate: JPEG-compress each image at quality Q (1-100)")
    group.add_argument("--blur", type=non_negative_float, metavar="SIGMA", help="with --evaluate: Gaussian-blur each image with this sigma in pixels")


def check_prediction_options(args):
    """Refuse the combinations of options that would be silently ignored."""
    applying = args.predict or args.evaluate
    mistakes = [
        (args.predict and args.evaluate, "--predict and --evaluate are separate runs; give one of them"),
        (args.gradcam and not args.predict, "--gradcam draws heat maps of --predict's images; add --predict PATH"),
        (args.csv and not args.predict, "--csv writes --predict's lines; add --predict PATH"),
        (
            (args.jpeg_quality is not None or args.blur is not None) and not args.evaluate,
            "--jpeg-quality and --blur perturb the images of --evaluate; add --evaluate",
        ),
        (args.model and not applying, "--model names the model for --predict or --evaluate; add one of them"),
        (
            args.model == ENSEMBLE and (args.gradcam or args.evaluate),
            "--model ensemble works with --predict alone: Grad-CAM explains one model, and the ensemble's "
            "test figures are in the results table",
        ),
    ]
    for is_wrong, message in mistakes:
        if is_wrong:
            raise UserError(message)


def parse_arguments(recipe, argv):
    """Parse the options and check them all, so that a mistake stops the run before any long work."""
    args = build_parser(recipe).parse_args(argv)
    defaults = dict(DEMO_DEFAULTS, img_size=max(DEMO_DEFAULTS["img_size"], recipe.min_img_size))
    for option, value in (defaults if args.demo else DOCUMENTED_DEFAULTS).items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    if args.img_size < recipe.min_img_size:
        raise UserError(f"--img-size {args.img_size} is too small for {recipe.title}: use {recipe.min_img_size} or more")
    if args.weights not in ("imagenet", "none"):
        existing_weights_file(args.weights)
    check_prediction_options(args)
    if args.distribute == "multiworker":
        check_multiworker_cluster()
    return resolve_data_options(args)


# ---------------------------------------------------------------------------
# Speed and scale
# ---------------------------------------------------------------------------


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

    Keras 3 (up to 3.15 at least) cannot fit a model under MultiWorkerMirroredStrategy
    across machines: its first step reduces the input batch in a way that only a
    single-machine strategy supports. When Keras fixes that, this check goes, and every
    worker but the chief needs an output folder of its own, so that no two write one file.
    """
    try:
        cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec().as_dict()
    except ValueError as error:  # json.JSONDecodeError is a ValueError.
        raise UserError(f"TF_CONFIG is not valid JSON ({error}); the README's Speed and scale section shows one") from None
    workers = sum(len(tasks) for task_type, tasks in cluster.items() if task_type in ("chief", "worker"))
    if workers > 1:
        raise UserError(
            f"TF_CONFIG names {workers} workers, but Keras {keras.version()} cannot yet train across machines "
            "(model.fit fails under MultiWorkerMirroredStrategy: https://github.com/keras-team/keras/issues/20585); "
            "train on one machine with --distribute mirrored"
        )


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class EpochTimer(keras.callbacks.Callback):
    """Adds each epoch's wall time to the logs, so that history.csv keeps it across resumes."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = round(time.perf_counter() - self.started, 1)


def is_complete_model_file(path):
    """True if `path` is a whole .keras file (a zip archive), not one cut off mid-write."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


# What a resumed run must share with the interrupted one, or its history would mix two setups.
RESUMABLE_SETTINGS = (
    "data_dir", "subset", "seed", "img_size", "batch_size", "learning_rate", "weights", "preprocessing",
    "unfreeze_rule", "pipeline", "mixed_precision",
)
SETTINGS_ADDED_LATER = {"pipeline": "idg", "mixed_precision": "False"}


RUN_OUTPUTS = ("model.keras", "history.csv", "history.png", "metrics.json", "predictions.csv", *EVALUATION_PLOTS)
# --evaluate writes into OUTPUT_DIR/<model>/eval-<name>/, beside the training run's own outputs.
EVALUATION_PREFIX = "eval-"


def set_aside_previous_run(run_dir):
    """Move a finished run's outputs to previous/, so that a new run neither loses nor mixes with them."""
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    outputs = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    # Evaluations of the earlier model go with it.
    outputs += sorted(run_dir.glob(f"{EVALUATION_PREFIX}*"))
    if not outputs:
        return
    previous_dir = run_dir / "previous"
    shutil.rmtree(previous_dir, ignore_errors=True)  # One run back is kept, not more.
    previous_dir.mkdir()
    for path in outputs:
        path.rename(previous_dir / path.name)
    print(f"Moved the previous run's outputs to {previous_dir}")
    write_results_table(run_dir.parent)  # Its row leaves the results table with them.


def start_or_resume(run_dir, args):
    """Return True to resume the interrupted run in run_dir; otherwise start a new one."""
    settings = {name: str(getattr(args, name)) for name in RESUMABLE_SETTINGS}
    settings_file = run_dir / "backup" / "settings.json"
    if not settings_file.exists():
        set_aside_previous_run(run_dir)
        write_json_atomically(settings_file, settings)
        return False
    # A run interrupted before a setting existed was made with that setting's default.
    earlier = {**SETTINGS_ADDED_LATER, **json.loads(settings_file.read_text())}
    changed = [f"--{name.replace('_', '-')} {earlier.get(name)}" for name in settings if settings[name] != earlier.get(name)]
    if changed:
        raise UserError(
            f"{settings_file.parent} holds an interrupted run made with {', '.join(changed)}; run it again "
            "with those to resume it, or delete that folder to start a new run"
        )
    print(f"Resuming the interrupted run in {run_dir} from its last backed-up epoch")
    return True


def training_callbacks(run_dir, patience, resuming):
    """Callbacks that lose nothing: the history, the best model, and a backup to resume from."""
    history_file, model_file = run_dir / "history.csv", run_dir / "model.keras"
    best_val_loss = None
    if resuming:
        history = read_history(history_file)
        if len(history) and is_complete_model_file(model_file):
            best_val_loss = float(history["val_loss"].min())
    callbacks = [
        EpochTimer(),
        keras.callbacks.TerminateOnNaN(),
        # Appends a row per epoch, so the history survives a crash.
        keras.callbacks.CSVLogger(str(history_file), append=True),
        # On a resume, only a model better than the best so far replaces model.keras.
        keras.callbacks.ModelCheckpoint(
            str(model_file), monitor="val_loss", save_best_only=True, initial_value_threshold=best_val_loss, verbose=1
        ),
    ]
    if patience:
        # After a resume, the patience counts again from the resumed epoch.
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, verbose=1))
    # Last, so that an epoch counts as done only once its row and checkpoint are written.
    # The backup is kept until every output is written (see fine_tune); a run stopped before
    # then resumes from it when the same command is run again.
    callbacks.append(
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), double_checkpoint=True, delete_checkpoint=False)
    )
    return callbacks


def train(model, flows, run_dir, args):
    """Fit the model, unless an earlier session of this run already finished training."""
    resuming = start_or_resume(run_dir, args)
    finished = run_dir / "backup" / "training-finished"
    if finished.exists():
        print("Training finished in an earlier session; evaluating its best model.")
        return
    # No steps_per_epoch: Keras then uses every batch, the last partial one included.
    callbacks = training_callbacks(run_dir, args.patience, resuming)
    # shuffle=False: each input pipeline already shuffles its training images every epoch.
    model.fit(flows["train"], validation_data=flows["valid"], epochs=args.epochs, callbacks=callbacks, shuffle=False)
    # Early stopping may end before --epochs: this tells a resumed session not to train on.
    finished.touch()


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def load_best_model(run_dir, last_model):
    """The model with the best val_loss, as model.keras holds it."""
    model_file = run_dir / "model.keras"
    if not model_file.exists():  # val_loss was never a number: keep the last weights.
        print("warning: val_loss never improved; model.keras holds the last epoch's model", file=sys.stderr)
        last_model.save(model_file)
    return keras.models.load_model(model_file)


def predict_split(model, flow, images):
    """p(fake) for every image of an unshuffled, labelled flow, which keeps the order of `images`."""
    p_fake = model.predict(flow, verbose=1).ravel().astype(float)
    return pd.DataFrame(
        {
            "path": [str(path) for path, _ in images],
            "label": [class_name for _, class_name in images],
            "p_fake": p_fake,
        }
    )


def write_test_outputs(folder, title, predictions, metrics):
    """predictions.csv, metrics.json and the ROC, precision-recall and confusion-matrix figures."""
    predictions.to_csv(folder / "predictions.csv", index=False)
    write_json_atomically(folder / "metrics.json", metrics)
    return plot_evaluation(predictions, metrics, folder, title)


def write_run_outputs(run_dir, recipe, args, predictions, valid_predictions):
    """metrics.json, predictions.csv, history.png and the test figures for one run; return the metrics."""
    history = read_history(run_dir / "history.csv")
    metrics = {
        "model": recipe.title,
        **classification_metrics(predictions),
        # The ensemble weighs each model by this; the test split must not choose the weights.
        "valid_auc": float(sklearn_metrics.roc_auc_score(true_labels(valid_predictions), valid_predictions["p_fake"])),
        "epochs_run": int(len(history)),
        "img_size": args.img_size,
        "weights": args.weights,
        "preprocessing": args.preprocessing,
        "unfreeze_rule": args.unfreeze_rule,
        "pipeline": args.pipeline,
        "mixed_precision": args.mixed_precision,
        "distribute": args.distribute,
        # Summed over the epochs in history.csv, so a resumed run counts every session.
        "train_seconds": round(float(history["seconds"].sum()), 1),
    }
    write_test_outputs(run_dir, recipe.title, predictions, metrics)
    plot_history(history, run_dir / "history.png", recipe.title)
    return metrics


# ---------------------------------------------------------------------------
# Applying a trained model: --predict (with Grad-CAM) and --evaluate
# ---------------------------------------------------------------------------

# The --model value that asks for the weighted average of every trained model.
ENSEMBLE = "ensemble"


@dataclass
class SavedModel:
    """A trained model with what is needed to feed it images as it was trained."""

    title: str
    model: keras.Model
    img_size: int
    preprocess_input: Callable
    preprocessing: str  # "native" or "rescale", as in training.


def load_saved_model(model_file, recipe, preprocessing):
    """Load a .keras file. Its training settings come from the metrics.json beside it, when there is one."""
    try:
        model = keras.models.load_model(model_file)
    except Exception as error:  # Keras raises several kinds for a file that is not a model.
        raise UserError(f"could not load the model {model_file} ({error}); pass a .keras file that a run saved") from None
    # Fed another base's pixel scaling, a model would print wrong p(fake) without a warning.
    if model.name != f"{recipe.name}_deepfake_detector":
        raise UserError(
            f"{model_file} holds the model {model.name!r}, not {recipe.title}'s; "
            "pass it to its own script, or a model that this script trained"
        )
    metrics_file = Path(model_file).with_name("metrics.json")
    settings = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    # The model's input layer knows its image size; only the pixel scaling has to be recorded.
    return SavedModel(recipe.title, model, model.input_shape[1], recipe.preprocess_input,
                      settings.get("preprocessing", preprocessing))


def saved_model_file(recipe, args):
    """--model FILE, or the model that training wrote into OUTPUT_DIR/<model>/."""
    model_file = Path(args.model) if args.model else args.output_dir / recipe.name / "model.keras"
    if not model_file.is_file():
        raise UserError(
            f"there is no model at {model_file}; train {recipe.title} first (the same command without "
            "--predict or --evaluate, with the same --output-dir), or pass --model FILE"
        )
    return model_file


def load_ensemble(output_dir, preprocessing):
    """The models of the results table's Ensemble row, and their weights."""
    members = ensemble_members(read_runs(output_dir))
    if len(members) < 2:
        raise UserError(
            f"the ensemble needs two or more models trained into {output_dir} on the same test images; "
            "train another model with the same --data-dir, --subset and --output-dir"
        )
    recipes = {recipe.title: recipe for recipe in load_recipes()}
    models = []
    for metrics, _ in members:
        recipe = recipes[metrics["model"]]
        models.append(load_saved_model(output_dir / recipe.name / "model.keras", recipe, preprocessing))
    return models, ensemble_weights([metrics["valid_auc"] for metrics, _ in members])


def predict_p_fake(saved, paths, batch_size):
    """p(fake) for each image file, read and scaled as in the model's training."""
    flow = prediction_flow(paths, saved.preprocess_input, saved.preprocessing, saved.img_size, batch_size)
    return saved.model.predict(flow, verbose=0).ravel().astype(float)


# Grad-CAM lives here rather than with the figures in plot_loss_accuracy_graph.py because it
# runs the model and takes TensorFlow gradients; that module only draws its result.
def gradcam_layer(model):
    """The base's last conv feature map: the layer that feeds the head's average pooling.

    For ResNet50 and InceptionV3 that is the final activation or concatenation after the
    last convolutions. VGG ends with a max pooling, which only halves the map, so Grad-CAM
    uses the conv layer before it, as in the Grad-CAM paper.
    """
    position = [layer.name for layer in model.layers].index("average_pool") - 1
    while isinstance(model.layers[position], (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        position -= 1
    return model.layers[position]


def grad_cam(model, batch):
    """Grad-CAM heat maps (Selvaraju et al., 2017), one per image, scaled to 0-1.

    Each channel of the last conv feature map is weighted by the mean gradient of the
    fake score with respect to it; the weighted sum, without its negative part, shows where
    the features that raised p(fake) are.
    """
    output_layer = model.get_layer("p_fake")
    feature_model = keras.Model(model.inputs, [gradcam_layer(model).output, output_layer.input])
    images = tf.convert_to_tensor(batch)
    with tf.GradientTape() as tape:
        # Watching the input records every layer, the frozen ones too.
        tape.watch(images)
        features, head_features = feature_model(images, training=False)
        # The score before the sigmoid, as in the paper: once p(fake) saturates at 0 or 1,
        # its own gradient vanishes and the map would go blank.
        fake_score = tf.matmul(tf.cast(head_features, "float32"), output_layer.kernel) + output_layer.bias
    gradients = tf.cast(tape.gradient(fake_score, features), "float32")
    features = tf.cast(features, "float32")
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    heatmaps = tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1)).numpy()
    peaks = heatmaps.max(axis=(1, 2), keepdims=True)
    return heatmaps / np.where(peaks > 0, peaks, 1)


def gradcam_file_names(paths):
    """A distinct overlay name for each image: its name, with its folder's name in front where two share it."""
    stems = [path.stem for path in paths]
    names = []
    for path, stem in zip(paths, stems):
        name = stem if stems.count(stem) == 1 else f"{path.parent.name}-{stem}"
        while f"{name}-gradcam.png" in names:
            name += "_"
        names.append(f"{name}-gradcam.png")
    return names


def write_gradcam_overlays(saved, paths, gradcam_dir, batch_size):
    """Draw one heat-map overlay per image into gradcam_dir; return their paths."""
    flow = prediction_flow(paths, saved.preprocess_input, saved.preprocessing, saved.img_size, batch_size)
    heatmaps = np.concatenate([grad_cam(saved.model, flow[index]) for index in range(len(flow))])
    return [
        save_gradcam_overlay(path, heatmap, gradcam_dir / name)
        for path, heatmap, name in zip(paths, heatmaps, gradcam_file_names(paths))
    ]


def refuse_writing_into_image_folders(folder, predicted_paths):
    """The images' folders are read, never written: refuse an output folder inside one of them."""
    folder = folder.resolve()
    for path in map(Path, predicted_paths):
        if path.is_dir() and (folder == path.resolve() or path.resolve() in folder.parents):
            raise UserError(f"--gradcam {folder} is inside the image folder {path}; choose a folder outside it")


def prediction_lines(paths, p_fake, threshold):
    """The table --predict prints: path, p(fake) and the verdict at the threshold."""
    verdicts = np.where(p_fake >= threshold, "fake", "real")
    return pd.DataFrame({"path": [str(path) for path in paths], "p_fake": p_fake, "verdict": verdicts})


def predict_images(recipe, args):
    """--predict: print p(fake) and a verdict for each image; train nothing and write only where asked."""
    if args.gradcam:
        refuse_writing_into_image_folders(args.gradcam, args.predict)
    if args.model == ENSEMBLE:
        models, weights = load_ensemble(args.output_dir, args.preprocessing)
    else:
        models, weights = [load_saved_model(saved_model_file(recipe, args), recipe, args.preprocessing)], [1.0]
    paths = readable_images(files_to_predict(args.predict))
    # Each model reads the images at its own size and with its own scaling.
    p_fake = 0
    for saved, weight in zip(models, weights):
        p_fake = p_fake + weight * predict_p_fake(saved, paths, args.batch_size)
    lines = prediction_lines(paths, p_fake, args.threshold)
    source = ", ".join(f"{saved.title} {weight:.2f}" for saved, weight in zip(models, weights))
    print(f"p(fake) from {source}; an image is called fake from p(fake) {args.threshold}")
    for line in lines.itertuples():
        print(f"{line.path}  p_fake={line.p_fake:.4f}  {line.verdict}")
    if args.csv:
        write_text_atomically(args.csv, lines.to_csv(index=False))
        print(f"Wrote {args.csv}")
    if args.gradcam:
        overlays = write_gradcam_overlays(models[0], paths, ensure_writable_folder(args.gradcam), args.batch_size)
        print(f"Wrote {len(overlays)} Grad-CAM overlays to {args.gradcam}")
    return 0


def evaluation_name(args, folder):
    """eval-<data folder>[-jpeg<Q>][-blur<SIGMA>]: a folder of its own for each evaluation."""
    source = Path(args.data_dir) if args.data_dir is not None else folder.parent
    name = f"{EVALUATION_PREFIX}{source.resolve().name}"
    if args.jpeg_quality is not None:
        name += f"-jpeg{args.jpeg_quality}"
    if args.blur is not None:
        name += f"-blur{args.blur}"
    return name


def evaluate_saved_model(recipe, args):
    """--evaluate: measure a saved model on another folder of real and fake faces, perhaps perturbed."""
    model_file = saved_model_file(recipe, args)
    folder = evaluation_folder(args.data_dir)
    eval_dir = ensure_writable_folder(args.output_dir / recipe.name / evaluation_name(args, folder))
    images = load_evaluation_images(folder, args.output_dir / ".cache", args.subset, args.seed)
    saved = load_saved_model(model_file, recipe, args.preprocessing)
    perturbation = None
    if args.jpeg_quality is not None or args.blur:
        perturbation = functools.partial(perturb, jpeg_quality=args.jpeg_quality, blur_sigma=args.blur)
    flow = evaluation_flow(images, saved.preprocess_input, saved.preprocessing, saved.img_size, args.batch_size, perturbation)
    predictions = predict_split(saved.model, flow, images)
    metrics = {
        "model": recipe.title,
        "model_file": str(model_file),
        "data_dir": str(folder),
        "jpeg_quality": args.jpeg_quality,
        "blur_sigma": args.blur,
        **classification_metrics(predictions, args.threshold),
    }
    figures = write_test_outputs(eval_dir, recipe.title, predictions, metrics)
    print(
        f"\n{recipe.title} on {folder} ({metrics['n_test']} images): accuracy {metrics['test_accuracy']:.4f}, "
        f"AUC {metrics['test_auc']:.4f}, AP {metrics['test_ap']:.4f}, EER {metrics['test_eer']:.4f}"
    )
    print(f"Wrote {eval_dir}/: metrics.json, predictions.csv, {', '.join(path.name for path in figures)}")
    return 0


# ---------------------------------------------------------------------------
# The story of one run
# ---------------------------------------------------------------------------


@exits_on_user_error
def fine_tune(recipe, argv=None):
    """Train, evaluate and report one model; return the process exit status.

    With --predict or --evaluate, apply the saved model instead, and train nothing.
    """
    args = parse_arguments(recipe, argv)
    if args.predict:
        return predict_images(recipe, args)
    if args.evaluate:
        return evaluate_saved_model(recipe, args)
    split_root = find_split_root(args.data_dir)
    args.data_dir = split_root.resolve()  # Recorded with the run's settings, so a resume uses the same data.
    # First, as MultiWorkerMirroredStrategy must be made before TensorFlow does any work.
    strategy = distribution_strategy(args.distribute)
    run_dir = ensure_writable_folder(args.output_dir / recipe.name)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(precision_policy(args.mixed_precision))

    # The model before the image check, so that a failed weights download stops the run early.
    # Made in the strategy's scope, its variables are mirrored on every replica.
    with strategy.scope():
        model = compile_model(build_model(recipe, args.weights, args.img_size, args.unfreeze_rule), args.learning_rate)
    print(
        f"{recipe.title}: training {len(trainable_conv_layer_names(model))} conv layers "
        f"({args.unfreeze_rule} rule) and the head, {count_trainable_parameters(model):,} parameters, "
        f"in {keras.mixed_precision.global_policy().name} on {strategy.num_replicas_in_sync} replica(s)"
    )
    try:
        dataset = load_dataset(split_root, args.output_dir / ".cache", args.subset, args.seed)
        report_bad_files(dataset.bad_files)
        flows = make_flows(
            dataset, recipe.preprocess_input, args.preprocessing, args.img_size, args.batch_size, args.seed, args.pipeline
        )
        if args.demo:
            print("Demo run on synthetic faces: its figures show that the pipeline works, they are not a benchmark.")
        train(model, flows, run_dir, args)
        best_model = load_best_model(run_dir, model)
        valid_predictions = predict_split(best_model, flows["valid"], dataset.images["valid"])
        predictions = predict_split(best_model, flows["test"], dataset.images["test"])
        metrics = write_run_outputs(run_dir, recipe, args, predictions, valid_predictions)
        table = write_results_table(args.output_dir)
    except KeyboardInterrupt:
        if len(read_history(run_dir / "history.csv")):
            print("\nInterrupted. Run the same command again to resume after the last finished epoch.")
        else:
            print("\nInterrupted before the first epoch finished; the same command starts it again.")
        return 130
    # Every output is written: the run is complete, and its backup is no longer needed.
    shutil.rmtree(run_dir / "backup", ignore_errors=True)

    print(f"\nTest accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}")
    print(f"Wrote {run_dir}/: {', '.join(RUN_OUTPUTS)}")
    print(f"Results so far ({args.output_dir / 'results.md'}):\n{table}")
    return 0


# ---------------------------------------------------------------------------
# python load_pre_trained_models.py
# ---------------------------------------------------------------------------


def load_recipes():
    """The four recipes, read from the per-model scripts.

    The scripts import this module in turn; run as a command, it is then loaded a second
    time under its own name, which is harmless.
    """
    return [importlib.import_module(script).RECIPE for script in MODEL_SCRIPTS]


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
    OneLineArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    for recipe in load_recipes():
        print(describe_freezing(recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
