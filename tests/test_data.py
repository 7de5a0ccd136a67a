"""Finding the dataset, checking its images, and feeding them to Keras."""

import os
import tracemalloc

import cv2
import keras
import numpy as np
import pytest

import data_preprocessing
from data_augmentation import make_flows
from data_preprocessing import (
    CLASSES,
    SPLITS,
    UserError,
    choose_subset,
    find_split_root,
    gan_upsample,
    image_problem,
    load_dataset,
    make_demo_dataset,
)


@pytest.fixture
def no_default_locations(tmp_path, monkeypatch):
    """Point the default search at empty folders, whatever the machine holds."""
    datasets_dir = tmp_path / "datasets"
    datasets_dir.mkdir()
    monkeypatch.setattr(data_preprocessing, "DATASETS_DIR", datasets_dir)
    monkeypatch.setattr(data_preprocessing, "KAGGLE_INPUT_DIR", tmp_path / "kaggle" / "input" / "140k")
    return datasets_dir


def make_split_root(folder):
    return make_demo_dataset(folder, {"train": 1, "valid": 1, "test": 1}, size=16)


# --- Finding the dataset ------------------------------------------------------


def test_data_dir_may_be_a_split_root(tiny_split_root):
    assert find_split_root(tiny_split_root) == tiny_split_root


def test_data_dir_may_be_the_kaggle_download_root(tmp_path):
    split_root = make_split_root(tmp_path / "download" / "real_vs_fake" / "real-vs-fake")
    assert find_split_root(tmp_path / "download") == split_root


def test_default_is_datasets_real_vs_fake(no_default_locations):
    split_root = make_split_root(no_default_locations / "real_vs_fake" / "real-vs-fake")
    assert find_split_root() == split_root


def test_default_finds_a_download_unzipped_into_its_own_folder(no_default_locations):
    download = no_default_locations / "140k-real-and-fake-faces"
    split_root = make_split_root(download / "real_vs_fake" / "real-vs-fake")
    (download / "train.csv").write_text(",original_path,id,label,label_str,path\n")
    assert find_split_root() == split_root


def test_default_falls_back_to_kaggle_input(no_default_locations, tmp_path):
    split_root = make_split_root(data_preprocessing.KAGGLE_INPUT_DIR / "real_vs_fake" / "real-vs-fake")
    assert find_split_root() == split_root


def test_no_dataset_says_where_it_looked_and_how_to_get_it(no_default_locations):
    with pytest.raises(UserError) as error:
        find_split_root()
    message = str(error.value)
    assert str(no_default_locations / "real_vs_fake" / "real-vs-fake") in message
    assert "kaggle datasets download -d xhlulu/140k-real-and-fake-faces" in message
    assert "\n" not in message


def test_data_dir_without_splits_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither train/, valid/ and test/"):
        find_split_root(tmp_path)


@pytest.mark.parametrize("missing", ["valid", "test/fake"])
def test_missing_split_or_class_folder_is_named(tiny_split_root, tmp_path, missing):
    for path in sorted((tiny_split_root / missing).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tiny_split_root / missing).rmdir()
    with pytest.raises(UserError, match=f"{tiny_split_root / missing}.* is missing"):
        load_dataset(tiny_split_root, tmp_path / "cache")


def test_empty_class_folder_is_named(tiny_split_root, tmp_path):
    for path in (tiny_split_root / "train" / "real").iterdir():
        path.unlink()
    with pytest.raises(UserError, match=f"{tiny_split_root / 'train' / 'real'} is empty"):
        load_dataset(tiny_split_root, tmp_path / "cache")


# --- Checking the images ------------------------------------------------------


def test_good_jpeg_has_no_problem(tiny_split_root):
    assert image_problem(tiny_split_root / "train" / "real" / "0000.jpg") is None


@pytest.mark.parametrize(
    "content, problem",
    [(b"", "empty file"), (b"name,label\nface.jpg,1\n", "not a decodable image")],
)
def test_non_images_are_recognised(tmp_path, content, problem):
    path = tmp_path / "file.jpg"
    path.write_bytes(content)
    assert image_problem(path) == problem


