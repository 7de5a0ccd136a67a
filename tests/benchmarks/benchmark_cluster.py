"""Measure what --predict --cluster costs against --predict on one machine, and what the driver holds.

On the sample's dataset faces (../shared/faces-140k-sample, 1,000 images of 256 px), with an
untrained VGG16 (the time to score a face does not depend on the weights), it measures:

- images per second of `--predict FOLDER --faces off --csv` on one machine, and of the
  same with `--cluster` (a Ray started on this machine), and the overhead as a ratio;
- the driver's peak memory (VmHWM) with --cluster, judging 100 files and judging 1,000:
  results stream through the driver, which keeps only the list of paths;
- the cost of scoring one 256 px face at 224 px, and of finding the face in it (MTCNN),
  in this process: the figures from which the README's sum for a million faces is made.

Each command runs in a fresh process, whose peak memory is read from /proc as it runs.
Pytest does not collect it; run it on demand (about 15 minutes on a loaded 2-core CPU):

    python tests/benchmarks/benchmark_cluster.py              # --img-size 64 for the commands
    python tests/benchmarks/benchmark_cluster.py --img-size 224

Its last line is machine-readable:

    ratios: cluster/predict=X driver_peak_1000/100=Y

What it measured
----------------
On the project's 2-core CPU (no GPU; Python 3.11, TensorFlow 2.21, Ray 2.60.0), on
2026-12-07, `python tests/benchmarks/benchmark_cluster.py`, while four other sessions
loaded the machine (load average 7 at the end, 10 to 15 in the hour before, on its 2 cores:
every time here is several times what an idle machine would take; the ratios are the figures to keep):

    | Command, untrained VGG16 at 64 px, --faces off | Images/s | Seconds | Driver peak MiB |
    | --predict, 1,000 files                          |     13.5 |      74 |            1153 |
    | --predict --cluster, 1,000 files                |      8.4 |     118 |            1123 |
    | --predict --cluster, 100 files                  |      2.6 |      39 |            1132 |

    per face at 224 px: scoring 1028.1 ms; finding it with MTCNN in a 256 px image 218.9 ms
    ratios: cluster/predict=1.60 driver_peak_1000/100=0.99

The cluster's run took 1.6 times as long: starting Ray and its actor (TensorFlow, the model
and MTCNN in a process of its own) costs about 35 s, the 100 files' run nearly all of it;
past that, it judged (1,000 - 100) / (118 - 39) = 11 images a second, against 13.5 for
the whole --predict run, as one actor on a 2-core machine has nothing to share the work
with. The driver held the same memory for 1,000 files as for 100 (0.99): rows stream
through it a file at a time, and only the list of paths grows, by about 100 bytes a file.

How long a million faces would take
-----------------------------------
Scoring is the part that a GPU speeds up; finding the face is MTCNN's, on the CPU cores of
the node. The dataset's faces are cropped already (--faces off), so only scoring counts:
on this CPU, per face at 224 px, 1.03 s under that load, so a million faces would take about
286 hours, and on N such 2-core nodes that time over N. On a GPU the
per-face cost is ASSUMED, not measured here (no GPU on this machine): about 2 ms for
VGG16 at 224 px in batches of 32 on one modern data-centre GPU, so one actor per GPU
judges a million faces in about 2,000 s, 33 minutes; N GPU nodes take 33/N minutes,
as long as each node's CPUs decode the JPEGs fast enough (about 500 a second per GPU).
"""

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY_DIR))
SAMPLE_DIR = REPOSITORY_DIR.parent / "shared" / "faces-140k-sample" / "real_vs_fake" / "real-vs-fake"


def sample_images(count):
    """`count` of the sample's faces, in a stable order."""
    images = sorted(SAMPLE_DIR.rglob("*.jpg"))
    if len(images) < count:
        sys.exit(f"{SAMPLE_DIR} holds {len(images)} images, fewer than {count}")
    return images[:count]


