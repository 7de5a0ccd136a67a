"""The page of --serve, in a child process, talked to as its users would: with Gradio's own client, and in a real browser.

One server serves the whole module, with a demo model trained once. Its verdicts must be
--predict --csv's, to the same p_fake and notes, for good uploads and bad ones; it refuses
a file over its size limit, answers two clients at once, and ends with one line on Ctrl-C.
The browser test drives headless Debian chromium with Selenium; it skips, with its reason,
only where chromium or chromedriver is missing (.ci/run installs them where apt-get can).

On the project's 2-core machine, shared with other helpers' test runs at the time, the
module took 70 to 90 s: about 30 training the demo model, 13 to 21 starting the server
(TensorFlow, the model, Gradio), 15 in the browser and 10 for --predict's own run.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import data_preprocessing
import VGG16_finetuning
from conftest import REPOSITORY_DIR, assert_one_line_error, run_script

# How long the server may take to load TensorFlow and the model, on a loaded machine.
START_TIMEOUT = 180


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An output folder holding a demo VGG16 (its card says so), trained for one epoch on a few demo faces."""
    folder = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        # The demo's dataset goes here, never into the checkout.
        patch.setattr(data_preprocessing, "DEMO_DATA_DIR", folder / "demo-data")
        assert run_script("VGG16", None, folder / "outputs", "--demo", "--subset", "8") == 0
    return folder / "outputs"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The sample photos and clip, and the bad uploads the issue lists, each under its own name."""
    folder = tmp_path_factory.mktemp("uploads")
    data_preprocessing.write_sample_media(folder)
    (folder / "cut.mp4").write_bytes((folder / "clip.mp4").read_bytes()[:5000])  # An mp4 keeps its index at the end.
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")  # 100 million pixels in 12 KB.
    Image.new("RGB", (100_000, 1)).save(folder / "strip.png")
    return folder


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python VGG16_finetuning.py --serve` in a child process, and what it printed."""

    def __init__(self, model_dir, temporary):
        self.port, self.temporary = free_port(), temporary
        self.url = f"http://127.0.0.1:{self.port}/"
        command = [sys.executable, str(REPOSITORY_DIR / "VGG16_finetuning.py"), "--demo", "--output-dir", str(model_dir),
                   "--serve", "--port", str(self.port), "--frames", "4"]
        # Its temporary files go to a folder of this test's, to be checked.
        environment = dict(os.environ, TMPDIR=str(temporary), TF_CPP_MIN_LOG_LEVEL="2")
        self.started = time.perf_counter()
        # Ctrl-C as a terminal sends it, even where this suite runs in the background: a child
        # started with SIGINT ignored (as a shell's background jobs are) would never hear it.
        self.process = subprocess.Popen(command, cwd=temporary, env=environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.printed = []
        ready = threading.Event()
        threading.Thread(target=self.read_lines, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT):
            self.process.kill()
            pytest.fail(f"the server did not start: {self.printed}")
        self.seconds_to_start = time.perf_counter() - self.started

    def read_lines(self, ready):
        for line in self.process.stdout:
            self.printed.append(line.rstrip("\n"))
            if line.startswith("The page is at"):
                ready.set()
        ready.set()

    def temporary_files(self):
        """The files in the server's temporary folder now."""
        return [path for path in self.temporary.rglob("*") if path.is_file()]

    def stop(self):
        """Ctrl-C; return the exit status and what it said on stdout and stderr after it."""
        already = len(self.printed)
        self.process.send_signal(signal.SIGINT)
        errors = self.process.stderr.read()
        self.process.wait(60)
        time.sleep(0.1)  # The last line reaches read_lines.
        return self.process.returncode, self.printed[already:], errors


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = Server(model_dir, tmp_path_factory.mktemp("server-tmp"))
    print(f"The server started in {server.seconds_to_start:.1f} s")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def client(server, folder):
    """Gradio's client of the page, which downloads what the page gives into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return Client(server.url, verbose=False, download_files=str(folder))


def judged_on_the_page(server, tmp_path, paths, gradcam=False):
    """The page's lines, table (a DataFrame of strings), CSV file and pictures for these uploads."""
    summary, table, csv_file, pictures = client(server, tmp_path).predict(
        [handle_file(str(path)) for path in paths], gradcam, api_name="/judge"
    )
    return summary, pd.DataFrame(table["data"], columns=table["headers"]), csv_file, pictures


def predict_csv(model_dir, paths, csv_file):
    assert run_script("VGG16", None, model_dir, "--demo", "--predict", *map(str, paths), "--frames", "4", "--csv", str(csv_file)) == 0
    return pd.read_csv(csv_file, dtype=str, keep_default_na=False)


def assert_same_rows(page, command_line):
    """The same rows: the path by name, the same frames, faces, verdicts, notes and model, and p_fake to 1e-6."""
    assert page["path"].tolist() == [os.path.basename(path) for path in command_line["path"]]
    for column in ("frame", "face", "verdict", "note", "model"):
        assert page[column].tolist() == command_line[column].tolist(), column
    as_numbers = [pd.to_numeric(rows["p_fake"].replace("", np.nan)) for rows in (page, command_line)]
    assert np.allclose(*as_numbers, atol=1e-6, equal_nan=True)


def test_the_page_gives_predict_csvs_rows_for_good_and_bad_uploads_and_keeps_serving(server, model_dir, media, tmp_path):
    uploads = [media / name for name in ("astronaut.jpg", "coffee.jpg", "clip.mp4", "cut.mp4", "empty.jpg",
                                         "text.jpg", "bomb.png", "strip.png")]
    summary, page, csv_file, pictures = judged_on_the_page(server, tmp_path, uploads)
    command_line = predict_csv(model_dir, uploads, tmp_path / "predict.csv")
    assert_same_rows(page, command_line)
    assert len(page) == len(uploads) + 4  # A row for each file, and for each of the clip's 4 frames.
    # The CSV to download is the table, as --csv writes it.
    assert pd.read_csv(csv_file, dtype=str, keep_default_na=False).equals(page)
    # The same notes as the command line's warnings, and the lines it prints.
    for note in ("empty.jpg: empty file", "text.jpg: not a decodable image", "cut.mp4: not a video FFmpeg can open",
                 "bomb.png: too large (100,000,000 pixels", "astronaut.jpg  face 1, ", "strip.png  no face found",
                 "clip.mp4  video  p_fake="):
        assert note in summary, note
    assert summary.startswith("8 files: 2 verdicts (0 real, 2 uncertain, 0 fake); not judged: 2 no face, 4 unreadable")
    # Her face marked, the coffee's picture and the strip, and the clip's contact sheet.
    assert sorted(os.path.basename(picture["image"]) for picture in pictures) == [
        "astronaut.jpg-faces.jpg", "clip.mp4-frames.png", "coffee.jpg-faces.jpg", "strip.png-faces.jpg"]
    # Every upload was removed once judged: no file of the server's has its name.
    left = [path for path in server.temporary_files() if path.name in {upload.name for upload in uploads}]
    assert left == []

    # Still serving, with Grad-CAM on request.
    summary, again, _, pictures = judged_on_the_page(server, tmp_path, [media / "astronaut.jpg"], gradcam=True)
    assert again["p_fake"].tolist() == page.query("path == 'astronaut.jpg'")["p_fake"].tolist()
    assert "astronaut.jpg-face1-gradcam.png" in [os.path.basename(picture["image"]) for picture in pictures]


def test_a_file_over_the_size_limit_is_refused(server, tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as file:
        file.truncate(200 * 2**20 + 1)  # Sparse: nothing is written.
    with pytest.raises(ValueError, match="exceeds the maximum file size of 209715200 bytes"):
        judged_on_the_page(server, tmp_path, [big])
    # A client that does not check is refused by the server itself.
    with open(big, "rb") as file:
        answer = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("big.jpg", file)}, timeout=60)
    assert answer.status_code == 413 and "File size exceeded maximum allowed size of 209715200 bytes" in answer.text


