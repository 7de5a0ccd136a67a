"""Applying trained models: --predict, Grad-CAM, --evaluate with perturbations, and the ensemble.

Two tiny models (VGG16 and VGG19, one epoch at 32 px) are trained once for the whole
module into the same output folder, and every test below reads or applies them; the
first redraws their figures with plot_loss_accuracy_graph.py.
"""

import contextlib
import errno
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import keras
import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn import metrics as sklearn_metrics

import data_preprocessing
import load_pre_trained_models
import plot_loss_accuracy_graph
from conftest import REPOSITORY_DIR, SCRIPTS, TINY_IMAGES_PER_CLASS, assert_one_line_error, run_script
from data_augmentation import perturb
from data_preprocessing import UserError, load_recipes, make_demo_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(split root, output folder) after VGG16 and VGG19 were each trained for one epoch."""
    folder = tmp_path_factory.mktemp("trained")
    split_root = make_demo_dataset(folder / "faces", TINY_IMAGES_PER_CLASS, size=32)
    output_dir = folder / "outputs"
    for title in ("VGG16", "VGG19"):
        assert run_script(title, split_root, output_dir) == 0
    return split_root, output_dir


def apply(title, output_dir, *options):
    """Run a script with --predict or --evaluate options, as its command line would."""
    return run_script(title, None, output_dir, *options)


def read_metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def printed_lines(output):
    """{path: (p_fake, verdict)} from --predict's printed lines (the tiny faces here are whole images)."""
    lines = [line.split("  ") for line in output.splitlines() if "  p_fake=" in line]
    return {fields[0]: (float(fields[-2].removeprefix("p_fake=")), fields[-1]) for fields in lines}


def test_plot_command_redraws_histories_and_prints_the_table(trained, capsys):
    split_root, output_dir = trained
    history_png = output_dir / "vgg16" / "history.png"
    history_png.unlink()
    capsys.readouterr()
    assert plot_loss_accuracy_graph.main([str(output_dir)]) == 0
    assert history_png.exists()
    assert "| VGG16 |" in capsys.readouterr().out


# --- Predict ------------------------------------------------------------------


def test_predict_gives_a_test_image_the_p_fake_of_predictions_csv(trained, tmp_path, capsys):
    split_root, output_dir = trained
    test_predictions = pd.read_csv(output_dir / "vgg16" / "predictions.csv")
    image = test_predictions["path"][4]
    capsys.readouterr()
    assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", "--threshold", "0.5", "--csv", str(tmp_path / "p.csv")) == 0

    printed = printed_lines(capsys.readouterr().out)
    written = pd.read_csv(tmp_path / "p.csv")
    assert written["path"].tolist() == list(printed) == [image]
    assert written["p_fake"][0] == pytest.approx(test_predictions["p_fake"][4], abs=1e-6)
    expected_verdict = "fake" if written["p_fake"][0] >= 0.5 else "real"
    assert written["verdict"][0] == expected_verdict
    assert printed[image] == (pytest.approx(written["p_fake"][0], abs=1e-4), expected_verdict)


def test_threshold_sets_the_verdict(trained, capsys):
    split_root, output_dir = trained
    image = str(split_root / "test" / "real" / "0000.jpg")
    assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", "--threshold", "0") == 0
    assert printed_lines(capsys.readouterr().out)[image][1] == "fake"  # Every p(fake) is at least 0.
    assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", "--threshold", "1") == 0
    assert printed_lines(capsys.readouterr().out)[image][1] == "real"


