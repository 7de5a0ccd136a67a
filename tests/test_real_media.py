"""Judging real media: faces found in photos and videos, cut out as the dataset frames them, and scored.

The scenes are built here: real faces of ../shared/faces-140k-sample (those tests skip
when it is absent) pasted at random places and sizes into larger noisy backgrounds, one
scene stored on its side with EXIF orientation 6, and a short mp4 with a moving face.
The public-domain astronaut portrait comes from the installed scikit-image.
"""

import json
import math
import re
import shutil
from fractions import Fraction

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import data_augmentation
import data_preprocessing
import load_pre_trained_models
import plot_loss_accuracy_graph
from plot_loss_accuracy_graph import FaceResult, PictureResult, VideoResult, read_model_card
from conftest import REPOSITORY_DIR, run_script, square_iou
from data_augmentation import (
    FaceFinder,
    MIN_FACE_CONFIDENCE,
    FaceFrame,
    NO_CANDIDATE,
    load_pixels,
    main_face,
    read_upright,
    read_video_frames,
    read_video_index,
    resized_image,
    sampled_frame_indices,
)
from data_preprocessing import UserError, make_demo_dataset

SAMPLE_TEST_DIR = REPOSITORY_DIR.parent / "shared" / "faces-140k-sample" / "real_vs_fake" / "real-vs-fake" / "test"
needs_sample = pytest.mark.skipif(not SAMPLE_TEST_DIR.is_dir(), reason=f"{SAMPLE_TEST_DIR} is absent")


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """An output folder holding a VGG16 trained for one epoch, at 32 px, on the synthetic demo faces."""
    folder = tmp_path_factory.mktemp("media")
    split_root = make_demo_dataset(folder / "faces", {"train": 8, "valid": 4, "test": 4}, size=32)
    assert run_script("VGG16", split_root, folder / "outputs") == 0
    return folder / "outputs"


@pytest.fixture(scope="module")
def finder():
    return FaceFinder()


def sample_faces(count):
    """`count` of the sample's 256x256 faces, real and fake in turn."""
    real, fake = sorted((SAMPLE_TEST_DIR / "real").glob("*.jpg")), sorted((SAMPLE_TEST_DIR / "fake").glob("*.jpg"))
    return [path for pair in zip(real, fake) for path in pair][:count]


def paste(scene, face_file, x, y, size):
    """Paste a dataset face into the scene as a size x size square at (x, y); return that square."""
    face = cv2.resize(np.asarray(Image.open(face_file).convert("RGB")), (size, size), interpolation=cv2.INTER_AREA)
    scene[y : y + size, x : x + size] = face
    return (x, y, size)


def noisy_background(rng, height, width):
    return rng.integers(70, 190, (height, width, 3), dtype=np.uint8)


