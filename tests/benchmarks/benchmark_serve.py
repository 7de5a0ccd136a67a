"""Measure --serve's page: how soon it is ready, how long it takes to judge a photo against --predict, and its memory.

It starts `python VGG16_finetuning.py --demo --serve` in a child process, as a user
would, and measures:

- the seconds from the command to the line that gives the page's address, and to the
  page's first answer;
- the seconds to judge the astronaut through the page with Gradio's client (upload,
  judging, the CSV and the marked picture downloaded), the median of 5, against the whole
  `--predict astronaut.jpg` command, which loads TensorFlow and the model each time;
- the memory (resident set) of the serving process after 1 upload, and after 20.

It needs a demo model (`python VGG16_finetuning.py --demo` first, or --output-dir D of
one). Pytest does not collect it (its name does not start with test_); run it on demand:

    python tests/benchmarks/benchmark_serve.py
    python tests/benchmarks/benchmark_serve.py --output-dir /tmp/demo/out

What it measured
----------------
On the project's 2-core CPU (no GPU; Python 3.11, TensorFlow 2.21, Gradio 6.31), on
2026-12-07, with a demo VGG16 trained for one epoch, while other test runs shared the
machine (load average 7.5: every figure is slower than on an idle machine, and the ratios
count more), `python tests/benchmarks/benchmark_serve.py --output-dir /tmp/wt25-demo/out` gave:

    --serve: its address printed after 25.0 s, the page's first answer after 25.0 s
    The astronaut through the page: median 0.92 s of 5 (1.25, 0.92, 1.03, 0.78, 0.64)
    The astronaut with the whole --predict command: median 12.7 s of 3
    Memory of the serving process: 1056 MiB after 1 upload, 1068 MiB after 20

Most of the start is TensorFlow's and the model's loading, which --predict pays on every
command; once loaded, the page judges a photo in under a second, and its memory stays
flat from one upload to twenty (+12 MiB, 1%).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPOSITORY_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY_DIR))

from data_preprocessing import write_sample_media  # noqa: E402


def resident_mib(pid):
    """The resident memory of a process, in MiB, as Linux counts it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_page(output_dir, port):
    """Start --serve; return the process, and the seconds to its address line and to its first answer."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), "--demo", "--output-dir", str(output_dir),
         "--serve", "--port", str(port)], stdout=subprocess.PIPE, text=True,
    )
    for line in process.stdout:
        if line.startswith("The page is at"):
            break
    to_address = time.perf_counter() - started
    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read()
    return process, to_address, time.perf_counter() - started


def timed(function, *args):
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, default=REPOSITORY_DIR / "outputs" / "demo",
                        help="where the demo model was trained (default outputs/demo)")
    parser.add_argument("--port", type=int, default=7899)
    options = parser.parse_args()
    from gradio_client import Client, handle_file  # Only here: it loads a while.

    media = Path(tempfile.mkdtemp(prefix="benchmark-serve-"))
    astronaut = write_sample_media(media)[0]
    process, to_address, to_answer = start_page(options.output_dir, options.port)
    try:
        client = Client(f"http://127.0.0.1:{options.port}/", verbose=False, download_files=str(media / "downloads"))

        def judge():
            client.predict([handle_file(str(astronaut))], False, api_name="/judge")

        judge()
        after_one = resident_mib(process.pid)
        page_seconds = [timed(judge) for _ in range(5)]
        for _ in range(20 - 6):
            judge()
        after_twenty = resident_mib(process.pid)
    finally:
        process.terminate()
        process.wait()
    command = [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), "--demo", "--output-dir", str(options.output_dir),
               "--predict", str(astronaut)]
    predict_seconds = [timed(lambda: subprocess.run(command, check=True, capture_output=True)) for _ in range(3)]

    print(f"--serve: its address printed after {to_address:.1f} s, the page's first answer after {to_answer:.1f} s")
    print(f"The astronaut through the page: median {statistics.median(page_seconds):.2f} s of 5 "
          f"({', '.join(f'{seconds:.2f}' for seconds in page_seconds)})")
    print(f"The astronaut with the whole --predict command: median {statistics.median(predict_seconds):.1f} s of 3")
    print(f"Memory of the serving process: {after_one:.0f} MiB after 1 upload, {after_twenty:.0f} MiB after 20")


if __name__ == "__main__":
    main()
