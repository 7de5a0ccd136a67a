"""How the modules depend on each other: no import cycle, and no TensorFlow before it is needed."""

import ast
import subprocess
import sys

import pytest

from conftest import REPOSITORY_DIR

# Every Python file of the project: the scripts, the helpers, the tests and the benchmarks.
PYTHON_FILES = sorted([*REPOSITORY_DIR.glob("*.py"), *REPOSITORY_DIR.glob("tests/**/*.py")])
OUR_MODULES = {path.stem for path in PYTHON_FILES}


def modules_imported_by(path):
    """The modules of ours that a file imports, at its top or inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
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