def build_scenes(folder, rng):
    """Portrait and landscape scenes, one with two faces; return {file: [pasted squares]} and the faces' files."""
    folder.mkdir()
    faces, scenes = iter(sample_faces(4)), {}
    sources = {}
    for name, (height, width), sizes in [
        ("portrait.jpg", (900, 600), [220]),
        ("landscape.jpg", (600, 1000), [300]),
        ("two-faces.jpg", (700, 1200), [180, 260]),
    ]:
        scene, squares = noisy_background(rng, height, width), []
        for index, size in enumerate(sizes):
            # Faces side by side, each at a random place in its own half.
            left = index * width // len(sizes)
            x = int(rng.integers(left, left + width // len(sizes) - size))
            y = int(rng.integers(0, height - size))
            face_file = next(faces)
            squares.append(paste(scene, face_file, x, y, size))
            sources[(name, len(squares))] = face_file
        Image.fromarray(scene).save(folder / name, quality=95)
        scenes[folder / name] = squares
    return scenes, sources


def predict(output_dir, *options):
    return run_script("VGG16", None, output_dir, "--predict", *options)


@needs_sample
def test_each_pasted_face_is_found_framed_and_scored_as_its_own_image(output_dir, tmp_path, capsys):
    scenes, sources = build_scenes(tmp_path / "scenes", np.random.default_rng(3))
    wall = tmp_path / "scenes" / "wall.jpg"  # No face: scored whole, with empty cells in its row.
    Image.fromarray(noisy_background(np.random.default_rng(4), 300, 400)).save(wall)
    assert predict(output_dir, str(tmp_path / "scenes"), "--csv", str(tmp_path / "faces.csv")) == 0

    rows = pd.read_csv(tmp_path / "faces.csv")
    assert list(rows.columns) == list(plot_loss_accuracy_graph.CSV_COLUMNS)
    whole = rows[rows["path"] == str(wall)]
    assert len(whole) == 1 and whole[["frame", "face", "crop_size", "confidence"]].isna().all(axis=None)
    rows = rows[rows["path"] != str(wall)]
    assert rows["frame"].isna().all() and (rows["confidence"] > 0.9).all()
    # Whole numbers stay whole beside the empty cells: "2", not "2.0".
    for line in (tmp_path / "faces.csv").read_text().splitlines()[1:]:
        frame_face_and_square = line.split(",")[1:6]
        assert all(cell == "" or cell.isdigit() for cell in frame_face_and_square), line
    originals = p_fake_of_files(output_dir, list(sources.values()), tmp_path, capsys)
    for scene, squares in scenes.items():
        found = rows[rows["path"] == str(scene)]
        assert len(found) == len(squares), f"{scene.name}: {len(found)} faces found, {len(squares)} pasted"
        # Faces are numbered left to right, as they were pasted.
        for number, (pasted, (_, row)) in enumerate(zip(squares, found.sort_values("face").iterrows()), start=1):
            assert row["face"] == number
            scored = (row["crop_x"], row["crop_y"], row["crop_size"])
            assert square_iou(scored, pasted) >= 0.7, f"{scene.name} face {number}: {scored} scored, {pasted} pasted"
            own = originals[str(sources[(scene.name, number)])]
            assert row["p_fake"] == pytest.approx(own, abs=0.05)


def p_fake_of_files(output_dir, files, tmp_path, capsys):
    """{path: p_fake} of dataset faces scored whole, as the model was trained to see them."""
    csv = tmp_path / "own.csv"
    assert predict(output_dir, *map(str, files), "--faces", "off", "--csv", str(csv)) == 0
    capsys.readouterr()
    return dict(pd.read_csv(csv)[["path", "p_fake"]].itertuples(index=False))


@needs_sample
def test_a_pasted_face_is_cut_out_as_the_dataset_framed_it(finder):
    # The pixels show it, whatever a model makes of them. Measured on these four faces, the
    # mean difference from the dataset's image was 9 to 20 grey levels for the frames found;
    # 36 to 54 for a frame moved by a tenth of its side, 24 to 37 for one a tenth larger,
    # and 72 to 110 for another face.
    differences = []
    # The last two are pasted larger than the dataset's 256 px, so that they are shrunk back.
    for face_file, size in zip(sample_faces(4), (256, 256, 400, 520)):
        scene = noisy_background(np.random.default_rng(11), 700, 900)
        paste(scene, face_file, 300, 100, size)
        (face,) = finder.find(scene, 64)
        original = np.asarray(Image.open(face_file).convert("RGB")).astype(int)
        differences.append(np.abs(face.frame().crop(scene).astype(int) - original).mean())
    assert max(differences) < 22 and np.mean(differences) < 15, differences


@needs_sample
def test_a_photo_stored_on_its_side_is_read_upright_everywhere(finder, tmp_path):
    rng = np.random.default_rng(5)
    scene = noisy_background(rng, 500, 800)
    pasted = paste(scene, sample_faces(1)[0], 420, 120, 240)
    # A phone holding the camera upright stores the picture turned left, with orientation 6.
    stored = Image.fromarray(np.rot90(scene, k=1).copy())
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    upright = load_pixels(path, 64, None)
    assert upright.shape == (64, 64, 3)
    faces = finder.find(read_upright(path), 64)
    assert len(faces) == 1 and square_iou(faces[0].frame().square, pasted) >= 0.7
    # The tf.data pipeline turns it the same way, to the same pixels.
    orientation = tf.constant(6)
    assert np.array_equal(resized_image(str(path), 64, orientation).numpy(), upright)


def test_a_dataset_face_framed_as_the_dataset_frames_it_comes_back_whole():
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    whole = FaceFrame(centre_x=127.5, centre_y=127.5, side=256.0)
    assert whole.square == (0, 0, 256)
    assert np.array_equal(whole.crop(image), image)


def test_a_tilted_face_is_levelled_by_its_eyes():
    # A bright bar along the eye line of a face tilted by 30 degrees comes out level.
    image = np.zeros((400, 400, 3), np.uint8)
    centre, turn = np.array([200.0, 200.0]), np.radians(30)
    along = np.array([np.cos(turn), np.sin(turn)])
    cv2.line(image, tuple(map(int, centre - 80 * along)), tuple(map(int, centre + 80 * along)), (255, 255, 255), 9)
    crop = FaceFrame(200.0, 200.0, 256.0, angle=30.0).crop(image)
    rows_lit = np.flatnonzero(crop[..., 0].max(axis=1) > 128)
    assert rows_lit.max() - rows_lit.min() < 15


@needs_sample
def test_a_video_is_sampled_and_its_moving_face_followed(output_dir, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    video, squares = write_video(tmp_path / "videos" / "clip.mp4", frames=40)
    annotate = tmp_path / "annotated"
    assert predict(output_dir, str(video), "--frames", "5", "--csv", str(tmp_path / "v.csv"), "--annotate", str(annotate)) == 0

    output = capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "v.csv").iloc[:-1]  # The video's own row comes after its frames'.
    # One frame in each fifth of the clip: its key frame (OpenCV writes one every 12 frames), or its middle one.
    assert rows["frame"].tolist() == sampled_frame_indices(40, 5, read_video_index(video).key_frames) == [0, 12, 20, 24, 36]
    # Whole numbers are written as such: the frame, the face, the square.
    first_row = (tmp_path / "v.csv").read_text().splitlines()[1].split(",")
    assert first_row[1:6] == [str(int(value)) for value in rows.iloc[0][["frame", "face", "crop_x", "crop_y", "crop_size"]]]
    assert first_row[1:3] == ["0", "1"]
    for row in rows.itertuples():
        assert square_iou((row.crop_x, row.crop_y, row.crop_size), squares[int(row.frame)]) >= 0.7
    summary = next(line for line in output.splitlines() if "  video  " in line)
    assert f"p_fake={rows['p_fake'].mean():.4f}" in summary
    assert "5 of 5 frames read, 5 faces scored; the face seen most, in 5 frames" in summary
    assert (annotate / "clip.mp4-frames.png").is_file()


def write_wall_video(folder):
    """A video of 12 frames, 96x64, of a plain wall growing lighter: no face in it."""
    folder.mkdir()
    video = folder / "wall.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for index in range(12):
        writer.write(np.full((64, 96, 3), 20 * index, np.uint8))
    writer.release()
    return video


def test_a_video_with_faces_off_is_judged_on_its_whole_frames(output_dir, tmp_path, capsys):
    video = write_wall_video(tmp_path / "videos")
    assert predict(output_dir, str(video), "--faces", "off", "--frames", "3", "--csv", str(tmp_path / "w.csv")) == 0

    rows = pd.read_csv(tmp_path / "w.csv")
    frames, video_row = rows[:-1], rows.iloc[-1]
    assert frames["frame"].tolist() == [2, 6, 10] and rows["face"].isna().all()
    summary = capsys.readouterr().out.splitlines()[-4]
    assert summary.startswith(f"{video}  video  p_fake={frames['p_fake'].mean():.4f}")
    assert summary.endswith("(3 of 3 frames read, 0 faces scored; the whole frames)")
    # The video's own verdict is a row of its own: no frame, and a note that says what it rests on.
    assert np.isnan(video_row["frame"]) and video_row["p_fake"] == pytest.approx(frames["p_fake"].mean())
    assert video_row["note"] == "video: 3 of 3 frames read; p_fake is the mean over the whole frames"


def test_ctrl_c_in_a_video_keeps_the_rows_of_the_frames_judged(output_dir, tmp_path, monkeypatch, capsys):
    read_frames = load_pre_trained_models.read_video_frames

    def interrupted_at_the_third_frame(path, frames):
        for position, frame in enumerate(read_frames(path, frames)):
            if position == 2:
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(load_pre_trained_models, "read_video_frames", interrupted_at_the_third_frame)
    video, csv_file = write_wall_video(tmp_path / "videos"), tmp_path / "w.csv"
    status = predict(output_dir, str(video), "--faces", "off", "--frames", "3", "--batch-size", "1", "--csv", str(csv_file))
    assert status == 130
    assert capsys.readouterr().out.splitlines()[-1] == f"Interrupted. {csv_file} holds 2 rows."
    assert pd.read_csv(csv_file)["frame"].tolist() == [2, 6]


def test_grad_cam_keeps_no_whole_frame_of_a_video(output_dir, tmp_path, monkeypatch, capsys):
    """Each frame's overlay is drawn as soon as it is scored, and the frame let go: before, every whole
    1080p frame was held to the end (4.17 GB for 400 frames, 1.14 GB without --gradcam)."""
    reported = []
    report_video = plot_loss_accuracy_graph.PredictionReport.video
    monkeypatch.setattr(plot_loss_accuracy_graph.PredictionReport, "video",
                        lambda report, video: reported.extend(video.frames) or report_video(report, video))
    video = write_wall_video(tmp_path / "videos")
    maps = tmp_path / "maps"
    assert predict(output_dir, str(video), "--faces", "off", "--frames", "3", "--batch-size", "1", "--gradcam", str(maps)) == 0
    # By the time the video's own line is reported, its overlays are drawn and no frame is held.
    assert len(reported) == 3 and all(frame.image is None for frame in reported)
    assert all(face.crop is None and face.heatmap is None for frame in reported for face in frame.faces)
    assert len(list(maps.glob("wall.avi-frame*-gradcam.png"))) == 3


def write_video(path, frames):
    """A video (mp4, or avi) of 480x360 frames in which a dataset face, 170 px, moves left to right; return it and each frame's square."""
    face_file, squares = sample_faces(1)[0], {}
    codec = "MJPG" if path.suffix == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 10, (480, 360))
    background = noisy_background(np.random.default_rng(1), 360, 480)
    for index in range(frames):
        frame = background.copy()
        squares[index] = paste(frame, face_file, 10 + 7 * index, 80, 170)
        writer.write(frame[..., ::-1].copy())
    writer.release()
    return path, squares


@needs_sample
def test_a_cut_off_or_fake_video_is_reported_and_the_rest_still_scored(output_dir, tmp_path, capfd):
    """Each in one line of ours: FFmpeg's own lines ("moov atom not found") are silenced, and a
    file name with a newline in it is printed on one line."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # An AVI cut off halfway still opens; the frames of its lost half cannot be decoded.
    video, _ = write_video(tmp_path / "whole.avi", frames=20)
    data = video.read_bytes()
    (inputs / "cut.avi").write_bytes(data[: len(data) // 2])
    # An mp4 keeps its index at the end, so one cut off does not open at all.
    video, _ = write_video(tmp_path / "whole.mp4", frames=20)
    (inputs / "cut.mp4").write_bytes(video.read_bytes()[:5000])
    (inputs / "notes.mp4").write_text("not a video")
    (inputs / "clip.jpg").write_bytes(video.read_bytes())  # An mp4, renamed.
    Image.open(sample_faces(1)[0]).save(inputs / "face\nnew line.jpg")
    assert predict(output_dir, str(inputs), "--frames", "4") == 0

    captured = capfd.readouterr()
    assert f"warning: skipping {inputs / 'notes.mp4'}: not a video" in captured.err
    assert f"warning: skipping {inputs / 'cut.mp4'}: not a video" in captured.err
    assert f"warning: skipping {inputs / 'clip.jpg'}: it looks like a video, not an image; give it its video extension" in captured.err
    assert f"warning: {inputs / 'cut.avi'}: only 2 of 4 sampled frames could be decoded" in captured.err
    assert all(line.startswith("warning: ") for line in captured.err.splitlines()), captured.err
    assert "(2 of 4 frames read, 2 faces scored" in captured.out
    assert any(line.startswith(f"{inputs}/face\\nnew line.jpg  face 1") for line in captured.out.splitlines())


def test_a_photo_without_a_face_gets_no_verdict_and_every_input_a_row(output_dir, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea"):
        Image.fromarray(getattr(skimage_data, name)()).save(photos / f"{name}.png")
    (photos / "notes.jpg").write_text("not an image")
    assert predict(output_dir, str(photos), "--csv", str(tmp_path / "p.csv")) == 0

    printed = capsys.readouterr().out.splitlines()
    for name in ("chelsea", "coffee"):
        assert f"{photos / name}.png  no face found: not judged (--faces off scores the whole image)" in printed
    rows = pd.read_csv(tmp_path / "p.csv")
    notes = {str(photos / name): note for name, note in (("chelsea.png", "no face"), ("coffee.png", "no face"), ("notes.jpg", "unreadable"))}
    assert dict(zip(rows["path"], rows["note"])) == notes and len(rows) == 3
    assert rows["p_fake"].isna().all() and rows["verdict"].isna().all()
    # --faces off still scores whole images, for sets cropped as the dataset is.
    assert predict(output_dir, str(photos / "coffee.png"), "--faces", "off", "--csv", str(tmp_path / "off.csv")) == 0
    assert pd.read_csv(tmp_path / "off.csv")["p_fake"].notna().all()


def test_a_face_too_small_to_judge_gets_its_width_and_min_face_and_a_row(output_dir, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    for name, options in (("camera", []), ("astronaut", ["--min-face", "400"])):
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(skimage_data, name)()).save(path)
        assert predict(output_dir, str(path), *options, "--csv", str(tmp_path / f"{name}.csv")) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(str(path)))
        min_face = options[-1] if options else "64"
        assert re.fullmatch(
            rf"{re.escape(str(path))}  face 1, \d+ px wide, crop \d+ px at -?\d+,-?\d+  too small to judge: under --min-face {min_face} px", line
        ), line
        rows = pd.read_csv(tmp_path / f"{name}.csv")
        assert len(rows) == 1 and rows["note"][0] == "face too small" and np.isnan(rows["p_fake"][0])


@needs_sample
def test_a_face_that_shrinks_for_a_while_is_still_followed_as_one(output_dir, tmp_path, capsys):
    face_file = sample_faces(1)[0]
    video = tmp_path / "videos" / "zoom.avi"
    video.parent.mkdir()
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (480, 360))
    background = noisy_background(np.random.default_rng(2), 360, 480)
    for index in range(30):
        # Large, then far away (too small to judge, and a little to the right), then large again.
        size, x = (60, 210) if 10 <= index < 20 else (170, 150 + index)
        frame = background.copy()
        paste(frame, face_file, x, 180 - size // 2, size)
        writer.write(frame[..., ::-1].copy())
    writer.release()
    assert predict(output_dir, str(video), "--frames", "6", "--csv", str(tmp_path / "z.csv")) == 0

    rows = pd.read_csv(tmp_path / "z.csv").iloc[:-1]  # The video's own row comes after its frames'.
    assert rows["note"].fillna("").tolist() == ["", "", "face too small", "face too small", "", ""]
    summary = next(line for line in capsys.readouterr().out.splitlines() if "  video  " in line)
    assert f"p_fake={rows['p_fake'].mean():.4f}" in summary
    assert "(6 of 6 frames read, 4 faces scored; the face seen most, in 6 frames, 2 of them too small to judge)" in summary


def test_a_stage_of_mtcnn_is_skipped_when_the_one_before_left_no_candidate(finder, tmp_path, monkeypatch):
    # Run on no candidate, TensorFlow would print a warning that reads like an error (unless
    # TF_CPP_MIN_LOG_LEVEL hides it, as these tests set it). Drawn demo faces lead MTCNN's
    # first stage on, and its second rejects every candidate: no face, quietly.
    split_root = make_demo_dataset(tmp_path / "faces", {"train": 0, "valid": 0, "test": 4}, size=64)
    for path in sorted((split_root / "test").rglob("*.jpg")):
        assert finder.find(read_upright(path), 64) == []
    calls = []
    monkeypatch.setattr(finder, "proposal", lambda **inputs: NO_CANDIDATE)
    monkeypatch.setattr(finder, "refinement", lambda **inputs: calls.append("refinement"))
    monkeypatch.setattr(finder.output, "_model", lambda patches: calls.append("output"))
    assert finder.find_in_each([np.zeros((100, 100, 3), np.uint8)] * 2, 64) == [[], []]
    assert calls == []


def test_frames_searched_together_get_the_faces_each_gets_alone(finder):
    """A video's frames go through MTCNN as one batch; each frame keeps the faces it gets searched alone."""
    skimage_data = pytest.importorskip("skimage.data")
    rng, frames = np.random.default_rng(3), []
    for x in (0, 200, 440):
        frame = noisy_background(rng, 540, 960)
        frame[14:526, x : x + 512] = skimage_data.astronaut()
        frames.append(frame)
    frames.append(noisy_background(rng, 540, 960))  # And a frame without a face.
    together = finder.find_in_each(frames, 64)
    alone = [finder.find(frame, 64) for frame in frames]
    assert [len(faces) for faces in together] == [len(faces) for faces in alone] == [1, 1, 1, 0]
    for (face,), (reference,), x in zip(together, alone, (0, 200, 440)):
        assert np.abs(np.subtract(face.box, reference.box)).max() <= 1
        assert face.box[0] == pytest.approx(x + 182, abs=10)  # Her face, where each frame has it.


def test_the_astronaut_is_found_and_framed_with_her_whole_head(finder):
    skimage_data = pytest.importorskip("skimage.data")
    faces = finder.find(skimage_data.astronaut(), 64)
    assert len(faces) == 1
    x, y, size = faces[0].frame().square
    # Her face, from hairline to chin and ear to ear, as drawn by hand on the 512x512 portrait.
    face_left, face_top, face_right, face_bottom = 170, 40, 280, 180
    assert x <= face_left and y <= face_top and x + size >= face_right and y + size >= face_bottom
    assert size < 2.5 * (face_right - face_left)


def test_annotations_and_heat_maps_go_to_their_folders_only(output_dir, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    images = tmp_path / "photos"
    images.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(images / "astronaut.png")
    annotate, gradcam = tmp_path / "annotated", tmp_path / "heat"
    assert predict(output_dir, str(images), "--annotate", str(annotate), "--gradcam", str(gradcam)) == 0

    assert [path.name for path in images.iterdir()] == ["astronaut.png"]
    # The pictures, and no lock file: a second run is kept out by a lock in the temporary folder.
    assert sorted(path.name for path in gradcam.iterdir()) == ["astronaut.png-face1-gradcam.png"]
    marked = cv2.imread(str(annotate / "astronaut.png-faces.jpg"))[..., ::-1].astype(int)
    assert marked.shape == (512, 512, 3)
    # The square is drawn in the verdict's colour, green or red.
    red, green = marked[..., 0], marked[..., 1]
    coloured = (np.abs(red - green) > 120) & (np.minimum(red, green) < 80)
    assert coloured.sum() > 300
    assert (annotate / "astronaut.png-faces.jpg").stat().st_size > 0 and "Wrote 1 annotated picture to" in capsys.readouterr().out


@needs_sample
def test_evaluate_with_faces_cuts_them_out_and_lists_the_images_without_one(output_dir, tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "uncropped"
    for class_name, faces in (("real", sample_faces(4)[0::2]), ("fake", sample_faces(4)[1::2])):
        (folder / class_name).mkdir(parents=True)
        for number, face_file in enumerate(faces):
            scene = noisy_background(rng, 400, 500)
            paste(scene, face_file, 100 + 30 * number, 60, 250)
            Image.fromarray(scene).save(folder / class_name / f"{number}.jpg")
    Image.fromarray(noisy_background(rng, 300, 300)).save(folder / "real" / "wall.jpg")
    assert run_script("VGG16", folder, output_dir, "--evaluate", "--faces", "auto") == 0

    metrics = json.loads((output_dir / "vgg16" / "eval-uncropped-faces" / "metrics.json").read_text())
    assert metrics["faces"] == "auto" and metrics["n_test"] == 4
    assert metrics["n_no_face"] == 1 and metrics["no_face"] == [str(folder / "real" / "wall.jpg")]


def test_frames_are_spread_evenly_and_faces_linked_by_overlap():
    assert sampled_frame_indices(100, 4) == [12, 37, 62, 87]
    assert sampled_frame_indices(3, 32) == [0, 1, 2]

    def line(frame, x, p_fake):
        return FaceResult(1, box=(x + 20, 70, 60, 60), face_frame=FaceFrame(x + 50, 100, 100), confidence=0.99, p_fake=p_fake, frame=frame)

    # One face moves right by most of its width between sampled frames; another passes by
    # once, far to the right.
    lines = [line(0, 0, 0.2), line(1, 80, 0.3), line(1, 400, 0.9), line(2, 160, 0.4)]
    followed = main_face(lines)
    assert [(item.frame, item.p_fake) for item in followed] == [(0, 0.2), (1, 0.3), (2, 0.4)]


def write_h264_clip(path, frame_count, key_frame_interval, rotation=None, milliseconds=None):
    """An H.264 clip of 160x120 frames by x264, a key frame every `key_frame_interval` frames, each frame showing its
    number as the grey of its lower half; with `rotation`, a rotation tag; with `milliseconds`, each frame's time."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"g": str(key_frame_interval), "sc_threshold": "0"}  # Key frames only where asked.
        if milliseconds is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index in range(frame_count):
            pixels = np.zeros((120, 160, 3), np.uint8)
            pixels[:30, :40] = 255  # A white corner, to tell the frame's way up.
            pixels[60:] = index % 256
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if milliseconds is not None:
                frame.pts, frame.time_base = milliseconds[index], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_sampled_frames_cover_the_clip_prefer_key_frames_and_none_is_decoded_twice(tmp_path):
    clip = write_h264_clip(tmp_path / "clip.mp4", frame_count=300, key_frame_interval=50)
    decoded = []
    read = list(read_video_frames(clip, 8, decoded))
    index = read_video_index(clip)
    assert index.key_frames == list(range(0, 300, 50)) and index.frame_count == 300
    # One frame in each eighth of the clip: its key frame where it has one, or else its middle frame.
    assert [number for number, _ in read] == [0, 50, 100, 131, 150, 200, 250, 281]
    for part, (number, pixels) in enumerate(read):
        assert part * 300 / 8 <= number < (part + 1) * 300 / 8
        assert abs(int(pixels[90, 80, 0]) - number % 256) <= 3, number  # The frame it says it is.
    # One forward pass: each frame decoded once at most, only from the key frame before a
    # sampled one, and of the frames between, only those that others refer to (not B-frames).
    assert decoded == sorted(set(decoded))
    assert {number for number, _ in read} <= set(decoded) <= {0, 50, *range(100, 132), 150, 200, *range(250, 282)}
    assert len(decoded) <= 0.7 * len([0, 50, *range(100, 132), 150, 200, *range(250, 282)])  # 41 of 70 with x264's B-frames.


def test_a_rotated_clip_comes_upright_and_a_variable_rate_one_by_frame_order(tmp_path):
    # A phone's portrait clip: stored sideways, with a tag that says to turn it a quarter clockwise.
    clip = write_h264_clip(tmp_path / "rotated.mp4", frame_count=20, key_frame_interval=10, rotation=-90)
    (_, upright), *_ = read_video_frames(clip, 2)
    assert upright.shape == (160, 120, 3)
    assert upright[:40, -30:].mean() > 200 and upright[:40, :30].mean() < 100  # The white corner, turned to the top right.
    # Frames at uneven times: the parts are counted in frames, as the CSV's frame numbers are.
    milliseconds = np.cumsum(np.r_[0, np.where(np.arange(59) < 30, 20, 180)]).tolist()
    clip = write_h264_clip(tmp_path / "variable.mp4", frame_count=60, key_frame_interval=60, milliseconds=milliseconds)
    read = list(read_video_frames(clip, 4))
    assert [number for number, _ in read] == [0, 22, 37, 52]
    assert [abs(int(pixels[90, 80, 0]) - number) <= 3 for number, pixels in read] == [True] * 4


def test_the_header_and_every_picture_say_whose_verdicts_these_are(output_dir, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "photos" / "astronaut.png"
    photo.parent.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photo)
    # The same model three times: with its card, with a card that says it was trained on the
    # demo's drawn faces, and alone.
    with_card, demo, alone = (tmp_path / name for name in ("with-card", "demo", "alone"))
    shutil.copytree(output_dir / "vgg16", with_card)
    shutil.copytree(output_dir / "vgg16", demo)
    card = demo / "README.md"
    card.write_text(card.read_text().replace("demo_model: false", "demo_model: true"))
    alone.mkdir()
    shutil.copy(output_dir / "vgg16" / "model.keras", alone / "model.keras")

    headers, annotated, overlays = {}, {}, {}
    for folder in (with_card, demo, alone):
        pictures = tmp_path / f"{folder.name}-pictures"
        assert predict(output_dir, str(photo), "--model", str(folder), "--annotate", str(pictures),
                       "--gradcam", str(pictures)) == 0
        headers[folder.name] = "\n".join(capsys.readouterr().out.splitlines()[:2])
        annotated[folder.name] = np.asarray(Image.open(pictures / "astronaut.png-faces.jpg").convert("RGB"), np.int16)
        overlays[folder.name] = np.asarray(Image.open(pictures / "astronaut.png-face1-gradcam.png").convert("RGB"), np.int16)

    assert "trained on faces, test AUC" in headers["with-card"] and "DEMO MODEL" not in headers["with-card"]
    assert "DEMO MODEL: trained on drawn faces" in headers["demo"]
    assert "UNKNOWN TRAINING DATA" in headers["alone"]
    # The mark is a band across the bottom of an annotated picture, and a line above a heat map.
    band = slice(-30, None)
    assert np.abs(annotated["demo"][band] - annotated["with-card"][band]).mean() > 20
    assert np.abs(annotated["alone"][band] - annotated["with-card"][band]).mean() > 20
    assert np.abs(annotated["demo"][:-30] - annotated["with-card"][:-30]).mean() < 1  # The rest is the same.
    assert overlays["demo"].shape[0] > overlays["with-card"].shape[0]

    def mark_coloured(picture):  # Pixels of the mark's magenta, in the top 40 rows.
        top = picture[:40]
        return ((top[..., 0] > 150) & (top[..., 1] < 120) & (top[..., 2] > 60)).sum()

    assert mark_coloured(overlays["demo"]) > 50 and mark_coloured(overlays["alone"]) > 50
    assert mark_coloured(overlays["with-card"]) == 0


def test_verdicts_come_from_the_cards_band_and_threshold_gives_two(output_dir, tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    card = read_model_card(output_dir / "vgg16" / "model.keras")
    # Trained on 8 validation faces, too few to set either side of the band: every face is uncertain.
    assert (card["real_below"], card["fake_from"]) == (None, None)
    assert predict(output_dir, str(photo), "--csv", str(tmp_path / "band.csv")) == 0
    header, line = capsys.readouterr().out.splitlines()[:3:2]
    assert "verdicts: uncertain whatever the score" in header and line.endswith("  uncertain")
    assert predict(output_dir, str(photo), "--threshold", "0.5", "--csv", str(tmp_path / "two.csv")) == 0
    two_way = pd.read_csv(tmp_path / "two.csv")
    assert two_way["verdict"][0] == ("fake" if two_way["p_fake"][0] >= 0.5 else "real")
    assert pd.read_csv(tmp_path / "band.csv")["verdict"][0] == "uncertain"


def test_the_share_of_a_frame_past_the_edge_is_what_the_crop_mirrors():
    inside, half_out = FaceFrame(50, 50, 40), FaceFrame(0, 50, 40)
    assert inside.share_outside(100, 100) == 0
    assert half_out.share_outside(100, 100) == pytest.approx(0.5, abs=0.02)
    assert FaceFrame(0, 0, 40, angle=45).share_outside(100, 100) == pytest.approx(0.75, abs=0.03)


@needs_sample
def test_a_face_whose_frame_is_mostly_mirrored_is_not_judged(output_dir, tmp_path, capsys):
    """A frame a fifth past the edge is judged, and says so; one two fifths past it shows a mirrored face, and is not."""
    face = cv2.resize(np.asarray(Image.open(sample_faces(1)[0]).convert("RGB")), (300, 300))
    folder = tmp_path / "edges"
    folder.mkdir()
    for name, cut in (("fifth.jpg", 60), ("two-fifths.jpg", 120)):
        scene = noisy_background(np.random.default_rng(0), 600, 800)
        scene[150:450, : 300 - cut] = face[:, cut:]
        Image.fromarray(scene).save(folder / name, quality=95)
    assert predict(output_dir, str(folder), "--csv", str(tmp_path / "edges.csv")) == 0
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith(str(folder))}
    assert re.search(r"p_fake=\S+  \w+  \(\d+% of its crop mirrored past the edge\)$", lines[str(folder / "fifth.jpg")])
    assert re.search(r"not judged: \d+% of its crop is past the picture's edge", lines[str(folder / "two-fifths.jpg")])
    rows = pd.read_csv(tmp_path / "edges.csv").set_index("path")
    assert 0.1 < rows.loc[str(folder / "fifth.jpg"), "mirrored"] <= 0.25
    assert rows.loc[str(folder / "two-fifths.jpg"), "mirrored"] > 0.25
    assert rows.loc[str(folder / "two-fifths.jpg"), "note"] == "face cut by the border"


def test_boxes_below_the_minimum_confidence_are_not_faces(finder, monkeypatch):
    """As MTCNN's boxes on a suit patch (0.81 to 0.87) were judged as faces before."""
    def row(x, y, confidence):
        """MTCNN's row of a face: its image, box (x1, y1, x2, y2), confidence, then the eyes', nose's and mouth's x and y."""
        return [0, x, y, x + 100, y + 120, confidence, x + 30, x + 70, x + 50, x + 35, x + 65, y + 40, y + 40, y + 60, y + 80, y + 80]

    found = np.array([row(400, 300, 0.99), row(300, 20, 0.85), row(20, 310, 0.97), row(500, 10, 0.999)])
    monkeypatch.setattr(finder, "search", lambda images, min_face: found)
    faces = finder.find(np.zeros((480, 640, 3), np.uint8), min_face=64)
    assert MIN_FACE_CONFIDENCE == 0.90
    # In reading order: the top row (the box at 0.85 dropped), then the bottom one, left to right.
    assert [face.confidence for face in faces] == [0.999, 0.97, 0.99]


def test_faces_are_searched_within_a_pixel_budget_and_a_larger_min_face_is_said(output_dir, tmp_path, monkeypatch, capsys):
    """Searched whole for faces of 20 px, an 88-megapixel photo took 12.3 GB; now at most SEARCH_PIXELS_AT_MOST are searched."""
    skimage_data = pytest.importorskip("skimage.data")
    assert data_augmentation.smallest_searched_face(9400, 9400, 20) == 67
    monkeypatch.setattr(data_augmentation, "SEARCH_PIXELS_AT_MOST", 100_000)  # Small, as the astronaut is 512x512.
    searched = []
    reduced_copy = data_augmentation.reduced_copy

    def noted_copy(image, scale):
        copy = reduced_copy(image, scale)
        searched.append(copy.shape)
        return copy

    monkeypatch.setattr(data_augmentation, "reduced_copy", noted_copy)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    assert predict(output_dir, str(photo), "--min-face", "20") == 0
    captured = capsys.readouterr()
    assert searched and all(height * width <= 100_000 for height, width, _ in searched)
    assert captured.err.strip() == (f"warning: {photo}: in its 512x512 pixels, faces narrower than 33 px are not searched "
                                    "for, not 20 px as --min-face asks, to keep memory within bounds")
    assert f"{photo}  face 1, " in captured.out  # Her face is still found.


@needs_sample
def test_faces_found_in_a_reduced_copy_are_framed_as_a_full_size_search_frames_them(finder, detector, monkeypatch):
    """A 1280x720 frame is searched at 640x360, and its faces framed in the frame itself: against a search
    of the whole frame, the same faces are found, and their crops and p_fake hardly move."""
    scene = noisy_background(np.random.default_rng(5), 720, 1280)
    for face_file, x, size in zip(sample_faces(2), (100, 700), (260, 380)):
        paste(scene, face_file, x, 150, size)
    reduced = finder.find(scene, 64)
    monkeypatch.setattr(data_augmentation, "SEARCH_SIDE", 1280)
    full_size = finder.find(scene, 64)
    assert len(reduced) == len(full_size) == 2
    for face, reference in zip(reduced, full_size):
        frame, reference_frame = face.frame(), reference.frame()
        moved = math.hypot(frame.centre_x - reference_frame.centre_x, frame.centre_y - reference_frame.centre_y)
        assert moved + abs(frame.side - reference_frame.side) <= 0.02 * reference_frame.side
    crops = [face.frame().crop(scene) for face in reduced + full_size]
    p_fake = load_pre_trained_models.p_fake_of_pictures(detector.members, crops)
    assert np.abs(p_fake[:2] - p_fake[2:]).max() <= 0.01


# --- The detector, from Python ----------------------------------------------------


@pytest.fixture(scope="module")
def detector(output_dir):
    """The trained model's detector, loaded from its folder, as a notebook would."""
    return load_pre_trained_models.Detector.load(output_dir / "vgg16")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The sample media: astronaut.jpg (a face), coffee.jpg (none) and clip.mp4 (the astronaut crossing a wall)."""
    folder = tmp_path_factory.mktemp("media")
    data_preprocessing.write_sample_media(folder)
    return folder


def test_the_detector_judges_a_photo_a_faceless_photo_and_a_face_too_small(detector, output_dir, media, capfd):
    photo = detector.judge(media / "astronaut.jpg")
    assert isinstance(photo, PictureResult) and photo.note is None and len(photo.faces) == 1
    face = photo.faces[0]
    assert face.number == 1 and face.note is None and 0 <= face.p_fake <= 1
    assert face.verdict == photo.band(face.p_fake) and face.crop.shape == (256, 256, 3)
    x, y, width, height = face.box
    assert 70 <= width <= 100 and face.confidence >= MIN_FACE_CONFIDENCE
    # The card of a model trained on other faces than the demo's: no mark.
    assert photo.mark is None and photo.band == read_band(output_dir / "vgg16")

    faceless = detector.judge(media / "coffee.jpg")
    assert faceless.faces == [] and faceless.note == "no face"
    assert faceless.rows() == [dict(path=str(media / "coffee.jpg"), frame=None, note="no face", model=detector.name)]

    strict = load_pre_trained_models.Detector.load(output_dir / "vgg16", min_face=400)
    small = strict.judge(media / "astronaut.jpg").faces[0]
    assert small.note == "face too small" and small.p_fake is None and small.verdict is None and small.crop is None
    # Nothing is printed, and nothing written.
    assert capfd.readouterr() == ("", "")


def read_band(model_folder):
    card = read_model_card(model_folder / "model.keras")
    return plot_loss_accuracy_graph.Verdicts(card["real_below"], card["fake_from"])


def test_the_detector_judges_a_clip_batch_by_batch(detector, media):
    batches = []
    clip = detector.judge_video(media / "clip.mp4", frames=6, on_batch=lambda pictures: batches.append(
        [picture.image is not None and all(face.crop is not None for face in picture.faces) for picture in pictures]))
    assert isinstance(clip, VideoResult) and (clip.frames_read, clip.frames_wanted) == (6, 6)
    assert [picture.frame for picture in clip.frames] == sampled_frame_indices(250, 6, read_video_index(media / "clip.mp4").key_frames)
    assert clip.p_fake == pytest.approx(np.mean([face.p_fake for face in clip.followed]))
    assert len(clip.followed) == 6 and clip.verdict == clip.band(clip.p_fake) and clip.note is None
    # Each batch came with its pixels, which were let go after.
    assert all(all(batch) for batch in batches) and all(picture.image is None for picture in clip.frames)


def test_the_detector_takes_a_numpy_array_or_a_pil_image_as_it_takes_a_file(detector, media, tmp_path):
    pixels = np.asarray(Image.open(media / "astronaut.jpg"))
    from_file = detector.judge(media / "astronaut.jpg").faces[0].p_fake
    from_array = detector.judge(pixels)
    assert from_array.path is None and from_array.faces[0].p_fake == pytest.approx(from_file, abs=1e-6)
    assert detector.judge(Image.open(media / "astronaut.jpg")).faces[0].p_fake == pytest.approx(from_file, abs=1e-6)
    with pytest.raises(UserError, match="must be RGB pixels, height x width x 3, of type uint8"):
        detector.judge(pixels / 255)
    with pytest.raises(UserError, match="no such file or folder; check the path"):
        detector.judge(tmp_path / "nosuch.jpg")


def test_the_detector_and_predict_csv_give_the_same_rows(detector, output_dir, media, tmp_path):
    inputs = [media / "astronaut.jpg", media / "coffee.jpg"]
    assert predict(output_dir, *map(str, inputs), str(media / "clip.mp4"), "--frames", "6", "--csv", str(tmp_path / "p.csv")) == 0

    from_api = [row for path in inputs for row in detector.judge(path).rows()]
    clip = detector.judge_video(media / "clip.mp4", frames=6)
    from_api += [row for frame in clip.frames for row in frame.rows()] + clip.rows()
    expected = pd.DataFrame(from_api, columns=plot_loss_accuracy_graph.CSV_COLUMNS)
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, na_values=[""])
    for column in ("path", "note", "verdict", "model"):
        assert written[column].fillna("").tolist() == expected[column].fillna("").tolist()
    assert np.allclose(written["p_fake"].astype(float), expected["p_fake"].astype(float), atol=1e-6, equal_nan=True)
    assert written["model"][0] == str(output_dir / "vgg16" / "model.keras")


def test_a_model_without_a_card_gives_marked_uncertain_verdicts(output_dir, media, tmp_path):
    shutil.copy(output_dir / "vgg16" / "model.keras", tmp_path / "found.keras")
    detector = load_pre_trained_models.Detector.load(tmp_path / "found.keras")
    photo = detector.judge(media / "astronaut.jpg")
    assert photo.mark == plot_loss_accuracy_graph.UNKNOWN_MARK and photo.faces[0].verdict == "uncertain"
    assert photo.lines()[0].endswith("uncertain  (UNKNOWN TRAINING DATA)")
    with pytest.raises(UserError, match=r"there is no model at .*nothing; give a model's folder or its \.keras file"):
        load_pre_trained_models.Detector.load(tmp_path / "nothing", faces="auto")
    with pytest.raises(UserError, match="faces='sometimes': use 'auto' or 'off'"):
        load_pre_trained_models.Detector.load(tmp_path / "found.keras", faces="sometimes")


def test_the_readmes_python_lines_run_as_a_user_would_run_them(output_dir, tmp_path, monkeypatch, capsys):
    """The README's lines, run as a notebook cell runs them, from a folder laid out as the README's commands leave it."""
    readme = (REPOSITORY_DIR / "README.md").read_text()
    lines = re.search(r"\n#+ In Python\n.*?```python\n(.*?)```", readme, re.S)[1]
    shutil.copytree(output_dir / "vgg16", tmp_path / "outputs" / "demo" / "vgg16")
    data_preprocessing.write_sample_media(tmp_path / "outputs" / "media")
    monkeypatch.chdir(tmp_path)
    exec(compile(lines, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"1 \((\d+\.0, ){3}\d+\.0\) [\d.e-]+ (real|uncertain|fake) None", printed[0]), printed
    assert re.fullmatch(r"[\d.e-]+ (real|uncertain|fake)", printed[-1]), printed


def test_a_folder_run_ends_with_a_count_and_the_csv_keeps_the_model_and_each_videos_verdict(output_dir, media, tmp_path, capsys):
    folder = tmp_path / "folder"
    shutil.copytree(media, folder)
    (folder / "notes.jpg").write_text("not an image")
    assert predict(output_dir, str(folder), "--frames", "4", "--csv", str(tmp_path / "p.csv")) == 0

    printed = capsys.readouterr().out.splitlines()
    # The card of this model gives no band: every verdict is uncertain.
    assert "4 files: 2 verdicts (0 real, 2 uncertain, 0 fake); not judged: 1 no face, 1 unreadable" in printed
    rows = pd.read_csv(tmp_path / "p.csv")
    assert set(rows["model"]) == {str(output_dir / "vgg16" / "model.keras")}
    video_row = rows[(rows["path"] == str(folder / "clip.mp4")) & rows["frame"].isna()]
    assert len(video_row) == 1 and video_row["verdict"].iloc[0] == "uncertain"
    assert video_row["note"].iloc[0] == "video: 4 of 4 frames read; p_fake is the mean over the face seen most, in 4 frames"
