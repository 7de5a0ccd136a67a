"""Draw the curves of each model, compute its metrics, and write the results table.

Every fine-tuning script calls this module when it finishes: it draws the training
curves (history.png), the ROC curve with its AUC and equal error rate (roc.png), the
precision-recall curve with its average precision (precision_recall.png) and the
confusion matrix (confusion_matrix.png), and it draws the Grad-CAM overlays of
--predict --gradcam. Run it on its own to redraw every OUTPUT_DIR/<model>/history.png
and print the table again:

    python plot_loss_accuracy_graph.py            # OUTPUT_DIR is outputs/
    python plot_loss_accuracy_graph.py outputs/demo

The table is rebuilt from each model's metrics.json, so a row is never lost: running
VGG19 after VGG16 adds a row, and running VGG16 again replaces its own. Once two or more
models have been tested on the same images, it also gets an Ensemble row: the weighted
average of their p(fake), computed from their predictions.csv, with nothing re-run.
"""

import contextlib
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Draw to files: training servers have no screen.
import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as sklearn_metrics

from data_preprocessing import (
    CLASSES,
    OneLineArgumentParser,
    UserError,
    ensure_writable_folder,
    exits_on_user_error,
    write_text_atomically,
)

# The order of the rows, as in the original README.
MODEL_ORDER = ("VGG16", "VGG19", "InceptionV3", "ResNet50")
TABLE_COLUMNS = {
    "model": "Model",
    "test_accuracy": "Test Accuracy",
    "test_loss": "Test Loss",
    "test_auc": "Test AUC",
    "test_ap": "Test AP",
    "test_eer": "Test EER",
}
# The figures drawn from a model's predictions, beside its history.png.
EVALUATION_PLOTS = ("roc.png", "precision_recall.png", "confusion_matrix.png")


def read_history(history_file):
    """The rows of a history.csv, one per epoch; empty if training stopped before any epoch."""
    try:
        history = pd.read_csv(history_file)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "seconds"])
    # A run stopped between writing an epoch's row and its backup repeats that epoch on resume.
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def save_figure(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_history(history, path, title):
    """The original's two panels: accuracy and loss per epoch, for training and validation."""
    epochs = range(1, len(history) + 1)
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 5))
    for axis, metric in ((accuracy_axis, "accuracy"), (loss_axis, "loss")):
        axis.plot(epochs, history[metric], "o-", label=f"train {metric}")
        axis.plot(epochs, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        axis.set_title(f"{title}: {metric}")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.legend()
    return save_figure(figure, path)


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
    sklearn_metrics.RocCurveDisplay.from_predictions(
        true_labels(predictions), predictions["p_fake"], name=title, ax=axis, plot_chance_level=True
    )
    eer = metrics["test_eer"]
    # At the EER, FPR = EER and TPR = 1 - FNR = 1 - EER.
    axis.plot([eer], [1 - eer], "o", color="crimson", label=f"EER = {eer:.3f}")
    axis.legend(loc="lower right")
    axis.set_title(f"{title}: ROC curve (fake is positive)")
    return save_figure(figure, path)


def plot_precision_recall(predictions, path, title):
    figure, axis = plt.subplots(figsize=(5, 5))
    sklearn_metrics.PrecisionRecallDisplay.from_predictions(
        true_labels(predictions), predictions["p_fake"], name=title, ax=axis, plot_chance_level=True
    )
    axis.set_title(f"{title}: precision-recall curve")
    return save_figure(figure, path)


def plot_confusion_matrix(metrics, path, title):
    figure, axis = plt.subplots(figsize=(4.5, 4))
    display = sklearn_metrics.ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=CLASSES)
    display.plot(ax=axis, cmap="Blues", colorbar=False)
    axis.set_title(f"{title}: confusion matrix at p(fake) {metrics['threshold']}")
    return save_figure(figure, path)


def plot_evaluation(predictions, metrics, folder, title):
    """Draw EVALUATION_PLOTS into `folder`; return their paths."""
    folder = Path(folder)
    roc_file, precision_recall_file, confusion_matrix_file = (folder / name for name in EVALUATION_PLOTS)
    return [
        plot_roc(predictions, metrics, roc_file, title),
        plot_precision_recall(predictions, precision_recall_file, title),
        plot_confusion_matrix(metrics, confusion_matrix_file, title),
    ]


def save_gradcam_overlay(image_path, heatmap, path, opacity=0.4):
    """Lay a heat map (values 0 to 1, any size) over the image, in OpenCV's JET colours, at the image's own size.

    Red marks the regions that raised p(fake) the most; blue, those that did not.
    """
    # IMREAD_COLOR turns a grey image into three channels and drops an alpha channel.
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    # Bilinear resizing keeps the few cells of a small conv map from showing as blocks.
    heatmap = cv2.resize(np.asarray(heatmap, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(colours, opacity, image, 1 - opacity, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), overlay)
    return path


# ---------------------------------------------------------------------------
# The ensemble
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


def read_runs(output_dir):
    """(metrics, test predictions or None) for every model with a metrics.json, in MODEL_ORDER."""
    runs = []
    for metrics_file in Path(output_dir).glob("*/metrics.json"):
        predictions_file = metrics_file.with_name("predictions.csv")
        predictions = pd.read_csv(predictions_file) if predictions_file.exists() else None
        runs.append((json.loads(metrics_file.read_text()), predictions))
    order = {title: position for position, title in enumerate(MODEL_ORDER)}
    return sorted(runs, key=lambda run: (order.get(run[0]["model"], len(order)), run[0]["model"]))


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
    return row, f"Ensemble: the average of p(fake) weighted by validation AUC above chance ({named})."


def read_results(output_dir):
    """One row per model that has a metrics.json under `output_dir`, in MODEL_ORDER, then the
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


@contextlib.contextmanager
def locked(lock_file):
    """Hold an exclusive lock, so that two scripts finishing at once take turns."""
    with open(lock_file, "w") as handle:
        try:
            import fcntl  # POSIX only; on Windows the table is written without a lock.
        except ImportError:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_results_table(output_dir):
    """Rebuild OUTPUT_DIR/results.csv and results.md from every metrics.json (and, for the
    Ensemble row, every predictions.csv); return the Markdown."""
    output_dir = Path(output_dir)
    with locked(output_dir / ".results.lock"):
        rows, ensemble_note = read_results(output_dir)
        frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).rename(columns=TABLE_COLUMNS)
        write_text_atomically(output_dir / "results.csv", frame.to_csv(index=False))
        markdown = results_markdown(rows, ensemble_note)
        write_text_atomically(output_dir / "results.md", markdown)
    return markdown


@exits_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", type=Path, default=Path("outputs"), help="default outputs")
    output_dir = parser.parse_args(argv).output_dir
    histories = {path: read_history(path) for path in sorted(output_dir.glob("*/history.csv"))}
    histories = {path: history for path, history in histories.items() if len(history)}
    if not histories:
        raise UserError(f"no trained model in {output_dir}; run a fine-tuning script first, or name its output folder")
    ensure_writable_folder(output_dir)
    for history_file, history in histories.items():
        metrics_file = history_file.with_name("metrics.json")
        title = json.loads(metrics_file.read_text())["model"] if metrics_file.exists() else history_file.parent.name
        print(f"Wrote {plot_history(history, history_file.with_name('history.png'), title)}")
    print(write_results_table(output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
