"""Training runs on tiny data: what they write, resuming, the demo, and setting a previous run aside."""

import json
import subprocess
import sys
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

import load_pre_trained_models
from conftest import (
    REPOSITORY_DIR,
    RUN_OUTPUTS,
    InterruptAfterEpoch,
    add_callback,
    TINY_IMAGES_PER_CLASS,
    assert_one_line_error,
    run_script,
)
from data_preprocessing import UserError, load_recipes, make_demo_dataset
from plot_loss_accuracy_graph import learned_nothing, write_results_table


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(output folder, run folder) after one epoch of VGG16 on tiny data, trained once for the tests below."""
    folder = tmp_path_factory.mktemp("run")
    split_root = make_demo_dataset(folder / "faces", TINY_IMAGES_PER_CLASS, size=32)
    assert run_script("VGG16", split_root, folder / "outputs") == 0
    return folder / "outputs", folder / "outputs" / "vgg16"


def test_a_training_run_writes_every_output(trained_run):
    output_dir, run_dir = trained_run
    for name in RUN_OUTPUTS:
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "backup").exists()  # Removed once training finished.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "VGG16" and metrics["n_test"] == 6 and metrics["epochs_run"] == 1
    assert {"test_auc", "test_ap", "test_eer", "valid_auc", "test_precision", "test_recall", "train_seconds",
            "unfreeze_rule", "warmup_epochs", "learned_nothing"} <= set(metrics)
    history = pd.read_csv(run_dir / "history.csv")
    assert {"accuracy", "loss", "val_accuracy", "val_loss", "phase", "seconds"} <= set(history.columns)
    assert (output_dir / "results.md").read_text().count("| VGG16 |") == 1


def test_the_model_card_is_front_matter_and_markdown_with_the_metrics_of_metrics_json(trained_run):
    _, run_dir = trained_run
    _, front_matter, body = (run_dir / "README.md").read_text().split("---\n", 2)
    card, metrics = yaml.safe_load(front_matter), json.loads((run_dir / "metrics.json").read_text())
    assert card["library_name"] == "keras" and "deepfake-detection" in card["tags"]
    results = card["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == metrics["trained_on"] == "faces"  # The tiny dataset's folder.
    assert {entry["type"]: entry["value"] for entry in results["metrics"]} == {
        "accuracy": metrics["test_accuracy"], "roc_auc": metrics["test_auc"], "eer": metrics["test_eer"],
        "ece": metrics["test_ece"],
    }
    for key in ("real_below", "fake_from", "test_auc"):
        assert card["deepfake_detector"][key] == metrics[key]
    assert metrics["temperature"] > 0 and {"test_ece", "test_ece_before_calibration"} <= set(metrics)
    assert (run_dir / "calibration.png").read_bytes().startswith(b"\x89PNG")
    assert card["deepfake_detector"]["demo_model"] is False and "demo_model" in metrics and "warning" not in metrics
    assert body.startswith("\n# VGG16 deepfake detector\n") and "DEMO MODEL" not in body
    for heading in ("## The model", "## Trained on", "## Test metrics", "## What it cannot judge", "## How it was made"):
        assert heading in body
    assert "8 train, 4 valid, 6 test images" in body and "TensorFlow" in body and "VGG16_finetuning.py" in body


def test_a_validation_split_too_small_keeps_the_temperature_at_1_and_the_card_says_so(trained_run):
    """On 4 validation images the fitted temperature went to 0.12 or to its bound of 20, and made ECE worse."""
    _, run_dir = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["temperature"] == 1.0 and metrics["calibrated"] is False
    assert metrics["calibration_skipped"].startswith("the validation split has 4 images (2 real, 2 fake), fewer than the 50")
    assert metrics["test_ece"] == metrics["test_ece_before_calibration"]
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    assert model.get_layer("temperature_scaling").get_weights()[0].item() == 1.0
    card = (run_dir / "README.md").read_text()
    assert f"p(fake) is not calibrated: {metrics['calibration_skipped']}; its temperature stays 1." in card
    assert "calibrated |" not in card and "before calibration" not in card


@pytest.mark.parametrize("real, fake, enough", [(25, 25, True), (40, 10, True), (24, 25, False), (45, 9, False)])
def test_a_temperature_is_fitted_on_50_validation_images_with_10_of_each_class(real, fake, enough):
    images = [(f"{number}.jpg", "real") for number in range(real)] + [(f"{number}.jpg", "fake") for number in range(fake)]
    assert (load_pre_trained_models.too_few_to_calibrate(images) is None) == enough


def test_predictions_agree_with_metrics_and_fake_is_1(trained_run):
    _, run_dir = trained_run
    predictions = pd.read_csv(run_dir / "predictions.csv")
    metrics = json.loads((run_dir / "metrics.json").read_text())

    assert sorted(predictions["label"]) == ["fake"] * 3 + ["real"] * 3
    assert all(f"/test/{label}/" in path for path, label in zip(predictions["path"], predictions["label"]))
    is_fake = predictions["label"] == "fake"
    says_fake = predictions["p_fake"] >= 0.5
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert (tn, fp, fn, tp) == (
        (~is_fake & ~says_fake).sum(), (~is_fake & says_fake).sum(),
        (is_fake & ~says_fake).sum(), (is_fake & says_fake).sum(),
    )
    assert metrics["test_accuracy"] == pytest.approx((is_fake == says_fake).mean())
    p = predictions["p_fake"].clip(1e-7, 1 - 1e-7)
    loss = -np.mean(np.where(is_fake, np.log(p), np.log(1 - p)))
    assert metrics["test_loss"] == pytest.approx(loss, abs=1e-4)


# What the README shows: plain Keras, in a process that imports nothing of this project.
LOAD_BY_HAND = """
import sys, keras, numpy as np
model = keras.models.load_model(sys.argv[1])  # safe_mode is on, no custom objects
size = model.input_shape[1]
images = [keras.utils.img_to_array(keras.utils.load_img(path, target_size=(size, size))) for path in sys.argv[2:]]
print(*model.predict(np.stack(images), verbose=0).ravel())
"""


def test_plain_keras_scores_raw_pixels_as_predictions_csv_does(trained_run, tmp_path):
    _, run_dir = trained_run
    predictions = pd.read_csv(run_dir / "predictions.csv")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_BY_HAND, str(run_dir / "model.keras"), *predictions["path"]],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load_pre_trained_models" not in result.stderr
    np.testing.assert_allclose([float(value) for value in result.stdout.split()], predictions["p_fake"], atol=1e-3)


def test_results_table_waits_for_a_script_that_is_writing_it(tmp_path):
    import fcntl
    import threading

    (tmp_path / "vgg19").mkdir()
    (tmp_path / "vgg19" / "metrics.json").write_text(json.dumps({"model": "VGG19", "test_accuracy": 0.9}))
    with open(tmp_path / ".results.lock", "w") as other_script:
        fcntl.flock(other_script, fcntl.LOCK_EX)
        writer = threading.Thread(target=write_results_table, args=(tmp_path,))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive() and not (tmp_path / "results.csv").exists()
        fcntl.flock(other_script, fcntl.LOCK_UN)
    writer.join(timeout=10)
    assert pd.read_csv(tmp_path / "results.csv")["Model"].tolist() == ["VGG19"]


def test_results_table_keeps_its_rows_across_runs(tmp_path):
    output_dir = tmp_path / "outputs"

    def finish(title, accuracy):
        run_dir = output_dir / title.lower()
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"model": title, "test_accuracy": accuracy, "test_loss": 0.3, "test_auc": None}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        write_results_table(output_dir)

    finish("ResNet50", 0.9)
    finish("VGG16", 0.8)
    finish("VGG16", 0.95)  # A second VGG16 run replaces its own row only.
    table = pd.read_csv(output_dir / "results.csv")
    assert table["Model"].tolist() == ["VGG16", "ResNet50"]
    assert table["Test Accuracy"].tolist() == [0.95, 0.9]
    assert list(table.columns) == ["Model", "Test Accuracy", "Test Loss", "Test AUC", "Test AP", "Test EER"]
    markdown = (output_dir / "results.md").read_text().splitlines()
    assert markdown[0] == "| Model | Test Accuracy | Test Loss | Test AUC | Test AP | Test EER |"
    # Without test predictions there is no Ensemble row.
    assert markdown[2:] == ["| VGG16 | 0.9500 | 0.3000 | - | - | - |", "| ResNet50 | 0.9000 | 0.3000 | - | - | - |"]


def test_the_demo_learns_and_ends_with_a_next_command_that_works(tmp_path, monkeypatch, capsys):
    """The README's first command, on the fast pipeline: offline, seeded, and it learns."""
    import data_preprocessing
    from VGG16_finetuning import main

    monkeypatch.setattr(data_preprocessing, "DEMO_DATA_DIR", tmp_path / "datasets" / "demo")
    monkeypatch.chdir(tmp_path)
    # --demo means 64 px, random weights and outputs/demo; 2 of its 5 epochs keep the test short.
    assert main(["--demo", "--pipeline", "tfdata", "--epochs", "2"]) == 0
    assert len(list((tmp_path / "datasets" / "demo" / "train" / "fake").glob("*.jpg"))) == 100
    metrics = json.loads((tmp_path / "outputs" / "demo" / "vgg16" / "metrics.json").read_text())
    assert (metrics["img_size"], metrics["weights"], metrics["epochs_run"], metrics["n_test"]) == (64, "none", 2, 60)
    # Marked as the demo's, and a model file to share: without the optimizer's state, VGG16's is about 60 MB.
    assert metrics["demo_model"] is True and metrics["warning"].startswith("DEMO MODEL")
    assert (tmp_path / "outputs" / "demo" / "vgg16" / "model.keras").stat().st_size < 80_000_000
    # From random weights, in two epochs, it ranks fakes above real faces better than chance
    # (AUC 0.76 on a 2-core CPU with TensorFlow 2.21; seeded, so the same each run).
    assert metrics["test_auc"] > 0.7
    # Its 60 validation faces are enough to fit a temperature on.
    assert metrics["calibrated"] is True and metrics["temperature"] != 1.0

    next_command = capsys.readouterr().out.strip().splitlines()[-1].split()
    # The script, as a path from where the demo ran, and the face, from the demo dataset.
    assert next_command[0] == "python" and (tmp_path / next_command[1]).samefile(REPOSITORY_DIR / "VGG16_finetuning.py")
    assert next_command[2] == "--demo" and next_command[4].startswith("datasets/demo/test/fake/")
    assert main(next_command[2:]) == 0
    printed = capsys.readouterr().out
    assert "  p_fake=" in printed and "no face found" not in printed  # Scored whole, as a cropped face.
    assert len(list((tmp_path / "outputs" / "demo" / "gradcam").glob("*-gradcam.png"))) == 1
    # Without --demo the model is looked for in outputs/: the error says where the demo's is.
    assert main(next_command[3:]) == 2
    error = capsys.readouterr().err
    assert f"no model at {tmp_path / 'outputs/vgg16/model.keras'}" in error and str(tmp_path / "outputs/demo/vgg16/model.keras") in error


