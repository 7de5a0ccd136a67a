"""Nothing lost, nothing stuck: two runs at once, a kill at any moment, and every value checked.

Each test here reproduces a way a careless user, a crashing machine or a second terminal
once broke a run, and checks that it now ends in one line, or in a run that finishes.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import data_preprocessing
import load_pre_trained_models
import VGG16_finetuning
from conftest import REPOSITORY_DIR, CountEpochs, assert_one_line_error, run_script
from data_augmentation import evaluation_flow, image_flow, load_pixels, make_flows, model_input, read_upright, resized_image
from data_preprocessing import (
    READABLE_FORMATS,
    UserError,
    files_to_predict,
    image_problem,
    load_dataset,
    one_run_at_a_time,
    readable_images,
)

# --- Two runs at once -----------------------------------------------------------------

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from data_preprocessing import one_run_at_a_time
with one_run_at_a_time(Path(sys.argv[2])):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def another_run(tmp_path):
    """Start a process that holds OUTPUT_DIR/vgg16's lock, as a run training there would; yield it."""
    run_dir = tmp_path / "outputs" / "vgg16"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(REPOSITORY_DIR), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    yield holder
    holder.kill()
    holder.wait()


def test_a_second_run_into_the_same_folder_stops_and_names_the_first(another_run, tiny_split_root, tmp_path, capsys):
    output_dir = tmp_path / "outputs"
    assert run_script("VGG16", tiny_split_root, output_dir) == 2
    assert_one_line_error(capsys, f"{output_dir / 'vgg16'} is in use by pid {another_run.pid}", "--output-dir")
    assert not (output_dir / "vgg16" / "backup").exists()  # It wrote nothing.
    # Another model trains into the same output folder meanwhile.
    (output_dir / "vgg19").mkdir()
    with one_run_at_a_time(output_dir / "vgg19"):
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(another_run, tmp_path, capsys):
    another_run.send_signal(signal.SIGKILL)
    another_run.wait()
    with one_run_at_a_time(tmp_path / "outputs" / "vgg16"):
        assert f"ended without releasing it (pid {another_run.pid}" in capsys.readouterr().out
    # A run that ends, however it ends, leaves nothing to take over.
    with pytest.raises(UserError):
        with one_run_at_a_time(tmp_path / "outputs" / "vgg16"):
            raise UserError("a mistake")
    with one_run_at_a_time(tmp_path / "outputs" / "vgg16"):
        assert "Taking over" not in capsys.readouterr().out


def test_a_folder_of_pictures_is_locked_from_the_temporary_folder_whatever_path_names_it(tmp_path, monkeypatch):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (tmp_path / "link").symlink_to(pictures)
    monkeypatch.chdir(tmp_path)
    lock_file = data_preprocessing.pictures_lock_file(pictures)
    assert lock_file.parent == Path(tempfile.gettempdir())
    # A relative path, or a link, to the same folder takes the same lock: a second run is kept out all the same.
    assert data_preprocessing.pictures_lock_file(Path("pictures")) == lock_file == data_preprocessing.pictures_lock_file(tmp_path / "link")
    assert data_preprocessing.pictures_lock_file(tmp_path) != lock_file
    with one_run_at_a_time(pictures, "--annotate", lock_file):
        with pytest.raises(UserError, match="in use by pid"):
            with one_run_at_a_time(Path("link"), "--annotate", data_preprocessing.pictures_lock_file(Path("link"))):
                pass
    assert list(pictures.iterdir()) == []
    lock_file.unlink()


