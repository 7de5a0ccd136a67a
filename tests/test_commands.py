"""The command lines: one-line errors with exit status 2, and the helper scripts' own commands."""

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

import data_augmentation
import data_preprocessing
import plot_loss_accuracy_graph
from conftest import REPOSITORY_DIR, assert_one_line_error, run_script

# --- Every user mistake: exit status 2, one line that says what to do ---------

def test_no_dataset_found(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(data_preprocessing, "DATASETS_DIR", tmp_path / "datasets")
    monkeypatch.setattr(data_preprocessing, "KAGGLE_INPUT_DIR", tmp_path / "kaggle")
    assert run_script("VGG16", None, tmp_path / "out") == 2
    assert_one_line_error(capsys, "no dataset found", str(tmp_path / "datasets"), "kaggle datasets download")


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--epochs", "0"], ["--epochs", "must be 1 or more"]),
        (["--batch-size", "many"], ["--batch-size", "not a whole number"]),
        (["--learning-rate", "-1"], ["--learning-rate", "-1"]),
        (["--preprocessing", "imagenet"], ["--preprocessing", "native", "rescale"]),
        (["--unfreeze-rule", "blocks"], ["--unfreeze-rule"]),
        (["--img-size", "31"], ["--img-size 31 is too small for VGG16", "32"]),
        (["--seed", "-1"], ["--seed", "between 0 and 4294967295"]),
        (["--weights", "missing.weights.h5"], ["--weights missing.weights.h5", "neither imagenet, none"]),
    ],
)
def test_bad_flag_values(capsys, tiny_split_root, tmp_path, options, fragments):
    assert run_script("VGG16", tiny_split_root, tmp_path / "out", *options) == 2
    assert_one_line_error(capsys, *fragments)


def test_inception_needs_75_pixels(capsys, tiny_split_root, tmp_path):
    assert run_script("InceptionV3", tiny_split_root, tmp_path / "out", "--img-size", "74") == 2
    assert_one_line_error(capsys, "InceptionV3", "75")


def test_demo_keeps_an_explicit_image_size_too_small_for_the_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(data_preprocessing, "DEMO_DATA_DIR", tmp_path / "demo")
    # The demo raises only its own default size to the model's minimum, never the user's.
    assert run_script("InceptionV3", None, tmp_path / "out", "--demo", "--img-size", "50") == 2
    assert_one_line_error(capsys, "--img-size 50 is too small for InceptionV3")


def test_missing_class_folder(capsys, tiny_split_root, tmp_path):
    for path in (tiny_split_root / "valid" / "fake").iterdir():
        path.unlink()
    (tiny_split_root / "valid" / "fake").rmdir()
    assert run_script("VGG16", tiny_split_root, tmp_path / "out") == 2
    assert_one_line_error(capsys, str(tiny_split_root / "valid" / "fake"), "missing")


def test_output_folder_that_cannot_be_written(capsys, tiny_split_root, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    assert run_script("VGG16", tiny_split_root, a_file / "outputs") == 2
    assert_one_line_error(capsys, "cannot write to", "--output-dir")


def test_a_real_command_line_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "resnet50_finetuning.py", "--data-dir", str(tmp_path / "nowhere")],
        cwd=REPOSITORY_DIR, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --data-dir {tmp_path / 'nowhere'} is not a folder; check the path"
    )


# --- The helper modules' own commands ----------------------------------------


def test_data_preprocessing_lists_counts_and_bad_files(capsys, tiny_split_root, tmp_path):
    argv = ["--data-dir", str(tiny_split_root), "--output-dir", str(tmp_path / "out")]
    assert data_preprocessing.main(argv) == 0
    assert "train        4       4" in capsys.readouterr().out

    bad = tiny_split_root / "test" / "real" / "notes.txt"
    bad.write_text("not an image")
    assert data_preprocessing.main(argv) == 1
    output = capsys.readouterr().out
    assert "test         3       3" in output
    assert f"{bad}: not a decodable image" in output
    assert bad.exists()


def test_data_preprocessing_lists_a_class_with_no_readable_image(capsys, tiny_split_root, tmp_path):
    for path in (tiny_split_root / "valid" / "fake").iterdir():
        path.write_bytes(b"")
    argv = ["--data-dir", str(tiny_split_root), "--output-dir", str(tmp_path / "out")]
    assert data_preprocessing.main(argv) == 1
    output = capsys.readouterr().out
    assert "valid        2       0" in output
    assert f"{tiny_split_root / 'valid' / 'fake' / '0001.jpg'}: empty file" in output


def test_freezing_report_and_its_options(capsys):
    import load_pre_trained_models

    report = load_pre_trained_models.describe_freezing(data_preprocessing.load_recipes()[0]).splitlines()
    assert report[0] == "VGG16"
    assert "5 trainable conv layers" in report[1] and report[1].endswith("block5_conv3")
    assert "3 trainable conv layers" in report[2]
    assert load_pre_trained_models.main(["--bogus"]) == 2
    assert_one_line_error(capsys, "--bogus")