@pytest.fixture
def mixed_folder(tmp_path):
    """Images in four formats, colour and grey, odd sizes, with an alpha channel, and two junk files."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (41, 27, 3), np.uint8)
    Image.fromarray(colour[..., 0]).save(folder / "grey.png")
    Image.fromarray(colour).save(folder / "colour.bmp")
    Image.fromarray(colour).save(folder / "colour.webp")
    Image.fromarray(np.dstack([colour, np.full((41, 27), 128, np.uint8)])).save(folder / "alpha.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    return folder


def test_predict_reads_every_format_and_skips_junk_without_touching_the_folder(trained, mixed_folder, capsys):
    _, output_dir = trained
    before = {path.name: path.read_bytes() for path in mixed_folder.iterdir()}
    assert apply("VGG16", output_dir, "--predict", str(mixed_folder), "--faces", "off") == 0

    captured = capsys.readouterr()
    scored = {path.rsplit("/", 1)[1] for path in printed_lines(captured.out)}
    assert scored == {"grey.png", "colour.bmp", "colour.webp", "alpha.png"}
    assert f"warning: skipping {mixed_folder / 'notes.txt'}: not a decodable image" in captured.err
    assert f"warning: skipping {mixed_folder / 'broken.jpg'}" in captured.err
    assert {path.name: path.read_bytes() for path in mixed_folder.iterdir()} == before


def test_gradcam_overlay_is_enlarged_and_written_outside_the_image_folder(trained, tmp_path, capsys):
    _, output_dir = trained
    image_file = tmp_path / "images" / "odd.png"
    image_file.parent.mkdir()
    image = cv2.imread(str(sorted((trained[0] / "test" / "fake").iterdir())[0]))
    cv2.imwrite(str(image_file), cv2.resize(image, (37, 23)))  # Width 37, height 23.
    gradcam_dir = tmp_path / "gradcam"
    assert apply("VGG19", output_dir, "--predict", str(image_file), "--faces", "off", "--gradcam", str(gradcam_dir)) == 0

    overlay = cv2.imread(str(gradcam_dir / "odd.png-gradcam.png"))
    # A 37 x 23 image is enlarged so that its p(fake), verdict and colour bar can be read.
    assert max(overlay.shape[:2]) >= 256
    assert sorted(path.name for path in image_file.parent.iterdir()) == ["odd.png"]


@pytest.mark.parametrize("title, layer", [("VGG16", "block5_conv3"), ("ResNet50", "conv5_block3_out")])
def test_gradcam_reads_the_last_conv_feature_map(title, layer):
    recipe = next(recipe for recipe in load_recipes() if recipe.title == title)
    model = load_pre_trained_models.build_model(recipe, weights="none", img_size=64)
    feature_map = load_pre_trained_models.gradcam_layer(load_pre_trained_models.base_of(model))
    assert feature_map.name == layer
    heatmaps = load_pre_trained_models.grad_cam(model, np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)))
    assert heatmaps.shape == (2, *feature_map.output.shape[1:3])
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1


def test_outputs_are_named_by_their_inputs_whole_name_and_never_collide(tmp_path):
    paths = [tmp_path / "real" / "0001.jpg", tmp_path / "fake" / "0001.jpg", tmp_path / "fake" / "0002.jpg",
             tmp_path / "more" / "real" / "0001.jpg", tmp_path / "astro.jpg", tmp_path / "astro.webp"]
    assert list(plot_loss_accuracy_graph.output_names(paths).values()) == [
        "real-0001.jpg", "fake-0001.jpg", "0002.jpg", "real-0001~2.jpg", "astro.jpg", "astro.webp"
    ]


def test_each_overlay_counted_is_a_file_of_its_own(trained, tmp_path, capsys):
    """Before, a.jpg's overlay and a-face1.jpg's shared a name, and two were counted for one file."""
    split_root, output_dir = trained
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "a-face1.jpg", "a.png"):
        shutil.copy(split_root / "test" / "fake" / "0001.jpg", images / name)
    shutil.copytree(split_root / "test" / "real", tmp_path / "more" / "images")
    shutil.copy(split_root / "test" / "real" / "0001.jpg", tmp_path / "more" / "a.jpg")
    inputs = [images, tmp_path / "more", images / "a.jpg"]  # a.jpg twice: judged once.
    status = apply("VGG16", output_dir, "--predict", *map(str, inputs), "--faces", "off",
                   "--gradcam", str(tmp_path / "maps"), "--annotate", str(tmp_path / "marked"))
    assert status == 0
    output = capsys.readouterr().out
    overlays, marked = sorted((tmp_path / "maps").glob("*.png")), sorted((tmp_path / "marked").glob("*.jpg"))
    judged = 4 + TINY_IMAGES_PER_CLASS["test"]
    assert len(overlays) == len(marked) == judged
    assert f"Wrote {judged} Grad-CAM overlays" in output and f"Wrote {judged} annotated pictures" in output
    assert {"images-a.jpg-gradcam.png", "a-face1.jpg-gradcam.png", "a.png-gradcam.png", "more-a.jpg-gradcam.png"} <= {path.name for path in overlays}


# --- Evaluate -----------------------------------------------------------------


def test_evaluate_writes_its_own_folder_and_leaves_the_training_run_alone(trained, capsys):
    split_root, output_dir = trained
    run_dir = output_dir / "vgg16"
    training_files = {path: path.read_bytes() for path in [*run_dir.iterdir(), output_dir / "results.md"] if path.is_file()}
    assert apply("VGG16", output_dir, "--evaluate", "--data-dir", str(split_root)) == 0

    eval_dir = run_dir / "eval-faces"
    for name in ("metrics.json", "predictions.csv", "roc.png", "precision_recall.png", "confusion_matrix.png"):
        assert (eval_dir / name).stat().st_size > 0, name
    assert {path: path.read_bytes() for path in training_files} == training_files
    # Unperturbed, on the training run's own test split, the evaluation repeats its figures.
    evaluated, trained_on = read_metrics(eval_dir), read_metrics(run_dir)
    for key in ("test_accuracy", "test_auc", "test_ap", "test_eer", "n_test"):
        assert evaluated[key] == pytest.approx(trained_on[key], abs=1e-5), key


def test_ctrl_c_while_evaluating_is_one_line_and_exits_130(trained, tmp_path, monkeypatch, capsys):
    split_root, output_dir = trained

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_pre_trained_models, "write_evaluation", interrupted)
    assert apply("VGG16", output_dir, "--evaluate", "--data-dir", str(split_root)) == 130
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "Interrupted; run the same command again to evaluate afresh"
    assert "Traceback" not in captured.err


def test_evaluate_takes_a_folder_of_real_and_fake_and_perturbs_it(trained, tmp_path):
    split_root, output_dir = trained
    other = tmp_path / "other-generator"
    shutil.copytree(split_root / "test", other)
    assert apply("VGG16", output_dir, "--evaluate", "--data-dir", str(other), "--jpeg-quality", "10", "--blur", "2") == 0

    eval_dir = output_dir / "vgg16" / "eval-other-generator-jpeg10-blur2.0"
    metrics = read_metrics(eval_dir)
    assert (metrics["jpeg_quality"], metrics["blur_sigma"], metrics["n_test"]) == (10, 2.0, 6)
    perturbed = pd.read_csv(eval_dir / "predictions.csv")
    clean = pd.read_csv(output_dir / "vgg16" / "predictions.csv")
    assert not np.allclose(perturbed["p_fake"], clean["p_fake"], atol=1e-7)


def test_perturbations_change_the_pixels():
    image = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    untouched = perturb(image)
    np.testing.assert_array_equal(untouched, np.rint(image))
    blurred, compressed = perturb(image, blur_sigma=1.5), perturb(image, jpeg_quality=20)
    assert blurred.shape == compressed.shape == image.shape
    # Blur smooths noise; strong compression moves many pixels.
    assert np.abs(np.diff(blurred, axis=0)).mean() < 0.5 * np.abs(np.diff(untouched, axis=0)).mean()
    assert np.abs(compressed - untouched).mean() > 10


# --- The ensemble -------------------------------------------------------------


def expected_ensemble(output_dir):
    """The Ensemble as documented: p(fake) averaged with weights max(valid AUC - 0.5, 0.01), normalised."""
    runs = [read_metrics(output_dir / SCRIPTS[title][1]) for title in ("VGG16", "VGG19")]
    raw = [max(metrics["valid_auc"] - 0.5, 0.01) for metrics in runs]
    weights = [weight / sum(raw) for weight in raw]
    predictions = [pd.read_csv(output_dir / SCRIPTS[title][1] / "predictions.csv").set_index("path").sort_index()
                   for title in ("VGG16", "VGG19")]
    p_fake = weights[0] * predictions[0]["p_fake"] + weights[1] * predictions[1]["p_fake"]
    return weights, p_fake, (predictions[0]["label"] == "fake").astype(int)


def test_results_table_gets_the_weighted_average_as_its_ensemble_row(trained):
    _, output_dir = trained
    weights, p_fake, labels = expected_ensemble(output_dir)
    table = pd.read_csv(output_dir / "results.csv").set_index("Model")
    assert table.index.tolist() == ["VGG16", "VGG19", "Ensemble"]
    ensemble = table.loc["Ensemble"]
    assert ensemble["Test Accuracy"] == pytest.approx(((p_fake >= 0.5) == labels).mean())
    assert ensemble["Test AUC"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, p_fake))
    assert ensemble["Test AP"] == pytest.approx(sklearn_metrics.average_precision_score(labels, p_fake))
    markdown = (output_dir / "results.md").read_text()
    assert "| Ensemble |" in markdown
    assert f"VGG16 {weights[0]:.2f}, VGG19 {weights[1]:.2f}" in markdown


def test_ensemble_weights_grow_with_validation_auc_above_chance():
    from plot_loss_accuracy_graph import ensemble_weights

    # Above chance by 0.4, 0.2 and nothing (a model worse than chance keeps the floor of 0.01).
    assert ensemble_weights([0.9, 0.7, 0.4]) == pytest.approx([0.4 / 0.61, 0.2 / 0.61, 0.01 / 0.61])


def test_ensemble_row_needs_two_models_on_the_same_test_images(trained, tmp_path):
    from plot_loss_accuracy_graph import write_results_table

    _, output_dir = trained
    copy = tmp_path / "outputs"
    for name in ("vgg16", "vgg19"):
        (copy / name).mkdir(parents=True)
        for file_name in ("metrics.json", "predictions.csv"):
            shutil.copy(output_dir / name / file_name, copy / name / file_name)
    predictions = pd.read_csv(copy / "vgg19" / "predictions.csv")
    predictions.drop(index=0).to_csv(copy / "vgg19" / "predictions.csv", index=False)  # Another test split.
    assert "| Ensemble |" not in write_results_table(copy)


def test_predict_with_the_ensemble_averages_the_models(trained, capsys):
    split_root, output_dir = trained
    weights, p_fake, _ = expected_ensemble(output_dir)
    image = str(split_root / "test" / "fake" / "0001.jpg")
    assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", "--model", "ensemble") == 0
    assert printed_lines(capsys.readouterr().out)[image][0] == pytest.approx(p_fake[image], abs=1e-4)


def test_the_ensemble_as_a_detector_averages_the_models_and_two_detectors_live_side_by_side(trained, capfd):
    split_root, output_dir = trained
    weights, p_fake, _ = expected_ensemble(output_dir)
    image = str(split_root / "test" / "fake" / "0001.jpg")
    Detector = load_pre_trained_models.Detector
    ensemble = Detector.load("ensemble", output_dir=output_dir, faces="off")
    assert [member.title for member in ensemble.members] == ["VGG16", "VGG19"]
    assert [member.weight for member in ensemble.members] == pytest.approx(weights)
    judged = ensemble.judge(image)
    assert judged.faces[0].p_fake == pytest.approx(p_fake[image], abs=1e-4)
    # No band was chosen for the ensemble's average, and the result says so.
    assert judged.faces[0].verdict == "uncertain" and judged.band.thresholds() == []

    vgg16 = Detector.load(output_dir / "vgg16", faces="off", threshold=0.5)
    vgg19 = Detector.load(output_dir / "vgg19" / "model.keras", faces="off", threshold=0.5)
    alone = vgg16.judge(image).faces[0].p_fake
    assert vgg19.judge(image).faces[0].p_fake != pytest.approx(alone, abs=1e-9)
    assert vgg16.judge(image).faces[0].p_fake == pytest.approx(alone, abs=1e-9)
    with pytest.raises(UserError, match="Grad-CAM explains one model"):
        Detector.load("ensemble", output_dir=output_dir, gradcam=True)
    with pytest.raises(UserError, match="not VGG19's"):
        Detector.load(output_dir / "vgg16", recipe=load_recipes()[1])
    assert capfd.readouterr().out == ""


# --- Mistakes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--gradcam", "maps"], ["--gradcam", "add --predict"]),
        (["--csv", "p.csv"], ["--csv", "add --predict"]),
        (["--evaluate", "--jpeg-quality", "0"], ["--jpeg-quality", "between 1 and 100"]),
        (["--evaluate", "--jpeg-quality", "101"], ["--jpeg-quality", "between 1 and 100"]),
        (["--evaluate", "--blur", "-1"], ["--blur", "between 0 and 100"]),
        (["--jpeg-quality", "75"], ["--jpeg-quality", "add --evaluate"]),
        (["--predict", "x.jpg", "--threshold", "2"], ["--threshold", "between 0 and 1"]),
        (["--predict", "x.jpg", "--evaluate"], ["separate runs"]),
        (["--predict", "x.jpg", "--model", "ensemble", "--gradcam", "maps"], ["Grad-CAM explains one model"]),
        (["--annotate", "marked"], ["--annotate", "add --predict"]),
        (["--frames", "8"], ["--frames", "add one of them"]),
        (["--faces", "auto"], ["--faces", "add one of them"]),
        (["--predict", "x.jpg", "--min-face", "10"], ["--min-face", "20 or more"]),
        (["--predict", "x.jpg", "--faces", "off", "--min-face", "40"], ["--min-face", "--faces auto"]),
        (["--predict", "x.jpg", "--frames", "0"], ["--frames", "1 or more"]),
        (["--predict", "x.jpg", "--epochs", "3"], ["--epochs", "--predict and --evaluate train none"]),
        (["--evaluate", "--img-size", "64"], ["--img-size", "the size the model was trained at"]),
    ],
)
def test_wrong_combinations_are_user_errors(capsys, tmp_path, options, fragments):
    assert apply("VGG16", tmp_path / "outputs", *options) == 2
    assert_one_line_error(capsys, *fragments)


def test_predict_or_evaluate_without_a_trained_model_says_to_train_first(capsys, tiny_split_root, tmp_path):
    image = str(tiny_split_root / "test" / "real" / "0000.jpg")
    assert apply("VGG16", tmp_path / "outputs", "--predict", image) == 2
    assert_one_line_error(capsys, f"no model in {tmp_path / 'outputs' / 'vgg16'} (looked for model.keras)", "train VGG16 first", "--model FILE")
    assert apply("VGG16", tmp_path / "outputs", "--evaluate", "--data-dir", str(tiny_split_root)) == 2
    assert_one_line_error(capsys, "train VGG16 first")
    assert not (tmp_path / "outputs" / "vgg16").exists()
    assert apply("VGG16", tmp_path / "outputs", "--predict", image, "--model", "ensemble") == 2
    assert_one_line_error(capsys, "two or more models")


def test_no_model_or_no_dataset_says_which_folder_it_looked_in_and_how_to_point_elsewhere(capsys, tiny_split_root, tmp_path):
    # The test runs in a folder of its own, away from the checkout, as from a user's home folder.
    script = importlib.import_module("VGG16_finetuning")
    image = str(tiny_split_root / "test" / "real" / "0000.jpg")
    for options, folder in (([], Path.cwd() / "outputs" / "vgg16"), (["--demo"], Path.cwd() / "outputs" / "demo" / "vgg16")):
        assert script.main([*options, "--predict", image]) == 2
        assert_one_line_error(capsys, f"there is no model in {folder} ", "--output-dir")
    # --model given: the path given is what is wrong, not the training.
    assert script.main(["--predict", image, "--model", "mine/model.keras"]) == 2
    error = capsys.readouterr().err
    assert f"--model {Path.cwd() / 'mine' / 'model.keras'} does not exist" in error
    assert "train VGG16 first" not in error and "--model FILE" not in error
    with pytest.raises(UserError, match=f"there is no model at {re.escape(str(Path.cwd()))}"):
        load_pre_trained_models.Detector.load("nothing.keras")
    assert plot_loss_accuracy_graph.main([]) == 2
    assert_one_line_error(capsys, f"no trained model in {Path.cwd() / 'outputs'};", "--output-dir")
    for data_dir, message in (("photos", "is not a folder"), (".", "holds neither")):
        Path("photos").mkdir(exist_ok=True)
        with pytest.raises(UserError, match=message) as error:
            data_preprocessing.find_split_root(data_dir if message == "holds neither" else "missing")
        assert str(Path.cwd()) in str(error.value)


def test_predict_with_no_readable_image_is_a_user_error(trained, tmp_path, capsys):
    _, output_dir = trained
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    assert apply("VGG16", output_dir, "--predict", str(junk)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0] == f"warning: skipping {junk}: not a decodable image"
    assert error[-1].startswith("error: none of the files given to --predict is a readable image or a video")


def test_gradcam_folder_inside_the_image_folder_is_refused(trained, capsys):
    split_root, output_dir = trained
    images = split_root / "test" / "real"
    assert apply("VGG16", output_dir, "--predict", str(images), "--gradcam", str(images / "maps")) == 2
    assert_one_line_error(capsys, "inside the image folder")
    assert not (images / "maps").exists()


def test_a_model_of_another_script_is_refused(trained, capsys):
    split_root, output_dir = trained
    image = str(split_root / "test" / "real" / "0000.jpg")
    vgg19_model = str(output_dir / "vgg19" / "model.keras")
    assert apply("VGG16", output_dir, "--predict", image, "--model", vgg19_model) == 2
    assert_one_line_error(capsys, "vgg19_deepfake_detector", "not VGG16's")


def test_evaluate_judges_at_the_threshold_given(trained, tmp_path):
    split_root, output_dir = trained
    assert apply("VGG16", output_dir, "--evaluate", "--data-dir", str(split_root), "--threshold", "0") == 0
    metrics = read_metrics(output_dir / "vgg16" / "eval-faces")
    # At p(fake) 0 every image is called fake: the 3 real ones are all false positives.
    assert metrics["threshold"] == 0 and metrics["confusion_matrix"] == [[0, 3], [0, 3]]


def test_gradcam_still_shows_regions_when_p_fake_saturates():
    recipe = next(recipe for recipe in load_recipes() if recipe.title == "VGG16")
    model = load_pre_trained_models.build_model(recipe, weights="none", img_size=32)
    output_layer = model.get_layer("fake_logit")
    # A huge bias pins p(fake) at exactly 1.0 in float32, where the sigmoid's gradient is 0.
    output_layer.bias.assign([100.0])
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    assert np.all(model.predict(images, verbose=0) == 1.0)
    kernel = np.random.default_rng(1).normal(0, 1, output_layer.kernel.shape)
    peaks = []
    # Grad-CAM keeps only the regions that raise the score, so a random head may raise it
    # nowhere; with its kernel negated it then raises it somewhere. Either way, not a blank map.
    for sign in (1, -1):
        output_layer.kernel.assign(sign * kernel)
        peaks.append(load_pre_trained_models.grad_cam(model, images).max())
    assert max(peaks) == pytest.approx(1.0)


def test_a_face_judged_real_gets_the_map_of_the_evidence_for_real():
    keras.utils.set_random_seed(0)
    recipe = next(recipe for recipe in load_recipes() if recipe.title == "VGG16")
    model = load_pre_trained_models.build_model(recipe, weights="none", img_size=32)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.uint8)
    toward_fake = load_pre_trained_models.grad_cam(model, images)
    toward_real = load_pre_trained_models.grad_cam(model, images, toward="real")
    assert max(toward_fake.max(), toward_real.max()) == pytest.approx(1.0)
    assert not np.allclose(toward_fake, toward_real)
    # The evidence for real is the evidence for fake of the same model with its score negated.
    output_layer = model.get_layer("fake_logit")
    kernel, bias = output_layer.kernel.numpy(), output_layer.bias.numpy()
    output_layer.kernel.assign(-kernel)
    output_layer.bias.assign(-bias)
    np.testing.assert_allclose(load_pre_trained_models.grad_cam(model, images), toward_real, atol=1e-5)
    output_layer.kernel.assign(kernel)
    output_layer.bias.assign(bias)
    # One class per image: each map is that image's.
    mixed = load_pre_trained_models.grad_cam(model, images, toward=["fake", "real"])
    np.testing.assert_allclose(mixed, [toward_fake[0], toward_real[1]], atol=1e-5)
    # The detector asks, face by face, for the evidence for the verdict it gave.
    card = plot_loss_accuracy_graph.WhoseVerdicts("VGG16, untrained", None, plot_loss_accuracy_graph.Verdicts(None, None))
    member = load_pre_trained_models.Member("VGG16", model, Path("model.keras"), card)
    for threshold, verdict in ((1.0, "real"), (0.0, "fake")):
        judging = load_pre_trained_models.JudgingOptions(faces="off", threshold=threshold, gradcam=True)
        face = load_pre_trained_models.Detector([member], judging).judge(images[1]).faces[0]
        assert (face.verdict, face.heatmap_of) == (verdict, verdict)
        np.testing.assert_allclose(face.heatmap, (toward_real if verdict == "real" else toward_fake)[1], atol=1e-5)


def test_ctrl_c_while_predicting_keeps_the_rows_judged_and_exits_130(trained, tmp_path, monkeypatch, capsys):
    split_root, output_dir = trained
    calls, read = [], load_pre_trained_models.read_upright

    def interrupted_on_the_third_image(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read(path)

    # Images are judged a batch at a time; batches of one make each image's row land before the next is read.
    monkeypatch.setattr(load_pre_trained_models, "read_upright", interrupted_on_the_third_image)
    csv_file = tmp_path / "p.csv"
    status = apply("VGG16", output_dir, "--predict", str(split_root / "test" / "real"), "--faces", "off",
                   "--batch-size", "1", "--csv", str(csv_file))
    assert status == 130
    output = capsys.readouterr().out
    assert output.splitlines()[-1] == f"Interrupted. {csv_file} holds 2 rows."
    rows = pd.read_csv(csv_file)
    assert len(rows) == 2 and rows["p_fake"].notna().all()


def test_a_missing_predict_path_is_reported_before_tensorflow_loads(tmp_path):
    check = (
        "import sys, VGG16_finetuning\n"
        f"status = VGG16_finetuning.main(['--predict', {str(tmp_path / 'nosuch.jpg')!r}, '--output-dir', {str(tmp_path)!r}])\n"
        "print(status, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPOSITORY_DIR, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr.strip() == f"error: --predict {tmp_path / 'nosuch.jpg'}: no such file or folder; check the path"


def test_evaluate_into_an_output_folder_it_cannot_write_stops_before_any_image_is_read(trained, tmp_path, monkeypatch, capsys):
    split_root, output_dir = trained
    monkeypatch.setattr(data_preprocessing, "image_problem", lambda path: pytest.fail("an image was read"))
    monkeypatch.setattr(load_pre_trained_models, "load_saved_model", lambda *args: pytest.fail("the model was loaded"))
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("a plain file")
    status = run_script("VGG16", split_root, in_the_way, "--evaluate", "--model", str(output_dir / "vgg16" / "model.keras"))
    assert status == 2
    assert_one_line_error(capsys, f"cannot write to {in_the_way} (a file is in the way)", "--output-dir")


def test_a_file_that_vanishes_mid_run_is_reported_and_the_others_judged(trained, tmp_path, monkeypatch, capsys):
    split_root, output_dir = trained
    images = tmp_path / "images"
    shutil.copytree(split_root / "test" / "real", images)
    listed = load_pre_trained_models.media_to_predict

    def listed_then_one_moved_away(paths):
        media = listed(paths)
        (images / "0001.jpg").rename(tmp_path / "moved.jpg")  # After the check, as a user might mid-run.
        return media

    monkeypatch.setattr(load_pre_trained_models, "media_to_predict", listed_then_one_moved_away)
    csv_file = tmp_path / "p.csv"
    assert apply("VGG16", output_dir, "--predict", str(images), "--faces", "off", "--csv", str(csv_file)) == 0
    assert f"warning: skipping {images / '0001.jpg'}: it can no longer be read" in capsys.readouterr().err
    rows = pd.read_csv(csv_file).set_index("path")
    assert rows.loc[str(images / "0001.jpg"), "note"] == "unreadable"
    assert rows.drop(index=str(images / "0001.jpg"))["p_fake"].notna().all() and len(rows) == 3


def test_csv_never_writes_over_a_trained_models_files(trained, capsys):
    split_root, output_dir = trained
    model_file = output_dir / "vgg16" / "model.keras"
    before = model_file.read_bytes()
    image = str(split_root / "test" / "fake" / "0001.jpg")
    for target in (model_file, output_dir / "vgg16" / "scores.csv"):
        assert apply("VGG16", output_dir, "--predict", image, "--csv", str(target)) == 2
        assert_one_line_error(capsys, f"--csv {target} would write over a trained model's files")
    assert model_file.read_bytes() == before


def test_csv_through_a_link_or_onto_a_file_not_its_own_writes_over_nothing(trained, tmp_path, capsys):
    split_root, output_dir = trained
    run_dir = output_dir / "vgg16"
    training_image = split_root / "train" / "fake" / "0000.jpg"
    script = tmp_path / "VGG16_finetuning.py"
    shutil.copy(REPOSITORY_DIR / "VGG16_finetuning.py", script)
    targets = {}
    for name, kept in (("card.csv", run_dir / "README.md"), ("model.csv", run_dir / "model.keras"), ("face.csv", training_image)):
        (tmp_path / name).symlink_to(kept)
        targets[tmp_path / name] = kept
    (tmp_path / "hard.csv").hardlink_to(run_dir / "README.md")
    targets[tmp_path / "hard.csv"] = run_dir / "README.md"
    targets[output_dir / "results.md"] = output_dir / "results.md"
    targets[script] = script
    before = {kept: kept.read_bytes() for kept in targets.values()}
    image = str(split_root / "test" / "fake" / "0001.jpg")
    for target in targets:
        assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", "--csv", str(target)) == 2
        assert_one_line_error(capsys, f"--csv {target}")
    assert {kept: kept.read_bytes() for kept in targets.values()} == before
    # A CSV that --predict wrote is written anew, as before.
    csv_file = tmp_path / "p.csv"
    for _ in range(2):
        assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", "--csv", str(csv_file)) == 0
    assert len(pd.read_csv(csv_file)) == 1


@pytest.mark.parametrize("option", ["--annotate", "--gradcam"])
def test_pictures_through_a_link_into_a_run_folder_or_a_class_folder_are_refused(trained, tmp_path, capsys, option):
    split_root, output_dir = trained
    image = str(split_root / "test" / "fake" / "0001.jpg")
    for name, folder in (("run", output_dir / "vgg16"), ("class", split_root / "train" / "fake")):
        before = sorted(folder.iterdir())
        (tmp_path / name).symlink_to(folder)
        assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", option, str(tmp_path / name / "pictures")) == 2
        assert_one_line_error(capsys, f"{option} {tmp_path / name / 'pictures'}")
        assert sorted(folder.iterdir()) == before


def written_in_part(path, *args, **kwargs):
    """A picture cut off by a full disk: what Python's write and Matplotlib leave."""
    with open(path, "wb") as file:
        file.write(b"the first part of a picture")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("option", ["--csv", "--annotate", "--gradcam"])
