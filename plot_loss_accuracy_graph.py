"""Draw the training curves of each model and write the results table.

Every fine-tuning script calls this module when it finishes. Run it on its own to
redraw every OUTPUT_DIR/<model>/history.png and print the table again:

    python plot_loss_accuracy_graph.py            # OUTPUT_DIR is outputs/
    python plot_loss_accuracy_graph.py outputs/demo

The table is rebuilt from each model's metrics.json, so a row is never lost: running
VGG19 after VGG16 adds a row, and running VGG16 again replaces its own.
"""

import contextlib
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Draw to files: training servers have no screen.
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from data_preprocessing import (
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
}


def read_history(history_file):
    """The rows of a history.csv, one per epoch; empty if training stopped before any epoch."""
    try:
        history = pd.read_csv(history_file)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame(columns=["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "seconds"])
    # A run stopped between writing an epoch's row and its backup repeats that epoch on resume.
    return history.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


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
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def read_results(output_dir):
    """One row per model that has a metrics.json under `output_dir`, in MODEL_ORDER."""
    rows = []
    for metrics_file in sorted(Path(output_dir).glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        rows.append({key: metrics.get(key) for key in TABLE_COLUMNS})
    order = {title: position for position, title in enumerate(MODEL_ORDER)}
    return sorted(rows, key=lambda row: order.get(row["model"], len(order)))


def results_markdown(rows):
    """A Markdown table with the original's columns and the test AUC."""
    lines = ["| " + " | ".join(TABLE_COLUMNS.values()) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [row["model"]] + ["-" if row[key] is None else f"{row[key]:.4f}" for key in list(TABLE_COLUMNS)[1:]]
        lines.append("| " + " | ".join(cells) + " |")
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
    """Rebuild OUTPUT_DIR/results.csv and results.md from every metrics.json; return the Markdown."""
    output_dir = Path(output_dir)
    with locked(output_dir / ".results.lock"):
        rows = read_results(output_dir)
        frame = pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).rename(columns=TABLE_COLUMNS)
        write_text_atomically(output_dir / "results.csv", frame.to_csv(index=False))
        markdown = results_markdown(rows)
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