def test_a_run_that_learned_nothing_says_so_after_its_accuracy_and_in_metrics_json(tiny_split_root, tmp_path, monkeypatch, capsys):
    # A model whose fake score is the same for every face: it calls every test image real.
    predict_logits = load_pre_trained_models.predict_logits
    monkeypatch.setattr(load_pre_trained_models, "predict_logits", lambda model, flow: np.full(len(predict_logits(model, flow)), -2.0))
    assert run_script("VGG16", tiny_split_root, tmp_path / "outputs") == 0
    printed = capsys.readouterr().out.splitlines()
    accuracy = next(number for number, line in enumerate(printed) if line.startswith("Test accuracy"))
    said = printed[accuracy + 1]
    assert said.startswith("This run learned nothing: it called every test image real at p(fake) 0.5")
    assert "--epochs" in said and "--warmup-epochs" in said and "check the data" in said
    metrics = json.loads((tmp_path / "outputs" / "vgg16" / "metrics.json").read_text())
    assert said == f"This run learned nothing: {metrics['learned_nothing']}"


@pytest.mark.parametrize(
    "title, weights, auc, confusion, expected",
    [
        ("VGG19", "none", None, [[3, 0], [3, 0]], "it called every test image real at p(fake) 0.5. VGG19 from random weights learns little in 5 epochs of the demo; try --epochs 15, or VGG16"),
        ("VGG19", "none", 0.793, [[30, 0], [30, 0]], "it called every test image real at p(fake) 0.5, though its test AUC of 0.793 says that it has begun to rank them. VGG19 from random weights learns little in 5 epochs of the demo; try --epochs 15, or VGG16"),
        ("VGG16", "none", 0.53, [[2, 1], [1, 2]], "its test AUC, 0.530, is within 0.05 of chance (0.5). VGG16 from random weights learns little in 5 epochs of the demo; try --epochs 15"),
        ("VGG19", "none", 0.91, [[3, 0], [1, 2]], None),
        ("VGG19", "none", 0.2, [[0, 3], [0, 3]], "it called every test image fake at p(fake) 0.5. VGG19 from random weights learns little in 5 epochs of the demo; try --epochs 15, or VGG16"),
    ],
)
def test_what_a_demo_run_that_learned_nothing_is_told(title, weights, auc, confusion, expected):
    recipe = next(recipe for recipe in load_recipes() if recipe.title == title)
    training = SimpleNamespace(demo_data=True, weights=weights)
    metrics = {"test_auc": auc, "confusion_matrix": confusion, "epochs_run": 5, "threshold": 0.5}
    assert learned_nothing(recipe, training, metrics) == expected


