"""How the modules depend on each other: no import cycle, and no TensorFlow before it is needed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPOSITORY_DIR

# Every Python file of the project: the scripts, the helpers, the tests and the benchmarks.
PYTHON_FILES = sorted([*REPOSITORY_DIR.glob("*.py"), *REPOSITORY_DIR.glob("tests/**/*.py")])
OUR_MODULES = {path.stem for path in PYTHON_FILES}


# The per-model scripts, which a helper could only reach at run time, by their file or module name.
SCRIPT_MODULES = {"VGG16_finetuning", "VGG19_finetuning", "inceptionV3_finetuning", "resnet50_finetuning"}
RUN_TIME_IMPORTS = ("run_path", "import_module", "run_module", "__import__")


def modules_imported_by(path):
    """The modules of ours that a file imports, at its top or inside a function, written or at run time.

    runpy and importlib count as imports too: one that names its module in a string names
    it; one that computes the name may reach any per-model script.
    """
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in RUN_TIME_IMPORTS:
            named = node.args[0] if node.args else None
            # An f-string names its package in its first part: f"keras.applications.{module}" is Keras'.
            head = named.values[0] if isinstance(named, ast.JoinedStr) and named.values else named
            if isinstance(head, ast.Constant) and isinstance(head.value, str):
                imported.add(Path(head.value).stem.split(".")[0])
            else:
                imported.update(SCRIPT_MODULES)
    return imported & OUR_MODULES


def reachable_from(module, imports):
    """Every module that `module` imports, directly or through others."""
    reached, waiting = set(), [module]
    while waiting:
        for imported in imports[waiting.pop()]:
            if imported not in reached:
                reached.add(imported)
                waiting.append(imported)
    return reached


def test_no_module_imports_one_that_imports_it_back():
    imports = {path.stem: modules_imported_by(path) for path in PYTHON_FILES}
    assert imports["VGG16_finetuning"] == {"data_preprocessing", "load_pre_trained_models"}  # The reader works.
    in_a_cycle = sorted(module for module in imports if module in reachable_from(module, imports))
    assert in_a_cycle == []


def test_a_run_time_import_counts_as_an_import(tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text(
        "import importlib, runpy\nrunpy.run_path(script)\nimportlib.import_module('data_augmentation')\n"
        "importlib.import_module(f'keras.applications.{name}')\n"
    )
    assert modules_imported_by(helper) == SCRIPT_MODULES | {"data_augmentation"}


# What the parsed options are called wherever they are passed on.
OPTIONS_NAMES = ("args", "namespace", "options", "opts", "arguments")


@pytest.mark.parametrize("helper", ["data_augmentation.py", "load_pre_trained_models.py", "plot_loss_accuracy_graph.py"])
def test_below_run_no_function_takes_the_parsed_options(helper):
    """Only the command line (data_preprocessing.py) and `run` or a `main` see argparse's namespace; below
    them, functions take named values and settings, and nothing computed is stored on the namespace."""
    tree = ast.parse((REPOSITORY_DIR / helper).read_text())
    taking = [
        node.name for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ("run", "main")
        and any(argument.arg in OPTIONS_NAMES for argument in [*node.args.args, *node.args.kwonlyargs])
    ]
    assert taking == []
    stored = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.ctx, ast.Store) and getattr(node.value, "id", None) == "args"]
    assert stored == []


def test_data_preprocessing_imports_nothing_of_ours():
    assert modules_imported_by(REPOSITORY_DIR / "data_preprocessing.py") == set()


def test_checking_a_dataset_shows_progress_without_loading_tensorflow(tiny_split_root, tmp_path):
    check = (
        "import sys, data_preprocessing\n"
        f"status = data_preprocessing.main(['--data-dir', {str(tiny_split_root)!r}, '--output-dir', {str(tmp_path)!r}])\n"
        "print(status, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=REPOSITORY_DIR, capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "0 False"
    assert "18/18 images [" in result.stdout  # The progress bar, finished.
    assert result.stderr == ""  # Not a line of TensorFlow's.


def test_reading_the_options_decides_and_the_run_builds_the_demo_dataset(tmp_path):
    import data_preprocessing
    from VGG16_finetuning import RECIPE

    demo_data = data_preprocessing.DEMO_DATA_DIR  # A folder of this test's own (see conftest).
    training = data_preprocessing.parse_arguments(RECIPE, ["--demo"])
    evaluating = data_preprocessing.parse_arguments(RECIPE, ["--demo", "--evaluate"])
    assert training.data_dir == demo_data.resolve() and evaluating.evaluation_folder == demo_data / "test"
    assert not demo_data.exists()

    assert data_preprocessing.main(["--demo", "--output-dir", str(tmp_path / "out")]) == 0
    assert len(list((demo_data / "train" / "fake").glob("*.jpg"))) == data_preprocessing.DEMO_IMAGES_PER_CLASS["train"]


def test_the_ci_workflow_runs_ci_run_on_every_push_and_pull_request():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((REPOSITORY_DIR / ".github" / "workflows" / "ci.yml").read_text())
    # YAML 1.1 reads the key `on` as True.
    assert set(workflow[True]) == {"push", "pull_request"}
    steps = workflow["jobs"]["tests"]["steps"]
    python = next(step for step in steps if step.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["python-version"] == "3.11" and python["with"]["cache"] == "pip"
    assert workflow["jobs"]["tests"]["runs-on"].startswith("ubuntu")
    assert any(step.get("run") == "bash .ci/run" for step in steps)


def test_the_readmes_first_screen_says_what_ships_and_judging_comes_next():
    readme = (REPOSITORY_DIR / "README.md").read_text()
    first_screen = readme[: readme.index("## Quick start")]
    assert "**What ships:**" in first_screen and "**What does not:** trained weights" in first_screen
    assert "--model FOLDER" in first_screen  # How to use a model someone shared.
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## Quick start", "## Judging photos and videos"]
    assert len(readme.encode()) <= 16 * 1024