def test_no_file_of_the_machine_is_readable_through_the_page(server, model_dir):
    (server.temporary / "secret.txt").write_text("in the folder the server was started in")
    for path in (server.temporary / "secret.txt", model_dir / "vgg16" / "model.keras", REPOSITORY_DIR / "README.md",
                 Path("/etc/passwd")):
        answer = httpx.get(f"{server.url}gradio_api/file={path}", timeout=30)
        assert answer.status_code == 403, (path, answer.status_code)


def test_two_clients_at_once_are_both_answered(server, media, tmp_path):
    answers = {}

    def ask(name):
        answers[name] = judged_on_the_page(server, tmp_path / name, [media / name])[1]

    askers = [threading.Thread(target=ask, args=(name,)) for name in ("astronaut.jpg", "coffee.jpg")]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(120)
    assert answers["astronaut.jpg"]["verdict"].tolist() == ["uncertain"]
    assert answers["coffee.jpg"]["note"].tolist() == ["no face"]


def test_the_page_in_a_real_browser_shows_the_demo_banner_and_judges_a_photo_and_a_video(server, media, tmp_path):
    chromium, chromedriver = shutil.which("chromium") or shutil.which("google-chrome"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("no chromium and chromedriver here: `apt-get install chromium chromium-driver` installs them")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(server.url)
        banner = wait.until(expected_conditions.visibility_of_element_located((By.ID, "model-mark")))
        assert banner.text.startswith("DEMO MODEL: trained on drawn faces")
        # The file input takes a file once the page has set it up, a moment after it shows: given again until it does.
        photo_and_video = [media / "astronaut.jpg", media / "clip.mp4"]
        WebDriverWait(browser, 120, poll_frequency=5).until(lambda browser: uploaded(browser, photo_and_video))
        browser.find_element(By.XPATH, "//button[normalize-space()='Judge']").click()
        shown = wait.until(table_with_the_clips_own_row)
        # Her row, then the clip's: 4 frames and its own, and its contact sheet among the pictures.
        assert shown.count("astronaut.jpg") == 1 and shown.count("clip.mp4") == 5
        pictures = [image.get_attribute("src") for image in browser.find_elements(By.CSS_SELECTOR, "img")]
        assert any(picture.endswith("clip.mp4-frames.png") for picture in pictures), pictures
        # Her verdict, and just before it her p_fake, in full.
        verdict = shown.index("uncertain", shown.index("astronaut.jpg"))
        p_fake = float(shown[verdict - 1])
        expected = judged_on_the_page(server, tmp_path, [media / "astronaut.jpg"])[1]["p_fake"][0]
        assert p_fake == pytest.approx(float(expected), abs=1e-6)
        # Nothing was fetched but from the page's own server.
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
        assert all(url.startswith(server.url) or url.startswith("data:") or url.startswith("blob:") for url in fetched), fetched
        screenshot = tmp_path / "page.png"
        browser.save_screenshot(str(screenshot))
        print(f"The page's screenshot: {screenshot}")
    finally:
        browser.quit()


def uploaded(browser, paths):
    """Whether the page shows the files as uploaded; if not, give them to the file input (again)."""
    from selenium.webdriver.common.by import By

    shown = browser.find_element(By.ID, "uploads").text
    if all(path.stem in shown for path in paths):  # It shows "astronaut" and ".jpg" apart.
        return True
    browser.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys("\n".join(map(str, paths)))
    return False


def table_with_the_clips_own_row(browser):
    """The table as it shows, a line per cell that is not empty, row after row, once the clip's own row is there; None before.

    (Its cells are read as shown: the table also holds a hidden row that sizes the columns.)
    """
    from selenium.webdriver.common.by import By

    shown = browser.find_element(By.ID, "verdicts").text.splitlines()
    return shown if any(line.startswith("video: 4 of 4 frames read") for line in shown) else None


def test_serve_options_are_checked_before_anything_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for options, fragment in (
            (["--serve", "--port", str(port)], f"--host 127.0.0.1 --port {port}: the page cannot listen there"),
            (["--serve", "--host", "no.such.host.invalid"], "the page cannot listen there"),
            (["--serve", "--predict", "x.jpg"], "--predict, --evaluate, --export and --serve are separate runs"),
            (["--port", "8000"], "--port and --host say where --serve's page listens; add --serve"),
            (["--serve", "--epochs", "3"], "--epochs sets how long a model trains"),
            (["--serve", "--port", "70000"], "70000 must be between 1 and 65535"),
        ):
            assert VGG16_finetuning.main(options) == 2
            assert_one_line_error(capsys, fragment)


def test_ctrl_c_stops_the_server_with_one_line(server):
    status, printed, errors = server.stop()
    assert status == 130
    assert [line for line in printed if line] == ["Stopped the page."]
    assert "Traceback" not in errors
