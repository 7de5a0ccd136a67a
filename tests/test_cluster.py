"""--predict --cluster on a real Ray: a two-node cluster on this machine (ray.cluster_utils.Cluster, Ray's own
way to test several nodes), shared by the tests, judges the same rows as --predict on one machine,
loses nothing when a node goes or the run is stopped, and a cluster that cannot be had is one line.

The model is an untrained VGG16 at 32 px with a card written here (a demo model's band), so that
a worker that did not get the card would give other verdicts and marks than the driver's.
"""

import csv
import json
import shutil
import sys
import threading
import time
from collections import Counter

import pytest
import ray.cluster_utils

import load_pre_trained_models
import plot_loss_accuracy_graph
from conftest import assert_one_line_error, run_script
from data_preprocessing import write_sample_media
from plot_loss_accuracy_graph import CSV_COLUMNS, row_order

CARD = """---
deepfake_detector:
  model: vgg16
  trained_on: drawn faces
  demo_model: true
  test_auc: 0.9
  img_size: 32
  real_below: 0.3
  fake_from: 0.6
---
A card written by the test.
"""

# Small nodes: each actor takes a CPU of its node, and each node's object store holds the 60 MB model.
NODE = dict(num_cpus=2, object_store_memory=300 * 2**20)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained VGG16 detector at 32 px, saved with its card."""
    recipe = load_pre_trained_models.recipe_named("vgg16")
    model = load_pre_trained_models.build_model(recipe, weights="none", img_size=32)
    model_file = tmp_path_factory.mktemp("model") / "model.keras"
    load_pre_trained_models.save_whole(model, model_file)
    model_file.with_name(plot_loss_accuracy_graph.MODEL_CARD).write_text(CARD)
    return model_file


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder that mixes a face, a faceless photo, a corrupt file and a short clip."""
    folder = tmp_path_factory.mktemp("media") / "media"
    write_sample_media(folder)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off after its first bytes")
    return folder