def test_a_full_disk_ends_in_one_line_naming_the_file_and_leaves_no_part_of_one(trained, tmp_path, monkeypatch, capsys, option):
    split_root, output_dir = trained
    if option == "--csv":
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full, the device whose every write finds the disk full")
        target = tmp_path / "p.csv"
        target.symlink_to("/dev/full")
    else:
        target = tmp_path / "pictures"
        monkeypatch.setattr(Path, "write_bytes", written_in_part)
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, path, **kwargs: written_in_part(path))
    image = str(split_root / "test" / "fake" / "0001.jpg")
    assert apply("VGG16", output_dir, "--predict", image, "--faces", "off", option, str(target)) == 1
    captured = capsys.readouterr()
    assert "Wrote" not in captured.out
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith(f"error: cannot write {target}")
    assert "the disk is full; free some space, then run the same command again" in error_lines[0]
    if option != "--csv":
        assert list(target.iterdir()) == []


def test_predict_leaves_only_its_pictures_in_the_folders_it_writes(trained, tmp_path):
    split_root, output_dir = trained
    image = str(split_root / "test" / "fake" / "0001.jpg")
    annotate, gradcam = tmp_path / "annotated", tmp_path / "heat"
    assert apply("VGG16", output_dir, "--predict", image, "--faces", "off",
                 "--annotate", str(annotate), "--gradcam", str(gradcam)) == 0
    # The user's folders hold the pictures and nothing else: no lock file, hidden or not.
    assert sorted(path.name for path in annotate.iterdir()) == ["0001.jpg-faces.jpg"]
    assert sorted(path.name for path in gradcam.iterdir()) == ["0001.jpg-gradcam.png"]


