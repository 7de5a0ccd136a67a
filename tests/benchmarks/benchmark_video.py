"""Time --predict on a 60-second 1080p video, stage by stage: seeking and decoding, finding faces, scoring.

It writes a 60-second 1920x1080 clip at 30 frames per second, with the public-domain
astronaut portrait of scikit-image moving across it, saves an untrained VGG16 detector
at 224 px (the timing does not depend on the weights), and runs

    python VGG16_finetuning.py --predict CLIP --model MODEL

as a user would, in a fresh process, reading the stage times from the line it prints
last. OpenCV writes MPEG-4 Part 2 with a key frame every 12 frames; where the ffmpeg
command is installed, the same clip is also encoded as H.264 with x264's default key frame
interval of 250 frames, the hardest case for seeking, and timed too. Pytest does not
collect it; run it on demand:

    python tests/benchmarks/benchmark_video.py              # the clips and the model go to a temporary folder
    python tests/benchmarks/benchmark_video.py --keep outputs/media/  # or into outputs/media/, and are kept

With --keep, the folder also gets the portrait itself, astronaut.png: the README's photo.

What it measured
----------------
On the project's 2-core CPU (AMD EPYC, no GPU; Python 3.11, TensorFlow 2.21, OpenCV 5.0,
mtcnn 1.0.0), on 2026-11-26, `python tests/benchmarks/benchmark_video.py` judged 32 frames of 1,800,
with the face found in each, in:

    | clip                          | seeking and decoding | finding faces | scoring | judging | whole command |
    | MPEG-4 Part 2, key frame /12  |                1.6 s |         3.7 s |   4.7 s |  10.0 s |        14.7 s |
    | H.264 (x264), key frame /250  |                8.9 s |         3.6 s |   4.7 s |  17.2 s |        21.9 s |

Judging is the sum of the stages (cutting the faces out takes under 0.1 s); the whole
command also starts Python and TensorFlow and loads both networks. A run before the last
changes to the code gave 10.3 and 18.7 s of judging, 15.1 and 23.3 s in all.
Each seek decodes from the key frame before the sampled frame, so the H.264 clip, with
its key frames 8 s apart, costs about 125 decoded frames a sample: still under a third of
decoding all 1,800. Phones write a key frame every second or two.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPOSITORY_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY_DIR))

SECONDS, FPS, WIDTH, HEIGHT = 60, 30, 1920, 1080


def astronaut():
    """scikit-image's astronaut portrait (public domain, NASA), as RGB."""
    import skimage.data

    return skimage.data.astronaut()


def write_clip(path, seconds=SECONDS, fps=FPS):
    """A 1080p clip in which the astronaut's portrait, 600 px high, crosses the frame once."""
    portrait = cv2.resize(astronaut(), (600, 600), interpolation=cv2.INTER_AREA)[..., ::-1]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    rng = np.random.default_rng(0)
    background = rng.integers(60, 200, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frame_count = seconds * fps
    for index in range(frame_count):
        frame = background.copy()
        x = int((WIDTH - 600) * index / (frame_count - 1))
        frame[240:840, x : x + 600] = portrait
        writer.write(frame)
    writer.release()
    return path


def save_detector(path):
    """An untrained VGG16 detector at 224 px, as the script saves one."""
    from data_preprocessing import quiet_tensorflow_start
    from VGG16_finetuning import RECIPE

    with quiet_tensorflow_start():
        import load_pre_trained_models

    load_pre_trained_models.build_model(RECIPE, weights="none", img_size=224).save(path)
    return path


def time_prediction(clip, model_file):
    """Run --predict on the clip in a fresh process; return its wall time and its printed stage times."""
    command = [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), "--predict", str(clip), "--model", str(model_file)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.exit(f"error: --predict failed:\n{finished.stderr}")
    summary = next(line for line in finished.stdout.splitlines() if "  video  " in line)
    stages = finished.stdout.strip().splitlines()[-1]
    return wall, summary, stages


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, metavar="DIR", help="write the clips and the model here and keep them")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    Image.fromarray(astronaut()).save(folder / "astronaut.png")
    clips = [write_clip(folder / "clip.mp4")]
    print(f"Wrote {clips[0]} in {time.perf_counter() - started:.0f} s")
    if subprocess.run(["which", "ffmpeg"], capture_output=True).returncode == 0:
        h264 = folder / "clip-h264.mp4"
        subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(clips[0]), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(h264)], check=True)
        clips.append(h264)
    model_file = save_detector(folder / "vgg16-224.keras")

    for clip in clips:
        wall, summary, stages = time_prediction(clip, model_file)
        print(f"{clip.name}: {wall:.1f} s in all, TensorFlow's start included")
        print(f"  {summary}")
        print(f"  {stages}")
        seconds = dict((stage, float(value)) for stage, value in re.findall(r"([a-z ]+) ([\d.]+) s", stages.removeprefix("Time: ")))
        print(f"  judging: {sum(seconds.values()):.1f} s")


if __name__ == "__main__":
    main()