def test_run_stopped_during_evaluation_finishes_without_retraining(tiny_split_root, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "outputs"

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_pre_trained_models, "predict_logits", interrupt)
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "2") == 130
    monkeypatch.undo()
    # The model is saved again once calibrated, so the history tells whether an epoch was trained again.
    history_file = output_dir / "vgg16" / "history.csv"
    history = history_file.read_text()
    # Another --epochs would silently test the model trained for 2: refused, with what to do.
    capsys.readouterr()
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "3") == 2
    assert_one_line_error(capsys, "finished training with --epochs 2", "again with --epochs 2")

    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "2") == 0
    assert history_file.read_text() == history  # No epoch was trained again.
    assert json.loads((output_dir / "vgg16" / "metrics.json").read_text())["epochs_run"] == 2
    assert not (output_dir / "vgg16" / "backup").exists()


def test_resumed_checkpoint_only_replaces_a_better_model(tmp_path):
    run_dir = tmp_path / "vgg16"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,val_loss\n0,0.40\n1,0.25\n2,0.31\n")
    keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]).save(run_dir / "model.keras")
    training = SimpleNamespace(patience=2, unfreeze_rule="conv", epochs=5, tensorboard=False)
    callbacks = load_pre_trained_models.training_callbacks(run_dir, training, phase="fine-tune")
    # ModelCheckpoint and EarlyStopping both start from the best model so far, not from scratch.
    checkpoint = next(callback for callback in callbacks if isinstance(callback, keras.callbacks.ModelCheckpoint))
    assert checkpoint.best == 0.25
    early_stopping = next(callback for callback in callbacks if isinstance(callback, keras.callbacks.EarlyStopping))
    early_stopping.set_model(keras.Sequential())
    early_stopping.on_train_begin()
    assert early_stopping.best == 0.25

    # A model file cut off mid-write (as an earlier version could leave it) is no best model:
    # the next epoch replaces it, while the history still knows the best val_loss.
    (run_dir / "model.keras").write_bytes((run_dir / "model.keras").read_bytes()[:100])
    assert load_pre_trained_models.best_val_loss_so_far(run_dir) == 0.25
    callbacks = load_pre_trained_models.training_callbacks(run_dir, training, phase="fine-tune")
    checkpoint = next(callback for callback in callbacks if isinstance(callback, keras.callbacks.ModelCheckpoint))
    assert checkpoint.best in (None, np.inf)
    # A history whose val_loss was never a number knows no best.
    (run_dir / "history.csv").write_text("epoch,val_loss\n0,nan\n")
    assert load_pre_trained_models.best_val_loss_so_far(run_dir) is None


