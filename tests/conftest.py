"""Shared helpers: tiny synthetic datasets made inside each test, running a script in this
process, callbacks that interrupt or count epochs, a clean Keras state, and a working folder
away from the checkout."""

import gc
import importlib
import os
import sys
from pathlib import Path

# Quiet TensorFlow's start-up messages; they hide the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPOSITORY_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_DIR))

import keras  # noqa: E402
import pytest  # noqa: E402

import data_preprocessing  # noqa: E402
from data_preprocessing import make_demo_dataset  # noqa: E402
import load_pre_trained_models  # noqa: E402  (imported before the freeze below)

# A full garbage collection walks the 400,000 objects that TensorFlow, Keras and the rest
# make at import; frozen, they are passed over.
gc.freeze()

# The suite runs in child processes, one per test module (the quick modules share one), two
# at a time, with pytest-isolated. TensorFlow keeps every model that model.fit has traced
# until its process ends (keras-team/keras#21090), so a single process would hold all the
# suite's models at once; and two children use both cores of a small machine. test_lesson.py,
# which trains the most models, is split in two. `python -m pytest --no-isolation` runs in one process.
QUICK_MODULES = ("test_commands.py", "test_data.py", "test_figures.py", "test_structure.py")
LESSON_RUNS = ("test_warmup_trains_the_head_alone_then_fine_tunes_at_a_tenth_of_the_rate",
               "test_an_interrupted_two_phase_run_resumes_where_it_stopped")
CHILDREN_AT_ONCE = "2"
# pytest-isolated starts the groups in the order of their tests: longest first, so that the two
# children finish together, rather than one running test_training alone at the end as it did in
# alphabetical order. By the seconds their tests took in a full run (--durations=0, summed by group).
GROUPS_LONGEST_FIRST = ("test_cluster", "test_training", "test_predict_evaluate", "test_real_media",
                        "test_pipelines", "test_serve", "test_models", "lesson-runs", "test_export",
                        "test_reliability", "quick", "lesson", "test_integration")
# A group that hangs fails after this many seconds. The slowest group, test_cluster, took 80 s
# in a suite of 4 minutes on a 2-core machine (load average 2.5 to 3.5), and 175 s in one of 7.7
# minutes on the same machine loaded by other work (load average 5 to 8): pytest-isolated's
# default of 5 minutes would leave too little margin on a loaded machine.
GROUP_TIMEOUT = 540

# The per-model scripts, by model title, as (module, output folder): read from the scripts' recipes.
SCRIPTS = {
    recipe.title: (Path(data_preprocessing.MODEL_SCRIPTS[recipe.name]).stem, recipe.name)
    for recipe in data_preprocessing.load_recipes()
}

# What every run must leave in OUTPUT_DIR/<model>/, as the project documents it.
RUN_OUTPUTS = list(load_pre_trained_models.RUN_OUTPUTS)


def square_iou(first, second):
    """Intersection over union of two (x, y, size) squares: 1 when they are the same, 0 when apart."""
    (x1, y1, size1), (x2, y2, size2) = first, second
    overlap_x = max(0, min(x1 + size1, x2 + size2) - max(x1, x2))
    overlap_y = max(0, min(y1 + size1, y2 + size2) - max(y1, y2))
    overlap = overlap_x * overlap_y
    return overlap / (size1**2 + size2**2 - overlap)

# A handful of 32-pixel images: enough for one epoch of every pipeline step.
TINY_IMAGES_PER_CLASS = {"train": 4, "valid": 2, "test": 3}


@pytest.fixture
def tiny_split_root(tmp_path):
    """A split root (train/, valid/, test/, each with real/ and fake/) of tiny JPEGs."""
    return make_demo_dataset(tmp_path / "faces", TINY_IMAGES_PER_CLASS, size=32)


