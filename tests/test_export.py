"""--export: the model as ONNX, SavedModel and LiteRT files, each checked in its own runtime, and --predict with model.onnx.

One tiny VGG16 (one epoch at 32 px) is trained and exported to all three formats once for
the whole module; the tests read those files, or export into folders of their own.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import keras
import pandas as pd
import pytest
import yaml

import data_preprocessing
import load_pre_trained_models
from conftest import TINY_IMAGES_PER_CLASS, assert_one_line_error, run_script
from data_preprocessing import make_demo_dataset, recipe_named

EXPORTED = ("model.onnx", "saved_model", "model.tflite")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the run folder, what --export all printed) after a VGG16 was trained for one epoch and exported."""
    folder = tmp_path_factory.mktemp("exported")
    split_root = make_demo_dataset(folder / "faces", TINY_IMAGES_PER_CLASS, size=32)
    assert run_script("VGG16", split_root, folder / "outputs") == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export(folder / "outputs" / "vgg16", "all") == 0
    return folder / "outputs" / "vgg16", printed.getvalue()


def export(model, formats):
    """Run VGG16's script with --export, as its command line would; return its exit status."""
    return run_script("VGG16", None, model.parent, "--export", formats, "--model", str(model))


def sha256_of_folder(folder):
    """What `find . -type f -printf '%P\\n' | sort | xargs sha256sum | sha256sum` prints inside the folder."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    lines = "".join(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_each_format_is_written_checked_against_keras_and_listed_in_the_card(exported):
    run_dir, printed = exported
    assert sorted(path.name for path in run_dir.iterdir() if path.name.startswith(".exporting")) == []
    metrics = json.loads((run_dir / "metrics.json").read_text())["exports"]
    card = (run_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["exports"] == metrics and front["deepfake_detector"]["model"] == "VGG16"
    for name, file_name in zip(data_preprocessing.EXPORT_FORMATS, EXPORTED):
        record, path = metrics[name], run_dir / file_name
        assert record["file"] == file_name and record["checked_on"] == "6 of the run's test images"
        assert 0 <= record["largest_difference"] <= 1e-4
        digest = sha256_of_folder(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["sha256"] == digest and f"`{digest}`" in card
        assert f"{path}: {record['size_bytes'] / 2**20:.1f} MB" in printed
    assert card.count("## Exported files") == 1 and 'run = Interpreter(model_path="model.tflite")' in card


def test_the_onnx_model_judges_the_astronaut_as_the_keras_model_does(exported, tmp_path, capsys):
    run_dir, _ = exported
    data_preprocessing.write_sample_media(tmp_path)
    judged = {}
    for model in ("model.keras", "model.onnx"):
        csv = tmp_path / f"{model}.csv"
        assert run_script("VGG16", None, run_dir.parent, "--predict", str(tmp_path / "astronaut.jpg"),
                          "--model", str(run_dir / model), "--csv", str(csv)) == 0
        header = next(line for line in capsys.readouterr().out.splitlines() if "; verdicts: " in line)
        judged[model] = (pd.read_csv(csv).iloc[0], header)
    (keras_row, keras_header), (onnx_row, onnx_header) = judged["model.keras"], judged["model.onnx"]
    assert onnx_row["p_fake"] == pytest.approx(keras_row["p_fake"], abs=1e-4)
    assert onnx_row["verdict"] == keras_row["verdict"] and onnx_header == keras_header  # The card's band.
    assert onnx_row["face"] == keras_row["face"] == 1 and onnx_row["model"].startswith(str(run_dir / "model.onnx"))


def test_grad_cam_of_an_onnx_model_asks_for_the_keras_model(exported, tmp_path, capsys):
    run_dir, _ = exported
    gradcam = tmp_path / "heat"
    assert run_script("VGG16", None, run_dir.parent, "--predict", str(run_dir / "predictions.csv"),
                      "--model", str(run_dir / "model.onnx"), "--gradcam", str(gradcam)) == 2
    assert_one_line_error(capsys, "Grad-CAM needs the .keras model")
    assert not gradcam.exists()


def test_an_unknown_format_is_refused_before_anything_loads(exported, capsys):
    run_dir, _ = exported
    assert export(run_dir / "model.keras", "onnx,coreml") == 2
    assert_one_line_error(capsys, "--export", "'coreml' is not a format: use onnx, saved_model, litert or all")


@pytest.fixture
def model_folder(exported, tmp_path):
    """A folder of its own holding the exported run's model.keras (a link) and its card, and nothing else."""
    run_dir, _ = exported
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.keras").symlink_to(run_dir / "model.keras")
    shutil.copy(run_dir / "README.md", folder)
    return folder


def test_a_model_without_a_card_is_refused(model_folder, capsys):
    (model_folder / "README.md").unlink()
    assert export(model_folder / "model.keras", "onnx") == 2
    assert_one_line_error(capsys, "model.keras has no model card (README.md) beside it")
    assert [path.name for path in model_folder.iterdir()] == ["model.keras"]


def test_a_read_only_folder_is_refused_before_any_export(model_folder, monkeypatch, capsys):
    model_folder.chmod(0o555)
    if os.geteuid() == 0:  # Permissions do not bind root: its write is refused as the folder's would be.
        write_text = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda path, *args, **kwargs: refused(path) if path.parent == model_folder
                            else write_text(path, *args, **kwargs))
    try:
        assert export(model_folder / "model.keras", "onnx") == 2
    finally:
        model_folder.chmod(0o755)
    assert_one_line_error(capsys, f"cannot write to {model_folder} (", "Permission denied", "choose another --model")
    assert sorted(path.name for path in model_folder.iterdir()) == ["README.md", "model.keras"]


def refused(path):
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


def test_a_full_disk_ends_in_one_line_and_leaves_no_part_of_a_file(model_folder, monkeypatch, capsys):
    def written_in_part(model, path, **kwargs):
        Path(path).write_bytes(b"the first part of an ONNX file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "export", written_in_part)
    card = (model_folder / "README.md").read_text()
    assert export(model_folder / "model.keras", "onnx") == 1
    assert_one_line_error(capsys, f"cannot write {model_folder / 'model.onnx'}: the disk is full; free some space")
    assert sorted(path.name for path in model_folder.iterdir()) == ["README.md", "model.keras"]
    assert (model_folder / "README.md").read_text() == card


def test_an_export_that_differs_from_keras_is_not_kept(model_folder, monkeypatch, capsys):
    # Without the run's predictions.csv, the file is checked on drawn demo faces.
    monkeypatch.setattr(load_pre_trained_models, "EXPORT_TOLERANCE", -1.0)
    assert export(model_folder / "model.keras", "saved_model") == 1
    assert_one_line_error(capsys, "TensorFlow gives a p(fake)", "on 32 drawn demo faces, more than -1", "was not kept")
    assert sorted(path.name for path in model_folder.iterdir()) == ["README.md", "model.keras"]


def test_a_model_that_computes_in_bfloat16_cannot_go_to_onnx_or_litert(model_folder, capsys):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # As --mixed-precision trains on a CPU.
    model = load_pre_trained_models.build_model(recipe_named("vgg16"), weights="none", img_size=32)
    (model_folder / "model.keras").unlink()
    load_pre_trained_models.save_whole(model, model_folder / "model.keras")
    assert export(model_folder / "model.keras", "onnx,litert") == 1
    assert_one_line_error(capsys, "computes in bfloat16 (it was trained with --mixed-precision), which ONNX and LiteRT cannot run")
    assert sorted(path.name for path in model_folder.iterdir()) == ["README.md", "model.keras"]
