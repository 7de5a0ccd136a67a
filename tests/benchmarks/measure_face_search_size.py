"""Measure what searching faces in a reduced copy costs against a full-size search: time, and how far the crops move.

FaceFinder searches an image at a longest side of SEARCH_SIDE pixels (unless --min-face
needs more), scales the boxes and landmarks back, and cuts each crop from the full-size
image. For each candidate side it searches scenes of 1280x720 and 1920x1080 (noisy walls
with faces of ../shared/faces-140k-sample pasted at 120 to 420 px) and compares with
the same scenes searched at full size:

- faces: whether the same faces are found (each matched to the nearest of the other search);
- crop moved: the distance between the two crops' centres plus the difference of their
  sides, as a share of the side (the tolerance is 2 %);
- p_fake: with --model, the largest difference of the model's p_fake between the two crops
  (the tolerance is 0.01).

    python tests/benchmarks/measure_face_search_size.py --model outputs/demo/vgg16

What it measured
----------------
On the project's 2-core AMD EPYC, shared with other work (load average 6 to 12), on
2026-12-07, `--model outputs/demo/vgg16` (the demo's VGG16 at 64 px) over 12 scenes:

    | search                                        | s a scene | faces unlike | crop moved, max (mean) | p_fake, max |
    | full size                                     |      1.70 |            - |                      - |           - |
    | SEARCH_SIDE 640, framed in the full image     |      0.28 |            0 |            5.1 % (2.4) |       0.035 |
    | SEARCH_SIDE 800, framed in the full image     |      0.40 |            0 |            5.7 % (2.4) |       0.031 |
    | SEARCH_SIDE 960, framed in the full image     |      0.47 |            0 |            5.8 % (2.2) |       0.049 |

Before the last stage ran in the full image (StageInFullImage), with the faces framed in
the reduced copy too, the crops moved by up to 9.0 % (mean 3.5 %) at 640, 6.6 % (3.2) at
800 and 4.9 % (2.4) at 960, and p_fake by up to 0.074, 0.044 and 0.058 (full size 9.95 s a
scene then, under more load). A larger copy costs more and frames no better: what is left
is MTCNN's own spread (its landmarks come in whole pixels, and its proposals differ from
one search to the next), about 1 px on a face 64 to 130 px wide. So SEARCH_SIDE stays 640.

Then the finder ran mtcnn's stages itself (FaceFinder.search): the last stage on the whole
full-size image (not the region of the candidates), its landmarks kept in fractions of a
pixel, and given its own box again (OUTPUT_PASSES). Same machine, 2026-12-07, load 4 to 8,
`--scenes 24 --model` the demo's VGG16 at 64 px, at SEARCH_SIDE 640 / 800 / 960:

    | last stage's passes | crop moved, max (mean)                     | p_fake, max             |
    |                   1 | 14.3 % (2.5), 15.4 % (2.7), 7.0 % (2.1)    | 0.060, 0.043, 0.032     |
    |                   2 | 7.4 % (1.9), 3.2 % (1.6), 4.2 % (1.5)      | 0.021, 0.017, 0.023     |
    |                   3 | 4.0 % (0.9), 2.4 % (1.1), 3.1 % (1.2)      | 0.014, 0.022, 0.031     |

Without --model, 640 gave 6.0 % (1.4) with four passes and 5.9 % (1.1) with six: the passes
wander rather than settle, and on the test's scene (two faces of 260 and 380 px) three
passes moved the larger crop by 3.6 % where two moved it by 0.8 %. So two passes. A full-size
search took 0.16 to 0.29 s a scene, at 640 0.04 to 0.06 s. The 2 % and 0.01 tolerances are
met on average, not for every face: that spread is the network's own.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPOSITORY_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY_DIR))
SAMPLE_DIR = REPOSITORY_DIR.parent / "shared" / "faces-140k-sample" / "real_vs_fake" / "real-vs-fake" / "test"
SIDES = (640, 800, 960)


def scenes(count, rng):
    """`count` scenes, half 1280x720 and half 1920x1080, each with one sample face at a random size and place."""
    faces = sorted(SAMPLE_DIR.glob("*/*.jpg"))
    for number in range(count):
        height, width = (720, 1280) if number % 2 == 0 else (1080, 1920)
        scene = rng.integers(70, 190, (height, width, 3), dtype=np.uint8)
        size = int(rng.integers(120, 420))
        face = cv2.resize(np.asarray(Image.open(faces[number * 7 % len(faces)]).convert("RGB")), (size, size),
                          interpolation=cv2.INTER_AREA)
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        scene[y : y + size, x : x + size] = face
        yield scene


def searched(finder, scene, side):
    """The faces found with SEARCH_SIDE set to `side`, and the seconds it took."""
    import data_augmentation

    data_augmentation.SEARCH_SIDE = side
    started = time.perf_counter()
    faces = finder.find(scene, 64)
    return faces, time.perf_counter() - started


def moved(frame, reference):
    """How far a crop's frame lies from the reference frame, as a share of the reference's side."""
    distance = math.hypot(frame.centre_x - reference.centre_x, frame.centre_y - reference.centre_y)
    return (distance + abs(frame.side - reference.side)) / reference.side


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=12, help="how many scenes (default 12)")
    parser.add_argument("--model", help="a model's folder or .keras file, to compare p_fake too")
    args = parser.parse_args(argv)
    from data_preprocessing import quiet_tensorflow_start

    with quiet_tensorflow_start():
        from data_augmentation import FaceFinder
        import load_pre_trained_models

    finder = FaceFinder()
    members = load_pre_trained_models.Detector.load(args.model).members if args.model else None
    results = {side: dict(seconds=[], moved=[], p_fake=[], missed=0) for side in SIDES}
    full_seconds = []
    for scene in scenes(args.scenes, np.random.default_rng(0)):
        full, seconds = searched(finder, scene, max(scene.shape))
        full_seconds.append(seconds)
        for side in SIDES:
            faces, seconds = searched(finder, scene, side)
            results[side]["seconds"].append(seconds)
            results[side]["missed"] += abs(len(faces) - len(full))
            for face in faces:
                reference = min(full, key=lambda other: moved(face.frame(), other.frame()), default=None)
                if reference is None:
                    continue
                results[side]["moved"].append(moved(face.frame(), reference.frame()))
                if members:
                    crops = [face.frame().crop(scene), reference.frame().crop(scene)]
                    p_fake = load_pre_trained_models.p_fake_of_pictures(members, crops)
                    results[side]["p_fake"].append(abs(float(p_fake[0]) - float(p_fake[1])))
    print(f"full size: {np.mean(full_seconds):.2f} s a scene")
    for side, result in results.items():
        p_fake = f", p_fake differs by at most {max(result['p_fake']):.4f}" if result["p_fake"] else ""
        print(f"SEARCH_SIDE {side}: {np.mean(result['seconds']):.2f} s a scene, {result['missed']} faces found or missed "
              f"unlike the full-size search, crops moved by at most {100 * max(result['moved']):.1f} % "
              f"(mean {100 * np.mean(result['moved']):.1f} %){p_fake}")


if __name__ == "__main__":
    main()
