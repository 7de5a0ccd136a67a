"""End-to-end runs of the four scripts on tiny data, and what they leave behind."""

import json
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest

import load_pre_trained_models
from conftest import RUN_OUTPUTS, SCRIPTS, run_script
from data_preprocessing import UserError
from plot_loss_accuracy_graph import write_results_table


@pytest.mark.parametrize("title", SCRIPTS)
def test_each_script_trains_one_epoch_and_writes_every_output(title, tiny_split_root, tmp_path):
    output_dir = tmp_path / "outputs"
    assert run_script(title, tiny_split_root, output_dir) == 0

    run_dir = output_dir / SCRIPTS[title][1]
    for name in RUN_OUTPUTS:
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "backup").exists()  # Removed once training finished.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == title and metrics["n_test"] == 6 and metrics["epochs_run"] == 1
    assert {"test_auc", "test_ap", "test_eer", "valid_auc", "test_precision", "test_recall", "train_seconds",
            "unfreeze_rule"} <= set(metrics)
    history = pd.read_csv(run_dir / "history.csv")
    assert {"accuracy", "loss", "val_accuracy", "val_loss"} <= set(history.columns)
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.output_shape == (None, 1)
    assert (output_dir / "results.md").read_text().count(f"| {title} |") == 1


def test_predictions_agree_with_metrics_and_fake_is_1(tiny_split_root, tmp_path):
    output_dir = tmp_path / "outputs"
    assert run_script("VGG16", tiny_split_root, output_dir) == 0
    run_dir = output_dir / "vgg16"
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

    # The saved model gives the same p(fake) for a test image: predictions are of model.keras.
    model = keras.models.load_model(run_dir / "model.keras")
    image = keras.utils.load_img(predictions["path"][0], target_size=(32, 32))
    batch = keras.applications.vgg16.preprocess_input(keras.utils.img_to_array(image)[None])
    assert float(model.predict(batch, verbose=0)[0, 0]) == pytest.approx(predictions["p_fake"][0], abs=1e-4)


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


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


class CountEpochs(keras.callbacks.Callback):
    epochs_begun = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs_begun.append(epoch)


def add_callback(monkeypatch, callback):
    """Append `callback` to the ones fine_tune trains with."""
    shared_callbacks = load_pre_trained_models.training_callbacks
    monkeypatch.setattr(load_pre_trained_models, "training_callbacks", lambda *args: shared_callbacks(*args) + [callback])


def test_interrupted_run_resumes_without_losing_epochs(tiny_split_root, tmp_path, monkeypatch):
    output_dir = tmp_path / "outputs"
    add_callback(monkeypatch, InterruptAfterFirstEpoch())
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "3") == 130
    assert (output_dir / "vgg16" / "backup").exists()
    assert len(pd.read_csv(output_dir / "vgg16" / "history.csv")) == 1

    monkeypatch.undo()
    counter = CountEpochs()
    add_callback(monkeypatch, counter)
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "3") == 0
    assert counter.epochs_begun == [1, 2]  # Epoch 0 was not trained again.
    history = pd.read_csv(output_dir / "vgg16" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    metrics = json.loads((output_dir / "vgg16" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3
    assert metrics["train_seconds"] == pytest.approx(history["seconds"].sum(), abs=0.1)


def test_resume_with_other_options_is_refused(tiny_split_root, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "outputs"
    add_callback(monkeypatch, InterruptAfterFirstEpoch())
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "3") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "3", "--unfreeze-rule", "layers") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "--unfreeze-rule conv" in error and "delete that folder" in error
    assert len(pd.read_csv(output_dir / "vgg16" / "history.csv")) == 1  # The interrupted run is kept.


def test_demo_builds_its_dataset_and_runs_offline(tmp_path, monkeypatch):
    import data_preprocessing
    import VGG16_finetuning

    monkeypatch.setattr(data_preprocessing, "DEMO_DATA_DIR", tmp_path / "datasets" / "demo")
    monkeypatch.chdir(tmp_path)
    # --demo alone means 64 px, random weights and outputs/demo; --subset and --epochs keep it short.
    assert VGG16_finetuning.fine_tune(VGG16_finetuning.RECIPE, ["--demo", "--subset", "4", "--epochs", "1"]) == 0
    assert len(list((tmp_path / "datasets" / "demo" / "train" / "fake").glob("*.jpg"))) == 100
    metrics = json.loads((tmp_path / "outputs" / "demo" / "vgg16" / "metrics.json").read_text())
    assert (metrics["img_size"], metrics["weights"], metrics["n_test"]) == (64, "none", 8)


def test_run_stopped_during_evaluation_finishes_without_retraining(tiny_split_root, tmp_path, monkeypatch):
    output_dir = tmp_path / "outputs"

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_pre_trained_models, "predict_split", interrupt)
    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "2") == 130
    monkeypatch.undo()
    model_file = output_dir / "vgg16" / "model.keras"
    saved_at = model_file.stat().st_mtime_ns

    assert run_script("VGG16", tiny_split_root, output_dir, "--epochs", "2") == 0
    assert model_file.stat().st_mtime_ns == saved_at  # No epoch was trained again.
    assert json.loads((output_dir / "vgg16" / "metrics.json").read_text())["epochs_run"] == 2
    assert not (output_dir / "vgg16" / "backup").exists()


def best_val_loss_of_checkpoint(run_dir):
    callbacks = load_pre_trained_models.training_callbacks(run_dir, patience=None, resuming=True)
    return next(callback.best for callback in callbacks if isinstance(callback, keras.callbacks.ModelCheckpoint))


def test_resumed_checkpoint_only_replaces_a_better_model(tmp_path):
    run_dir = tmp_path / "vgg16"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,val_loss\n0,0.40\n1,0.25\n2,0.31\n")
    keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]).save(run_dir / "model.keras")
    assert best_val_loss_of_checkpoint(run_dir) == 0.25

    # A model file cut off mid-write is no best model: the next epoch replaces it.
    (run_dir / "model.keras").write_bytes((run_dir / "model.keras").read_bytes()[:100])
    assert best_val_loss_of_checkpoint(run_dir) is None


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


def test_a_run_interrupted_before_the_speed_options_existed_still_resumes(tmp_path):
    settings = {name: "value" for name in load_pre_trained_models.RESUMABLE_SETTINGS}
    run_dir = tmp_path / "vgg16"
    (run_dir / "backup").mkdir(parents=True)
    older = {name: value for name, value in settings.items() if name not in ("pipeline", "mixed_precision")}
    (run_dir / "backup" / "settings.json").write_text(json.dumps(older))
    args = SimpleNamespace(**{**settings, "pipeline": "idg", "mixed_precision": False})
    assert load_pre_trained_models.start_or_resume(run_dir, args) is True
    args.pipeline = "tfdata"
    with pytest.raises(UserError, match="--pipeline idg"):
        load_pre_trained_models.start_or_resume(run_dir, args)
