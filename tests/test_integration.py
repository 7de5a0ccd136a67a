"""One script on real dataset files: ../shared/faces-140k-sample, when it is there."""

import json

import pandas as pd
import pytest

from conftest import REPOSITORY_DIR, RUN_OUTPUTS, run_script

SAMPLE_DIR = REPOSITORY_DIR.parent / "shared" / "faces-140k-sample"


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"{SAMPLE_DIR} is absent (it ships beside the project's CI only)")
def test_vgg16_on_the_real_sample(tmp_path):
    output_dir = tmp_path / "outputs"
    # The download's root is given, as a Kaggle user would; 20 images per class keep it quick.
    assert run_script("VGG16", SAMPLE_DIR, output_dir, "--subset", "20", "--img-size", "48") == 0
    run_dir = output_dir / "vgg16"
    for name in RUN_OUTPUTS:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_test"] == 40
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert predictions["label"].value_counts().to_dict() == {"real": 20, "fake": 20}
    assert all(str(SAMPLE_DIR) in path for path in predictions["path"])
