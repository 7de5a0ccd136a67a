"""Measure where the dataset's faces sit in their 256x256 frame, as MTCNN's landmarks place them.

--predict cuts the faces of photos and video frames out the way the dataset frames its
own faces; data_augmentation.py records the framing this script measures
(FRAME_SIDE_PER_FACE_SCALE and FRAME_CENTRE_TOWARD_MOUTH). It runs MTCNN on every image
of a dataset folder, prints the medians and spreads of the box and the landmarks, and then
checks the rule: each image's face, framed by the recorded numbers, should give back the
image's own square. Pytest does not collect it; run it on demand:

    python tests/benchmarks/measure_face_framing.py                                      # ../shared/faces-140k-sample
    python tests/benchmarks/measure_face_framing.py datasets/real_vs_fake/real-vs-fake/test   # any folder of faces

What it measured
----------------
On the 1,000 images of faces-140k-sample (2-core CPU, mtcnn 1.0.0, TensorFlow 2.21), on
2026-11-26, in 80 s; every image had a face (medians, with the standard deviation):

    box width 138 px (sd 7.0), height 186 (sd 12.3)
    eye midpoint (127.5, 120.0), sd 1.4 and 1.5 px; eye angle 0.0 degrees (sd 1.6)
    eye distance 64 px (sd 3.6); eye to mouth 65 px (sd 5.2)
    side / FFHQ's face scale 2.00 (relative sd 3.3%); side / eye distance 4.00 (6.9%);
        side / box width 1.86 (5.1%)
    frame centre toward the mouth: 0.116 of the eye-to-mouth distance (sd 0.020)
    each image's face, framed by the rule: IoU with the image's own square, median 0.969,
        5th percentile 0.879
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY_DIR = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPOSITORY_DIR.parent / "shared" / "faces-140k-sample"
sys.path[:0] = [str(REPOSITORY_DIR), str(REPOSITORY_DIR / "tests")]

from conftest import square_iou  # noqa: E402
from data_augmentation import DATASET_FRAME_SIDE, FaceFinder, read_upright  # noqa: E402


def centre_toward_mouth(measures, side):
    """How far the frame's centre lies from the eyes toward the mouth, in eye-to-mouth distances."""
    centre = np.full(2, (side - 1) / 2)
    down = (measures["mouth"] - measures["eyes"]) / measures["eye_to_mouth"]
    return float((centre - measures["eyes"]) @ down / measures["eye_to_mouth"])


def describe(name, values):
    values = np.asarray(values, float)
    # A spread relative to a mean near 0, such as the eye angle's, says nothing.
    relative = f"relative sd {values.std() / abs(values.mean()):6.1%}" if abs(values.mean()) > values.std() else ""
    print(f"{name:40s} median {np.median(values):8.3f}  mean {values.mean():8.3f}  sd {values.std():7.3f}  {relative}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=SAMPLE_DIR, help="a folder of dataset faces, searched to any depth")
    args = parser.parse_args(argv)
    paths = sorted(args.folder.rglob("*.jpg"))
    if not paths:
        sys.exit(f"error: no .jpg images in {args.folder}")

    finder, rows, missed, started = FaceFinder(), [], [], time.perf_counter()
    for path in paths:
        image = read_upright(path)
        faces = finder.find(image, min_face=MIN_FACE_MEASURED)
        if not faces:
            missed.append(path)
            continue
        face = max(faces, key=lambda found: found.width)
        side = image.shape[1]
        rows.append((face, face.geometry(), side))
    print(f"{len(paths)} images, a face in {len(rows)}, in {time.perf_counter() - started:.0f} s")

    describe("box width, px", [face.box[2] for face, _, _ in rows])
    describe("box height, px", [face.box[3] for face, _, _ in rows])
    describe("eye midpoint x, px", [measures["eyes"][0] for _, measures, _ in rows])
    describe("eye midpoint y, px", [measures["eyes"][1] for _, measures, _ in rows])
    describe("eye angle, degrees", [measures["angle"] for _, measures, _ in rows])
    describe("eye distance, px", [measures["eye_distance"] for _, measures, _ in rows])
    describe("eye to mouth, px", [measures["eye_to_mouth"] for _, measures, _ in rows])
    describe("side / face scale", [side / measures["face_scale"] for _, measures, side in rows])
    describe("side / eye distance", [side / measures["eye_distance"] for _, measures, side in rows])
    describe("side / box width", [side / face.box[2] for face, _, side in rows])
    describe("centre toward the mouth, eye-to-mouth", [centre_toward_mouth(measures, side) for _, measures, side in rows])
    ious = [square_iou(face.frame().square, (0, 0, side)) for face, _, side in rows]
    describe("IoU of the framed square with the image", ious)
    print(f"IoU 5th percentile {np.percentile(ious, 5):.3f}; the frame is {DATASET_FRAME_SIDE} px")
    for path in missed:
        print(f"no face found: {path}")


# The dataset's faces are about 138 px wide; any smaller limit finds them all.
MIN_FACE_MEASURED = 64

if __name__ == "__main__":
    main()