def test_a_killed_run_resumes_with_one_history_row_per_epoch(tiny_split_root, tmp_path):
    """kill -9 during training, then the same command: every epoch is in history.csv exactly once."""
    output_dir = tmp_path / "outputs"
    options = ["--data-dir", str(tiny_split_root), "--output-dir", str(output_dir), "--weights", "none",
               "--img-size", "32", "--batch-size", "4", "--epochs", "2"]
    training = subprocess.Popen(
        [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    history_file = output_dir / "vgg16" / "history.csv"
    while not history_file.exists() and training.poll() is None:
        time.sleep(0.02)
    # Killed just after the first row: while it saves the model, or backs up, or trains on.
    training.send_signal(signal.SIGKILL)
    training.wait()
    assert len(pd.read_csv(history_file)) >= 1

    assert VGG16_finetuning.main(options) == 0
    assert pd.read_csv(history_file)["epoch"].tolist() == [0, 1]
    assert json.loads((output_dir / "vgg16" / "metrics.json").read_text())["epochs_run"] == 2


# --- Every value checked, before any long work -------------------------------------------


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--learning-rate", "inf"], ["--learning-rate", "finite"]),
        (["--learning-rate", "nan"], ["--learning-rate", "finite"]),
        (["--warmup-epochs", "1", "--epochs", "2", "--fine-tune-learning-rate", "inf"], ["--fine-tune-learning-rate"]),
        (["--predict", "x.jpg", "--threshold", "nan"], ["--threshold", "finite"]),
        (["--evaluate", "--blur", "inf"], ["--blur", "finite"]),
        (["--evaluate", "--blur", "1e9"], ["--blur", "between 0 and 100"]),
        (["--img-size", "10000"], ["--img-size 10000", "1024 or less"]),
        (["--epoch", "3"], ["unrecognized arguments: --epoch 3"]),
    ],
)
def test_values_that_cannot_work_are_refused_with_one_line(capsys, tiny_split_root, tmp_path, options, fragments):
    assert run_script("VGG16", tiny_split_root, tmp_path / "outputs", *options) == 2
    assert_one_line_error(capsys, *fragments)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("where", ["inside", "around"])
def test_an_output_folder_inside_the_dataset_or_around_it_is_refused(capsys, tiny_split_root, where):
    output_dir = tiny_split_root / "train" / "real" / "results" if where == "inside" else tiny_split_root.parent
    assert run_script("VGG16", tiny_split_root, output_dir) == 2
    assert_one_line_error(capsys, "--output-dir", "choose")
    assert not (tiny_split_root / "train" / "real" / "results").exists()


def test_out_of_memory_ends_with_one_line_naming_batch_size_and_img_size(tiny_split_root, tmp_path, monkeypatch, capsys):
    def run_out_of_memory(*args):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(load_pre_trained_models, "fine_tune", run_out_of_memory)
    assert run_script("VGG16", tiny_split_root, tmp_path / "outputs") == 2
    assert_one_line_error(capsys, "out of memory", "--batch-size 4", "--img-size 32")


# --- Outputs checked before any image is read ----------------------------------------------


@pytest.fixture
def image_file(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "face.png"), np.full((40, 40, 3), 128, np.uint8))
    return folder / "face.png"


@pytest.mark.parametrize(
    "destination, fragments",
    [
        (["--csv", "/proc/scores.csv"], ["cannot write to /proc (files cannot be made there", "--csv"]),
        (["--csv", "{plain_file}/scores.csv"], ["--csv", "a file is in the way"]),
        (["--csv", "{tmp_path}"], ["--csv", "is a folder"]),
        (["--csv", "{image_folder}/new/scores.csv", "--predict", "{image_folder}"], ["--csv", "new/scores.csv is inside the image folder"]),
        (["--csv", "{image_folder}/face.png"], ["--csv", "one of the images given to --predict"]),
        (["--gradcam", "{plain_file}/maps"], ["--gradcam", "a file is in the way"]),
        # The overlays are images: beside a face given as a file, they would be scored the next time.
        (["--gradcam", "{image_folder}/maps"], ["--gradcam", "inside the image folder"]),
    ],
)
def test_an_output_that_cannot_be_written_is_named_before_any_image_is_read(
    capsys, tmp_path, image_file, monkeypatch, destination, fragments
):
    for check in ("image_problem", "photo_problem"):
        monkeypatch.setattr(data_preprocessing, check, lambda path: pytest.fail("an image was read"))
    (tmp_path / "notes.txt").write_text("a plain file")
    places = dict(plain_file=tmp_path / "notes.txt", tmp_path=tmp_path, image_folder=image_file.parent)
    options = [option.format(**places) for option in destination]
    if "--predict" not in options:
        options += ["--predict", str(image_file)]
    assert run_script("VGG16", None, tmp_path / "outputs", *options) == 2
    assert_one_line_error(capsys, *fragments)
    # Nothing was made where the outputs would have gone, nor written over the image.
    assert sorted(path.name for path in image_file.parent.iterdir()) == ["face.png"]
    assert cv2.imread(str(image_file)) is not None


