"""Measure --export on a full-size detector: ONNX export time, file size and difference, and onnxruntime's speed against Keras'.

It builds VGG16's detector as the script does (`build_model`, --weights none, 224 px; the
weights do not change the time or the size), exports it to ONNX as --export does, checks
onnxruntime's p(fake) against Keras' on the same images, then times both on those images,
one run, taking turns batch by batch after a warm-up batch each. Pytest does not collect it; run it on demand:

    python tests/benchmarks/benchmark_export.py              # 32 images, batches of 8
    python tests/benchmarks/benchmark_export.py --images 128

Its last line is machine-readable:

    ratio: onnxruntime/keras=X

What it measured
----------------
On the project's 2-core CPU (AMD EPYC, no GPU; Python 3.11, TensorFlow 2.21, Keras 3.15.1,
tf2onnx 1.17.0, onnx 1.23.2, onnxruntime 1.32.0), with four other helpers' jobs sharing
the 2 cores (so the wall times are high, and only the ratio compares like with like),
`python tests/benchmarks/benchmark_export.py` gave on 2026-12-07:

    ONNX export: 58.1 MB in 38.3 s; largest difference 6.0e-08
    Keras 0.6 images/s, onnxruntime 0.8 images/s (32 images, batches of 8)
    ratio: onnxruntime/keras=1.25

(load average about 11; 4.3 GB peak memory). An earlier run, timing Keras then
onnxruntime one after the other rather than in turns, gave 0.78 with 64 images, as the
load changed between them. Run again on the same machine when it was quiet (load average
0.9, nothing else running), the same command gave:

    ONNX export: 58.1 MB in 6.9 s; largest difference 6.0e-08
    Keras 4.8 images/s, onnxruntime 6.0 images/s (32 images, batches of 8)
    ratio: onnxruntime/keras=1.25

and `--export all` on a fresh demo model (quiet): model.onnx in 7.0 s (difference 1.0e-07),
saved_model/ in 2.1 s (0), model.tflite in 4.3 s (2.4e-07).

The demo's model (VGG16 at 32 px, one epoch; tests/test_export.py's), exported by
`--export all` under the same load: model.onnx 58.1 MB in 34.8 s (difference 6.0e-08),
saved_model/ 116.5 MB in 9.7 s (difference 0), model.tflite 58.2 MB in 15.7 s (difference
6.0e-08). The SavedModel holds each weight twice: Keras' export archive writes its
variables under two names.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import load_pre_trained_models  # noqa: E402
from data_preprocessing import recipe_named  # noqa: E402


def images_per_second(runtimes, pixels, batch_size):
    """Images per second of each runtime ({name: predict}), after a warm-up batch each.

    The runtimes take turns, batch by batch, so that a machine shared with other work
    slows them alike, and their ratio stays fair.
    """
    seconds = dict.fromkeys(runtimes, 0.0)
    for predict in runtimes.values():
        predict(pixels[:batch_size])
    for start in range(0, len(pixels), batch_size):
        for name, predict in runtimes.items():
            started = time.perf_counter()
            predict(pixels[start : start + batch_size])
            seconds[name] += time.perf_counter() - started
    return {name: len(pixels) / seconds[name] for name in runtimes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images scored by each runtime (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    options = parser.parse_args()
    model = load_pre_trained_models.build_model(recipe_named("vgg16"), weights="none", img_size=224)
    pixels = np.random.default_rng(0).uniform(0, 255, (options.images, 224, 224, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        onnx_file = Path(folder) / "model.onnx"
        started = time.perf_counter()
        load_pre_trained_models.write_export(model, Path(folder) / "model.keras", load_pre_trained_models.EXPORTS["onnx"], onnx_file)
        seconds = time.perf_counter() - started
        onnx_model = load_pre_trained_models.OnnxModel.load(onnx_file)
        difference = np.max(np.abs(onnx_model.predict_on_batch(pixels[:16]) - model.predict_on_batch(pixels[:16])))
        print(f"ONNX export: {onnx_file.stat().st_size / 2**20:.1f} MB in {seconds:.1f} s; largest difference {difference:.1e}")
        speed = images_per_second({"keras": model.predict_on_batch, "onnxruntime": onnx_model.predict_on_batch}, pixels, options.batch_size)
        keras_speed, onnx_speed = speed["keras"], speed["onnxruntime"]
    print(f"Keras {keras_speed:.1f} images/s, onnxruntime {onnx_speed:.1f} images/s ({options.images} images, batches of {options.batch_size})")
    print(f"ratio: onnxruntime/keras={onnx_speed / keras_speed:.2f}")


if __name__ == "__main__":
    main()