def test_a_name_too_long_for_the_file_system_is_said_to_be_so_not_a_full_disk(tmp_path):
    too_long = tmp_path / ("x" * 300 + ".jpg")
    with pytest.raises(data_preprocessing.CannotWrite, match="File name too long") as error:
        data_preprocessing.write_jpeg(too_long, np.zeros((8, 8, 3), np.uint8), quality=90)
    assert "disk is full" not in str(error.value)


def test_long_input_names_give_output_names_within_the_limit_and_still_distinct(tmp_path):
    paths = [tmp_path / ("x" * 242 + f"{end}.jpg") for end in "ab"]
    names = list(plot_loss_accuracy_graph.output_names(paths).values())
    assert len(set(names)) == 2 and all(name.endswith(".jpg") and name.startswith("x" * 100) for name in names)
    assert all(len(os.fsencode(name)) <= plot_loss_accuracy_graph.MAX_INPUT_NAME_BYTES for name in names)


def test_a_247_character_photo_name_gets_its_pictures(trained, tmp_path, capsys):
    split_root, output_dir = trained
    photo = tmp_path / "photos" / ("face-" * 48 + "xyz.jpg")
    assert len(photo.name) == 247
    photo.parent.mkdir()
    shutil.copy(split_root / "test" / "fake" / "0001.jpg", photo)
    pictures = tmp_path / "pictures"
    assert apply("VGG16", output_dir, "--predict", str(photo), "--faces", "off",
                 "--annotate", str(pictures), "--gradcam", str(pictures)) == 0
    written = list(pictures.iterdir())
    assert len(written) == 2 and all(path.name.startswith("face-face-") for path in written)
    assert "Wrote 1 annotated picture" in capsys.readouterr().out