def test_a_loss_that_becomes_nan_stops_the_run_with_one_line(tiny_split_root, tmp_path, capsys):
    assert run_script("VGG16", tiny_split_root, tmp_path / "outputs", "--learning-rate", "1e30") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: the training loss became nan") and "lower --learning-rate" in error[-1]
    assert not (tmp_path / "outputs" / "vgg16" / "metrics.json").exists()
    # Nothing blocks the corrected command: the backup, which could only resume the failed run, is gone.
    assert not (tmp_path / "outputs" / "vgg16" / "backup").exists()


def test_a_new_run_sets_the_previous_run_aside(tmp_path):
    run_dir = tmp_path / "vgg16"
    run_dir.mkdir()
    for name in RUN_OUTPUTS:
        (run_dir / name).write_text("from the previous run")
    (run_dir / "metrics.json").write_text(json.dumps({"model": "VGG16", "test_accuracy": 0.9}))
    (run_dir / "eval-faces").mkdir()
    (run_dir / "eval-faces" / "metrics.json").write_text("an evaluation of the previous model")
    write_results_table(tmp_path)
    assert "| VGG16 |" in (tmp_path / "results.md").read_text()

    load_pre_trained_models.set_aside_previous_run(run_dir)
    assert not any((run_dir / name).exists() for name in [*RUN_OUTPUTS, "eval-faces"])
    assert all((run_dir / "previous" / name).exists() for name in [*RUN_OUTPUTS, "eval-faces/metrics.json"])
    assert "| VGG16 |" not in (tmp_path / "results.md").read_text()


