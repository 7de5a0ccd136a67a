"""Shared fixtures: tiny synthetic datasets made inside each test, and a clean Keras state."""

import os
import sys
from pathlib import Path

# Quiet TensorFlow's start-up messages; they hide the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPOSITORY_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_DIR))

import keras  # noqa: E402
import pytest  # noqa: E402

from data_preprocessing import make_demo_dataset  # noqa: E402

# A handful of 32-pixel images: enough for one epoch of every pipeline step.
TINY_IMAGES_PER_CLASS = {"train": 4, "valid": 2, "test": 3}


@pytest.fixture
def tiny_split_root(tmp_path):
    """A split root (train/, valid/, test/, each with real/ and fake/) of tiny JPEGs."""
    return make_demo_dataset(tmp_path / "faces", TINY_IMAGES_PER_CLASS, size=32)


@pytest.fixture(autouse=True)
def fresh_keras_session():
    """Each test starts with Keras' layer names and memory reset."""
    keras.backend.clear_session()
    yield


def pytest_configure(config):
    # Keras' legacy ImageDataGenerator calls SciPy and NumPy APIs that now warn; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:keras")