def non_utf8_path(folder, name):
    """folder/name, where name's bytes are not UTF-8 (Python holds them as surrogate escapes); skip where the file system refuses such names."""
    path = folder / os.fsdecode(name)
    try:
        path.touch()
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    return path


def test_a_photo_and_a_video_named_in_latin_1_are_judged_written_and_listed(trained, tmp_path, capsys):
    split_root, output_dir = trained
    media = tmp_path / "media"
    media.mkdir()
    faces = sorted((split_root / "test" / "fake").iterdir())
    photo = non_utf8_path(media, b"caf\xe9.jpg")
    shutil.copy(faces[0], photo)
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 5, (32, 32))
    for face in faces:
        writer.write(cv2.imread(str(face)))
    writer.release()
    video = non_utf8_path(media, b"vid\xe9.mp4")
    clip.rename(video)
    # A JPEG named as a video is said to be one.
    shutil.copy(faces[0], media / "photo.mp4")
    csv_file, pictures = tmp_path / "p.csv", tmp_path / "pictures"
    assert apply("VGG16", output_dir, "--predict", str(media), "--faces", "off", "--frames", "2",
                 "--csv", str(csv_file), "--annotate", str(pictures)) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {media / 'photo.mp4'}: it is a JPEG image named as a video" in captured.err
    # The CSV is UTF-8, and names the files as the printed lines do, each byte that is not UTF-8 as an escape.
    rows = pd.read_csv(csv_file)
    assert str(media / "caf\\udce9.jpg") in set(rows["path"]) and str(media / "vid\\udce9.mp4") in set(rows["path"])
    assert f"{media / 'caf'}\\udce9.jpg  p_fake=" in captured.out
    assert sorted(os.listdir(os.fsencode(pictures))) == [b"caf\xe9.jpg-faces.jpg", b"vid\xe9.mp4-frames.png"]


