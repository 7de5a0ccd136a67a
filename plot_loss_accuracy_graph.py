"""What a run writes for people: its curves, metrics and figures, --predict's lines and pictures, and the results table.

Every fine-tuning script calls this module as it finishes, and as it judges photos and
videos. In order, it holds:

1. the training curves, history.png, with the kept epoch marked and any warmup shaded;
2. the test metrics (accuracy, loss, AUC, AP, EER) and their figures: roc.png,
   precision_recall.png and confusion_matrix.png; the reliability diagram, calibration.png,
   and its expected calibration error; and the band of verdicts (real, uncertain, fake)
   chosen on the validation split;
3. the run's output files: metrics.json, predictions.csv, those figures, and the model
   card, README.md, that a model hub shows and --predict reads back;
4. what the detector finds (FaceResult, PictureResult, VideoResult, with their notes and
   Verdicts) and the words and CSV rows that say it;
5. what --predict prints and writes from those results (PredictionReport): its lines, its
   CSV, and the names of its pictures; and the CSV of --predict --cluster (ClusterCsv),
   whose rows come in any order, and are put in order at the end;
6. the Grad-CAM overlays of --gradcam, from heat maps that the model computed;
7. the faces marked on photos, and the contact sheets of videos, of --annotate;
8. the page of --serve (serve_page): a thin layer that shows, on a local Gradio page, what
   --predict's report makes of the files dropped on it;
9. the ensemble's weights, and the results table;
10. the command below.

Run on its own, it redraws OUTPUT_DIR/<model>/history.png for every trained model (every
folder with a history.csv), then rewrites OUTPUT_DIR/results.csv and
OUTPUT_DIR/results.md and prints the table:

    python plot_loss_accuracy_graph.py            # OUTPUT_DIR is outputs/
    python plot_loss_accuracy_graph.py outputs/demo

The table is rebuilt from each model's metrics.json, so a row is never lost: running
VGG19 after VGG16 adds a row, and running VGG16 again replaces its own. Once two or more
models have been tested on the same images, it also gets an Ensemble row: the weighted
average of their p(fake), computed from their predictions.csv, with nothing re-run.
"""

import contextlib
import csv
import dataclasses
import hashlib
import heapq
import importlib.metadata
import io
import itertools
import json
import math
import os
import reprlib
import shlex
import shutil
import stat
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Draw to files: training servers have no screen.
import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.axes_grid1 import make_axes_locatable
from sklearn import metrics as sklearn_metrics

from data_preprocessing import (
    CLASSES,
    DEFAULT_FRAMES,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEMO_OUTPUT_DIR,
    MODEL_SCRIPTS,
    OUTPUT_DIR,
    SPLITS,
    TEXT_ENCODING,
    OneLineArgumentParser,
    UserError,
    dataset_name,
    ensure_writable_folder,
    exits_on_user_error,
    locked,
    one_run_at_a_time,
    open_alone,
    photo_problem,
    pictures_lock_file,
    start_anew,
    printable,
    quiet_tensorflow_start,
    save_figure,
    warn_skipping,
    write_json_atomically,
    write_jpeg,
    write_text_atomically,
    writing,
)


# At 12 points and 100 dpi, about this many characters of a title fit in an inch of figure.
TITLE_CHARACTERS_PER_INCH = 8


def wrapped_title(title, what, width):
    """A figure's title, "<title>: <what>", in lines of at most `width` characters.

    A title too long for one line is wrapped, and what the figure shows gets a line of its
    own below it, so that it is never split.
    """
    one_line = f"{title}: {what}"
    if len(one_line) <= width:
        return one_line
    return textwrap.fill(title, width) + "\n" + textwrap.fill(what, width)


def set_wrapped_title(axis, title, what):
    """Title the axis with wrapped_title, at the width of its figure."""
    width = int(axis.figure.get_figwidth() * TITLE_CHARACTERS_PER_INCH)
    axis.set_title(wrapped_title(title, what, width))


# ---------------------------------------------------------------------------
# The training curves
# ---------------------------------------------------------------------------


def read_history(history_file):
    """The rows of a history.csv, one per epoch; empty if training stopped before any epoch."""
    try:
        history = pd.read_csv(history_file)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "seconds"])
    # A run stopped between writing an epoch's row and its backup repeats that epoch on resume.
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


# The phase column of history.csv names the epochs that trained the new head only.
WARMUP_PHASE = "warmup"


def kept_epoch(history):
    """The epoch, counted from 1, whose model ModelCheckpoint kept; None if no val_loss is a number.

    With save_best_only, ModelCheckpoint replaces model.keras only when val_loss improves,
    so of equal lowest values it keeps the first.
    """
    val_loss = pd.to_numeric(history["val_loss"], errors="coerce").to_numpy(float)
    finite = np.isfinite(val_loss)
    if not finite.any():
        return None
    # NaN counts as infinitely bad, as it never improves on a number; argmin takes the first minimum.
    return int(np.argmin(np.where(finite, val_loss, np.inf))) + 1


def warmup_epochs(history):
    """The epochs, counted from 1, that trained the head alone; none in a history without phases."""
    if "phase" not in history.columns:
        return []
    return [epoch for epoch, phase in enumerate(history["phase"], start=1) if phase == WARMUP_PHASE]


def shade_warmup(axis, epochs):
    """Shade each warmup epoch, so that the reader sees where the conv layers began to train."""
    for epoch in epochs:
        # One label for all the shaded epochs, so that the legend names them once.
        label = "warmup: head only" if epoch == epochs[0] else None
        axis.axvspan(epoch - 0.5, epoch + 0.5, color="gold", alpha=0.2, linewidth=0, label=label)


def mark_kept_epoch(axis, epoch, values):
    """A dotted line at the epoch whose model was kept, and a ring round its validation value."""
    axis.axvline(epoch, color="black", linestyle=":", label=f"kept: epoch {epoch} (lowest val_loss)")
    # A hollow ring, so that the validation point stays visible inside it.
    axis.plot(epoch, values[epoch - 1], "o", markersize=14, markerfacecolor="none", markeredgecolor="black")