@pytest.mark.parametrize("pipeline", ["idg", "tfdata"])
def test_data_augmentation_writes_a_grid(capsys, tiny_split_root, tmp_path, pipeline):
    argv = ["--data-dir", str(tiny_split_root), "--output-dir", str(tmp_path / "out"), "--img-size", "32",
            "--pipeline", pipeline]
    assert data_augmentation.main(argv) == 0
    grid = tmp_path / "out" / "augmentation_samples.png"
    assert grid.read_bytes().startswith(b"\x89PNG")


def test_plot_command_skips_a_run_stopped_before_its_first_epoch(capsys, tmp_path):
    (tmp_path / "vgg19").mkdir()
    (tmp_path / "vgg19" / "history.csv").write_text("")
    assert plot_loss_accuracy_graph.main([str(tmp_path)]) == 2
    assert_one_line_error(capsys, "no trained model")


def test_plot_command_without_runs_is_a_user_error(capsys, tmp_path):
    assert plot_loss_accuracy_graph.main([str(tmp_path)]) == 2
    assert_one_line_error(capsys, "no trained model", str(tmp_path))


# --- Quiet by default ------------------------------------------------------------

# How TensorFlow's C++ log lines begin: I, W, E or F, the date, the time, the thread.
TENSORFLOW_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ |absl::InitializeLog")


def test_a_script_prints_none_of_tensorflows_start_up_lines(tiny_split_root, tmp_path):
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), "--data-dir", str(tiny_split_root),
         "--weights", "none", "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = (result.stdout + result.stderr).splitlines()
    tensorflow_lines = [line for line in output if TENSORFLOW_LOG_LINE.search(line)]
    assert len(tensorflow_lines) <= 2, tensorflow_lines
    assert not [line for line in output if "E0000" in line or "cuInit" in line], output


def test_plot_command_points_to_the_demo_and_takes_demo(capsys):
    # The test runs in a folder of its own, so outputs/ here is this test's.
    run_dir = plot_loss_accuracy_graph.DEMO_OUTPUT_DIR / "vgg16"
    run_dir.mkdir(parents=True)
    (run_dir / "history.csv").write_text("epoch,accuracy,loss,val_accuracy,val_loss,seconds\n0,0.5,0.7,0.5,0.69,1.0\n")
    assert plot_loss_accuracy_graph.main([]) == 2
    assert_one_line_error(capsys, f"no trained model in {Path.cwd() / 'outputs'} (the demo's are in {Path.cwd() / 'outputs' / 'demo'}: add --demo)")
    assert plot_loss_accuracy_graph.main(["--demo"]) == 0
    assert (run_dir / "history.png").is_file()


# --- Ctrl-C -----------------------------------------------------------------------


class InterruptedImport:
    """An import finder that stops the import of load_pre_trained_models as Ctrl-C would while TensorFlow loads."""

    def find_spec(self, name, path=None, target=None):
        if name == "load_pre_trained_models":
            raise KeyboardInterrupt
        return None


@pytest.mark.parametrize("title", ["VGG16", "VGG19", "InceptionV3", "ResNet50"])
def test_ctrl_c_while_tensorflow_loads_is_one_line_and_exits_130(capsys, tiny_split_root, tmp_path, monkeypatch, title):
    # Without it, the start-up's own standard error is caught and given back, as outside the tests.
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delitem(sys.modules, "load_pre_trained_models")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    assert run_script(title, tiny_split_root, tmp_path / "out") == 130
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == ["Interrupted."]
    assert captured.err == ""


# --- Odd paths and unwritable places ------------------------------------------------


def test_a_predict_path_that_is_no_regular_file_is_named_as_such(capsys, tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    assert run_script("VGG16", None, tmp_path / "out", "--predict", "/dev/zero") == 2
    assert_one_line_error(capsys, "--predict /dev/zero: not a regular file")


def test_a_cache_that_cannot_be_written_is_a_warning_on_standard_error(capsys, tiny_split_root, tmp_path):
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("a plain file")
    images = sorted((tiny_split_root / "test" / "real").iterdir())
    assert data_preprocessing.check_images(images, tiny_split_root, in_the_way / "cache") == {}
    captured = capsys.readouterr()
    assert "could not cache the image check" not in captured.out
    assert captured.err.startswith(f"warning: could not cache the image check in {in_the_way / 'cache'}")


def test_sample_media_are_written_in_seconds_without_tensorflow(tmp_path):
    check = (
        "import sys, time, data_preprocessing\n"
        "started = time.perf_counter()\n"
        f"status = data_preprocessing.main(['--sample-media', {str(tmp_path / 'media')!r}])\n"
        "print(status, 'tensorflow' in sys.modules, round(time.perf_counter() - started, 1))\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPOSITORY_DIR, capture_output=True, text=True, timeout=60)
    status, tensorflow_loaded, seconds = result.stdout.splitlines()[-1].split()
    assert (status, tensorflow_loaded) == ("0", "False") and float(seconds) < 10 and result.stderr == ""
    assert sorted(path.name for path in (tmp_path / "media").iterdir()) == ["astronaut.jpg", "clip.mp4", "coffee.jpg"]
    clip = cv2.VideoCapture(str(tmp_path / "media" / "clip.mp4"))
    assert clip.get(cv2.CAP_PROP_FRAME_COUNT) / clip.get(cv2.CAP_PROP_FPS) == pytest.approx(10)
    assert (tmp_path / "media" / "clip.mp4").stat().st_size <= 5_000_000