@pytest.mark.parametrize("kept_bytes", [lambda size: size // 2, lambda size: size - 2])
def test_truncated_jpeg_is_recognised(tiny_split_root, tmp_path, kept_bytes):
    data = (tiny_split_root / "train" / "real" / "0000.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: kept_bytes(len(data))])
    assert image_problem(truncated) == "not a decodable image"


def test_jpeg_damaged_inside_is_recognised(tmp_path):
    # OpenCV decodes this file (it skips the bad marker); Pillow, which Keras uses, does not.
    image = data_preprocessing.demo_image(np.random.default_rng(0), "real")
    path = tmp_path / "damaged.jpg"
    data = bytearray(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    data[len(data) // 2] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(OSError):
        keras.utils.img_to_array(keras.utils.load_img(path))
    assert image_problem(path) == "damaged image data"


def test_image_claiming_an_absurd_size_is_recognised(tmp_path):
    # A BMP header that claims 2**21 x 1 pixels: OpenCV raises instead of returning None.
    path = tmp_path / "huge.bmp"
    cv2.imwrite(str(path), np.zeros((1, 1, 3), np.uint8))
    data = bytearray(path.read_bytes())
    data[18:22] = (2**21).to_bytes(4, "little")  # The width field of the BMP info header.
    path.write_bytes(bytes(data))
    assert image_problem(path) == "not a decodable image"


def test_predict_reads_a_files_header_and_its_image_not_the_whole_file(tmp_path, capsys):
    """Before, each --predict input was read whole for the check: a 3 GB file took 33 s and 3.9 GB."""
    zeros, photo = tmp_path / "zeros.jpg", tmp_path / "photo.jpg"
    zeros.touch()
    data_preprocessing.write_jpeg(photo, data_preprocessing.demo_image(np.random.default_rng(0), "real"), quality=90)
    for path in (zeros, photo):
        os.truncate(path, 64 * 2**20)  # Zeros to 64 MiB, which take no disk space; the photo's come after its image.
    tracemalloc.start()
    try:
        readable = data_preprocessing.readable_images([zeros, photo], required=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert readable == [photo]
    assert capsys.readouterr().err == f"warning: skipping {zeros}: not a decodable image\n"
    assert peak < 8 * 2**20


def test_corrupt_jpeg_is_reported_left_out_and_kept(tiny_split_root, tmp_path):
    corrupt = tiny_split_root / "train" / "fake" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    assert dataset.bad_files == {corrupt: "not a decodable image"}
    assert corrupt not in [path for path, _ in dataset.images["train"]]
    assert dataset.count("train", "fake") == 4
    assert corrupt.exists()  # Reported, never deleted.


def test_second_check_reads_the_cache(tiny_split_root, tmp_path, monkeypatch):
    (tiny_split_root / "valid" / "real" / "bad.jpg").write_bytes(b"")
    first = load_dataset(tiny_split_root, tmp_path / "cache")

    def must_not_decode(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(data_preprocessing, "image_problem", must_not_decode)
    second = load_dataset(tiny_split_root, tmp_path / "cache")
    assert second.bad_files == first.bad_files and len(second.bad_files) == 1


def test_changed_file_is_checked_again(tiny_split_root, tmp_path):
    load_dataset(tiny_split_root, tmp_path / "cache")
    changed = tiny_split_root / "test" / "real" / "0000.jpg"
    changed.write_bytes(b"broken now")
    assert load_dataset(tiny_split_root, tmp_path / "cache").bad_files == {changed: "not a decodable image"}


# --- Subsets and flows --------------------------------------------------------


def test_subset_decodes_only_the_chosen_images(tiny_split_root, tmp_path, monkeypatch):
    decoded = []
    check_one = data_preprocessing.image_problem
    monkeypatch.setattr(data_preprocessing, "image_problem", lambda path: decoded.append(path) or check_one(path))
    dataset = load_dataset(tiny_split_root, tmp_path / "cache", subset=1)
    assert sorted(decoded) == sorted(path for split in SPLITS for path, _ in dataset.images[split])
    assert len(decoded) == len(SPLITS) * len(CLASSES)


def test_subset_is_seeded_and_capped_per_class(tiny_split_root, tmp_path):
    first = load_dataset(tiny_split_root, tmp_path / "cache", subset=2, seed=7)
    again = load_dataset(tiny_split_root, tmp_path / "cache", subset=2, seed=7)
    assert first.images == again.images
    for split in SPLITS:
        for class_name in CLASSES:
            assert first.count(split, class_name) == 2
    many_paths = [f"image{index}" for index in range(50)]
    assert choose_subset(many_paths, 10, seed=1) != choose_subset(many_paths, 10, seed=2)


def test_flows_label_real_0_and_fake_1_and_keep_test_order(tiny_split_root, tmp_path):
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    flows = make_flows(dataset, img_size=24, batch_size=4, seed=0)
    test_flow = flows["test"]
    assert test_flow.paths == [str(path) for path, _ in dataset.images["test"]]
    expected_labels = [CLASSES.index(name) for _, name in dataset.images["test"]]
    labels = np.concatenate([test_flow[index][1] for index in range(len(test_flow))])
    assert labels.tolist() == expected_labels
    # Every image is used: 6 test images in batches of 4 make 2 batches, the last one partial.
    assert len(test_flow) == 2 and len(test_flow[1][0]) == 2
    images = test_flow[0][0]
    # Raw pixels: the model's first layer scales them.
    assert images.shape == (4, 24, 24, 3) and images.min() >= 0 and images.max() <= 255 and images.max() > 1


def test_only_training_is_augmented(tiny_split_root, tmp_path):
    dataset = load_dataset(tiny_split_root, tmp_path / "cache")
    flows = make_flows(dataset, img_size=32, batch_size=2, seed=0)
    training = flows["train"].generator
    assert training.rotation_range == 20 and training.horizontal_flip and training.zoom_range == [0.8, 1.2]
    assert training.width_shift_range == 0.2 and training.height_shift_range == 0.2
    assert training.fill_mode == "nearest" and training.rescale is None
    assert training.shear_range == pytest.approx(11.46, abs=0.01)  # 0.2 radians, in degrees.
    assert flows["train"].shuffle
    for split in ("valid", "test"):
        assert flows[split].generator is None and not flows[split].shuffle


# --- The demo dataset ---------------------------------------------------------


def checkerboard_energy(image):
    """The spectrum's power at the period-2 frequencies that up-sampling leaves."""
    grey = image.astype(float).mean(axis=2)
    spectrum = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    half = grey.shape[0] // 2
    return (spectrum[half, :].sum() + spectrum[:, half].sum()) / spectrum.sum()


def test_gan_upsampling_leaves_a_checkerboard():
    rng = np.random.default_rng(0)
    flat = np.full((16, 16, 3), 120, np.uint8)
    upsampled = gan_upsample(flat).astype(int)
    assert upsampled.shape == (32, 32, 3)
    # A flat image comes out striped: the four pixel phases have different gains.
    assert upsampled[0::2, 0::2].mean() > upsampled[1::2, 1::2].mean() + 20
    faces = [data_preprocessing.demo_image(rng, name) for name in ("real", "fake") for _ in range(10)]
    real_energy = np.mean([checkerboard_energy(face) for face in faces[:10]])
    fake_energy = np.mean([checkerboard_energy(face) for face in faces[10:]])
    assert fake_energy > 5 * real_energy