def set_epoch_axis(axis, epoch_count):
    """Epochs 1 to epoch_count, with ticks on whole epochs only."""
    # Half an epoch of margin on each side gives even one epoch a whole number to tick,
    # and min_n_ticks=1 stops matplotlib from falling back to fractions of an epoch.
    axis.set_xlim(0.5, epoch_count + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axis.set_xlabel("epoch")


def history_figure(history, title):
    """The original's two panels, accuracy and loss per epoch, with the kept epoch marked."""
    # history.csv counts epochs from 0; the figure counts them from 1, as the training log does.
    epochs = np.arange(1, len(history) + 1)
    kept = kept_epoch(history)
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 5))
    for axis, metric in ((accuracy_axis, "accuracy"), (loss_axis, "loss")):
        shade_warmup(axis, warmup_epochs(history))
        axis.plot(epochs, history[metric], "o-", label=f"train {metric}")
        axis.plot(epochs, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        if kept is not None:
            mark_kept_epoch(axis, kept, history[f"val_{metric}"].to_numpy(float))
        set_wrapped_title(axis, title, metric)
        set_epoch_axis(axis, len(history))
        axis.set_ylabel(metric)
        axis.legend()
    return figure


def plot_history(history, path, title):
    """Draw the training curves of a history.csv's rows into `path`; return the path."""
    return save_figure(history_figure(history, title), path)


# ---------------------------------------------------------------------------
# Metrics and their figures
# ---------------------------------------------------------------------------


def true_labels(predictions):
    """1 for fake, 0 for real: fake is the positive class throughout."""
    return (predictions["label"] == "fake").to_numpy(int)


def equal_error_rate(labels, p_fake):
    """The error rate at the threshold where false positives and false negatives are equally frequent."""
    false_positive_rate, true_positive_rate, _ = sklearn_metrics.roc_curve(labels, p_fake)
    false_negative_rate = 1 - true_positive_rate
    # The ROC curve is a staircase: take its point closest to FPR = FNR, and the mean of the two there.
    closest = np.argmin(np.abs(false_positive_rate - false_negative_rate))
    return float((false_positive_rate[closest] + false_negative_rate[closest]) / 2)


def classification_metrics(predictions, threshold=0.5):
    """Accuracy, loss, AUC, AP, EER and the rest, with fake as the positive class."""
    with quiet_tensorflow_start():
        import keras  # Only for its loss; imported here so that this module loads fast.

    labels = true_labels(predictions)
    p_fake = predictions["p_fake"].to_numpy(float)
    predicted = (p_fake >= threshold).astype(int)
    both_classes = len(set(labels)) == 2
    return {
        "test_accuracy": float(sklearn_metrics.accuracy_score(labels, predicted)),
        # The same loss as training, so that Test Loss compares with val_loss.
        "test_loss": float(keras.losses.BinaryCrossentropy()(labels[:, None], p_fake[:, None])),
        # AUC, AP and EER rank the images by p(fake), so they need both classes.
        "test_auc": float(sklearn_metrics.roc_auc_score(labels, p_fake)) if both_classes else None,
        "test_ap": float(sklearn_metrics.average_precision_score(labels, p_fake)) if both_classes else None,
        "test_eer": equal_error_rate(labels, p_fake) if both_classes else None,
        "test_precision": float(sklearn_metrics.precision_score(labels, predicted, zero_division=0)),
        "test_recall": float(sklearn_metrics.recall_score(labels, predicted, zero_division=0)),
        # [[tn, fp], [fn, tp]]: rows are the true class, columns the predicted one.
        "confusion_matrix": sklearn_metrics.confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        "threshold": threshold,
        "n_test": int(len(labels)),
    }


def plot_roc(predictions, metrics, path, title):
    """The ROC curve, its AUC, and the equal error rate where it crosses the FPR = FNR line."""
    figure, axis = plt.subplots(figsize=(5, 5))
    # The title names the model and the images; the legend only needs the score.
    sklearn_metrics.RocCurveDisplay.from_predictions(
        true_labels(predictions), predictions["p_fake"], name="model", ax=axis, plot_chance_level=True
    )
    eer = metrics["test_eer"]
    # At the EER, FPR = EER and TPR = 1 - FNR = 1 - EER.
    axis.plot([eer], [1 - eer], "o", color="crimson", label=f"EER = {eer:.3f}")
    axis.legend(loc="lower right")
    set_wrapped_title(axis, title, "ROC curve (fake is positive)")
    return save_figure(figure, path)


def plot_precision_recall(predictions, path, title):
    """Precision against recall as the threshold on p(fake) falls, with its average precision."""
    figure, axis = plt.subplots(figsize=(5, 5))
    sklearn_metrics.PrecisionRecallDisplay.from_predictions(
        true_labels(predictions), predictions["p_fake"], name="model", ax=axis, plot_chance_level=True
    )
    set_wrapped_title(axis, title, "precision-recall curve")
    return save_figure(figure, path)


def plot_confusion_matrix(metrics, path, title):
    """How many images of each true class were called real or fake at the threshold."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
    display = sklearn_metrics.ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=CLASSES)
    display.plot(ax=axis, cmap="Blues", colorbar=False)
    set_wrapped_title(axis, title, f"confusion matrix at p(fake) {metrics['threshold']}")
    return save_figure(figure, path)


# The figures drawn from a model's predictions, beside its history.png.
EVALUATION_PLOTS = ("roc.png", "precision_recall.png", "confusion_matrix.png")


# Guo et al. (2017) measure the expected calibration error over this many equal bins of confidence.
CALIBRATION_BINS = 15


def calibration_bins(labels, p_fake, bins=CALIBRATION_BINS):
    """(mean confidence, accuracy, share of the images) in each non-empty bin of confidence.

    The confidence is the probability of the class called, max(p_fake, 1 - p_fake); the
    bins split 0 to 1 into equal parts, as Guo et al. (2017) count them.
    """
    labels, p_fake = np.asarray(labels), np.asarray(p_fake, float)
    confidence = np.maximum(p_fake, 1 - p_fake)
    correct = (p_fake >= 0.5).astype(int) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [
        (float(confidence[which == bin].mean()), float(correct[which == bin].mean()), float((which == bin).mean()))
        for bin in range(bins) if (which == bin).any()
    ]


def expected_calibration_error(labels, p_fake):
    """How far the confidence of the class called is from its accuracy, on average over the images (ECE)."""
    return float(sum(share * abs(accuracy - confidence) for confidence, accuracy, share in calibration_bins(labels, p_fake)))


def plot_calibration(labels, p_fake_before, p_fake_after, path, title):
    """The reliability diagram: accuracy against confidence, before and after temperature scaling."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0.5, 1], [0.5, 1], ":", color="grey", label="calibrated")
    for name, p_fake in (("before", p_fake_before), ("after temperature scaling", p_fake_after)):
        confidence, accuracy, _ = zip(*calibration_bins(labels, p_fake))
        ece = expected_calibration_error(labels, p_fake)
        axis.plot(confidence, accuracy, "o-", label=f"{name}: ECE {ece:.3f}")
    axis.set_xlim(0.5, 1.0)
    axis.set_ylim(0.0, 1.05)
    axis.set_xlabel("confidence: p of the class called")
    axis.set_ylabel("accuracy")
    axis.legend(loc="lower right")
    set_wrapped_title(axis, title, "reliability on the test split")
    return save_figure(figure, path)


# The band of --predict's verdicts, chosen on the validation split: below its low end at least
# this share of the faces are real, and from its high end up at least this share are fake.
BAND_PURITY = 0.95
# Each side holds at least this many validation faces, so that a few at either end cannot set it.
BAND_MIN_FACES = 20


def uncertain_band(labels, p_fake, purity=BAND_PURITY, min_faces=BAND_MIN_FACES):
    """The (real_below, fake_from) thresholds of --predict's verdicts, from the validation split.

    real_below is the highest score with at least `min_faces` faces below it, `purity` of
    them real; fake_from, the lowest score from real_below up with at least `min_faces`
    faces from it up, `purity` of them fake. Either is None where no score qualifies: a
    model that does not separate the classes calls every face uncertain.
    """
    order = np.argsort(p_fake, kind="stable")
    scores, fake = np.asarray(p_fake, float)[order], np.asarray(labels)[order]
    count = len(scores)
    # Each distinct score, as a threshold: the faces below it are the first `first` ones.
    firsts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    real_below_first = np.r_[0, np.cumsum(1 - fake)]
    fake_from_first = fake.sum() - np.r_[0, np.cumsum(fake)]
    real_side = [first for first in firsts if first >= min_faces and real_below_first[first] >= purity * first]
    lowest = real_side[-1] if real_side else 0
    fake_side = [
        first for first in firsts
        if first >= lowest and count - first >= min_faces and fake_from_first[first] >= purity * (count - first)
    ]
    real_below = float(scores[real_side[-1]]) if real_side else None
    fake_from = float(scores[fake_side[0]]) if fake_side else None
    return real_below, fake_from


def plot_evaluation(predictions, metrics, folder, title):
    """Draw EVALUATION_PLOTS into `folder`; return their paths."""
    folder = Path(folder)
    roc_file, precision_recall_file, confusion_matrix_file = (folder / name for name in EVALUATION_PLOTS)
    return [
        plot_roc(predictions, metrics, roc_file, title),
        plot_precision_recall(predictions, precision_recall_file, title),
        plot_confusion_matrix(metrics, confusion_matrix_file, title),
    ]


# ---------------------------------------------------------------------------
# The run's output files
# ---------------------------------------------------------------------------


# The model card, beside model.keras: a model hub shows it as the model's page.
MODEL_CARD = "README.md"
# The validation split's p(fake), beside the test split's predictions.csv: an ensemble's band is chosen on it.
VALID_PREDICTIONS = "valid_predictions.csv"
RUN_OUTPUTS = (
    "model.keras", MODEL_CARD, "history.csv", "history.png", "metrics.json", "predictions.csv", *EVALUATION_PLOTS,
    "calibration.png", VALID_PREDICTIONS,
)

# What the header of --predict, its pictures and metrics.json say of a model trained on the
# demo's drawn faces, and of a model without a card.
DEMO_MARK = "DEMO MODEL: trained on drawn faces; its verdicts on real photos mean nothing"
UNKNOWN_MARK = "UNKNOWN TRAINING DATA: no model card; what its verdicts are worth is unknown"

# --evaluate writes into OUTPUT_DIR/<model>/eval-<name>/, beside the training run's own outputs
# (a model from elsewhere: load_pre_trained_models.evaluations_folder).
EVALUATION_PREFIX = "eval-"


def write_test_outputs(folder, title, predictions, metrics):
    """predictions.csv, metrics.json and the ROC, precision-recall and confusion-matrix figures."""
    write_text_atomically(folder / "predictions.csv", predictions.to_csv(index=False))
    write_json_atomically(folder / "metrics.json", metrics)
    return plot_evaluation(predictions, metrics, folder, title)


def write_run_outputs(run_dir, recipe, training, dataset, predictions, valid_predictions, calibration):
    """metrics.json, predictions.csv, history.png, the test figures and the model card for one run; return the metrics.

    `training` is the run's TrainingSettings. The predictions are calibrated; `calibration` gives the temperature, and the test split's
    p(fake) before it was applied.
    """
    history = read_history(run_dir / "history.csv")
    metrics = {
        "model": recipe.title,
        "name": recipe.name,
        "trained_on": "the synthetic demo faces" if training.demo_data else dataset_name(dataset.split_root),
        "images": {split: len(dataset.images[split]) for split in SPLITS},
        "demo_model": bool(training.demo_data),
        **({"warning": DEMO_MARK} if training.demo_data else {}),
        **classification_metrics(predictions),
        "valid_auc": float(sklearn_metrics.roc_auc_score(true_labels(valid_predictions), valid_predictions["p_fake"])),
        "epochs_run": int(len(history)),
        "img_size": training.img_size,
        "weights": training.weights,
        "preprocessing": training.preprocessing,
        "unfreeze_rule": training.unfreeze_rule,
        "learning_rate": training.learning_rate,
        "warmup_epochs": training.warmup_epochs,
        "fine_tune_learning_rate": training.fine_tune_learning_rate,
        "pipeline": training.pipeline,
        "mixed_precision": training.mixed_precision,
        "distribute": training.distribute,
        # Summed over the epochs in history.csv, so a resumed run counts every session.
        "train_seconds": round(float(history["seconds"].sum()), 1),
        **calibration_metrics(predictions, valid_predictions, calibration),
    }
    metrics["learned_nothing"] = learned_nothing(recipe, training, metrics)
    write_test_outputs(run_dir, recipe.title, predictions, metrics)
    write_text_atomically(run_dir / VALID_PREDICTIONS, valid_predictions.to_csv(index=False))
    plot_history(history, run_dir / "history.png", recipe.title)
    labels = true_labels(predictions)
    plot_calibration(labels, calibration["test_p_fake_before"], predictions["p_fake"], run_dir / "calibration.png", recipe.title)
    write_text_atomically(run_dir / MODEL_CARD, model_card(recipe, training, metrics))
    return metrics


# A test AUC this close to 0.5 ranks the faces little better than a coin would.
CHANCE_AUC_MARGIN = 0.05


def learned_nothing(recipe, training, metrics):
    """Why a run's test metrics show that it learned nothing, and what to try; None where it learned something.

    A model that calls every test image by one class, or whose test AUC is within
    CHANCE_AUC_MARGIN of chance, has learned nothing worth using yet, though its accuracy
    may read 0.5 and nothing failed.
    """
    (true_real, false_fake), (false_real, true_fake) = metrics["confusion_matrix"]
    auc = metrics["test_auc"]
    if true_fake + false_fake == 0 or true_real + false_real == 0:
        what = f"it called every test image {'real' if true_fake + false_fake == 0 else 'fake'} at p(fake) {metrics['threshold']}"
        if auc is not None and auc > 0.5 + CHANCE_AUC_MARGIN:
            # Its scores rank the faces, but have not yet moved apart across the threshold.
            what += f", though its test AUC of {auc:.3f} says that it has begun to rank them"
    elif auc is not None and abs(auc - 0.5) <= CHANCE_AUC_MARGIN:
        what = f"its test AUC, {auc:.3f}, is within {CHANCE_AUC_MARGIN} of chance (0.5)"
    else:
        return None
    if training.demo_data and training.weights == "none":
        # The demo trains from random weights, briefly: a deep net may not get going in that time.
        other = "" if recipe.title == "VGG16" else ", or VGG16"
        return f"{what}. {recipe.title} from random weights learns little in {metrics['epochs_run']} epochs of the demo; try --epochs 15{other}"
    return (f"{what}. Try more --epochs, --warmup-epochs 2 to train the head before the base, or a lower --learning-rate; "
            "and check the data (python data_preprocessing.py counts each class and lists bad files)")


def calibration_metrics(predictions, valid_predictions, calibration):
    """The temperature, the test split's ECE before and after it, and the band of --predict's verdicts."""
    labels = true_labels(predictions)
    real_below, fake_from = uncertain_band(true_labels(valid_predictions), valid_predictions["p_fake"].to_numpy(float))
    return {
        "temperature": calibration["temperature"],
        # Whether the temperature was fitted, or kept at 1 on a validation split too small, and why.
        "calibrated": calibration.get("skipped") is None,
        "calibration_skipped": calibration.get("skipped"),
        "test_ece_before_calibration": expected_calibration_error(labels, calibration["test_p_fake_before"]),
        "test_ece": expected_calibration_error(labels, predictions["p_fake"]),
        "real_below": real_below,
        "fake_from": fake_from,
    }


def model_card(recipe, training, metrics):
    """The model card: YAML front matter that a model hub reads, then what the model is, what it was
    trained on, how it scored on its test split, what it cannot judge, and how it was made."""
    calibrated = metrics["calibrated"]
    test_metrics = [
        ("accuracy", "test_accuracy", "Test accuracy"), ("roc_auc", "test_auc", "Test AUC"), ("eer", "test_eer", "Test EER"),
        ("ece", "test_ece", "Test ECE, calibrated" if calibrated else "Test ECE"),
    ]
    front = {
        "library_name": "keras",
        "pipeline_tag": "image-classification",
        "tags": ["keras", "image-classification", "deepfake-detection", recipe.name],
        "model-index": [{
            "name": f"{recipe.name}_deepfake_detector",
            "results": [{
                "task": {"type": "image-classification", "name": "Real or StyleGAN-fake face"},
                "dataset": {"name": metrics["trained_on"], "type": "faces", "split": "test"},
                "metrics": [{"type": kind, "name": name, "value": metrics[key]} for kind, key, name in test_metrics],
            }],
        }],
        # Read back by --predict, to say whose verdicts it prints.
        "deepfake_detector": {
            key: metrics[key] for key in ("model", "trained_on", "demo_model", "test_auc", "img_size", "real_below", "fake_from")
        },
    }
    images = ", ".join(f"{count} {split}" for split, count in metrics["images"].items())
    warmup = f"the head alone for {counted(training.warmup_epochs, 'epoch')} at {training.learning_rate}, then " if training.warmup_epochs else ""
    fine_tuning_epochs = counted(metrics["epochs_run"] - training.warmup_epochs, "epoch")
    trained = (
        f"its last {recipe.trainable_conv_layers} conv layers trained and batch normalization frozen"
        if metrics["unfreeze_rule"] == "conv"
        else f"its last {recipe.original_trainable_layers} Keras layers trained, as the original code did"
    )
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {recipe.title} deepfake detector", "",
        *([f"> **{DEMO_MARK}.**", ""] if metrics["demo_model"] else []),
        "It gives p(fake), the probability that a face is a StyleGAN fake rather than a real photograph.", "",
        "## The model", "",
        f"- Base: {recipe.title}, from {starting_weights(metrics['weights'])}, with {trained}.",
        f"- Input: {metrics['img_size']}x{metrics['img_size']} RGB pixels, 0 to 255, scaled inside the model "
        f"({metrics['preprocessing']} preprocessing).",
        "- Head: average pooling, Dense 1024 ReLU, dropout 0.5, a logit divided by the temperature T, a sigmoid p(fake).",
        f"- Training with Adam: {warmup}{fine_tuning_epochs} at {training.fine_tune_learning_rate}; "
        "the kept model has the lowest validation loss.", "",
        "## Trained on", "",
        f"{images} images of {metrics['trained_on']}.", "",
        "## Test metrics", "",
        "| Metric | Value |", "|---|---|",
        *(f"| {name} | {metrics[key]:.4f} |" for _, key, name in test_metrics if metrics[key] is not None),
        *([f"| Test ECE, before calibration | {metrics['test_ece_before_calibration']:.4f} |"] if calibrated else []), "",
        *(["Here the test ECE is worse after calibration: one temperature cannot mend a model whose errors are "
           "not over- or under-confidence alone, and a small validation split fits it roughly.", ""]
          if metrics["test_ece"] > metrics["test_ece_before_calibration"] else []),
        ("p(fake) is calibrated: a temperature of "
         f"{metrics['temperature']:.3f}, fitted on the validation split (Guo et al., 2017), scales the logit inside the model."
         if calibrated else f"p(fake) is not calibrated: {metrics['calibration_skipped']}; its temperature stays 1."), "",
        "## Verdicts", "",
        verdicts_sentence(metrics["real_below"], metrics["fake_from"]), "",
        "## What it cannot judge", "",
        "- Anything but a face: `--predict` finds the faces and cuts each out as the dataset frames its faces; "
        "a picture without one gets no verdict.",
        "- Faces from generators it never saw, or edited faces: it learned "
        + ("drawn demo faces only." if metrics["demo_model"] else "FFHQ photographs against StyleGAN faces only."),
        "", "## How it was made", "",
        f"`{shlex.join(['python', *sys.argv])}`, with TensorFlow {package_version('tensorflow')} and "
        f"Keras {package_version('keras')}.", "",
        "## Use", "",
        f"`python {MODEL_SCRIPTS[recipe.name]} --predict photo.jpg --model FOLDER`, FOLDER holding this card and "
        "model.keras;",
        "from Python, `Detector.load(\"FOLDER\").judge(\"photo.jpg\")` (load_pre_trained_models.py, beside the script);",
        "or, in plain Keras, `keras.models.load_model(\"model.keras\")`, fed face crops framed as the dataset frames them, "
        "RGB pixels 0 to 255.", "",
    ]
    return "\n".join(lines)