# --- Images -----------------------------------------------------------------------------


def test_a_16_bit_grey_png_reads_as_its_8_bit_version_on_every_path(tmp_path):
    gradient = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)  # 0 to 64,484.
    cv2.imwrite(str(tmp_path / "deep.png"), gradient)
    cv2.imwrite(str(tmp_path / "eight_bit.png"), (gradient >> 8).astype(np.uint8))
    deep, eight_bit = tmp_path / "deep.png", tmp_path / "eight_bit.png"
    assert Image.open(deep).mode.startswith("I")  # Pillow's convert("RGB") would clip it to white.
    assert image_problem(deep) is None

    def idg(path):
        return image_flow([(path, "real")], None, 32, 1, False, 0)[0][0][0]

    def predicting(path):
        return model_input(read_upright(path), 32)

    def evaluating(path):
        return evaluation_flow([(path, "real")], 32, 1, perturbation=lambda image: image)[0][0][0]

    def tfdata(path):
        return resized_image(str(path), 32).numpy()

    for read in (idg, predicting, evaluating, tfdata):
        np.testing.assert_array_equal(read(deep), read(eight_bit), err_msg=read.__name__)
    assert 100 < load_pixels(deep, 32).mean() < 140  # A gradient from black to white, not white.


def test_an_image_too_large_for_pillow_is_reported_as_too_large_with_its_size(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "large.png"), np.zeros((60, 50, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # Pillow only warns, and Keras would read it.
    assert image_problem(tmp_path / "large.png") == "too large (3,000 pixels, more than Pillow's limit of 2,000); resize it"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Past twice the limit, Pillow refuses to open it.
    assert image_problem(tmp_path / "large.png") == "too large (3,000 pixels, more than Pillow's limit of 1,000); resize it"


def test_subfolders_and_broken_links_in_class_folders_are_reported(tiny_split_root, tmp_path, capsys):
    real = tiny_split_root / "train" / "real"
    (real / "more").mkdir()
    (real / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    assert "a folder" in dataset.bad_files[real / "more"]
    assert "a broken link" in dataset.bad_files[real / "gone.jpg"]
    assert files_to_predict([real]) == sorted(path for path in real.glob("*.jpg") if path.exists())
    assert f"skipping {real / 'gone.jpg'}: a broken link" in capsys.readouterr().err


def test_the_tfdata_format_refusal_counts_the_files_of_every_split(tiny_split_root, tmp_path):
    for split in ("train", "test"):
        Image.new("RGB", (32, 32)).save(tiny_split_root / split / "fake" / "scan.tif")
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    with pytest.raises(UserError, match=r"(2 such files)"):
        make_flows(dataset, 32, 4, 0, pipeline="tfdata")


def test_the_predict_error_names_every_format_that_is_read(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError) as error:
        readable_images([tmp_path / "notes.txt"])
    assert all(image_format in str(error.value) for image_format in ("JPEG", "PNG", "BMP", "WebP", "TIFF"))
    assert "notes.txt: not a decodable image" in capsys.readouterr().err


@pytest.mark.parametrize("image_format", READABLE_FORMATS)
def test_every_format_the_predict_error_names_is_read(tmp_path, image_format):
    path = tmp_path / f"face.{image_format.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), np.uint8)).save(path, image_format.upper())
    assert image_problem(path) is None


# --- Messages -------------------------------------------------------------------------


def test_evaluate_on_a_folder_without_fake_names_the_missing_fake(capsys, tiny_split_root, tmp_path):
    folder = tiny_split_root / "test"
    for path in (folder / "fake").iterdir():
        path.unlink()
    (folder / "fake").rmdir()
    assert run_script("VGG16", None, tmp_path / "outputs", "--evaluate", "--data-dir", str(folder)) == 2
    assert_one_line_error(capsys, "no fake/", str(folder / "fake"))


@pytest.fixture
def saved_model(tmp_path):
    model_file = tmp_path / "model.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(model_file)
    return model_file


def test_a_cut_off_keras_file_is_named_as_such(capsys, tmp_path, saved_model, image_file):
    saved_model.write_bytes(saved_model.read_bytes()[:2000])
    assert run_script("VGG16", None, tmp_path / "outputs", "--predict", str(image_file), "--model", str(saved_model)) == 2
    assert_one_line_error(capsys, f"{saved_model} is not a complete .keras file")


def test_an_evaluation_folder_is_made_only_once_its_inputs_are_read(capsys, tiny_split_root, tmp_path, saved_model):
    folder = tiny_split_root / "test"
    for path in (folder / "real").iterdir():
        path.write_text("not an image")
    output_dir = tmp_path / "outputs"
    assert run_script("VGG16", None, output_dir, "--evaluate", "--data-dir", str(folder), "--model", str(saved_model)) == 2
    assert "has no readable image" in capsys.readouterr().err
    assert not list(output_dir.rglob("eval-*"))  # Neither OUTPUT_DIR/vgg16/ nor OUTPUT_DIR/evaluations/.


# --- Resuming, and the best model --------------------------------------------------------


def begun_checkpoint(model, model_file, record_file, **options):
    """A SaveBestModel for a tiny model, as a fit that has begun holds it."""
    checkpoint = load_pre_trained_models.SaveBestModel(model_file, record_file, monitor="val_loss", **options)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    return checkpoint


def test_a_kill_while_saving_the_best_model_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model_file, record_file = tmp_path / "model.keras", tmp_path / "backup" / "best-model.json"
    checkpoint = begun_checkpoint(model, model_file, record_file)
    checkpoint.on_epoch_end(0, {"val_loss": 0.6})
    saved = model_file.read_bytes()
    assert json.loads(record_file.read_text()) == {"epoch": 1, "val_loss": 0.6}

    def killed_halfway(path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(saved[: len(saved) // 2])
        raise KeyboardInterrupt  # As a kill would stop it, halfway through the file.

    monkeypatch.setattr(model, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.on_epoch_end(1, {"val_loss": 0.4})
    assert model_file.read_bytes() == saved
    assert load_pre_trained_models.is_complete_model_file(model_file)
    assert json.loads(record_file.read_text())["val_loss"] == 0.6

    # The resumed run must beat the model that model.keras holds; the half-saved file is not it.
    resumed = begun_checkpoint(model, model_file, record_file, initial_value_threshold=0.6)
    resumed.on_epoch_end(1, {"val_loss": 0.9})
    assert model_file.read_bytes() == saved


def test_a_full_disk_while_saving_the_best_model_is_one_line_and_leaves_no_part_of_it(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    checkpoint = begun_checkpoint(model, tmp_path / "model.keras", tmp_path / "backup" / "best-model.json")

    def disk_fills(path, *args, **kwargs):
        Path(path).write_bytes(b"the first 100 MB of a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save", disk_fills)
    with pytest.raises(data_preprocessing.CannotWrite, match="the disk is full; free some space, then run the same command again"):
        checkpoint.on_epoch_end(0, {"val_loss": 0.6})
    assert list(tmp_path.iterdir()) == []


def test_an_epoch_trained_again_replaces_its_history_row(tmp_path):
    history_file = tmp_path / "history.csv"

    def train(epochs):
        logger = load_pre_trained_models.HistoryLogger(history_file, "fine-tune", "conv")
        logger.on_train_begin()
        logger.announced = True  # Nothing to announce without a model.
        for epoch in epochs:
            logger.on_epoch_begin(epoch)
            logger.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_loss": 0.5})

    train([0, 1])
    # Killed after epoch 1's row but before its backup: the resumed run trains epoch 1 again.
    train([1, 2])
    history = pd.read_csv(history_file)
    assert history["epoch"].tolist() == [0, 1, 2]
    assert list(history.columns) == ["epoch", "loss", "val_loss", "phase", "seconds"]


def resumable_settings(**changes):
    settings = {name: "value" for name in load_pre_trained_models.RESUMABLE_SETTINGS}
    return SimpleNamespace(**{**settings, "epochs": 3, **changes})


def back_up(run_dir, training, finished_epoch=True):
    """A backup/ as an interrupted run leaves it, with or without a finished epoch."""
    backup = run_dir / "backup"
    backup.mkdir(parents=True)
    settings = {name: str(getattr(training, name)) for name in load_pre_trained_models.RESUMABLE_SETTINGS}
    (backup / "settings.json").write_text(json.dumps({"backup_format": load_pre_trained_models.BACKUP_FORMAT, **settings}))
    # BackupAndRestore writes the weights first, then the number of the epoch they end.
    (backup / "latest.weights.h5").write_text("the weights of an epoch, whole or cut off by a kill")
    if finished_epoch:
        (backup / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}')
    return backup


def test_a_backup_with_no_finished_epoch_lets_a_corrected_command_start_afresh(tmp_path, capsys):
    """As after a crash in epoch 1, or a kill while the first backup was written."""
    run_dir = tmp_path / "vgg16"
    back_up(run_dir, resumable_settings(), finished_epoch=False)
    (run_dir / "previous").mkdir()
    (run_dir / "previous" / "metrics.json").write_text("the last finished run")
    (run_dir / "history.csv").write_text("epoch,val_loss\n0,0.5\n")  # Killed before its backup.

    load_pre_trained_models.start_or_resume(run_dir, resumable_settings(batch_size="16"))
    assert "nothing to resume, starting afresh" in capsys.readouterr().out
    assert json.loads((run_dir / "backup" / "settings.json").read_text())["batch_size"] == "16"
    assert (run_dir / "previous" / "metrics.json").read_text() == "the last finished run"
    assert (run_dir / "unfinished" / "history.csv").exists()


@pytest.mark.parametrize(
    "backup_file, content, refused_epochs, refusal, resumed_epochs",
    [
        # A run that finished training is not tested under other epochs.
        ("training-finished", "3", 5, "finished training with --epochs 3.*again with --epochs 3", 3),
        # A resume with fewer epochs than were trained would train none, silently.
        ("training_metadata.json", '{"epoch": 3, "batch": 0}', 2,
         "has trained 3 epochs, more than --epochs 2; run it again with --epochs 3 or more", 5),
    ],
)
def test_a_resume_with_epochs_its_backup_cannot_serve_is_refused(
    tmp_path, backup_file, content, refused_epochs, refusal, resumed_epochs
):
    run_dir = tmp_path / "vgg16"
    (back_up(run_dir, resumable_settings()) / backup_file).write_text(content)
    with pytest.raises(UserError, match=refusal):
        load_pre_trained_models.start_or_resume(run_dir, resumable_settings(epochs=refused_epochs))
    load_pre_trained_models.start_or_resume(run_dir, resumable_settings(epochs=resumed_epochs))


def test_a_phase_backup_cut_off_before_it_was_whole_trains_that_phase_again(tmp_path, capsys):
    """As a kill leaves the fine-tuning's first backup (issue 17): the warmup's state is the last usable one."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    images, labels = np.zeros((4, 2)), np.zeros((4, 1))

    def phase_backup(folder):
        return load_pre_trained_models.PhaseBackup(str(folder), double_checkpoint=True, delete_checkpoint=False)

    model.fit(images, labels, epochs=1, verbose=0, callbacks=[phase_backup(tmp_path / "warmup")])
    whole = (tmp_path / "warmup" / "latest.weights.h5").read_bytes()
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "latest.weights.h5").write_bytes(whole[: len(whole) // 2])

    counter = CountEpochs()
    model.fit(images, labels, initial_epoch=1, epochs=3, verbose=0, callbacks=[phase_backup(tmp_path / "backup"), counter])
    assert counter.epochs_begun == [1, 2]
    assert "could not be read (" in capsys.readouterr().err
    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text())["epoch"] == 3

    # A kill while an epoch's number was written leaves it empty: the backup before it is whole.
    (tmp_path / "backup" / "training_metadata.json").write_text("")
    counter = CountEpochs()
    model.fit(images, labels, initial_epoch=1, epochs=4, verbose=0, callbacks=[phase_backup(tmp_path / "backup"), counter])
    assert counter.epochs_begun == [2, 3]  # From the .bkp of epoch 2, not from the phase's start.
    assert "resuming from the one before it" in capsys.readouterr().err


def test_a_run_whose_val_loss_is_never_finite_ends_with_one_line(tmp_path):
    run_dir = tmp_path / "vgg16"
    run_dir.mkdir()
    (run_dir / "history.csv").write_text("epoch,loss,val_loss\n0,0.7,nan\n1,0.7,inf\n")
    with pytest.raises(load_pre_trained_models.TrainingDiverged, match="not a finite number in any of the 2 epochs"):
        load_pre_trained_models.load_best_model(run_dir, last_model=keras.Sequential())
    assert not (run_dir / "model.keras").exists()


def test_a_linked_folder_inside_a_folder_is_followed_and_a_file_given_twice_listed_once(tiny_split_root, tmp_path):
    folder = tmp_path / "L"
    folder.mkdir()
    (folder / "photos").symlink_to(tiny_split_root / "test" / "real")
    (folder / "photos" / "again").symlink_to(folder)  # A link back up the tree ends there.
    single = tiny_split_root / "test" / "fake" / "0000.jpg"
    shutil.copy(single, folder / "single.jpg")
    files = files_to_predict([folder, folder / "single.jpg", single, single])
    linked = sorted(folder / "photos" / path.name for path in (tiny_split_root / "test" / "real").glob("*.jpg"))
    assert files == [*linked, folder / "single.jpg", single]


@pytest.mark.parametrize("option", ["--csv", "--annotate", "--gradcam"])
def test_a_second_predict_run_with_the_same_output_stops_at_once(image_file, tmp_path, capsys, option):
    model_file = tmp_path / "model" / "model.keras"
    model_file.parent.mkdir()
    load_pre_trained_models.build_model(VGG16_finetuning.RECIPE, weights="none", img_size=32).save(model_file)
    target = tmp_path / ("scores.csv" if option == "--csv" else "pictures")
    if option == "--csv":
        target.write_text("path,frame,face,crop_x\nthe rows of the first run\n")  # A CSV of --predict, begun.
        holder = open(target, "a")
    else:
        target.mkdir()
        data_preprocessing.pictures_lock_file(target).touch()
        holder = open(data_preprocessing.pictures_lock_file(target), "r+")
    with holder:
        assert data_preprocessing.lock(holder, wait=False)  # The first run, still writing.
        status = run_script("VGG16", None, tmp_path / "outputs", "--model", str(model_file),
                            "--predict", str(image_file), "--faces", "off", option, str(target))
    assert status == 2
    assert_one_line_error(capsys, option, str(target), "wait for")
    if option == "--csv":
        assert target.read_text() == "path,frame,face,crop_x\nthe rows of the first run\n"


def test_pixels_hidden_by_transparency_are_not_what_is_scored(tmp_path):
    """An RGBA picture whose hidden pixels are red, and its visible ones blue half-seen over the grey."""
    pixels = np.zeros((20, 20, 4), np.uint8)
    pixels[..., 0] = 255  # Red everywhere, hidden on the left half.
    pixels[:, 10:] = (0, 0, 255, 128)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "cut-out.png")
    palette = Image.fromarray(pixels[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    palette.save(tmp_path / "palette.png")
    for name in ("cut-out.png", "palette.png"):
        read = load_pixels(tmp_path / name, 20)
        assert read[5, 2].tolist() == [128, 128, 128], name  # Fully transparent: the neutral grey.
    assert read_upright(tmp_path / "cut-out.png")[5, 15].tolist() == pytest.approx([64, 64, 191], abs=2)