def linked_folder(images, folder):
    """A folder of links to `images`, so that no image is copied."""
    folder.mkdir(parents=True)
    for number, image in enumerate(images):
        (folder / f"{number:05d}-{image.name}").symlink_to(image)
    return folder


def save_untrained_model(folder, img_size):
    """An untrained VGG16 detector at `img_size`, saved as the scripts save one (no card)."""
    import load_pre_trained_models

    recipe = load_pre_trained_models.recipe_named("vgg16")
    model = load_pre_trained_models.build_model(recipe, weights="none", img_size=img_size)
    model_file = folder / "model" / "model.keras"
    model_file.parent.mkdir()
    load_pre_trained_models.save_whole(model, model_file)
    return model_file


def run_measured(command):
    """Run `command`; return its seconds and its peak resident memory in MiB (VmHWM, read as it runs)."""
    output = tempfile.TemporaryFile("w+")  # Not a pipe: a full one would stop the command.
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
    peak_kib = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kib = max(peak_kib, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))
        except (OSError, AttributeError):  # It ended between the poll and the read.
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    output.seek(0)
    if process.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{output.read()[-3000:]}")
    return seconds, peak_kib / 1024


def predict_command(model_file, folder, csv_file, *options):
    return [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), "--predict", str(folder), "--model", str(model_file),
            "--faces", "off", "--csv", str(csv_file), *options]


def per_face_costs(img_size, faces=64):
    """Seconds to score one sample face at `img_size` (batches of 32), and to find the face in one (MTCNN)."""
    import numpy as np

    import load_pre_trained_models
    from data_augmentation import FaceFinder, read_upright

    with tempfile.TemporaryDirectory() as folder:
        member = load_pre_trained_models.load_member(save_untrained_model(Path(folder), img_size))
    pictures = [read_upright(path) for path in sample_images(faces)]
    load_pre_trained_models.p_fake_of_pictures([member], pictures[:32])  # Traced once, not timed.
    started = time.perf_counter()
    for start in range(0, faces, 32):
        load_pre_trained_models.p_fake_of_pictures([member], pictures[start : start + 32])
    scoring = (time.perf_counter() - started) / faces
    finder = FaceFinder()
    finder.find(np.asarray(pictures[0]), 50)  # Loaded once, not timed.
    started = time.perf_counter()
    for picture in pictures[:16]:
        finder.find(np.asarray(picture), 50)
    return scoring, (time.perf_counter() - started) / 16


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="sample images to judge (default 1000)")
    parser.add_argument("--img-size", type=int, default=64, help="the size the model judges at in the commands (default 64)")
    options = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model_file = save_untrained_model(work, options.img_size)
        many = linked_folder(sample_images(options.images), work / "many")
        few = linked_folder(sample_images(options.images // 10), work / "few")
        rows = []
        for name, command in [
            (f"--predict, {options.images} files", predict_command(model_file, many, work / "one.csv")),
            (f"--predict --cluster, {options.images} files", predict_command(model_file, many, work / "cluster.csv", "--cluster")),
            (f"--predict --cluster, {options.images // 10} files", predict_command(model_file, few, work / "few.csv", "--cluster")),
        ]:
            seconds, peak = run_measured(command)
            files = options.images // 10 if "few" in str(command) else options.images
            rows.append((name, files / seconds, seconds, peak))
            print(f"{name}: {files / seconds:.1f} images/s ({seconds:.0f} s), driver peak {peak:.0f} MiB", flush=True)
        shutil.rmtree(many)
    scoring, finding = per_face_costs(224)
    print(f"per face at 224 px: scoring {scoring * 1000:.1f} ms; finding it with MTCNN in a 256 px image {finding * 1000:.1f} ms")
    print(f"a million faces, scoring at 224 px on this CPU: {scoring * 1e6 / 3600:.1f} hours")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"this process's peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"ratios: cluster/predict={rows[0][2] and rows[1][2] / rows[0][2]:.2f} driver_peak_1000/100={rows[1][3] / rows[2][3]:.2f}")


if __name__ == "__main__":
    main()