def run_script(title, split_root, output_dir, *options):
    """Run a script in this process, as `python SCRIPT ...` would, small and fast; return its exit status."""
    script = importlib.import_module(SCRIPTS[title][0])
    img_size = str(max(32, script.RECIPE.min_img_size))
    data_options = [] if split_root is None else ["--data-dir", str(split_root)]
    # --predict, --evaluate, --export and --serve train nothing, and refuse the options that say how to.
    applying = any(mode in options for mode in ("--predict", "--evaluate", "--export", "--serve"))
    training_options = [] if applying else ["--epochs", "1", "--img-size", img_size]
    argv = [*data_options, "--output-dir", str(output_dir), "--weights", "none",
            *training_options, "--batch-size", "4", *options]
    return script.main(argv)


def assert_one_line_error(capsys, *fragments):
    """The script printed exactly one line, an error that holds every fragment."""
    error_output = capsys.readouterr().err.strip().splitlines()
    assert len(error_output) == 1, error_output
    assert error_output[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in error_output[0]


class InterruptAfterEpoch(keras.callbacks.Callback):
    """Stops training as Ctrl-C would, once the given epoch is over (and backed up)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class CountEpochs(keras.callbacks.Callback):
    """Records each epoch that begins, in every fit it is given to."""

    def __init__(self):
        super().__init__()
        self.epochs_begun = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs_begun.append(epoch)


def add_callback(monkeypatch, callback):
    """Append `callback` to the ones each phase of fine_tune trains with."""
    shared_callbacks = load_pre_trained_models.training_callbacks
    monkeypatch.setattr(
        load_pre_trained_models, "training_callbacks", lambda *args, **kwargs: shared_callbacks(*args, **kwargs) + [callback]
    )


# What the README's commands fill in the checkout; the tests neither read nor write them.
CHECKOUT_RUN_FOLDERS = (REPOSITORY_DIR / "outputs", REPOSITORY_DIR / "datasets" / "demo")


def files_under(folders):
    """Each file under the folders, with its size and modification time."""
    return {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for folder in folders if folder.is_dir() for path in folder.rglob("*") if path.is_file()
    }


@pytest.fixture(autouse=True, scope="session")
def checkout_left_as_it_was():
    """The suite passes before the README's demo and after it, as it never touches what the demo made."""
    before = files_under(CHECKOUT_RUN_FOLDERS)
    yield
    assert files_under(CHECKOUT_RUN_FOLDERS) == before, "a test wrote into the checkout's outputs/ or datasets/demo"


@pytest.fixture(autouse=True)
def away_from_the_checkout(tmp_path_factory, monkeypatch):
    """Each test runs in a folder of its own, where outputs/ is empty, with a demo dataset of its own."""
    working_dir = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(working_dir)
    monkeypatch.setattr(data_preprocessing, "DEMO_DATA_DIR", working_dir / "datasets" / "demo")


@pytest.fixture(autouse=True)
def fresh_keras_session():
    """Each test starts with Keras' layer names and precision reset."""
    keras.backend.clear_session(free_memory=False)
    keras.mixed_precision.set_global_policy("float32")
    yield


def pytest_configure(config):
    # Keras' legacy ImageDataGenerator calls SciPy and NumPy APIs that now warn; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:keras")
    if config.getoption("isolated_numprocesses", None) is None:
        config.option.isolated_numprocesses = CHILDREN_AT_ONCE
    if config.getoption("isolated_timeout", None) is None:
        config.option.isolated_timeout = GROUP_TIMEOUT


def group_of(item):
    """The child process a test runs in (its pytest-isolated group): its module's, mostly."""
    module = item.path.name
    if module == "test_lesson.py":
        return "lesson-runs" if item.originalname in LESSON_RUNS else "lesson"
    if module in QUICK_MODULES:
        return "quick"
    return item.path.stem


def pytest_itemcollected(item):
    """Put each test in its group's child process."""
    item.add_marker(pytest.mark.isolated(group=group_of(item)))


def pytest_collection_modifyitems(items):
    """Run the longest groups first; a stable sort, so each group's tests keep their order."""
    items.sort(key=group_rank)


def group_rank(item):
    """Where a test's group comes in GROUPS_LONGEST_FIRST; a group left out of it comes last."""
    group = group_of(item)
    return GROUPS_LONGEST_FIRST.index(group) if group in GROUPS_LONGEST_FIRST else len(GROUPS_LONGEST_FIRST)