def test_evaluate_writes_a_name_in_latin_1_into_its_predictions(trained, tmp_path):
    split_root, output_dir = trained
    folder = tmp_path / "latin"
    shutil.copytree(split_root / "test", folder)
    shutil.copy(folder / "real" / "0000.jpg", non_utf8_path(folder / "real", b"caf\xe9.jpg"))
    assert apply("VGG16", output_dir, "--evaluate", "--data-dir", str(folder)) == 0
    predictions = pd.read_csv(next(output_dir.rglob("eval-latin/predictions.csv")))
    assert str(folder / "real" / "caf\\udce9.jpg") in set(predictions["path"])


def test_an_animated_gif_or_webp_is_judged_as_a_video(trained, tmp_path, capsys):
    split_root, output_dir = trained
    faces = [Image.open(path).convert("RGB") for path in sorted((split_root / "test").rglob("*.jpg"))]
    for suffix in (".gif", ".webp"):
        faces[0].save(tmp_path / f"moving{suffix}", save_all=True, append_images=faces[1:], duration=100, loop=0)
    faces[0].save(tmp_path / "still.gif")
    whole = (tmp_path / "moving.gif").read_bytes()
    (tmp_path / "cut.gif").write_bytes(whole[: len(whole) // 2])
    status = apply("VGG16", output_dir, "--predict", str(tmp_path / "moving.gif"), str(tmp_path / "moving.webp"),
                   str(tmp_path / "still.gif"), str(tmp_path / "cut.gif"), "--faces", "off", "--frames", "4")
    assert status == 0
    captured = capsys.readouterr()
    output = captured.out
    assert f"warning: skipping {tmp_path / 'cut.gif'}: its frames cannot be read" in captured.err
    for suffix in (".gif", ".webp"):
        assert re.search(rf"moving\{suffix}  video  p_fake=\S+  \w+  \(4 of 4 frames read", output), output
        assert len(re.findall(rf"moving\{suffix}  frame \d+  p_fake=", output)) == 4
    assert re.search(r"still\.gif  p_fake=", output)


# --- What is trusted: the model's card -----------------------------------------


def card_beside_a_model(trained, folder, change):
    """A copy of VGG16's model and card in `folder`, its card's deepfake_detector block changed by `change`."""
    _, output_dir = trained
    folder.mkdir()
    shutil.copy(output_dir / "vgg16" / "model.keras", folder / "model.keras")
    _, front_matter, body = (output_dir / "vgg16" / "README.md").read_text().split("---\n", 2)
    front = yaml.safe_load(front_matter)
    front["deepfake_detector"] = change(dict(front["deepfake_detector"]))
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n{body}")
    return folder / "model.keras"


def changed(**fields):
    """A change to a card's block: set each field given, and drop those given as DROPPED."""
    def change(block):
        block.update(fields)
        return {key: value for key, value in block.items() if value is not DROPPED}
    return change


DROPPED = object()


@pytest.mark.parametrize(
    "change, fragment",
    [
        (changed(real_below="0.3"), "deepfake_detector.real_below '0.3' is not a number"),
        (changed(test_auc="high"), "deepfake_detector.test_auc 'high' is not a number"),
        (changed(trained_on=DROPPED), "deepfake_detector.trained_on is missing"),
        (lambda block: [1, 2], "deepfake_detector is [1, 2], not a block of fields"),
        (changed(real_below=0.9, fake_from=0.1), "deepfake_detector.real_below 0.9 is above its fake_from 0.1"),
        (changed(real_below=float("nan")), "deepfake_detector.real_below nan is not a finite number"),
        (changed(real_below=-0.5), "deepfake_detector.real_below -0.5 is not between 0 and 1"),
        (changed(fake_from=1.5), "deepfake_detector.fake_from 1.5 is not between 0 and 1"),
        (changed(real_below=True), "deepfake_detector.real_below True is not a number"),
        (changed(img_size=True), "deepfake_detector.img_size True is not a whole number above 0"),
        (changed(demo_model="no"), "deepfake_detector.demo_model 'no' is not true or false"),
    ],
)
def test_a_tampered_card_is_named_in_one_line_and_decides_nothing(trained, tmp_path, capsys, change, fragment):
    model_file = card_beside_a_model(trained, tmp_path / "tampered", change)
    card = plot_loss_accuracy_graph.whose_verdicts("VGG16", model_file)
    line, mark, verdicts = card.line, card.mark, card.band
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: {tmp_path / 'tampered' / 'README.md'}: {fragment}; ")
    # Judged as a model without a card: marked, and without a band.
    assert mark == plot_loss_accuracy_graph.UNKNOWN_MARK and line.endswith(mark)
    assert verdicts.thresholds() == [] and verdicts(0.0) == verdicts(1.0) == "uncertain"


def test_a_sound_card_gives_its_band_without_a_word(trained, tmp_path, capsys):
    model_file = card_beside_a_model(trained, tmp_path / "sound", changed(real_below=0.3, fake_from=0.7, test_auc=None))
    card = plot_loss_accuracy_graph.whose_verdicts("VGG16", model_file)
    line, mark, verdicts = card.line, card.mark, card.band
    assert capsys.readouterr().err == ""
    assert mark is None and "test AUC -" in line and verdicts.thresholds() == [0.3, 0.7]


def test_predict_sets_a_card_with_its_band_upside_down_aside(trained, tmp_path, capsys):
    """With real_below 0.9 and fake_from 0.1, a face at p_fake 0.854 was called real."""
    split_root, _ = trained
    model_file = card_beside_a_model(trained, tmp_path / "upside-down", changed(real_below=0.9, fake_from=0.1))
    image = str(split_root / "test" / "fake" / "0001.jpg")
    assert apply("VGG16", tmp_path / "outputs", "--predict", image, "--faces", "off", "--model", str(model_file.parent)) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"warning: {model_file.parent / 'README.md'}: deepfake_detector.real_below 0.9 is above "
                                    "its fake_from 0.1; the card is set aside, and the model's verdicts are marked as of "
                                    "unknown training data")
    assert "UNKNOWN TRAINING DATA" in captured.out and "as the model's card was set aside" in captured.out
    assert f"{image}  p_fake=" in captured.out and captured.out.count("  uncertain  (UNKNOWN TRAINING DATA)") == 1


@pytest.mark.parametrize("card", [b"---\ndeepfake_detector: \xff\xfe\n---\n", b"---\n" + b"[" * 5_000 + b"\n---\n"])
def test_a_card_that_cannot_be_read_counts_as_none(tmp_path, card):
    """A card that is not UTF-8, or nested deeper than Python recurses, gave a traceback."""
    (tmp_path / "README.md").write_bytes(card)
    card = plot_loss_accuracy_graph.whose_verdicts("VGG16", tmp_path / "model.keras")
    assert card.mark == plot_loss_accuracy_graph.UNKNOWN_MARK and card.band.thresholds() == []


# --- What is trusted: the run folders under OUTPUT_DIR ------------------------------


def runs_beside_strays(trained, folder):
    """A copy of the two trained runs (their models linked, not copied) beside a stray metrics.json and two
    damaged ones, each in a folder of its own; return the stray files."""
    _, output_dir = trained
    for name in ("vgg16", "vgg19"):
        (folder / name).mkdir(parents=True)
        for file_name in ("metrics.json", "predictions.csv", "history.csv", "README.md"):
            shutil.copy(output_dir / name / file_name, folder / name / file_name)
        (folder / name / "model.keras").symlink_to(output_dir / name / "model.keras")
    strays = {
        "junk": ('{"accuracy": 1}', "not a run's metrics: model is missing"),
        "cut": (json.dumps(read_metrics(output_dir / "vgg16"))[:40], "it cannot be read as JSON"),
        "boolean": (json.dumps({**read_metrics(output_dir / "vgg16"), "test_accuracy": True}),
                    "not a run's metrics: test_accuracy True is not a number"),
    }
    for name, (content, _) in strays.items():
        (folder / name).mkdir()
        (folder / name / "metrics.json").write_text(content)
    shutil.copy(output_dir / "vgg16" / "history.csv", folder / "cut" / "history.csv")  # A history to redraw, titled by its folder.
    return {folder / name / "metrics.json": why for name, (_, why) in strays.items()}


def assert_each_skipped_once(error_output, strays):
    lines = error_output.strip().splitlines()
    assert len(lines) == len(strays), lines
    for path, why in strays.items():
        assert sum(line.startswith(f"warning: skipping {path}: {why}") for line in lines) == 1, (path, lines)


def test_a_stray_or_damaged_metrics_json_is_skipped_by_the_table_and_the_plot(trained, tmp_path, capsys):
    """outputs/demo/junk/metrics.json holding {"accuracy": 1} made the plot command fail with KeyError 'model'."""
    from plot_loss_accuracy_graph import main, write_results_table

    strays = runs_beside_strays(trained, tmp_path / "outputs")
    markdown = write_results_table(tmp_path / "outputs")
    assert [line.split(" | ")[0] for line in markdown.splitlines()[2:5]] == ["| VGG16", "| VGG19", "| Ensemble"]
    assert_each_skipped_once(capsys.readouterr().err, strays)

    assert main([str(tmp_path / "outputs")]) == 0
    assert (tmp_path / "outputs" / "cut" / "history.png").exists()
    assert_each_skipped_once(capsys.readouterr().err, strays)


def test_a_stray_metrics_json_is_skipped_by_the_ensemble(trained, tmp_path, capsys):
    split_root, _ = trained
    strays = runs_beside_strays(trained, tmp_path / "outputs")
    members, weights = plot_loss_accuracy_graph.read_ensemble(tmp_path / "outputs")
    assert [metrics["model"] for metrics in members] == ["VGG16", "VGG19"]
    assert_each_skipped_once(capsys.readouterr().err, strays)

    _, p_fake, _ = expected_ensemble(tmp_path / "outputs")
    image = str(split_root / "test" / "fake" / "0001.jpg")
    assert apply("VGG16", tmp_path / "outputs", "--predict", image, "--faces", "off", "--model", "ensemble") == 0
    captured = capsys.readouterr()
    assert printed_lines(captured.out)[image][0] == pytest.approx(p_fake[image], abs=1e-4)
    assert_each_skipped_once(captured.err, strays)


def test_a_damaged_predictions_csv_leaves_its_model_out_of_the_ensemble(trained, tmp_path, capsys):
    from plot_loss_accuracy_graph import write_results_table

    runs_beside_strays(trained, tmp_path / "outputs")
    predictions_file = tmp_path / "outputs" / "vgg19" / "predictions.csv"
    predictions_file.write_text(predictions_file.read_text().replace("p_fake", "score"))
    markdown = write_results_table(tmp_path / "outputs")
    assert "| VGG19 |" in markdown and "| Ensemble |" not in markdown
    assert (f"warning: skipping {predictions_file}: it has no p_fake column; its model is left out of the Ensemble row"
            in capsys.readouterr().err)


# --- What is trusted: a .keras file -----------------------------------------------


class LoadedTheBomb(BaseException):
    """Raised where Keras would have begun to read the bomb; not an Exception, so that nothing catches it."""


def zip_bomb(path, name, megabytes):
    """A .keras file of a few kB whose `name` declares `megabytes` MB: of spaces for JSON, of zeros for the weights."""
    filler = b" " if name.endswith(".json") else b"\0"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for content in ("metadata.json", "config.json", "model.weights.h5"):
            archive.writestr(content, filler * (megabytes * 2**20) if content == name else b"{}")
    return path


@pytest.mark.parametrize("name, fragments", [
    ("config.json", ["its config.json declares 20 MB, where a model's takes under 10 MB"]),
    # Deflate stores zeros about 1,000 times smaller.
    ("model.weights.h5", ["its model.weights.h5 declares 20 MB, ", " times what it stores"]),
])
def test_a_zip_bomb_as_model_keras_is_refused_from_its_declared_sizes(tiny_split_root, tmp_path, monkeypatch, capsys, name, fragments):
    """A config.json of 1.5 GiB of spaces, stored in 1.5 MB, took 3.9 GB of memory before its one-line error."""
    bomb = zip_bomb(tmp_path / "model.keras", name, 20)
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(load_pre_trained_models.keras.models, "load_model", lambda *args, **kwargs: throw(LoadedTheBomb()))
    image = str(tiny_split_root / "test" / "fake" / "0001.jpg")
    assert apply("VGG16", tmp_path / "outputs", "--predict", image, "--faces", "off", "--model", str(bomb)) == 2
    assert_one_line_error(capsys, f"{bomb} cannot be a model that these scripts saved: ", *fragments)
    # Training's own checks call such a file damaged, and replace it rather than load it.
    assert not load_pre_trained_models.is_complete_model_file(bomb)


def throw(error):
    raise error


# --- A full disk mid-row ---------------------------------------------------------


@contextlib.contextmanager
def files_limited_to(size):
    """Files of this process cannot grow past `size` bytes, as on a disk that fills: a write that crosses it
    writes what fits, and the next fails (RLIMIT_FSIZE, with its signal ignored)."""
    resource = pytest.importorskip("resource")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_disk_that_fills_mid_row_leaves_only_whole_rows_in_the_csv(tmp_path):
    """A full disk left a cut-off last row in --csv, which pandas read as one more row."""
    from data_preprocessing import CannotWrite

    csv_file = tmp_path / "p.csv"
    report = plot_loss_accuracy_graph.PredictionReport(plot_loss_accuracy_graph.ReportSettings(csv=csv_file), [])
    report.start(None)
    row = dict(path=str(tmp_path / "a face with a long name.jpg"), p_fake=0.25, verdict="real")
    report.add_row(row)
    whole = csv_file.read_bytes()
    with files_limited_to(len(whole) + 10):  # Room for 10 bytes of the next row.
        with pytest.raises(CannotWrite, match=f"cannot write {csv_file}"):
            report.add_row({**row, "p_fake": 0.75})
        report.stop()  # Closed while the disk is still full.
    assert csv_file.read_bytes() == whole
    assert pd.read_csv(csv_file)["p_fake"].tolist() == [0.25]


# --- Where an evaluation is filed ---------------------------------------------------


def test_an_evaluation_is_filed_with_the_model_it_evaluates(tmp_path):
    from load_pre_trained_models import evaluations_folder

    output_dir = tmp_path / "outputs"
    for trained_here in (output_dir / "vgg16" / "model.keras", tmp_path / "outputs" / ".." / "outputs" / "vgg16" / "model.keras"):
        assert evaluations_folder(trained_here, output_dir, "vgg16") == output_dir / "vgg16"
    # A model from elsewhere: named for its folder when it is a model.keras beside its card, else for its file.
    assert evaluations_folder(tmp_path / "hub" / "vgg16-ffhq" / "model.keras", output_dir, "vgg16") == output_dir / "evaluations" / "vgg16-ffhq"
    assert evaluations_folder(tmp_path / "mine.keras", output_dir, "vgg16") == output_dir / "evaluations" / "mine"
    assert evaluations_folder(output_dir / "vgg16" / "previous" / "model.keras", output_dir, "vgg16") == output_dir / "evaluations" / "previous"


def test_evaluating_a_model_from_elsewhere_leaves_the_training_runs_folder_and_the_models_alone(trained, tmp_path, capsys):
    """--evaluate --model X wrote into OUTPUT_DIR/vgg16/eval-*, which a later training run set aside as its own."""
    split_root, trained_outputs = trained
    elsewhere = tmp_path / "downloaded"
    elsewhere.mkdir()
    for name in ("model.keras", "README.md"):
        shutil.copy(trained_outputs / "vgg16" / name, elsewhere / name)
    output_dir = tmp_path / "outputs"
    assert apply("VGG16", output_dir, "--evaluate", "--data-dir", str(split_root), "--model", str(elsewhere)) == 0
    assert read_metrics(output_dir / "evaluations" / "downloaded" / "eval-faces")["model_file"] == str(elsewhere / "model.keras")
    assert f"Wrote {output_dir / 'evaluations' / 'downloaded' / 'eval-faces'}/: metrics.json" in capsys.readouterr().out
    assert not (output_dir / "vgg16").exists()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["README.md", "model.keras"]


# --- Contact sheets -----------------------------------------------------------------


def test_contact_sheets_of_one_frame_or_of_no_face_draw_without_a_warning(trained, tmp_path, recwarn):
    """A one-frame video, and a GIF with no judged face, printed Matplotlib's warnings with their source lines."""
    split_root, output_dir = trained
    (tmp_path / "media").mkdir()
    face = cv2.imread(str(split_root / "test" / "fake" / "0001.jpg"))
    writer = cv2.VideoWriter(str(tmp_path / "media" / "one-frame.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, face.shape[1::-1])
    writer.write(face)
    writer.release()
    noise = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8)) for seed in range(3)]
    noise[0].save(tmp_path / "media" / "no-face.gif", save_all=True, append_images=noise[1:], duration=100)
    for media, faces in (("one-frame.mp4", "off"), ("no-face.gif", "auto")):
        assert apply("VGG16", output_dir, "--predict", str(tmp_path / "media" / media), "--faces", faces, "--annotate",
                     str(tmp_path / "sheets")) == 0
        assert (tmp_path / "sheets" / f"{media}-frames.png").exists()
    ours = [str(warning.message) for warning in recwarn if Path(warning.filename) == Path(plot_loss_accuracy_graph.__file__)]
    assert ours == []


