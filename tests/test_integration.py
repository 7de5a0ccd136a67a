"""Two scripts on real dataset files, ../shared/faces-140k-sample, when it is there: training,
the Ensemble row, --predict with Grad-CAM, whole and with the faces cut out, and --evaluate
with JPEG compression."""

import json

import cv2
import pandas as pd
import pytest

from conftest import REPOSITORY_DIR, RUN_OUTPUTS, run_script

SAMPLE_DIR = REPOSITORY_DIR.parent / "shared" / "faces-140k-sample"

pytestmark = pytest.mark.skipif(
    not SAMPLE_DIR.is_dir(), reason=f"{SAMPLE_DIR} is absent (it ships beside the project's CI only)"
)

# 10 images per class and 32 pixels keep both runs to seconds; the same --subset and seed
# give both models the same test images, which the Ensemble row needs.
SMALL_RUN = ("--subset", "10", "--img-size", "32")


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sample") / "outputs"
    # The download's root is given, as a Kaggle user would.
    for title in ("VGG16", "VGG19"):
        assert run_script(title, SAMPLE_DIR, output_dir, *SMALL_RUN) == 0
    return output_dir


def test_training_on_the_real_sample_writes_every_output_and_the_ensemble_row(output_dir):
    run_dir = output_dir / "vgg16"
    for name in RUN_OUTPUTS:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_test"] == 20
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert predictions["label"].value_counts().to_dict() == {"real": 10, "fake": 10}
    assert all(str(SAMPLE_DIR.resolve()) in path for path in predictions["path"])
    table = pd.read_csv(output_dir / "results.csv")
    assert table["Model"].tolist() == ["VGG16", "VGG19", "Ensemble"]
    assert table.notna().all().all()


def test_predict_and_gradcam_on_two_real_test_images(output_dir, tmp_path, capsys):
    predictions = pd.read_csv(output_dir / "vgg16" / "predictions.csv")
    images = [predictions["path"][0], predictions["path"][19]]  # One real, one fake.
    options = ["--predict", *images, "--csv", str(tmp_path / "p.csv"), "--gradcam", str(tmp_path / "gradcam")]
    # Whole, the dataset's images get the p_fake of predictions.csv.
    assert run_script("VGG16", None, output_dir, *options, "--faces", "off") == 0

    written = pd.read_csv(tmp_path / "p.csv")
    expected = predictions.set_index("path").loc[images, "p_fake"].to_numpy()
    assert written["p_fake"].to_numpy() == pytest.approx(expected, abs=1e-6)
    printed = capsys.readouterr().out
    for image in images:
        assert f"{image}  p_fake=" in printed
        overlay = cv2.imread(str(tmp_path / "gradcam" / f"{image.rsplit('/', 1)[1]}-gradcam.png"))
        assert max(overlay.shape[:2]) >= 256  # Drawn at least at the dataset's own 256 pixels.

    # Their faces, found and cut out again, give them back nearly whole: nearly the same p_fake.
    assert run_script("VGG16", None, output_dir, "--predict", *images, "--csv", str(tmp_path / "faces.csv")) == 0
    faces = pd.read_csv(tmp_path / "faces.csv")
    assert faces["path"].tolist() == images and (faces["face"] == 1).all()
    assert faces["p_fake"].to_numpy() == pytest.approx(expected, abs=0.05)


def test_evaluate_the_saved_model_on_jpeg_compressed_test_images(output_dir):
    assert run_script("VGG19", SAMPLE_DIR, output_dir, "--evaluate", "--jpeg-quality", "75", "--subset", "10") == 0
    eval_dir = output_dir / "vgg19" / "eval-faces-140k-sample-jpeg75"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert (metrics["n_test"], metrics["jpeg_quality"]) == (20, 75)
    assert (eval_dir / "roc.png").exists()