def test_a_run_interrupted_under_an_earlier_version_is_refused_with_what_to_do(tmp_path):
    settings = {name: "value" for name in load_pre_trained_models.RESUMABLE_SETTINGS}
    run_dir = tmp_path / "vgg16"
    (run_dir / "backup").mkdir(parents=True)
    # Its models took scaled pixels: its weights do not fit today's model.
    (run_dir / "backup" / "settings.json").write_text(json.dumps(settings))
    (run_dir / "backup" / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}')
    with pytest.raises(UserError, match="earlier version of these scripts.*delete that folder"):
        load_pre_trained_models.start_or_resume(run_dir, SimpleNamespace(**settings))


def test_tensorboard_logs_one_step_per_epoch_per_phase_across_a_resume(tiny_split_root, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "outputs"
    options = ["--epochs", "3", "--warmup-epochs", "1", "--tensorboard"]
    add_callback(monkeypatch, InterruptAfterEpoch(1))  # Ctrl-C after the first fine-tuning epoch.
    assert run_script("VGG16", tiny_split_root, output_dir, *options) == 130
    monkeypatch.undo()
    assert run_script("VGG16", tiny_split_root, output_dir, *options) == 0

    def steps(phase, split):
        events = EventAccumulator(str(output_dir / "vgg16" / "logs" / phase / split), size_guidance={"tensors": 0})
        events.Reload()
        return sorted(event.step for event in events.Tensors("epoch_loss"))

    assert steps("warmup", "train") == steps("warmup", "validation") == [0]
    assert steps("fine-tune", "train") == steps("fine-tune", "validation") == [1, 2]