@pytest.fixture(scope="module")
def one_machine(model_file, media, tmp_path_factory):
    """The CSV of --predict on the media, on this machine."""
    csv_file = tmp_path_factory.mktemp("one") / "one.csv"
    assert predict(model_file, media, csv_file) == 0
    return csv_file


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, on this machine."""
    cluster = ray.cluster_utils.Cluster(initialize_head=True, head_node_args=NODE)
    worker = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    yield cluster, worker
    cluster.shutdown()


def predict(model_file, folder, csv_file, *options):
    return run_script("VGG16", None, model_file.parent, "--predict", str(folder), "--model", str(model_file),
                      "--frames", "4", "--csv", str(csv_file), *options)


def read_rows(csv_file):
    with open(csv_file, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == list(CSV_COLUMNS)
    return rows[1:]


def same_rows(rows, expected):
    """The same rows, p_fake (column 8) to 1e-6."""
    p_fake = CSV_COLUMNS.index("p_fake")
    assert len(rows) == len(expected)
    for row, expected_row in zip(rows, expected):
        assert row[:p_fake] + row[p_fake + 1 :] == expected_row[:p_fake] + expected_row[p_fake + 1 :]
        assert (row[p_fake] == expected_row[p_fake] == "") or float(row[p_fake]) == pytest.approx(float(expected_row[p_fake]), abs=1e-6)


def test_a_two_node_cluster_writes_the_rows_of_predict_in_order(model_file, media, one_machine, cluster, tmp_path, capsys):
    assert predict(model_file, media, tmp_path / "cluster.csv", "--cluster", cluster[0].address) == 0

    rows = read_rows(tmp_path / "cluster.csv")
    assert rows == sorted(rows, key=row_order)
    same_rows(rows, sorted(read_rows(one_machine), key=row_order))
    assert {row[0] for row in rows} == {str(media / name) for name in ("astronaut.jpg", "coffee.jpg", "corrupt.jpg", "clip.mp4")}
    assert any(row[CSV_COLUMNS.index("verdict")] for row in rows)  # The card's band gave verdicts on the workers.
    output = capsys.readouterr().out
    assert "4/4 files [" in output and "1 failure" in output


def test_a_run_stopped_then_killed_then_cut_by_a_lost_node_judges_each_file_once(model_file, media, cluster, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "many"
    shutil.copytree(media, folder)
    for copy in range(4):
        shutil.copy(media / "astronaut.jpg", folder / f"astronaut-{copy}.jpg")
        shutil.copy(media / "coffee.jpg", folder / f"coffee-{copy}.jpg")
    inputs = {str(path) for path in folder.iterdir()}
    listed = tmp_path / "files.txt"  # Given as a list of paths, a line each.
    listed.write_text("# The files to judge\n" + "\n".join(sorted(inputs)) + "\n")
    csv_file = tmp_path / "rows.csv"
    head_and_worker, worker = cluster
    written, add = [], plot_loss_accuracy_graph.ClusterCsv.add

    def ctrl_c_after_two_files(table, rows):
        add(table, rows)
        written.append(rows[0]["path"])
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(plot_loss_accuracy_graph.ClusterCsv, "add", ctrl_c_after_two_files)
    assert predict(model_file, listed, csv_file, "--cluster", head_and_worker.address) == 130
    assert "run the same command again" in capsys.readouterr().out
    assert {row[0] for row in read_rows(csv_file)} == set(written)
    monkeypatch.undo()
    # Then killed as it wrote the rows of a third file: its first row is cut short.
    with open(csv_file, "ab") as file:
        file.write(f"{folder / 'astronaut-0.jpg'},,1,141".encode())
    rows_before = len(csv_file.read_text().splitlines())

    def remove_the_worker_once_rows_come():
        while len(csv_file.read_text().splitlines()) <= rows_before:
            time.sleep(0.2)
        head_and_worker.remove_node(worker)

    remover = threading.Thread(target=remove_the_worker_once_rows_come, daemon=True)
    remover.start()
    assert predict(model_file, listed, csv_file, "--cluster", head_and_worker.address) == 0
    remover.join(timeout=1)
    assert not remover.is_alive()  # The node went mid-run.

    # The first file is kept; the second, written last, is judged again, as its rows may have been cut short.
    assert f"holds the rows of 1 file: judging the {len(inputs) - 1} others" in capsys.readouterr().out
    rows = read_rows(csv_file)
    keys = [tuple(row[:3]) for row in rows]
    assert len(keys) == len(set(keys))
    assert {row[0] for row in rows} == inputs
    p_fake = CSV_COLUMNS.index("p_fake")
    # The same face, scored in other batches on other workers: the same p_fake but for float32 rounding.
    astronauts = [float(row[p_fake]) for row in rows if "astronaut" in row[0]]
    assert len(astronauts) == 5 and max(astronauts) - min(astronauts) <= 1e-6
    assert len([row for row in rows if "coffee" in row[0]]) == 5  # One row each: no face.


def test_without_ray_or_with_an_address_that_does_not_answer_one_line(model_file, media, tmp_path, monkeypatch, capsys):
    assert predict(model_file, media, tmp_path / "rows.csv", "--cluster", "127.0.0.1:1") == 2
    assert_one_line_error(capsys, "--cluster 127.0.0.1:1: nothing answers there", "ray start --head")
    monkeypatch.setitem(sys.modules, "ray", None)  # As if Ray were not installed.
    assert predict(model_file, media, tmp_path / "rows.csv", "--cluster") == 2
    assert_one_line_error(capsys, "--cluster needs Ray", "pip install")


def test_a_csv_folder_gets_shards_of_the_same_rows_and_a_summary(model_file, media, one_machine, cluster, tmp_path, capsys):
    assert predict(model_file, media, f"{tmp_path / 'shards'}/", "--cluster", cluster[0].address) == 0  # A new folder.

    folder = tmp_path / "shards"
    shards = sorted(folder.glob("*.csv"))
    rows = sorted((row for shard in shards for row in read_rows(shard)), key=row_order)
    expected = read_rows(one_machine)
    same_rows([numbers_as_floats(row) for row in rows], [numbers_as_floats(row) for row in sorted(expected, key=row_order)])
    summary = json.loads((folder / "summary.json").read_text())
    verdict, note = CSV_COLUMNS.index("verdict"), CSV_COLUMNS.index("note")
    assert summary["files"] == 4 and summary["failures"] == 1 and summary["rows"] == len(expected)
    assert summary["shards"] == len(shards) and summary["columns"] == list(CSV_COLUMNS)
    assert summary["faces"] == sum(row[CSV_COLUMNS.index("p_fake")] != "" and row[2] != "" for row in expected)
    assert summary["counts"] == dict(Counter(row[verdict] or row[note] for row in expected if row[1] == ""))
    assert "4/4 files [" in capsys.readouterr().out


def test_a_csv_folder_without_cluster_one_line(model_file, media, tmp_path, capsys):
    assert predict(model_file, media, tmp_path) == 2
    assert_one_line_error(capsys, "is a folder: only --cluster writes shards", "name a file")


def numbers_as_floats(row):
    """A row's numbers written one way, as Ray's writer and Python's csv write them differently (0 and 0.0)."""
    return [cell if column in ("path", "verdict", "note", "model") or cell == "" else str(float(cell))
            for column, cell in zip(CSV_COLUMNS, row)]