def verdicts_sentence(real_below, fake_from):
    """What the card says of the band of --predict's verdicts."""
    rule = (
        f"a threshold is set only where at least {BAND_PURITY:.0%} of at least {BAND_MIN_FACES} validation faces "
        "beyond it are of one class: real below the low one, fake from the high one"
    )
    if real_below is None and fake_from is None:
        return (f"`--predict` calls every face uncertain: no threshold met the rule ({rule}). "
                "`--threshold T` gives a two-way verdict at T.")
    return f"`--predict`'s verdicts: {Verdicts(real_below, fake_from)}. Here {rule}."


def starting_weights(weights):
    """Where the base's weights came from, in words: --weights imagenet, none or a file."""
    return {"imagenet": "ImageNet weights", "none": "random weights"}.get(weights, f"the weights in {Path(weights).name}")


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_model_card(model_file):
    """What the card beside a model file says of it (its "deepfake_detector" block), or None without a card."""
    front, _ = read_card(model_file)
    return front.get("deepfake_detector") if isinstance(front, dict) else None


def read_card(model_file):
    """The card beside a model file: its front matter (None without one) and the text after it ("" without a card)."""
    try:
        text = Path(model_file).with_name(MODEL_CARD).read_text()
        if not text.startswith("---\n"):
            return None, text
        _, front, body = text.split("---\n", 2)
        return yaml.safe_load(front), body
    # A card that is not UTF-8 raises a ValueError, and one nested thousands deep a RecursionError.
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return None, ""


def write_card_section(model_file, heading, lines, front_key, front_value):
    """Put a section in the card beside a model file, in place of any earlier one of that heading, and its
    figures under `front_key` in the front matter, where a model hub reads them."""
    front, body = read_card(model_file)
    front = {**front, front_key: front_value}
    marker = f"\n## {heading}\n"
    if marker in body:
        before, after = body.split(marker, 1)
        # The section ends where the next one begins, or with the card.
        next_section = after.find("\n## ")
        body = before + ("" if next_section < 0 else after[next_section:])
    body = body.rstrip("\n") + "\n" + marker + "\n" + "\n".join(lines) + "\n"
    text = "\n".join(["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---"]) + "\n" + body
    write_text_atomically(Path(model_file).with_name(MODEL_CARD), text)


def not_text(value):
    return None if isinstance(value, str) else "is not text"


def not_true_or_false(value):
    return None if isinstance(value, bool) else "is not true or false"