def test_a_contact_sheet_shows_64_sampled_frames_spread_evenly_and_draws_those():
    from plot_loss_accuracy_graph import CONTACT_SHEET_FRAMES, PictureResult, Verdicts, VideoResult, save_contact_sheet, shown_frame_positions

    assert CONTACT_SHEET_FRAMES == 64
    assert shown_frame_positions(1) == [0] and shown_frame_positions(64) == list(range(64))
    many = shown_frame_positions(100_000)
    assert len(many) == 64 and (many[0], many[-1]) == (0, 99_999)
    assert max(np.diff(many)) - min(np.diff(many)) <= 1

    drawn = []
    thumbnail = np.zeros((18, 32, 3), np.uint8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plot_loss_accuracy_graph, "save_figure", lambda figure, path: drawn.extend(axis.get_title() for axis in figure.axes))
        video = VideoResult("clip.mp4", [PictureResult("clip.mp4", [], Verdicts(None, None), frame=0)], Verdicts(None, None), p_fake=0.5)
        save_contact_sheet([(10 * position, thumbnail, 0.1) for position in range(200)], video, "sheet.png")
    assert [title for title in drawn if title] == [f"frame {10 * position}" for position in shown_frame_positions(200)]


def test_annotate_keeps_the_thumbnails_of_the_frames_shown_only(trained, tmp_path, monkeypatch):
    """--frames 100000 would have kept a thumbnail of every sampled frame, about 20 GB, to show 64."""
    split_root, output_dir = trained
    faces = [Image.open(path).convert("RGB") for path in sorted((split_root / "test").rglob("*.jpg"))]
    frames = (faces * 17)[:100]
    frames[0].save(tmp_path / "hundred.gif", save_all=True, append_images=frames[1:], duration=40)
    handed = []
    monkeypatch.setattr(plot_loss_accuracy_graph, "save_contact_sheet",
                        lambda thumbnails, *args, **kwargs: handed.append([index for index, _, _ in thumbnails]))
    assert apply("VGG16", output_dir, "--predict", str(tmp_path / "hundred.gif"), "--faces", "off", "--frames", "100",
                 "--annotate", str(tmp_path.parent / f"{tmp_path.name}-sheets")) == 0
    assert handed == [plot_loss_accuracy_graph.shown_frame_positions(100)]  # Every frame sampled: index is position.