def not_a_positive_whole_number(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "is not a whole number above 0"


def not_a_finite_number(value):
    # YAML and JSON read true as a bool, and a bool is an int in Python: it must not pass as a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    return None if math.isfinite(value) else "is not a finite number"


def not_a_share(value):
    """Why `value` is not a number from 0 to 1 (a threshold, an AUC), or None if it is one."""
    return not_a_finite_number(value) or (None if 0 <= value <= 1 else "is not between 0 and 1")


def not_a_loss_or_none(value):
    return None if value is None else not_a_finite_number(value) or (None if value >= 0 else "is below 0")


def not_a_share_or_none(value):
    return None if value is None else not_a_share(value)


# The card's deepfake_detector block, as --predict trusts it: each field, how it is checked, and
# whether it may be absent. Cards written before the band was chosen have no real_below or fake_from.
CARD_FIELDS = {
    "model": (not_text, "required"),
    "trained_on": (not_text, "required"),
    "demo_model": (not_true_or_false, "required"),
    "test_auc": (not_a_share_or_none, "required"),
    "img_size": (not_a_positive_whole_number, "required"),
    "real_below": (not_a_share_or_none, "optional"),
    "fake_from": (not_a_share_or_none, "optional"),
}


def fields_problem(block, fields, prefix=""):
    """Why the fields of a dict read from a file do not pass their checks (a table such as CARD_FIELDS),
    naming the first field that fails, its value (shortened) and why; None if they all pass."""
    for name, (problem_of, presence) in fields.items():
        if name not in block:
            if presence == "required":
                return f"{prefix}{name} is missing"
            continue
        problem = problem_of(block[name])
        if problem:
            return f"{prefix}{name} {reprlib.repr(block[name])} {problem}"
    return None


def card_problem(card):
    """Why a card's deepfake_detector block cannot be trusted, naming the field; None if it can."""
    if not isinstance(card, dict):
        return f"deepfake_detector is {reprlib.repr(card)}, not a block of fields"
    problem = fields_problem(card, CARD_FIELDS, "deepfake_detector.")
    if problem:
        return problem
    real_below, fake_from = card.get("real_below"), card.get("fake_from")
    if real_below is not None and fake_from is not None and real_below > fake_from:
        # Faces would be called real above the score from which others are called fake.
        return f"deepfake_detector.real_below {real_below} is above its fake_from {fake_from}"
    return None


# ---------------------------------------------------------------------------
# What the detector finds: its results, and the words and rows that say them
# ---------------------------------------------------------------------------


# Why a face, or a whole picture, has no verdict, as a result's note and the CSV say it.
NO_FACE = "no face"
FACE_TOO_SMALL = "face too small"
FACE_AT_BORDER = "face cut by the border"
FRAME_NOT_DECODED = "frame not decoded"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Verdicts:
    """How a p(fake) becomes a verdict: real below `real_below`, fake from `fake_from`, uncertain between.

    --threshold T gives the two-way verdict, Verdicts(T, T). Otherwise the band comes from
    the model's card, chosen on its validation split (uncertain_band); a side without a
    threshold (None) gives no such verdict.
    """

    real_below: float | None
    fake_from: float | None
    why_no_band: str = "the model's card gives no band"

    def __call__(self, p_fake):
        if self.real_below is not None and p_fake < self.real_below:
            return "real"
        if self.fake_from is not None and p_fake >= self.fake_from:
            return "fake"
        return "uncertain"

    def thresholds(self):
        return sorted({value for value in (self.real_below, self.fake_from) if value is not None})

    def __str__(self):
        """The band in a sentence that a newcomer reads once."""
        if self.real_below is None and self.fake_from is None:
            return f"uncertain whatever the score, as {self.why_no_band}; --threshold T gives real under T, fake from T up"
        if self.real_below == self.fake_from:
            return f"real where p(fake) is under {self.fake_from:g}, fake from {self.fake_from:g} up"
        if self.fake_from is None:
            return (f"real where p(fake) is under {self.real_below:.3f}, uncertain above it (no score was high enough "
                    "to call a validation face fake)")
        if self.real_below is None:
            return (f"fake where p(fake) is {self.fake_from:.3f} or more, uncertain below it (no score was low enough "
                    "to call a validation face real)")
        return f"real where p(fake) is under {self.real_below:.3f}, fake where it is {self.fake_from:.3f} or more, uncertain in between"


@dataclass
class FaceResult:
    """A face found in a picture and its verdict; or, where faces are not searched, the whole picture.

    A face without a p_fake says why in its note: FACE_TOO_SMALL or FACE_AT_BORDER.
    """

    number: int | None  # 1, 2, ... in reading order (see data_augmentation.in_reading_order); None for a whole picture.
    box: tuple | None = None  # MTCNN's box around the face, (x, y, width, height) in the picture's pixels.
    face_frame: object = None  # The FaceFrame the face is cut out in, as the dataset frames its faces.
    confidence: float | None = None  # MTCNN's.
    mirrored: float | None = None  # The share of the face's frame past the picture's edge, which the crop mirrors.
    p_fake: float | None = None
    verdict: str | None = None  # "real", "uncertain" or "fake", from the detector's band.
    note: str | None = None
    frame: int | None = None  # The index of the video frame it was seen in; None in a photo.
    crop: np.ndarray | None = field(default=None, repr=False)  # What was scored: the face cut out at 256x256, or the picture.
    heatmap: np.ndarray | None = field(default=None, repr=False)  # With Grad-CAM: its map of the crop, 0 to 1.
    heatmap_of: str | None = None  # With Grad-CAM: whose evidence its map shows, "real" or "fake" (that of its verdict).

    @property
    def width(self):
        """The face's width in pixels, as MTCNN's box gives it; None for a whole picture."""
        return None if self.box is None else self.box[2]


@dataclass
class PictureResult:
    """A photo, or one frame of a video, judged: a result per face found (or one for the whole picture), or
    the note that says why nothing in it was judged (NO_FACE, UNREADABLE or FRAME_NOT_DECODED).

    It also carries whose verdicts these are: the model's `mark` (DEMO_MARK or UNKNOWN_MARK,
    None for a model with a card), and the `band` they were given with.
    """

    path: Path | None  # None for pixels handed over in memory.
    faces: list
    band: Verdicts
    mark: str | None = None
    model: str | None = None  # The model that judged it, with its mark, as the CSV names it.
    note: str | None = None
    reason: str | None = None  # Why an UNREADABLE input could not be read.
    frame: int | None = None  # Its index in a video; None for a photo.
    min_face: int | None = None  # The narrowest face judged; None where faces are not searched.
    warnings: list = field(default_factory=list)  # What a command line prints as a warning.
    image: np.ndarray | None = field(default=None, repr=False)  # The upright RGB pixels judged, to draw on.

    def rows(self):
        """Its rows of the CSV: one per face, or one that gives its note."""
        return [csv_row(self, face) for face in self.faces] or [csv_row(self, None)]

    def lines(self):
        """Its lines, as --predict prints them: one per face, or one that says why nothing was judged."""
        return [printed_line(self, face) for face in self.faces] or [printed_line(self, None)]


@dataclass
class VideoResult:
    """A video, or an animated GIF or WebP, judged on sampled frames.

    Its p_fake is the mean over the frames of the face seen most (`followed`, each of its
    sightings, judged or not), or of the whole frames where faces are not searched; None,
    with a `note` (NO_FACE, FACE_TOO_SMALL, FACE_AT_BORDER, UNREADABLE), where nothing in it could be judged.
    """

    path: Path
    frames: list  # A PictureResult per frame sampled, in order, without its pixels.
    band: Verdicts
    mark: str | None = None
    model: str | None = None
    followed: list = field(default_factory=list)
    p_fake: float | None = None
    verdict: str | None = None
    note: str | None = None
    reason: str | None = None  # Why an UNREADABLE video could not be read.
    frames_read: int = 0
    frames_wanted: int = 0
    min_face: int | None = None
    warnings: list = field(default_factory=list)

    def rows(self):
        """Its own row of the CSV, after its frames' rows: its p_fake and verdict, with no frame and no face."""
        return [dict(path=str(self.path), p_fake=self.p_fake, verdict=self.verdict, note=video_note(self), model=self.model)]


@dataclass(frozen=True)
class WhoseVerdicts:
    """What a model's card says of it: a line on whose verdicts these are, the mark they carry
    (DEMO_MARK, UNKNOWN_MARK or None), and the band they are given with."""

    line: str
    mark: str | None
    band: Verdicts


def whose_verdicts(title, model_file):
    """WhoseVerdicts of a model, from the card beside its file (or from its absence).

    A card that fails its check (card_problem) decides nothing: it is named in a warning, and the
    model is judged as one without a card.
    """
    card = read_model_card(model_file)
    problem = None if card is None else card_problem(card)
    if problem:
        card_file = Path(model_file).with_name(MODEL_CARD)
        print(f"warning: {printable(card_file)}: {problem}; the card is set aside, and the model's verdicts "
              "are marked as of unknown training data", file=sys.stderr)
        return WhoseVerdicts(f"{title} ({model_file}). {UNKNOWN_MARK}", UNKNOWN_MARK, Verdicts(None, None, "the model's card was set aside"))
    if card is None:
        return WhoseVerdicts(f"{title} ({model_file}). {UNKNOWN_MARK}", UNKNOWN_MARK, Verdicts(None, None))
    auc = "-" if card.get("test_auc") is None else f"{card['test_auc']:.3f}"
    line = f"{title} ({model_file}), trained on {card['trained_on']}, test AUC {auc}"
    band = Verdicts(card.get("real_below"), card.get("fake_from"))
    return WhoseVerdicts(f"{line}. {DEMO_MARK}", DEMO_MARK, band) if card.get("demo_model") else WhoseVerdicts(line, None, band)


def part_of_input(frame, face):
    """Which part of the input a line is about: the frame, and the face (its width, as MTCNN's box gives it, and
    the square it is cut out in, the crop); empty for a whole photo."""
    parts = [] if frame is None else [f"frame {frame}"]
    if face is None or face.number is None:
        return " ".join(parts)
    x, y, size = face.face_frame.square
    parts.append(f"face {face.number}, {face.width:.0f} px wide, crop {size} px at {x},{y}")
    return " ".join(parts)


def judgement(picture, face):
    """What a line says of a face (or of the picture, for face None): p_fake and the verdict, or why it was not judged."""
    if face is None:
        return {
            NO_FACE: "no face found: not judged (--faces off scores the whole image)",
            FRAME_NOT_DECODED: "not judged: the frame could not be decoded",
            UNREADABLE: "not judged: the file could no longer be read",
        }[picture.note]
    if face.note == FACE_TOO_SMALL:
        return f"too small to judge: under --min-face {picture.min_face} px"
    if face.note == FACE_AT_BORDER:
        return f"not judged: {face.mirrored:.0%} of its crop is past the picture's edge, too much to fill by mirroring"
    said = f"p_fake={face.p_fake:.4f}  {face.verdict}"
    if face.mirrored and face.mirrored >= MIRRORED_SHARE_SHOWN:
        said += f"  ({face.mirrored:.0%} of its crop mirrored past the edge)"
    return said + marked_verdict(picture.mark)


def marked_verdict(mark):
    """After a verdict of a model without a card, or of the demo's: what its mark says, in short."""
    return f"  ({mark.split(':')[0]})" if mark else ""


def printed_line(picture, face):
    """A line as --predict prints it: path, what part, p_fake=..., verdict; or why it was not judged."""
    path = "" if picture.path is None else printable(picture.path)
    return "  ".join(part for part in (path, part_of_input(picture.frame, face), judgement(picture, face)) if part)


def video_line(video):
    """A video's own line: its p_fake and verdict, and what they rest on; or why it was not judged."""
    if video.p_fake is None:
        return f"{printable(video.path)}  video  not judged: {why_video_not_judged(video)} ({frames_read(video)})"
    faces_scored = sum(face.number is not None and face.p_fake is not None for frame in video.frames for face in frame.faces)
    counts = f"{frames_read(video)}, {faces_scored} faces scored; {video_basis(video)}"
    return f"{printable(video.path)}  video  p_fake={video.p_fake:.4f}  {video.verdict}  ({counts})" + marked_verdict(video.mark)


def frames_read(video):
    return f"{video.frames_read} of {video.frames_wanted} frames read"


def why_video_not_judged(video):
    if video.note == FACE_TOO_SMALL:
        return f"the face seen most was under --min-face {video.min_face} or cut by the border in every frame"
    return "no face found in any frame" if video.min_face is not None else "no frame could be scored"


def video_basis(video):
    """What a video's p_fake is the mean of: the whole frames, or the face seen most, and how often it was not judged."""
    if video.min_face is None:
        return "the whole frames"
    basis = f"the face seen most, in {counted(len(video.followed), 'frame')}"
    for note, why in ((FACE_TOO_SMALL, "too small to judge"), (FACE_AT_BORDER, "cut by the border")):
        count = sum(face.note == note for face in video.followed)
        basis += f", {count} of them {why}" if count else ""
    return basis


def video_note(video):
    """The note of a video's own row: how many frames its verdict rests on, or why it has none."""
    if video.p_fake is None:
        return f"video not judged: {why_video_not_judged(video)} ({frames_read(video)})"
    return f"video: {frames_read(video)}; p_fake is the mean over {video_basis(video)}"


def counted(count, thing):
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


# A face's line says how much of its frame was mirrored from this share on (it prints 1% and up).
MIRRORED_SHARE_SHOWN = 0.005

# The CSV that --csv writes, in this order: a row per face, per picture without one, and per
# input that could not be read, so that every input is accounted for.
CSV_COLUMNS = (
    "path", "frame", "face", "crop_x", "crop_y", "crop_size", "mirrored", "confidence", "p_fake", "verdict", "note", "model",
)


def csv_row(picture, face):
    """A row of the CSV, for a face of a picture, or for the picture itself (face None), which then gives its note."""
    if face is None:
        return dict(path=str(picture.path), frame=picture.frame, note=picture.note, model=picture.model)
    crop_x, crop_y, crop_size = (None, None, None) if face.face_frame is None else face.face_frame.square
    return dict(
        path=str(picture.path),
        frame=picture.frame,
        face=face.number,
        crop_x=crop_x,
        crop_y=crop_y,
        crop_size=crop_size,
        mirrored=None if face.mirrored is None else round(face.mirrored, 3),
        confidence=face.confidence,
        p_fake=face.p_fake,
        verdict=face.verdict,
        note=face.note,
        model=picture.model,
    )


def csv_cells(row):
    """A row of --csv in the order of CSV_COLUMNS: whole numbers as such, every digit of a float, empty for None."""
    return ["" if row.get(column) is None else row[column] for column in CSV_COLUMNS]


# ---------------------------------------------------------------------------
# What --predict prints and writes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportSettings:
    """Where --predict writes, besides its lines: the CSV, the folder of annotated pictures, the folder of Grad-CAM overlays;
    and how many frames of each video it is handed."""

    csv: Path | None = None
    annotate: Path | None = None
    gradcam: Path | None = None
    # Frames sampled from each video: --annotate keeps small copies of those its contact sheet shows only.
    frames: int = 32


class PredictionReport:
    """What --predict prints and writes, input by input, from the detector's results: a line per face,
    a row of the CSV, and the pictures of --annotate and --gradcam; `finish` says what was written.

    Where each output goes was checked with the options, before any image was read; each
    is locked before the model loads, and the CSV written from the start once it has loaded
    (`start`). The CSV grows row by row, so that a run stopped halfway keeps what it judged.
    """

    def __init__(self, settings, inputs):
        self.settings = settings
        self.names = output_names(inputs)  # What each input's pictures are called.
        self.csv_file, self.csv_rows = None, 0
        self.pictures = {}  # The path of each picture written so far, and its kind: "annotated" or "gradcam".
        self.thumbnails = {}  # With --annotate: each video's sampled frames, small, for its contact sheet.
        self.model = None  # The model that judges, as the CSV names it.
        self.tally = Counter()  # The verdicts given, and why others were not, for the closing count.
        self.files = 0
        self.frames_seen = {}  # The position of the last frame reported, of each video.
        self.shown = set(shown_frame_positions(settings.frames))  # Those positions a contact sheet shows.
        self.csv_created = bool(settings.csv) and not Path(settings.csv).exists()
        # One run at a time writes each output: a second one, given the same, stops at once.
        self.locks = contextlib.ExitStack()
        try:
            self.lock_picture_folders()
            if settings.csv:
                self.open_csv()
        except BaseException:
            self.locks.close()
            raise

    def lock_picture_folders(self):
        """Hold the lock of each folder of pictures (--annotate and --gradcam may name one folder)."""
        folders = {}
        for folder, option in ((self.settings.annotate, "--annotate"), (self.settings.gradcam, "--gradcam")):
            if folder:
                folders.setdefault(Path(folder).resolve(), (folder, option))
        for folder, option in folders.values():
            self.locks.enter_context(one_run_at_a_time(folder, option, pictures_lock_file(folder)))

    def open_csv(self):
        """Open --csv, locked; what it held stays until `start`."""
        try:
            self.csv_file = open_alone(self.settings.csv, "--csv")
        except OSError as error:
            raise UserError(f"cannot write --csv {self.settings.csv} ({error.strerror}); name another file") from None

    def start(self, model):
        """Once the `model` that judges has loaded: write the CSV anew, from its header."""
        self.model = model
        if self.csv_file is not None:
            start_anew(self.csv_file)
            self.csv_created = False
            self.write_csv_cells(CSV_COLUMNS)

    def photo(self, picture):
        """Report a photo's lines, mark its faces (--annotate) and draw their overlays (--gradcam)."""
        self.files += 1
        self.tally.update(face.verdict or face.note for face in picture.faces)
        self.tally.update([picture.note] if picture.note else [])
        self.print_lines(picture)
        if self.settings.annotate and picture.image is not None:
            marked = self.output_file(self.settings.annotate, f"{self.names[picture.path]}-faces.jpg", "annotated")
            save_annotated_image(picture.image, picture, marked)
        self.overlays(picture)

    def frames(self, pictures):
        """Report a batch of a video's frames as soon as they are judged: their lines, their overlays (--gradcam),
        and with --annotate a small copy of each frame that the contact sheet shows (shown_frame_positions)."""
        for picture in pictures:
            self.print_lines(picture)
            self.overlays(picture)
            position = self.frames_seen[picture.path] = self.frames_seen.get(picture.path, -1) + 1
            if self.settings.annotate and picture.image is not None and position in self.shown:
                scale = THUMBNAIL_WIDTH / picture.image.shape[1]
                thumbnail = cv2.resize(picture.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                self.thumbnails.setdefault(picture.path, []).append((picture.frame, thumbnail, scale))

    def video(self, video):
        """Report a video's own line, once its frames are reported, and draw its contact sheet (--annotate)."""
        self.say(video_line(video))
        for row in video.rows():
            self.add_row(row)
        self.files += 1
        self.tally.update([video.verdict or video.note])
        if self.settings.annotate:
            sheet = self.output_file(self.settings.annotate, f"{self.names[video.path]}-frames.png", "annotated")
            save_contact_sheet(self.thumbnails.pop(video.path, []), video, sheet)

    def print_lines(self, picture):
        """Print a picture's lines, and keep each as a row of the CSV."""
        for line in picture.lines():
            self.say(line)
        for row in picture.rows():
            self.add_row(row)

    def say(self, line):
        """Print a line of the report (the page keeps it instead)."""
        print(line)

    def output_file(self, folder, name, kind):
        """The path in `folder` of a picture of `kind`, which no other picture of this run has taken:
        each picture counted is a file (a failed write ends the run)."""
        path, number = folder / name, 2
        while path in self.pictures:
            path, number = folder / f"{Path(name).stem}~{number}{Path(name).suffix}", number + 1
        self.pictures[path] = kind
        return path

    def unreadable(self, path, reason=None):
        """An input that could not be read (its warning, which gives the `reason`, is printed already): a row of its own in the CSV."""
        self.files += 1
        self.tally.update([UNREADABLE])
        self.add_row(dict(path=str(path), note=UNREADABLE, model=self.model))

    def add_row(self, row):
        """Write a row of --csv: each row is on disk once this returns."""
        if self.settings.csv:
            self.write_csv_cells(csv_cells(row))
            self.csv_rows += 1

    def write_csv_cells(self, cells):
        """Write one row of --csv whole, or not at all (write_rows_whole)."""
        write_rows_whole(self.csv_file, self.settings.csv, [cells])

    def stop(self):
        """Close the CSV; return a sentence that says what it holds, or an empty one without --csv."""
        if self.csv_file is not None and not self.csv_file.closed:
            with contextlib.suppress(OSError):  # A full disk: the rows that fitted are in the file.
                self.csv_file.close()
            if self.csv_created:  # Made to be locked, but the run stopped before writing it.
                Path(self.settings.csv).unlink(missing_ok=True)
        self.locks.close()
        return f"{self.settings.csv} holds {counted(self.csv_rows, 'row')}." if self.settings.csv else ""

    def overlays(self, picture):
        """--gradcam: draw each scored face's heat map over what was scored."""
        if not self.settings.gradcam:
            return
        for face in [face for face in picture.faces if face.heatmap is not None]:
            overlay = self.output_file(self.settings.gradcam, f"{self.names[picture.path]}{gradcam_part(picture.frame, face)}-gradcam.png", "gradcam")
            save_gradcam_overlay(face.crop, face.heatmap, overlay, face.p_fake, face.verdict, mark=picture.mark,
                                 evidence_for=face.heatmap_of or "fake")

    def count_line(self):
        return count_line(self.files, self.tally)

    def finish(self):
        """Close the CSV, say what was judged, and what was written where."""
        print(self.count_line())
        self.stop()
        if self.settings.csv:
            print(f"Wrote {self.settings.csv}")
        written = Counter(self.pictures.values())
        if self.settings.annotate:
            print(f"Wrote {counted(written['annotated'], 'annotated picture')} to {self.settings.annotate}")
        if self.settings.gradcam:
            print(f"Wrote {counted(written['gradcam'], 'Grad-CAM overlay')} to {self.settings.gradcam}")


def count_line(files, tally):
    """One line that counts what was judged: files, verdicts by kind, and what was not judged, by reason (`tally`)."""
    verdicts = ", ".join(f"{tally[verdict]} {verdict}" for verdict in ("real", "uncertain", "fake"))
    given = sum(tally[verdict] for verdict in ("real", "uncertain", "fake"))
    reasons = [f"{count} {note}" for note, count in sorted(tally.items()) if note not in ("real", "uncertain", "fake")]
    not_judged = f"; not judged: {', '.join(reasons)}" if reasons else ""
    return f"{counted(files, 'file')}: {counted(given, 'verdict')} ({verdicts}){not_judged}"


def write_rows_whole(handle, path, rows):
    """Write rows of cells to the CSV open as `handle` (at `path`) whole, or not at all: a disk that fills
    mid-row leaves no part of them.

    The rows are written past the file's buffer, straight to its descriptor: a part left in
    the buffer after a failed write would be written when the file closes, once the cut
    has freed some space, as the tail of a row without its start.
    """
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    data = text.getvalue().encode(handle.encoding, handle.errors)
    descriptor = handle.fileno()
    before = os.fstat(descriptor)
    with writing(path):
        try:
            while data:  # A write may take only part of the rows, the disk's last free bytes.
                data = data[os.write(descriptor, data):]
        except BaseException:  # A full disk, or Ctrl-C between two parts of the rows.
            # Cut back to the rows before; a pipe or a device (/dev/full) has nothing to cut.
            if stat.S_ISREG(before.st_mode):
                os.ftruncate(descriptor, before.st_size)
            raise


# ---------------------------------------------------------------------------
# The CSV of --predict --cluster: rows as they come, then in order
# ---------------------------------------------------------------------------


# Rows sorted at once in memory when a cluster's CSV is put in order; more are merged from sorted runs on disk.
SORTED_AT_ONCE = 100_000


def row_order(cells):
    """Where a row of --csv stands in a cluster's CSV: by path, then frame (a video's own row after its frames), then face."""
    path, frame, face = cells[:3]
    return (path, int(frame) if frame else math.inf, int(face) if face else 0)


class ClusterCsv:
    """The --csv of --predict --cluster: the rows of each file appended at once, in the order the workers finish
    them, then put in order (row_order) when all are in.

    Run again with the same --csv, after Ctrl-C, a kill or a finished run, it keeps the rows there and
    the next run judges only the files without any (`judged`). The last file written may have been
    cut short: it is judged again, and each of its rows kept once.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.rows = 0
        # Made for this run: removed again if the run stops before it adds a row.
        self.created, self.added = not self.path.exists(), False
        self.handle = open_alone(self.path, "--csv")
        try:
            self.judged = self.files_judged_already()
        except BaseException:
            self.handle.close()
            raise

    def files_judged_already(self):
        """The paths of the files with rows in the CSV, less the last one; a CSV without a header gets one."""
        self.cut_to_the_last_whole_line()
        with open(self.path, newline="", **TEXT_ENCODING) as file:
            rows = csv.reader(file)
            if next(rows, None) is None:
                write_rows_whole(self.handle, self.path, [CSV_COLUMNS])
                return set()
            judged, last = set(), None
            for cells in rows:
                if len(cells) == len(CSV_COLUMNS):
                    judged.add(cells[0])
                    last = cells[0]
        judged.discard(last)
        return judged

    def cut_to_the_last_whole_line(self):
        """Cut off a row that a killed run left without its end, so that the next is not written onto it."""
        size = os.fstat(self.handle.fileno()).st_size
        with open(self.path, "rb") as file:
            file.seek(max(0, size - 2**16))
            tail = file.read()
        if tail and not tail.endswith(b"\n"):
            os.ftruncate(self.handle.fileno(), size - len(tail) + tail.rfind(b"\n") + 1)

    def add(self, rows):
        """Append a file's rows (dicts of CSV_COLUMNS), all at once."""
        write_rows_whole(self.handle, self.path, [csv_cells(row) for row in rows])
        self.added = True

    def put_in_order(self):
        """Replace the CSV whole with its rows in order, each once: a row repeated (a file judged again) is kept once."""
        sorting = self.path.with_name(f".{self.path.name}.sorting")
        with writing(self.path, sorting), open(sorting, "w", newline="", **TEXT_ENCODING) as target:
            writer, previous = csv.writer(target), None
            writer.writerow(CSV_COLUMNS)
            for cells in rows_in_order(self.path):
                order = row_order(cells)
                if order != previous:
                    writer.writerow(cells)
                    self.rows += 1
                previous = order
        os.replace(sorting, self.path)
        self.added = True

    def close(self):
        self.handle.close()
        if self.created and not self.added:
            self.path.unlink(missing_ok=True)


def rows_in_order(csv_file):
    """Yield the whole rows of a CSV of --predict in order (row_order), holding SORTED_AT_ONCE of them at most:
    each run of that many is sorted and set aside on disk, then the runs are merged."""
    with contextlib.ExitStack() as runs, open(csv_file, newline="", **TEXT_ENCODING) as file:
        rows = csv.reader(file)
        next(rows, None)
        sorted_runs = []
        while chunk := list(itertools.islice(rows, SORTED_AT_ONCE)):
            run = runs.enter_context(tempfile.TemporaryFile("w+", newline="", **TEXT_ENCODING))
            csv.writer(run).writerows(sorted((cells for cells in chunk if len(cells) == len(CSV_COLUMNS)), key=row_order))
            run.seek(0)
            sorted_runs.append(csv.reader(run))
        yield from heapq.merge(*sorted_runs, key=row_order)


def output_names(paths):
    """A distinct name for each input's outputs: its file name, with its folder's name in front where two share it.

    The name keeps its extension (astro.jpg and astro.webp), and what follows it starts with
    a dash (astro.jpg-faces.jpg). Names still shared get ~2, ~3 before the extension; and
    PredictionReport.output_file numbers any output whose name is taken all the same.
    """
    file_names = [path.name for path in paths]
    names = {}
    for path, file_name in zip(paths, file_names):
        name = within_name_limit(file_name if file_names.count(file_name) == 1 else f"{path.parent.name}-{file_name}")
        stem, extension, number = Path(name).stem, Path(name).suffix, 2
        while name in names.values():
            name, number = f"{stem}~{number}{extension}", number + 1
        names[path] = name
    return names


# Most file systems take names of at most 255 bytes. An input's name is kept short enough for
# what its pictures' names add to it: -frame123456-face12-gradcam.png, and ~2 when that is taken.
MAX_INPUT_NAME_BYTES = 255 - 55


def within_name_limit(name):
    """An input's `name`, cut short where its pictures' names would pass the file system's limit.

    The stem is cut and a short hash of the whole name added, so that two long names that
    differ only at the end still differ; the extension is kept.
    """
    if len(os.fsencode(name)) <= MAX_INPUT_NAME_BYTES:
        return name
    stem, extension = Path(name).stem, Path(name).suffix
    if len(os.fsencode(extension)) > 16:  # Not an extension: a long name with a dot in it.
        stem, extension = name, ""
    digest = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:10]
    room = MAX_INPUT_NAME_BYTES - len(os.fsencode(digest + extension))
    stem = stem[:room]
    while len(os.fsencode(stem)) > room:  # Characters of more than one byte.
        stem = stem[:-1]
    return stem + digest + extension


def gradcam_part(frame, face):
    """What tells a heat map's file from the others of the same input: -frame12-face1, -face2, or nothing."""
    frame_part = "" if frame is None else f"-frame{frame}"
    face_part = "" if face.number is None else f"-face{face.number}"
    return frame_part + face_part

# ---------------------------------------------------------------------------
# Grad-CAM overlays
# ---------------------------------------------------------------------------


# The longer side of an overlay's image on screen, in pixels at 100 dpi: small faces are
# enlarged until the title and colour bar read well, and large ones shrunk to keep files small.
SMALLEST_SHOWN_SIDE = 256
LARGEST_SHOWN_SIDE = 768
OVERLAY_DPI = 100  # The dpi save_figure writes.


def shown_scale(height, width):
    """How much to enlarge (above 1) or shrink (below 1) an image for its overlay."""
    longer_side = max(height, width)
    return float(np.clip(longer_side, SMALLEST_SHOWN_SIDE, LARGEST_SHOWN_SIDE)) / longer_side


def shown_copy(image):
    """The image as its overlay shows it, if that is smaller: a photo of 88 megapixels is drawn from 0.6 of one."""
    height, width = image.shape[:2]
    scale = shown_scale(height, width)
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image


def overlay_figure_size(height, width, scale, mark=None):
    """The figure's size in inches: the shown image, a colour bar to its right, a title above, and a model's mark above that."""
    image_width, image_height = width * scale / OVERLAY_DPI, height * scale / OVERLAY_DPI
    # Wide enough for the title, even above a tall, narrow image.
    return max(image_width + 1.3, 3.0), image_height + 0.6 + (0.5 if mark else 0)


# What a map that is zero everywhere means, as its picture says it.
NOTHING_RAISED = {"fake": "nothing here raised p(fake)", "real": "nothing here lowered p(fake)"}


def save_gradcam_overlay(image, heatmap, path, p_fake, verdict, opacity=0.4, mark=None, evidence_for="fake"):
    """Draw a Grad-CAM heat map (values 0 to 1, any size) over its image, in the jet colours.

    The image is an RGB array: a face as it was cut out, or a whole image, as scored. The
    map shows the evidence `evidence_for` "fake" or "real" (see load_pre_trained_models.grad_cam):
    red marks the regions that raised that score the most; blue, those that did not; and a
    map that is zero everywhere is said in words on the picture (NOTHING_RAISED). The
    title gives the model's p(fake) and verdict for the image, and a model's mark
    (DEMO_MARK or UNKNOWN_MARK), if any, is written in red below it. Writes a PNG; returns its path.
    """
    image = shown_copy(image)
    height, width = image.shape[:2]
    # Bilinear resizing keeps the few cells of a small conv map from showing as blocks.
    heatmap = cv2.resize(np.asarray(heatmap, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    scale = shown_scale(height, width)
    # Enlarged pixels stay sharp squares, so that the reader sees the image's own pixels;
    # shrunk images are smoothed instead, as dropping pixels would break up their edges.
    interpolation = "nearest" if scale >= 1 else "antialiased"
    figure, axis = plt.subplots(figsize=overlay_figure_size(height, width, scale, mark))
    axis.imshow(image, interpolation=interpolation)
    axis.imshow(np.clip(heatmap, 0, 1), cmap="jet", vmin=0, vmax=1, alpha=opacity, interpolation=interpolation)
    # The bar shows the colours at full strength, so that each reads clearly, and is as
    # tall as the image, which is why its label takes two lines.
    colours = ScalarMappable(norm=Normalize(0, 1), cmap="jet")
    bar_axis = make_axes_locatable(axis).append_axes("right", size="5%", pad=0.1)
    figure.colorbar(colours, cax=bar_axis, label=f"Grad-CAM: share of the\nevidence for {evidence_for}")
    if not np.any(heatmap > 0):
        # A flat blue map would otherwise read as a map that failed.
        axis.text(0.5, 0.04, NOTHING_RAISED[evidence_for], transform=axis.transAxes, ha="center", va="bottom",
                  color="white", fontsize=9, bbox=dict(facecolor="black", edgecolor="none", pad=3))
    axis.set_title(f"p_fake={p_fake:.4f}: {verdict}")
    if mark:
        figure.suptitle(textwrap.fill(mark, 45), color=np.array(MARK_COLOUR) / 255, fontsize=8)
    axis.set_axis_off()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(figure, path)


# ---------------------------------------------------------------------------
# Faces marked on photos and video frames (--annotate)
# ---------------------------------------------------------------------------


# RGB: the colour of a model's mark (DEMO_MARK, UNKNOWN_MARK) on its pictures.
MARK_COLOUR = (200, 0, 120)
# RGB: green for a face called real, red for fake, amber for uncertain, grey for one not judged.
VERDICT_COLOURS = {"real": (30, 200, 60), "fake": (230, 30, 30), "uncertain": (240, 160, 0), None: (160, 160, 160)}

# An annotated photo is shrunk to this longer side at most, to keep its file small.
LARGEST_ANNOTATED_SIDE = 1600


def marks_of(picture):
    """The faces a picture's marks show: its faces, or, where it has none, one for the whole picture that gives its note."""
    return picture.faces or [FaceResult(None, note=picture.note)]


def face_label(face):
    """What a face's label says, after its number: its p(fake), or why it was not judged."""
    if face.p_fake is not None:
        return f"p_fake {face.p_fake:.2f}" if face.face_frame is not None else f"whole image: p_fake {face.p_fake:.2f}"
    if face.face_frame is None:
        return "no face found: not judged"
    return "cut by the border" if face.note == FACE_AT_BORDER else "too small"


def marked_image(image, faces, largest_side=LARGEST_ANNOTATED_SIDE, mark=None):
    """A copy of an RGB image with each face's square drawn and labelled with its number and p(fake), in its verdict's colour.

    `faces` holds a FaceResult per face, in the image's pixels. A model's `mark` is written across the bottom.
    """
    height, width = image.shape[:2]
    scale = min(1.0, largest_side / max(height, width))
    # At least a pixel each way: a strip of 1 x 100,000 pixels is still drawn.
    shrunk = (max(1, round(width * scale)), max(1, round(height * scale)))
    marked = cv2.resize(image, shrunk, interpolation=cv2.INTER_AREA) if scale < 1 else image.copy()
    # Lines and letters grow with the picture, so that they read the same at any size.
    thickness = max(1, round(max(marked.shape[:2]) / 450))
    labels = []  # The boxes of the labels drawn so far, which the next one must not cover.
    for face in faces:
        colour = VERDICT_COLOURS[face.verdict]
        if face.face_frame is None:
            corner = np.array([thickness, thickness])
        else:
            corners = np.array(face.face_frame.scaled(scale).corners())
            cv2.polylines(marked, [np.round(corners).astype(np.int32)], True, colour, thickness, cv2.LINE_AA)
            corner = corners.min(axis=0)
        text = face_label(face) if face.number is None else f"{face.number}: {face_label(face)}"
        labels.append(draw_label(marked, text, corner, colour, thickness, labels))
    if mark:
        draw_banner(marked, mark, MARK_COLOUR)
    return marked


def draw_label(image, text, corner, colour, thickness, taken=()):
    """Write white text on a box of the face's colour, just above `corner` (x, y), inside the image and
    off the boxes `taken`; return its box."""
    font_scale = 0.4 * thickness
    (text_width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    size = (text_width + 2 * thickness, text_height + baseline + 2 * thickness)
    x, y = label_place(size, corner, taken, image.shape[:2])
    cv2.rectangle(image, (x, y), (x + size[0], y + size[1]), colour, cv2.FILLED)
    origin = (x + thickness, y + thickness + text_height)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return (x, y, x + size[0], y + size[1])


def label_place(size, corner, taken, image_shape):
    """Where a label of `size` (width, height) goes: just above `corner`, kept in the image, and
    moved down a line at a time while it would cover a box of `taken` (x0, y0, x1, y1)."""
    (width, height), (image_height, image_width) = size, image_shape
    x = int(np.clip(corner[0], 0, max(0, image_width - width)))
    y = int(np.clip(corner[1] - height, 0, max(0, image_height - height)))
    first_y = y
    while any(x < x1 and x0 < x + width and y < y1 and y0 < y + height for x0, y0, x1, y1 in taken):
        y += height
        if y + height > image_height:  # No free place below: over the first place, as before.
            return x, first_y
    return x, y


def draw_banner(image, text, colour):
    """Write white text on a band of `colour` across the bottom of the image, as large as fits its width."""
    height, width = image.shape[:2]
    font_scale, thickness = 1.0, 1
    text_width = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)[0][0]
    font_scale = min(1.2, 0.95 * width / text_width)
    thickness = max(1, round(2 * font_scale))
    (text_width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    band_height = text_height + baseline + 8
    cv2.rectangle(image, (0, height - band_height), (width, height), colour, cv2.FILLED)
    origin = ((width - text_width) // 2, height - baseline - 4)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)


def save_annotated_image(image, picture, path):
    """Write an RGB image with the faces of its PictureResult marked (see marked_image) as a JPEG; return its path."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    marked = marked_image(image, marks_of(picture), mark=picture.mark)
    write_jpeg(path, cv2.cvtColor(marked, cv2.COLOR_RGB2BGR), quality=90)
    return path


# A video's frames are kept this wide for its contact sheet, and at most this many are shown.
THUMBNAIL_WIDTH = 320
CONTACT_SHEET_FRAMES = 64
CONTACT_SHEET_COLUMNS = 8
CONTACT_SHEET_MIN_WIDTH = 4.0  # inches


def shown_frame_positions(frame_count):
    """Which of `frame_count` sampled frames, by position (0, 1, ...), a contact sheet shows: all of them up
    to CONTACT_SHEET_FRAMES, else as many spread evenly, the first and the last among them.

    Known before any frame is read, so that --predict keeps the thumbnails of these frames only.
    """
    return sorted({int(position) for position in np.linspace(0, frame_count - 1, min(frame_count, CONTACT_SHEET_FRAMES)).round()})


def save_contact_sheet(thumbnails, video, path):
    """A video's sampled frames with their faces marked, and a strip of each face's p(fake) over the frames.

    `thumbnails` holds (frame index, RGB thumbnail, its scale) triples; with more than
    CONTACT_SHEET_FRAMES, those at shown_frame_positions are shown. The faces come from the
    video's VideoResult, in the frames' pixels; its p_fake is drawn as a dashed line, and a
    model's mark, if any, is the title. Writes a PNG; returns its path.
    """
    thumbnails = [thumbnails[position] for position in shown_frame_positions(len(thumbnails))]
    columns = min(CONTACT_SHEET_COLUMNS, max(1, len(thumbnails)))
    rows = max(1, math.ceil(len(thumbnails) / columns))
    height, width = thumbnails[0][1].shape[:2] if thumbnails else (9, 16)
    cell_height = 2.0 * height / width
    # Never narrower than the strip of scores and its legend beside it need, even for one frame.
    figure = plt.figure(figsize=(max(2.0 * columns, CONTACT_SHEET_MIN_WIDTH), cell_height * rows + 2.2))
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=[cell_height] * rows + [1.6])
    faces_of_frame = {picture.frame: marks_of(picture) for picture in video.frames}
    for position, (index, thumbnail, scale) in enumerate(thumbnails):
        frame_faces = [
            dataclasses.replace(face, face_frame=None if face.face_frame is None else face.face_frame.scaled(scale))
            for face in faces_of_frame.get(index, [])
        ]
        axis = figure.add_subplot(grid[position // columns, position % columns])
        axis.imshow(marked_image(thumbnail, frame_faces))
        axis.set_title(f"frame {index}", fontsize=8)
        axis.set_axis_off()
    strip = figure.add_subplot(grid[rows, :])
    scored = [(picture.frame, face) for picture in video.frames for face in picture.faces if face.p_fake is not None]
    for verdict in ("real", "uncertain", "fake"):
        points = [(at, face.p_fake) for at, face in scored if face.verdict == verdict]
        if points:
            strip.scatter(*zip(*points), color=np.array(VERDICT_COLOURS[verdict]) / 255, s=14, label=verdict)
    for threshold in video.band.thresholds():
        strip.axhline(threshold, color="grey", linestyle=":", linewidth=1, label=f"threshold {threshold:.2f}")
    if video.p_fake is not None:
        strip.axhline(video.p_fake, color="black", linestyle="--", linewidth=1, label=f"video p_fake {video.p_fake:.2f}")
    strip.set_ylim(-0.05, 1.05)
    strip.xaxis.set_major_locator(MaxNLocator(integer=True))  # Frames are counted whole, even where one is shown.
    strip.set_xlabel("frame")
    strip.set_ylabel("p_fake")
    if strip.get_legend_handles_labels()[0]:  # Nothing to name where no face was judged.
        strip.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if video.mark:
        figure.suptitle(video.mark, color="crimson")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(figure, path)


# ---------------------------------------------------------------------------
# The page of --serve
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PageSettings:
    """Where --serve's page listens, and how much it takes at once.

    host, port: its address; 127.0.0.1 is this machine only.
    frames: the frames judged of each video (--frames).
    max_file_bytes: the largest file an upload may be; Gradio refuses a larger one as it arrives.
    max_files: the most files judged in one request.
    waiting: the requests that may wait while one is judged; more are refused, so that a
        burst of uploads never fills the memory.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    frames: int = DEFAULT_FRAMES
    max_file_bytes: int = 200 * 2**20
    max_files: int = 50
    waiting: int = 16


# Under the results: what a verdict means, for someone who has not read the README.
VERDICTS_EXPLAINED = """\
**What a verdict means.** The model gives each face a p(fake), from 0 to 1, and the band above
turns it into *real*, *uncertain* (amber) or *fake*. It judges **faces only**: each face is found,
cut out as its training faces were and scored; a picture without a face, or with a face too
small, gets no verdict, only a note that says why. A video's p(fake) is the mean over the face
seen most. A verdict is as good as the data the model was trained on, and no better.
"""


class PageReport(PredictionReport):
    """What the page shows of one request: --predict's report, its lines and rows kept instead of printed.

    The uploads lie in `uploads`; the rows and lines name them by their names there. With
    `progress(done, total, what)`, each photo and each frame judged moves the page's progress bar.
    """

    def __init__(self, settings, uploads, paths, progress):
        super().__init__(settings, paths)
        self.uploads, self.progress = uploads, progress
        self.lines, self.rows = [], []
        self.total = len(paths)

    def name(self, path):
        return str(Path(path).relative_to(self.uploads))

    def say(self, line):
        self.lines.append(line.replace(f"{self.uploads}{os.sep}", ""))

    def add_row(self, row):
        self.rows.append(dict(row, path=self.name(row["path"])))

    def warn(self, path, warnings):
        """Show the warnings of an input, each once, as --predict prints them."""
        for warning in warnings:
            line = f"warning: {self.name(path)}: {warning}"
            if line not in self.lines:
                self.lines.append(line)

    def photo(self, picture):
        self.warn(picture.path, picture.warnings + ([picture.reason] if picture.reason else []))
        super().photo(picture)
        self.progress(self.files, self.total, self.name(picture.path))

    def frames(self, pictures):
        super().frames(pictures)
        for picture in pictures:
            self.warn(picture.path, picture.warnings)
        last = pictures[-1] if pictures else None
        if last is not None:
            seen = self.frames_seen[last.path] + 1
            self.progress(self.files + seen / self.settings.frames, self.total, f"{self.name(last.path)}: frame {seen} of {self.settings.frames}")

    def video(self, video):
        self.warn(video.path, video.warnings)
        super().video(video)
        self.progress(self.files, self.total, self.name(video.path))

    def unreadable(self, path, reason=None):
        super().unreadable(path, reason)
        self.warn(path, [reason or photo_problem(path)])
        self.progress(self.files, self.total, self.name(path))

    def table(self):
        """The rows as the CSV's cells, each as --csv writes it (every digit of p_fake)."""
        return [[str(cell) for cell in csv_cells(row)] for row in self.rows]

    def write_csv(self, path):
        """The rows, as --csv writes them; written whole, then renamed."""
        text = io.StringIO()
        csv.writer(text).writerows([CSV_COLUMNS, *self.table()])
        write_text_atomically(path, text.getvalue())
        return path

    def summary(self):
        """The count of what was judged, then every line, as --predict prints them."""
        return "\n".join([self.count_line(), "", "```", *self.lines, "```"])


def page_header(detector):
    """The page's header: whose verdicts these are, from the model's card, and the band they are given with."""
    first, *models = detector.header()
    return "\n".join(["# Is this face real or fake?", "", first, "", *(f"- {line.strip()}" for line in models)])


def page_banner(mark):
    """The banner of a demo model, or of one without a card, that no one can miss; empty for a model with a card."""
    if not mark:
        return ""
    colour = "#%02x%02x%02x" % MARK_COLOUR
    return (f'<div id="model-mark" style="background:{colour};color:white;font-size:1.4em;font-weight:bold;'
            f'padding:0.8em;border-radius:6px;text-align:center">{mark}</div>')


class DetectorPage:
    """The page that judges the photos and videos dropped on it with one Detector, one request at a time.

    The detector judges, with `judge(detector, report, paths, frames, gradcam)` (--predict's
    own judging); this class only takes the uploads, shows the report, and cleans up. Each
    request has a folder of its own in `workspace`; its uploads are deleted once judged, and
    its pictures once the next request starts (Gradio has kept copies of them by then).

    As Gradio keeps one file for identical uploads, a request for a file already judged and
    deleted (judged again without dropping it again, or dropped by two people at once) asks
    for it to be dropped again.
    """

    def __init__(self, detector, settings, judge, workspace):
        self.detector, self.settings, self.judge, self.workspace = detector, settings, judge, Path(workspace)
        self.requests = 0

    def build(self):
        """The page's Gradio Blocks."""
        import gradio as gr  # Only here: the scripts' other runs never load it.

        with gr.Blocks(title="Deepfake detector", analytics_enabled=False, delete_cache=(600, 3600)) as page:
            gr.HTML(page_banner(self.detector.mark), visible=bool(self.detector.mark))
            gr.Markdown(page_header(self.detector))
            files = gr.File(label=f"Photos and videos (at most {self.settings.max_files}, "
                            f"{self.settings.max_file_bytes // 2**20} MB each)", file_count="multiple", elem_id="uploads")
            gradcam = gr.Checkbox(label="Grad-CAM: also show which regions of each face drove its score",
                                  visible=len(self.detector.members) == 1)
            button = gr.Button("Judge", variant="primary")
            summary = gr.Markdown()
            table = gr.Dataframe(headers=list(CSV_COLUMNS), label="A row per face, as --predict --csv writes it",
                                 interactive=False, elem_id="verdicts")
            download = gr.File(label="The CSV")
            pictures = gr.Gallery(label="Faces marked, videos' frames and p(fake) over time, Grad-CAM", columns=2,
                                  height="auto")
            gr.Markdown(VERDICTS_EXPLAINED)

            def judge_request(files, gradcam, progress=gr.Progress()):
                def moved(done, total, what):
                    progress(done / max(total, 1), desc=what)
                try:
                    return self.judged(files or [], gradcam, moved)
                except UserError as error:
                    raise gr.Error(str(error)) from None

            button.click(judge_request, [files, gradcam], [summary, table, download, pictures], api_name="judge")
        page.queue(default_concurrency_limit=1, max_size=self.settings.waiting)
        return page

    def judged(self, files, gradcam, progress):
        """Judge one request's uploads; return what the page shows: the lines, the table, the CSV and the pictures."""
        if not files:
            raise UserError("no file given: drop photos or videos on the page first")
        if len(files) > self.settings.max_files:
            raise UserError(f"{len(files)} files: the page judges at most {self.settings.max_files} at once; "
                            "send them in smaller groups")
        gone = [Path(file).name for file in files if not Path(file).is_file()]
        if gone:
            raise UserError(f"{', '.join(gone)}: deleted once judged; drop the file again to judge it again")
        folder = self.request_folder()
        uploads = folder / "uploads"
        paths = take_uploads(files, uploads)
        report = PageReport(ReportSettings(annotate=folder / "pictures", gradcam=folder / "gradcam" if gradcam else None,
                                           frames=self.settings.frames), uploads, paths, progress)
        try:
            report.start(self.detector.name)
            self.judge(self.detector, report, paths, self.settings.frames, gradcam)
        finally:
            report.stop()
            shutil.rmtree(uploads, ignore_errors=True)
        pictures = [(str(path), path.name) for path in report.pictures]
        return report.summary(), report.table(), str(report.write_csv(folder / "verdicts.csv")), pictures

    def request_folder(self):
        """A new folder for a request's uploads and pictures; the earlier requests' are removed."""
        for earlier in self.workspace.glob("request-*"):
            shutil.rmtree(earlier, ignore_errors=True)
        self.requests += 1
        folder = self.workspace / f"request-{self.requests}"
        folder.mkdir(parents=True)
        return folder


def take_uploads(files, uploads):
    """Move each uploaded file into `uploads`, under its own name (name~2.jpg where two share one); return their paths."""
    uploads.mkdir(parents=True, exist_ok=True)
    paths = []
    for file in map(Path, files):
        path, number = uploads / file.name, 2
        while path.exists():
            path, number = uploads / f"{file.stem}~{number}{file.suffix}", number + 1
        shutil.move(file, path)
        with contextlib.suppress(OSError):  # Gradio keeps each upload in a folder of its own; not empty, another name is left.
            file.parent.rmdir()
        paths.append(path)
    return paths


def serve_page(detector, settings, judge):
    """Serve the page of `detector` (with PageSettings `settings`) until Ctrl-C; return the exit status, 130.

    `judge(detector, report, paths, frames, gradcam)` judges a request's files into its
    PageReport, as --predict does. Nothing leaves the machine: no share link, no analytics,
    and the page reads no file of the machine but those uploaded to it.
    """
    workspace = Path(tempfile.mkdtemp(prefix="deepfake-page-"))
    # Before Gradio loads: its uploads go into this folder, which is removed when the page closes.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(workspace / "gradio")
    page = DetectorPage(detector, settings, judge, workspace).build()
    try:
        try:
            page.launch(
                server_name=settings.host, server_port=settings.port, share=False, quiet=True, prevent_thread_lock=True,
                max_file_size=settings.max_file_bytes, allowed_paths=[], ssr_mode=False, enable_monitoring=False,
                mcp_server=False, pwa=False, show_error=True,
            )
        except OSError:  # Taken since the options were checked: Gradio's own words name its settings, not ours.
            raise UserError(f"--host {settings.host} --port {settings.port}: the page cannot listen there; "
                            "give another --port, or stop what uses it") from None
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: --host {settings.host}: anyone who can reach this machine can upload to the page", file=sys.stderr)
        print(f"The page is at http://{settings.host}:{settings.port}/ ; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):  # Closing must not hide why it closed.
            page.close(verbose=False)
        shutil.rmtree(workspace, ignore_errors=True)
    print("\nStopped the page.", flush=True)
    return 130


# ---------------------------------------------------------------------------
# The ensemble and the results table
# ---------------------------------------------------------------------------


# The smallest weight a model gets, so that the weights never all vanish.
MIN_ENSEMBLE_WEIGHT = 0.01


def ensemble_weights(valid_aucs):
    """Weights that sum to 1, from each model's validation AUC.

    A model's weight is how far its validation AUC lies above chance (0.5): a model that
    ranks at chance adds only noise to the average, and one twice as far above chance
    counts twice as much. The validation split chooses the weights, so the test split
    still measures the ensemble fairly.
    """
    raw = [max(auc - 0.5, MIN_ENSEMBLE_WEIGHT) for auc in valid_aucs]
    return [weight / sum(raw) for weight in raw]


# What a run folder's metrics.json must hold for the results table and the ensemble to read it:
# its model and test accuracy. Runs made before the AUC, AP, EER and validation AUC were
# recorded have none of them; the table shows a dash for each value missing.
RUN_FIELDS = {
    "model": (not_text, "required"),
    "test_accuracy": (not_a_share, "required"),
    "test_loss": (not_a_loss_or_none, "optional"),
    "test_auc": (not_a_share_or_none, "optional"),
    "test_ap": (not_a_share_or_none, "optional"),
    "test_eer": (not_a_share_or_none, "optional"),
    "valid_auc": (not_a_share_or_none, "optional"),
    "name": (not_text, "optional"),
}
# The columns of predictions.csv that the ensemble reads.
PREDICTIONS_COLUMNS = ("path", "label", "p_fake")


def read_run_metrics(metrics_file):
    """(a run's metrics, None), or (None, why the file is not a run's metrics.json)."""
    try:
        metrics = json.loads(Path(metrics_file).read_text())
    # Damaged JSON, or text that is not UTF-8, raises a ValueError; JSON nested thousands deep, a RecursionError.
    except (OSError, ValueError, RecursionError) as error:
        return None, f"it cannot be read as JSON ({error})"
    if not isinstance(metrics, dict):
        return None, "it holds no run's metrics"
    problem = fields_problem(metrics, RUN_FIELDS)
    return (None, f"not a run's metrics: {problem}") if problem else (metrics, None)


def read_run_predictions(predictions_file):
    """A run's test predictions, or None, with a warning, where its predictions.csv cannot be read by the ensemble."""
    try:
        predictions = pd.read_csv(predictions_file)
    except (OSError, ValueError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors.
        problem = f"it cannot be read as a CSV ({error})"
    else:
        missing = [column for column in PREDICTIONS_COLUMNS if column not in predictions.columns]
        if missing:
            problem = f"it has no {', '.join(missing)} column"
        elif not pd.to_numeric(predictions["p_fake"], errors="coerce").between(0, 1).all():
            problem = "some of its p_fake are not numbers from 0 to 1"
        else:
            return predictions
    warn_skipping(predictions_file, f"{problem}; its model is left out of the Ensemble row")
    return None


def read_runs(output_dir):
    """(metrics, test predictions or None) for every model with a metrics.json, in the order of MODEL_SCRIPTS.

    Each metrics also gives its run's folder, as "run_dir". A metrics.json that is no run's
    (a stray file, or one damaged) is skipped with a warning, as is a predictions.csv that
    the ensemble cannot read.
    """
    runs = []
    for metrics_file in Path(output_dir).glob("*/metrics.json"):
        metrics, problem = read_run_metrics(metrics_file)
        if problem:
            warn_skipping(metrics_file, problem)
            continue
        predictions_file = metrics_file.with_name("predictions.csv")
        predictions = read_run_predictions(predictions_file) if predictions_file.exists() else None
        runs.append(({**metrics, "run_dir": str(metrics_file.parent)}, predictions))
    # The order of the results table's rows is the scripts', as in the original README.
    order = {name: position for position, name in enumerate(MODEL_SCRIPTS)}
    position = lambda run: order.get(run[0].get("name", Path(run[0]["run_dir"]).name), len(order))  # noqa: E731
    return sorted(runs, key=lambda run: (position(run), run[0]["model"]))


def ensemble_members(runs):
    """The largest group of models tested on the same images, each with a validation AUC.

    Runs made before validation AUCs were recorded have no weight and are left out.
    """
    groups = {}
    for metrics, predictions in runs:
        if predictions is not None and metrics.get("valid_auc") is not None:
            test_images = frozenset(zip(predictions["path"], predictions["label"]))
            groups.setdefault(test_images, []).append((metrics, predictions))
    return max(groups.values(), key=len, default=[])


def read_ensemble(output_dir):
    """The metrics of each model in the Ensemble row of OUTPUT_DIR's results table, and their weights."""
    members = ensemble_members(read_runs(output_dir))
    return [metrics for metrics, _ in members], ensemble_weights([metrics["valid_auc"] for metrics, _ in members])


def ensemble_band(run_dirs, weights):
    """The band of an ensemble's verdicts, chosen as a single model's is (uncertain_band), on the weighted
    average of its models' validation p(fake); without one, Verdicts that say why, in words a user can act on."""
    tables = []
    for run_dir in map(Path, run_dirs):
        try:
            tables.append(pd.read_csv(run_dir / VALID_PREDICTIONS).set_index("path").sort_index())
        except (OSError, ValueError):
            return Verdicts(None, None, f"{run_dir} has no {VALID_PREDICTIONS} to choose the ensemble's band on "
                                        "(it was trained by an earlier version): train that model again")
    if any(not table.index.equals(tables[0].index) for table in tables):
        return Verdicts(None, None, "its models were validated on different images: train them with the same "
                                    "--data-dir, --subset and --seed")
    p_fake = sum(weight * table["p_fake"] for weight, table in zip(weights, tables))
    real_below, fake_from = uncertain_band(true_labels(tables[0]), p_fake.to_numpy(float))
    return Verdicts(real_below, fake_from, "no score of the ensemble's validation faces met the band's rule")


def ensemble_predictions(members, weights):
    """The weighted average of the members' p(fake), image by image."""
    aligned = [predictions.set_index("path").sort_index() for _, predictions in members]
    p_fake = sum(weight * predictions["p_fake"] for weight, predictions in zip(weights, aligned))
    return pd.DataFrame({"path": aligned[0].index, "label": aligned[0]["label"].to_numpy(), "p_fake": p_fake.to_numpy()})


def ensemble_result(runs):
    """The Ensemble's table row and a sentence naming its weights, or (None, None) with fewer than 2 members."""
    members = ensemble_members(runs)
    if len(members) < 2:
        return None, None
    weights = ensemble_weights([metrics["valid_auc"] for metrics, _ in members])
    row = {"model": "Ensemble", **classification_metrics(ensemble_predictions(members, weights))}
    named = ", ".join(f"{metrics['model']} {weight:.2f}" for (metrics, _), weight in zip(members, weights))
    return row, f"Ensemble: the average of p(fake) weighted by validation AUC above chance (weights: {named})."


TABLE_COLUMNS = {
    "model": "Model",
    "test_accuracy": "Test Accuracy",
    "test_loss": "Test Loss",
    "test_auc": "Test AUC",
    "test_ap": "Test AP",
    "test_eer": "Test EER",
}


def read_results(output_dir):
    """One row per model that has a metrics.json under `output_dir`, in the scripts' order, then the
    Ensemble row when there is one; and the sentence that names the ensemble's weights, or None."""
    runs = read_runs(output_dir)
    rows = [{key: metrics.get(key) for key in TABLE_COLUMNS} for metrics, _ in runs]
    ensemble_row, ensemble_note = ensemble_result(runs)
    if ensemble_row is not None:
        rows.append({key: ensemble_row[key] for key in TABLE_COLUMNS})
    return rows, ensemble_note


def results_markdown(rows, note=None):
    """A Markdown table with the original's columns, the test AUC, AP and EER, and an optional note below."""
    lines = ["| " + " | ".join(TABLE_COLUMNS.values()) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [row["model"]] + ["-" if row[key] is None else f"{row[key]:.4f}" for key in list(TABLE_COLUMNS)[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_results_table(output_dir):
    """Rebuild OUTPUT_DIR/results.csv and results.md from every metrics.json (and, for the
    Ensemble row, every predictions.csv); return the Markdown."""
    output_dir = Path(output_dir)
    # Two scripts that finish at once take turns, so that neither row is lost.
    with locked(output_dir / ".results.lock"):
        rows, ensemble_note = read_results(output_dir)
        frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).rename(columns=TABLE_COLUMNS)
        write_text_atomically(output_dir / "results.csv", frame.to_csv(index=False))
        markdown = results_markdown(rows, ensemble_note)
        write_text_atomically(output_dir / "results.md", markdown)
    return markdown


# ---------------------------------------------------------------------------
# python plot_loss_accuracy_graph.py
# ---------------------------------------------------------------------------


def build_parser():
    parser = OneLineArgumentParser(
        description="Redraw OUTPUT_DIR/<model>/history.png for every trained model (every folder with a "
        "history.csv), then rewrite OUTPUT_DIR/results.csv and OUTPUT_DIR/results.md from each model's "
        "metrics.json and print the table.",
    )
    parser.add_argument(
        "output_dir",
        nargs="?",
        type=Path,
        metavar="OUTPUT_DIR",
        help="the folder the fine-tuning scripts wrote into (default outputs, or outputs/demo with --demo)",
    )
    parser.add_argument("--demo", action="store_true", help="the demo's models, in outputs/demo")
    return parser


@exits_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    output_dir = args.output_dir or (DEMO_OUTPUT_DIR if args.demo else OUTPUT_DIR)
    histories = {path: read_history(path) for path in sorted(output_dir.glob("*/history.csv"))}
    histories = {path: history for path, history in histories.items() if len(history)}
    if not histories:
        demo = f" (the demo's are in {DEMO_OUTPUT_DIR.absolute()}: add --demo)" if not args.demo and any(DEMO_OUTPUT_DIR.glob("*/history.csv")) else ""
        raise UserError(
            f"no trained model in {output_dir.absolute()}{demo}; run a fine-tuning script first, "
            "or name the folder it wrote into (its --output-dir): python plot_loss_accuracy_graph.py FOLDER"
        )
    ensure_writable_folder(output_dir)
    for history_file, history in histories.items():
        metrics_file = history_file.with_name("metrics.json")
        # A metrics.json that is no run's is named once, when the table is rebuilt below.
        metrics = read_run_metrics(metrics_file)[0] if metrics_file.exists() else None
        title = metrics["model"] if metrics else history_file.parent.name
        print(f"Wrote {plot_history(history, history_file.with_name('history.png'), title)}")
    print(write_results_table(output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
