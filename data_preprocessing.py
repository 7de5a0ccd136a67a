"""Before TensorFlow: the models' recipes, the dataset, the media to judge, and the scripts' command line.

Nothing here loads TensorFlow, so a script reads and checks its options, and finds its
data, at once: --help and a mistyped option answer before TensorFlow starts. In order,
this module holds:

1. ModelRecipe, what differs between the four models, and the scripts that hold them;
2. finding the "140k Real and Fake Faces" dataset;
3. checking every image once (the verdicts are cached), and the dataset a run trains on;
4. the small synthetic demo dataset;
5. the photos and videos that --predict judges: the one place that tells images from videos;
   with --cluster, also list files and URIs, and the Ray cluster it joins;
6. the scripts' command line and its checks;
7. the shared ground: one-line errors, a progress bar, files written whole (or a line that
   says why not), and one run per folder at a time.

Run it on its own to see what the scripts would train on:

    python data_preprocessing.py                  # finds the dataset by itself
    python data_preprocessing.py --data-dir D     # a split root, or the Kaggle download's root
    python data_preprocessing.py --demo           # the small synthetic demo dataset
    python data_preprocessing.py --sample-media outputs/media   # a photo, a faceless photo and a clip to judge

It prints how many images each split and class holds, lists every file that cannot
be decoded (and any subfolder or broken link in a class folder), and exits with status 1
if there is any.

The dataset's layout, as Kaggle ships it:

    140k-real-and-fake-faces/           <- the download's root (an "archive root")
        train.csv  valid.csv  test.csv
        real_vs_fake/real-vs-fake/      <- the "split root"
            train/real/*.jpg  train/fake/*.jpg
            valid/real/*.jpg  valid/fake/*.jpg
            test/real/*.jpg   test/fake/*.jpg

Labels follow the folders: real = 0 and fake = 1, so a model's sigmoid output is the
probability that an image is fake. (The dataset's CSV files say the opposite, 1 = real;
we never read them.)
"""

import argparse
import ast
import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import socket
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------
# The four models
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRecipe:
    """What differs between the four models; everything else is shared."""

    title: str  # As the results table shows it, e.g. "VGG16".
    name: str  # The output folder, e.g. "vgg16".
    keras_module: str  # The keras.applications module, e.g. "vgg16": its constructor and preprocess_input.
    constructor: str  # The keras.applications constructor in that module, e.g. "VGG16".
    trainable_conv_layers: int  # The documented recipe: train the last N Conv2D layers.
    original_trainable_layers: int  # What the original code did: train the last K Keras layers.
    imagenet_weights_file: str  # The file Keras downloads for include_top=False.
    min_img_size: int = 32  # The smallest input the base accepts.


# The per-model scripts, by their models' output folders, in the order of the results table.
MODEL_SCRIPTS = {
    "vgg16": "VGG16_finetuning.py",
    "vgg19": "VGG19_finetuning.py",
    "inceptionv3": "inceptionV3_finetuning.py",
    "resnet50": "resnet50_finetuning.py",
}


def load_recipes():
    """The four recipes, in the order of MODEL_SCRIPTS, each read from its script.

    A script's RECIPE is read as the data it is, not run: the scripts import the helpers,
    and imports run one way, from the scripts down to this module.
    """
    return [read_recipe(REPOSITORY_DIR / script) for script in MODEL_SCRIPTS.values()]


def read_recipe(script):
    """The ModelRecipe that a per-model script declares as `RECIPE = ModelRecipe(...)`, each value a literal."""
    for node in ast.walk(ast.parse(Path(script).read_text())):
        if isinstance(node, ast.Assign) and [target.id for target in node.targets if isinstance(target, ast.Name)] == ["RECIPE"]:
            return ModelRecipe(**{keyword.arg: ast.literal_eval(keyword.value) for keyword in node.value.keywords})
    raise ValueError(f"{script} declares no RECIPE")


def recipe_named(name):
    """The recipe of the model whose output folder is `name` ("vgg16"); None if no script makes it."""
    return next((recipe for recipe in load_recipes() if recipe.name == name), None)


# ---------------------------------------------------------------------------
# Finding the dataset
# ---------------------------------------------------------------------------


SPLITS = ("train", "valid", "test")
# The position of a class in this tuple is its label: real = 0, fake = 1.
CLASSES = ("real", "fake")
REPOSITORY_DIR = Path(__file__).resolve().parent
DATASETS_DIR = REPOSITORY_DIR / "datasets"
DEMO_DATA_DIR = DATASETS_DIR / "demo"
KAGGLE_INPUT_DIR = Path("/kaggle/input/140k-real-and-fake-faces")
# Outputs go into the folder the scripts run from.
OUTPUT_DIR = Path("outputs")
DEMO_OUTPUT_DIR = OUTPUT_DIR / "demo"
SPLIT_ROOT_IN_ARCHIVE = Path("real_vs_fake") / "real-vs-fake"
KAGGLE_PAGE = "https://www.kaggle.com/datasets/xhlulu/140k-real-and-fake-faces"
KAGGLE_COMMAND = "kaggle datasets download -d xhlulu/140k-real-and-fake-faces"


def split_root_inside(folder):
    """Return the split root that `folder` is or holds, or None."""
    if any((folder / split).is_dir() for split in SPLITS):
        return folder
    for inner in (SPLIT_ROOT_IN_ARCHIVE, Path("real-vs-fake")):
        if (folder / inner).is_dir():
            return folder / inner
    return None


def default_split_roots():
    """The places searched, in order, when no --data-dir is given."""
    candidates = [DATASETS_DIR / SPLIT_ROOT_IN_ARCHIVE]
    # A Kaggle download unzipped into a folder of its own: it holds real_vs_fake/ and train.csv.
    if DATASETS_DIR.is_dir():
        for folder in sorted(DATASETS_DIR.iterdir()):
            if (folder / "real_vs_fake").is_dir() and (folder / "train.csv").is_file():
                candidates.append(folder / SPLIT_ROOT_IN_ARCHIVE)
    candidates.append(KAGGLE_INPUT_DIR / SPLIT_ROOT_IN_ARCHIVE)
    return candidates


def find_split_root(data_dir=None):
    """Return the folder that holds train/, valid/ and test/."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir.absolute()} is not a folder; check the path")
        split_root = split_root_inside(data_dir)
        if split_root is None:
            raise UserError(
                f"{data_dir.absolute()} holds neither train/, valid/ and test/ nor {SPLIT_ROOT_IN_ARCHIVE}/; "
                "point --data-dir at the split root or at the Kaggle download's root"
            )
        return split_root
    candidates = default_split_roots()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked_in = ", ".join(str(candidate) for candidate in candidates)
    raise UserError(
        f"no dataset found (looked in {looked_in}); download it from {KAGGLE_PAGE} "
        f"or with `{KAGGLE_COMMAND}`, unzip it into {DATASETS_DIR}, or pass --data-dir "
        "(or try --demo)"
    )


def dataset_name(split_root):
    """A dataset's name, as a model card gives it: its download's folder, or the split root's own."""
    split_root = Path(split_root).resolve()
    if split_root.parts[-2:] == SPLIT_ROOT_IN_ARCHIVE.parts:
        return split_root.parent.parent.name
    return split_root.name


def files_in(folder):
    """The files directly in `folder`, sorted, and {path: why it is passed over} for whatever else is there.

    Hidden entries such as .DS_Store are neither images nor mistakes, and are passed over
    in silence; a subfolder or a broken link is reported, as it may hold images meant for training.
    """
    files, passed_over = [], {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            passed_over[path] = "a folder; class folders are read one level deep, so move its images up"
        elif path.is_symlink():
            passed_over[path] = "a broken link; it points to nothing"
        else:
            passed_over[path] = "not a regular file"
    return files, passed_over


def class_files(folder, class_name, needed, passed_over):
    """The files of one class folder; `needed` says, in the error, what the folder should hold.

    What the folder holds besides files is added to `passed_over`, to be reported.
    """
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: {needed}")
    paths, others = files_in(folder)
    passed_over.update(others)
    if not paths:
        holds = f"holds no image file, only {len(others)} folders or broken links" if others else "is empty"
        raise UserError(f"{folder} {holds}; put the {class_name} images there")
    return paths


def list_images(split_root):
    """Return {split: {class: [paths]}}, after checking that every folder is there, and what was passed over."""
    needed = "the dataset needs train/, valid/ and test/, each with real/ and fake/"
    passed_over = {}
    files = {
        split: {name: class_files(split_root / split / name, name, needed, passed_over) for name in CLASSES}
        for split in SPLITS
    }
    return files, passed_over


def evaluation_folder(data_dir):
    """The folder holding real/ and fake/ to evaluate on: `data_dir` itself, or its dataset's test/ split."""
    if data_dir is not None:
        present = [name for name in CLASSES if (Path(data_dir) / name).is_dir()]
        if len(present) == len(CLASSES):
            return Path(data_dir)
        if present:
            missing = next(name for name in CLASSES if name not in present)
            raise UserError(
                f"{data_dir} has {present[0]}/ but no {missing}/; --evaluate needs both, to measure "
                f"how well the model tells them apart: add {Path(data_dir) / missing}"
            )
    return find_split_root(data_dir) / "test"


def list_evaluation_images(folder):
    """Return {class: [paths]} for a folder holding real/ and fake/, and what was passed over."""
    needed = "--evaluate needs a folder holding real/ and fake/, or a dataset with test/real/ and test/fake/"
    passed_over = {}
    return {name: class_files(folder / name, name, needed, passed_over) for name in CLASSES}, passed_over


# ---------------------------------------------------------------------------
# Checking every image once
# ---------------------------------------------------------------------------


def image_problem(path):
    """Return why `path` cannot be used as an image, or None if it decodes: the training check, which OpenCV
    and Pillow both decode whole, and which is cached.

    The header is read first (header_problem): a file that begins as no image does is not read whole.
    """
    problem = header_problem(path)
    if problem is not None:
        return problem
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return f"unreadable ({error.strerror})"
    try:
        # OpenCV returns None for most bad files, and raises for a few (an absurd size).
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        decoded = None
    if decoded is None:
        return "not a decodable image"
    # OpenCV passes over some damage inside a JPEG that Pillow, which Keras loads images
    # with, refuses; such a file would stop training mid-epoch. So Pillow decodes it too.
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # Pillow raises many kinds; any of them would stop training.
        return "damaged image data"
    return None


def photo_problem(path):
    """Why --predict cannot read `path` as a photo, or None: Pillow, which --predict reads photos with, decodes it.

    Unlike image_problem, this never reads a file whole: Pillow reads the header, then the
    image's own data from the file, and no further; a 3 GB file named .jpg is refused at its first bytes.
    """
    problem = header_problem(path)
    if problem is not None:
        return problem
    try:
        with Image.open(path) as image:
            image.load()
    except Exception:  # Pillow raises many kinds for damaged or cut-off data.
        return "damaged image data"
    return None


def header_problem(path):
    """Why `path` is no image, from its first bytes, or too large to read safely, from the size its header gives; None if it may be one.

    Pillow, which Keras reads every image with, identifies an image by its header, and reads
    its size there. It refuses an image of more than twice Image.MAX_IMAGE_PIXELS (a
    "decompression bomb", which could exhaust the memory) and warns above it; such images
    are left out and reported with their size.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if not head:
        return "empty file"
    try:
        with Image.open(path) as image:
            pixels = image.size[0] * image.size[1]
    except Image.DecompressionBombError as error:
        # Its message is the only place that gives the size: "Image size (N pixels) exceeds limit ...".
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(found[1]) if found else None
    except Exception:  # No image Pillow knows, which neither Keras nor --predict could read; Pillow raises many kinds.
        return looks_like_a_video(head) or "not a decodable image"
    if pixels is not None and pixels <= Image.MAX_IMAGE_PIXELS:
        return None
    size = f"{pixels:,} pixels" if pixels else "too many pixels"
    return f"too large ({size}, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}); resize it"


def looks_like_a_video(data):
    """What to say of a file that is no image but begins as a video does (an mp4 renamed .jpg); None otherwise."""
    # An ISO media file (ftyp) is a video unless its brand is a photo's: AVIF or HEIC.
    iso_video = data[4:8] == b"ftyp" and data[8:12] not in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")
    if iso_video or data[:4] == b"\x1aE\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI "):
        return f"it looks like a video, not an image; give it its video extension ({', '.join(VIDEO_SUFFIXES)})"
    return None


def image_named_as_video(path):
    """What to say of a file named as a video that is an image (a JPEG renamed .mp4); None otherwise. Only its header is read."""
    try:
        with Image.open(path) as image:
            kind = image.format
    except Exception:  # No image Pillow knows: a video, or neither; Pillow raises many kinds.
        return None
    return f"it is a {kind} image named as a video; give it an image's extension (such as .jpg or .png) to have it judged"


# The check above reports these images on one line; Pillow's own warning would add several.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Raise this whenever image_problem changes, so that older verdicts are not reused.
IMAGE_CHECK_VERSION = 4


def cache_file_for(split_root, cache_dir):
    """One cache file per dataset and version of the check, named after the dataset's path."""
    digest = hashlib.sha1(str(split_root.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"image-check-v{IMAGE_CHECK_VERSION}-{digest}.json"


def load_cache(cache_file):
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}


def check_images(paths, split_root, cache_dir):
    """Decode every image once with OpenCV and Pillow, in parallel; return {path: problem} for the bad ones.

    Results are cached by path, size and modification time, so a second run only
    decodes new or changed files. Bad files are reported, never moved or deleted.
    """
    cache_file = cache_file_for(split_root, cache_dir)
    cache = load_cache(cache_file)
    problems, unchecked = {}, []
    for path in paths:
        key = str(path.relative_to(split_root))
        stat = path.stat()
        cached = cache.get(key)
        if cached is not None and cached[:2] == [stat.st_size, stat.st_mtime_ns]:
            if cached[2] is not None:
                problems[path] = cached[2]
        else:
            unchecked.append((path, key, stat))

    if unchecked:
        print(f"Checking {len(unchecked)} images (once; the result is cached in {cache_file})")
        progress = ProgressBar(len(unchecked), unit="image")
        # OpenCV and Pillow release the GIL while they decode, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            found = pool.map(image_problem, [path for path, _, _ in unchecked])
            for done, ((path, key, stat), problem) in enumerate(zip(unchecked, found), start=1):
                cache[key] = [stat.st_size, stat.st_mtime_ns, problem]
                if problem is not None:
                    problems[path] = problem
                if done % 256 == 0 or done == len(unchecked):
                    progress.update(done)
        try:
            write_json_atomically(cache_file, cache)
        except OSError as error:
            print(f"warning: could not cache the image check in {cache_file}: {error.strerror}", file=sys.stderr)
    return problems


# ---------------------------------------------------------------------------
# The dataset a run trains on
# ---------------------------------------------------------------------------


@dataclass
class Dataset:
    """The usable images of each split, as (path, class name) pairs, and the bad files."""

    split_root: Path
    images: dict  # {split: [(path, class_name), ...]}
    bad_files: dict = field(default_factory=dict)  # {path: problem}

    def count(self, split, class_name):
        return sum(1 for _, name in self.images[split] if name == class_name)


def choose_subset(paths, per_class, seed):
    """At most `per_class` paths, the same ones for the same seed."""
    if per_class is None or len(paths) <= per_class:
        return paths
    return sorted(random.Random(seed).sample(paths, per_class))


def usable_images(chosen, folder, bad_files, require_every_class=True):
    """The (path, class name) pairs of {class: [paths]} under `folder`, less the bad files.

    A class left with no readable image stops the run, unless require_every_class is False.
    """
    images = []
    for class_name in CLASSES:
        good = [path for path in chosen[class_name] if path not in bad_files]
        if not good and require_every_class:
            example = chosen[class_name][0]
            raise UserError(
                f"{folder / class_name} has no readable image "
                f"({example.name}: {bad_files[example]}); replace its files with JPEG or PNG images"
            )
        images += [(path, class_name) for path in good]
    return images


def load_dataset(split_root, cache_dir, subset=None, seed=42, require_every_class=True):
    """List, subsample (with --subset) and check the dataset under `split_root`."""
    files, passed_over = list_images(split_root)
    # Subsample before checking, so that a quick run on a few images decodes only those.
    chosen = {
        split: {name: choose_subset(files[split][name], subset, seed) for name in CLASSES} for split in SPLITS
    }
    all_paths = [path for split in SPLITS for name in CLASSES for path in chosen[split][name]]
    bad_files = check_images(all_paths, split_root, cache_dir)
    images = {
        split: usable_images(chosen[split], split_root / split, bad_files, require_every_class) for split in SPLITS
    }
    return Dataset(split_root, images, {**passed_over, **bad_files})


def load_evaluation_images(folder, cache_dir, subset=None, seed=42):
    """The readable (path, class name) pairs of a folder holding real/ and fake/, checked like a dataset."""
    files, passed_over = list_evaluation_images(folder)
    chosen = {name: choose_subset(files[name], subset, seed) for name in CLASSES}
    bad_files = check_images([path for name in CLASSES for path in chosen[name]], folder, cache_dir)
    report_bad_files({**passed_over, **bad_files})
    # Both classes are needed: without them there is no ROC curve, no AUC and no equal error rate.
    return usable_images(chosen, folder, bad_files)


def report_bad_files(bad_files):
    for path, problem in sorted(bad_files.items()):
        warn_skipping(path, problem)


def warn_skipping(path, problem):
    print(skipping_warning(path, problem), file=sys.stderr)


def skipping_warning(path, problem):
    """The warning that a file is passed over, and why: warn_skipping prints it, a cluster's worker returns it."""
    return f"warning: skipping {printable(path)}: {problem}"


def printable(path):
    """A path as one line shows it: a newline or another control character in a file name is written as an escape."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in str(path))


# ---------------------------------------------------------------------------
# The synthetic demo dataset
# ---------------------------------------------------------------------------


DEMO_IMAGES_PER_CLASS = {"train": 100, "valid": 30, "test": 30}
DEMO_IMAGE_SIZE = 64


def draw_face(rng, size):
    """A cartoon face with random colours, shape and position: the demo's "photograph"."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = rng.integers(40, 220, size=3)  # The background.
    jitter = size // 10
    center_x, center_y = size // 2 + rng.integers(-jitter, jitter + 1, size=2)
    half_width, half_height = int(size * rng.uniform(0.25, 0.33)), int(size * rng.uniform(0.32, 0.42))
    skin = [int(value) for value in rng.integers(90, 255, size=3)]
    cv2.ellipse(image, (center_x, center_y), (half_width, half_height), 0, 0, 360, skin, -1, cv2.LINE_AA)

    eye_y = center_y - half_height // 4
    for eye_x in (center_x - half_width // 2, center_x + half_width // 2):
        cv2.circle(image, (eye_x, eye_y), max(1, size // 20), (30, 30, 30), -1, cv2.LINE_AA)

    mouth_center = (center_x, center_y + half_height // 2)
    mouth_axes = (half_width // 2, max(1, int(half_height * rng.uniform(0.05, 0.2))))
    line_width = max(1, size // 40)
    cv2.ellipse(image, mouth_center, mouth_axes, 0, 0, 180, (40, 40, 160), line_width, cv2.LINE_AA)
    return image


# A 3x3 kernel whose four phases sum to different gains (1.0, 0.85, 0.85 and 0.72), like
# an untrained or imperfect transposed convolution: it leaves a period-2 checkerboard.
GAN_UPSAMPLING_TAPS = np.array([0.35, 1.0, 0.5])
GAN_UPSAMPLING_KERNEL = np.outer(GAN_UPSAMPLING_TAPS, GAN_UPSAMPLING_TAPS)


def gan_upsample(image):
    """Double an image the way a GAN generator does: insert zeros, then convolve.

    Zhang, Karaman and Chang (2019) showed that this step leaves periodic traces in
    the spectrum of GAN images, the artifacts that a detector can learn to see.
    """
    height, width, channels = image.shape
    zero_inserted = np.zeros((2 * height, 2 * width, channels), np.float32)
    zero_inserted[::2, ::2] = image
    # Reflecting around the edge pixel keeps the border rows in the same phase pattern.
    upsampled = cv2.filter2D(zero_inserted, -1, GAN_UPSAMPLING_KERNEL, borderType=cv2.BORDER_REFLECT_101)
    return np.clip(upsampled, 0, 255).astype(np.uint8)


def demo_image(rng, class_name, size=DEMO_IMAGE_SIZE):
    """A real face is drawn at full size; a fake one at half size, then GAN-upsampled."""
    if class_name == "real":
        image = draw_face(rng, size)
    else:
        image = gan_upsample(draw_face(rng, size // 2))
    # The same sensor-like noise on both classes, so that noise alone gives nothing away.
    noise = rng.normal(0, 4, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def make_demo_dataset(folder, images_per_class=None, size=DEMO_IMAGE_SIZE, seed=0):
    """Write a small synthetic split root of face-like JPEGs under `folder`."""
    images_per_class = images_per_class or DEMO_IMAGES_PER_CLASS
    rng = np.random.default_rng(seed)
    for split, count in images_per_class.items():
        for class_name in CLASSES:
            class_dir = Path(folder) / split / class_name
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                write_jpeg(class_dir / f"{index:04d}.jpg", demo_image(rng, class_name, size), quality=95)
    return Path(folder)


def ensure_demo_dataset(folder):
    """Build the demo dataset in `folder` unless it is already complete.

    The options only choose the folder (resolve_data_options); a run builds it when it starts.
    """
    complete = all(
        len(list((folder / split / class_name).glob("*.jpg"))) >= count
        for split, count in DEMO_IMAGES_PER_CLASS.items()
        for class_name in CLASSES
    )
    if not complete:
        print(f"Building the synthetic demo dataset in {folder}")
        make_demo_dataset(folder)
    return folder


# ---------------------------------------------------------------------------
# The photos and videos to judge (--predict)
# ---------------------------------------------------------------------------


# What --predict reads as a video; OpenCV's own FFmpeg decodes them.
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def is_video(path):
    """A video, or an animated GIF or WebP: --predict samples its frames."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES or is_animated_image(path)


def is_animated_image(path):
    """An animated GIF or WebP, whose frames Pillow decodes (OpenCV's FFmpeg reads no animated WebP)."""
    if Path(path).suffix.lower() not in (".gif", ".webp"):
        return False
    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except Exception:  # Not an image at all: reported as such with the images.
        return False


def files_to_predict(paths):
    """The files named by `paths`, and every file inside the folders among them, in order; each file once.

    A path that does not exist, or a broken link, is reported and passed over, like an unreadable image.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            inside, broken_links = files_under(path)
            files += inside
            for broken_link in broken_links:
                warn_skipping(broken_link, "a broken link; it points to nothing")
        elif path.is_file():
            files.append(path)
        else:
            warn_skipping(path, missing_path_problem(path))
    # A file given twice, or reached through two links, is judged once.
    seen = set()
    return [path for path in files if not (path.resolve() in seen or seen.add(path.resolve()))]


def files_under(folder):
    """The files under `folder` to any depth, sorted, and its broken links; hidden entries are passed over.

    Links to folders are followed, as `find -L` does, each real folder once, so that a link
    back up the tree ends there. Folders are searched to any depth, so that a split root's
    test/ can be scored at once.
    """
    files, broken_links, visited = [], [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in visited:
            folders[:] = []
            continue
        visited.add(os.path.realpath(root))
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            path = Path(root) / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                broken_links.append(path)
    return sorted(files), sorted(broken_links)


# What the image check decodes (OpenCV and Pillow both read these), as the error messages name
# them. GIF is not among them: OpenCV reads it only from version 5.
READABLE_FORMATS = ("JPEG", "PNG", "BMP", "WebP", "TIFF", "PPM")


def readable_images(paths, required=True):
    """The files among `paths` that decode as images; the others are reported by path and skipped.

    If none does and one is `required` (no video was given either), that is the user's mistake.
    """
    problems = {path: photo_problem(path) for path in paths}
    report_bad_files({path: problem for path, problem in problems.items() if problem is not None})
    good = [path for path in paths if problems[path] is None]
    if not good and required:
        raise UserError(
            "none of the files given to --predict is a readable image or a video; name "
            f"{', '.join(READABLE_FORMATS[:-1])} or {READABLE_FORMATS[-1]} images, videos, or folders holding them"
        )
    return good


def media_to_predict(paths, required=True):
    """The readable images, the videos, and the unreadable images among --predict's paths.

    Unreadable images are reported and skipped, and listed, so that each still gets its row in --csv.
    Unless one is not `required` (the page's uploads), no readable image or video is the user's mistake.
    """
    files = files_to_predict(paths)
    is_a_video = {path: is_video(path) for path in files}  # Each animated image is opened once.
    videos = [path for path in files if is_a_video[path]]
    images = [path for path in files if not is_a_video[path]]
    readable = readable_images(images, required=required and not videos)
    return readable, videos, sorted(set(images) - set(readable))


# A --predict --cluster input may be a URI that pyarrow's file systems read; argparse's Path keeps
# one slash of its two (s3:/bucket/faces), which uri_of puts back.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
# A --predict --cluster file with this suffix lists the inputs, a path or a URI a line.
LIST_FILE_SUFFIX = ".txt"


def uri_of(path):
    """The URI that a --predict path names (s3://bucket/faces), or None for a local path."""
    scheme, separator, rest = str(path).partition(":/")
    if not separator or scheme.lower() not in REMOTE_SCHEMES:
        return None
    return f"{scheme}://{rest.lstrip('/')}"


def files_for_cluster(paths):
    """Every file that --predict --cluster judges, in order, each once: local files as --predict lists them,
    the lines of each list file (LIST_FILE_SUFFIX), and the files under each URI."""
    files, local = [], []
    for path in paths:
        if uri_of(path):
            files += remote_files(uri_of(path))
        elif Path(path).suffix.lower() == LIST_FILE_SUFFIX and Path(path).is_file():
            files += listed_files(path)
        else:
            local.append(path)
    files += [str(path) for path in files_to_predict(local)]
    return list(dict.fromkeys(files))


def listed_files(list_file):
    """The paths and URIs of a list file, one a line; blank lines and lines starting with # are passed over."""
    lines = Path(list_file).read_text(**TEXT_ENCODING).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def remote_files(uri):
    """The files at a URI (one file, or every file under a prefix, sorted, hidden ones passed over), as URIs."""
    import pyarrow.fs  # Only here: it comes with Ray, which --cluster needs.

    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
        found = filesystem.get_file_info(root)
        if found.type == pyarrow.fs.FileType.File:
            return [uri]
        listed = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as error:  # pyarrow's own errors derive from these.
        raise UserError(f"--predict {uri}: cannot list it ({error}); check the URI and the credentials for it") from None
    scheme = uri.split("://")[0]
    files = [file.path for file in listed if file.type == pyarrow.fs.FileType.File]
    # Hidden below the prefix given, as files_under passes them over.
    hidden = [any(part.startswith(".") for part in path.removeprefix(root).split("/")) for path in files]
    return sorted(f"{scheme}://{path}" for path, is_hidden in zip(files, hidden) if not is_hidden)


# The lines Ray's C++ core prints as it starts: the log level it was given, and its tries at a cluster
# that does not answer (which end in the error that is said in one line).
RAY_START_UP_LINE = re.compile(r"\[[^\]]+ [IWE] \d+ \d+\] (logging|gcs_client)\.cc:\d+:")
# How long a --cluster address has to answer before the run stops with one line.
CLUSTER_ANSWER_SECONDS = 10


def connect_to_ray(address, modules):
    """Join the Ray cluster at `address` (or start one here, for LOCAL_RAY), shipping our `modules` (.py files) to
    its workers; return the ray module. Ray missing, or an address that does not answer: a UserError."""
    # Ray asks the network about nothing, and keeps its own lines and dashboard to itself.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's C++ core says only what stops it: not, for one, that the actors' model is in its object store.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--cluster needs Ray, which is not installed here: pip install 'ray[data]>=2.60,<3'") from None
    if address not in (LOCAL_RAY, "auto"):
        check_answers(address)
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        with standard_error_without(RAY_START_UP_LINE):
            ray.init(
                address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                runtime_env={"py_modules": [str(module) for module in modules]},
            )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--cluster {address}: could not join it ({first_line}); start it with `ray start --head`, "
                        "or check the address") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars, context.print_on_execution_start = False, False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def check_answers(address):
    """Refuse a --cluster address (ray://host:port, or host:port) where nothing answers within CLUSTER_ANSWER_SECONDS."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--cluster {address}: give HOST:PORT, ray://HOST:PORT or auto (or no address, for a Ray on this machine)")
    try:
        socket.create_connection((host, int(port)), timeout=CLUSTER_ANSWER_SECONDS).close()
    except OSError as error:
        raise UserError(f"--cluster {address}: nothing answers there ({error.strerror or error}); "
                        "start the cluster's head with `ray start --head`, or check the address") from None


# Sample media to try --predict on: scikit-image's public-domain astronaut portrait (NASA) and
# coffee cup, which its wheel ships, and a clip made from the portrait.
SAMPLE_CLIP_SECONDS, SAMPLE_CLIP_FPS, SAMPLE_CLIP_SIZE = 10, 25, (640, 360)


def write_sample_media(folder):
    """Write astronaut.jpg (a face), coffee.jpg (no face) and clip.mp4 (10 s, the astronaut crossing a wall) into folder."""
    import skimage.data  # Only here: the portraits ship in its wheel.

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    astronaut, written = skimage.data.astronaut(), []
    for name, image in (("astronaut.jpg", astronaut), ("coffee.jpg", skimage.data.coffee())):
        write_jpeg(folder / name, image[..., ::-1], quality=92)
        written.append(folder / name)
    written.append(write_sample_clip(folder / "clip.mp4", astronaut))
    return written


# The astronaut's head and shoulders in the 512x512 portrait: (left, top, side).
SAMPLE_CLIP_HEAD = (97, 0, 256)


def write_sample_clip(path, portrait):
    """A clip of the portrait's head, its face about 100 px wide, sliding across a grey wall; written whole, then renamed."""
    width, height = SAMPLE_CLIP_SIZE
    side = height - 40
    left, top, head_side = SAMPLE_CLIP_HEAD
    head = portrait[top : top + head_side, left : left + head_side, ::-1]
    portrait = cv2.resize(head, (side, side), interpolation=cv2.INTER_AREA)
    frames = SAMPLE_CLIP_SECONDS * SAMPLE_CLIP_FPS
    temporary = path.with_name(f".{path.name}.{os.getpid()}.mp4")
    with writing(path, temporary):
        writer = cv2.VideoWriter(str(temporary), cv2.VideoWriter_fourcc(*"mp4v"), SAMPLE_CLIP_FPS, (width, height))
        try:
            for index in range(frames):
                frame = np.full((height, width, 3), 150, np.uint8)
                x = int((width - side) * index / (frames - 1))
                frame[(height - side) // 2 : (height - side) // 2 + side, x : x + side] = portrait
                writer.write(frame)
        finally:
            writer.release()
        if not temporary.is_file() or temporary.stat().st_size == 0:
            raise OSError(errno.EIO, "OpenCV's video writer wrote nothing")
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------
# The scripts' command line
# ---------------------------------------------------------------------------


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other error here.

    Options must be spelled out: argparse would otherwise take --epoch 3 for --epochs 3,
    and a later option beginning the same way would silently change what it means.
    """

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def exits_on_user_error(main):
    """Wrap a command's main() so that a UserError prints one line and returns its exit status (2, or 1 for CannotWrite);
    Ctrl-C that nothing else caught says "Interrupted." and returns 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_status
        except KeyboardInterrupt:
            # Ctrl-C where the command does not catch it itself, as while TensorFlow loads:
            # one line and the shell's status for it, as later, not Python's traceback.
            print("\nInterrupted.")
            return 130

    return wrapper


def checked_number(convert, is_allowed, allowed):
    """An argparse type that reads a number with `convert` and accepts it if `is_allowed`.

    float() reads "inf" and "nan" too; no option here means either, so they are refused.
    """
    kind = "whole number" if convert is int else "number"

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number, {allowed}")
        if not is_allowed(value):
            raise argparse.ArgumentTypeError(f"{text} must be {allowed}")
        return value

    return parse


# Counts such as --epochs and --batch-size.
positive_int = checked_number(int, lambda value: value >= 1, "1 or more")


# Keras seeds its generators with 0 to 2**32 - 1.
seed_value = checked_number(int, lambda value: 0 <= value < 2**32, f"between 0 and {2**32 - 1}")


# The prediction threshold, a probability.
probability = checked_number(float, lambda value: 0 <= value <= 1, "between 0 and 1")


# OpenCV's JPEG quality scale.
jpeg_quality = checked_number(int, lambda value: 1 <= value <= 100, "between 1 and 100")


# A Gaussian blur's sigma, in pixels; 0 is no blur, and beyond 100 an image at the largest
# --img-size is a flat colour (OpenCV also fails on kernels that wide).
MAX_BLUR = 100


blur_sigma = checked_number(float, lambda value: 0 <= value <= MAX_BLUR, f"between 0 and {MAX_BLUR}")


# MTCNN, the face finder, finds no face narrower than 20 pixels.
SMALLEST_FINDABLE_FACE = 20


face_width = checked_number(
    int, lambda value: value >= SMALLEST_FINDABLE_FACE, f"{SMALLEST_FINDABLE_FACE} or more: the face finder finds no smaller face"
)


# Rates such as --learning-rate.
positive_float = checked_number(float, lambda value: value > 0, "more than 0")


# Counts that may be zero, such as --warmup-epochs.
non_negative_int = checked_number(int, lambda value: value >= 0, "0 or more")


# What --export writes, in the order it writes them; "all" is every one.
EXPORT_FORMATS = ("onnx", "saved_model", "litert")


def export_formats(text):
    """An argparse type for --export: formats separated by commas, each once, in EXPORT_FORMATS' order."""
    given = [name.strip() for name in text.split(",")]
    unknown = [name for name in given if name not in (*EXPORT_FORMATS, "all")]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not a format: use {', '.join(EXPORT_FORMATS)} or all, separated by commas")
    return tuple(name for name in EXPORT_FORMATS if name in given or "all" in given)


# A TCP port that a user's program may listen on, for --port.
port_number = checked_number(int, lambda value: 1 <= value <= 65535, "between 1 and 65535")


def add_data_arguments(parser):
    """The options that say which images to use, shared by every command."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="a split root (train/, valid/ and test/, each with real/ and fake/) or the "
        "Kaggle download's root; by default datasets/ and /kaggle/input are searched",
    )
    parser.add_argument(
        "--subset",
        type=positive_int,
        metavar="N",
        help="use at most N images per class in each split, chosen with --seed",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the small synthetic dataset in datasets/demo, built if absent",
    )
    parser.add_argument("--seed", type=seed_value, default=42, help="random seed (default 42)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="where results and the image-check cache go (default outputs, or outputs/demo with --demo)",
    )


def resolve_data_options(args):
    """Fill in where the data comes from and where outputs go, from --demo and --data-dir.

    This only decides: with --demo, `args.uses_demo_data` says that the run builds the demo
    dataset (ensure_demo_dataset) when it starts.
    """
    args.uses_demo_data = args.demo and args.data_dir is None
    if args.uses_demo_data:
        args.data_dir = DEMO_DATA_DIR
    if args.output_dir is None:
        args.output_dir = DEMO_OUTPUT_DIR if args.demo else OUTPUT_DIR
    return args


# The dataset's faces are 256 pixels, and a model's memory grows with the square of the side.
MAX_IMG_SIZE = 1024
DOCUMENTED_DEFAULTS = dict(epochs=10, batch_size=32, img_size=224, weights="imagenet")

# Small enough to train on a laptop CPU, with nothing to download.
DEMO_DEFAULTS = dict(epochs=5, batch_size=16, img_size=64, weights="none")

# A face narrower than this is too small to judge: cut out as the dataset frames faces, it
# would fill a square of about 120 pixels, under half the dataset's 256, and the fine
# texture the models rely on would be gone.
DEFAULT_MIN_FACE = 64

# Frames judged per video, as DeepfakeBench scores videos.
DEFAULT_FRAMES = 32

# The --model value that asks for the weighted average of every trained model.
ENSEMBLE = "ensemble"
# --cluster without an address: Ray's own name for a Ray started on this machine for this run.
LOCAL_RAY = "local"

# Where --serve's page listens by default: this machine only, on Gradio's usual port.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser(recipe):
    parser = OneLineArgumentParser(
        description=f"Fine-tune {recipe.title}'s last {recipe.trainable_conv_layers} conv layers to tell real "
        f"faces from StyleGAN fakes. Training writes OUTPUT_DIR/{recipe.name}/ (model.keras, history.csv and "
        ".png, metrics.json, predictions.csv, roc.png, precision_recall.png, confusion_matrix.png) and "
        "OUTPUT_DIR/results.md; --predict and --evaluate apply the trained model instead, and --export writes it for other runtimes.",
    )
    add_data_arguments(parser)
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=positive_int, help="training epochs in all (default 10; 5 with --demo)")
    training.add_argument("--batch-size", type=positive_int, help="images per batch (default 32; 16 with --demo)")
    training.add_argument(
        "--learning-rate", type=positive_float, default=1e-4,
        help="Adam's learning rate (default 1e-4); with --warmup-epochs, the head's rate during the warmup",
    )
    training.add_argument(
        "--warmup-epochs", type=non_negative_int, default=0, metavar="K",
        help="first train the head alone for K epochs, with the whole base frozen (default 0: one phase, as the original)",
    )
    training.add_argument(
        "--fine-tune-learning-rate", type=positive_float, metavar="RATE",
        help="the learning rate after the warmup (default --learning-rate / 10)",
    )
    training.add_argument(
        "--img-size", type=positive_int,
        help=f"image side in pixels (default 224; 64 with --demo; {recipe.min_img_size} to {MAX_IMG_SIZE})",
    )
    training.add_argument(
        "--weights", help="imagenet, none, or the path of a weights file for the base (default imagenet; none with --demo)"
    )
    training.add_argument(
        "--preprocessing", choices=["native", "rescale"], default="native",
        help="how the model's first layer scales pixels: native, the base's own preprocess_input (default); "
        "rescale, the original's 1/255",
    )
    training.add_argument(
        "--unfreeze-rule", choices=["conv", "layers"], default="conv",
        help=f"conv: train the last {recipe.trainable_conv_layers} conv layers (default); "
        f"layers: the original code's last {recipe.original_trainable_layers} Keras layers",
    )
    training.add_argument(
        "--patience", type=positive_int, help="stop after N epochs without a better val_loss (after the warmup)"
    )
    training.add_argument(
        "--tensorboard", action="store_true",
        help="write TensorBoard logs to OUTPUT_DIR/<model>/logs/, a folder per phase; watch them with "
        "`tensorboard --logdir OUTPUT_DIR`",
    )
    speed = parser.add_argument_group("speed and scale")
    speed.add_argument(
        "--pipeline", choices=["idg", "tfdata"], default="idg",
        help="idg: the original's ImageDataGenerator flows (default); "
        "tfdata: a tf.data pipeline with the same augmentations, several times faster",
    )
    speed.add_argument(
        "--mixed-precision", action="store_true",
        help="compute in bfloat16 on a CPU or float16 on a GPU, keeping the weights and p(fake) in float32",
    )
    speed.add_argument(
        "--distribute", choices=["none", "mirrored", "multiworker"], default="none",
        help="mirrored: every visible GPU of this machine; multiworker: every machine in TF_CONFIG "
        "(--batch-size is then the global batch, split across them)",
    )
    add_prediction_arguments(parser)
    return parser


def add_prediction_arguments(parser):
    """The options that apply a trained model instead of training one."""
    group = parser.add_argument_group("applying a trained model (no training)")
    group.add_argument(
        "--predict", nargs="+", type=Path, metavar="PATH",
        help="print p(fake) and the verdict for these photos and videos, and every one in these folders: "
        "for each face found in them, unless --faces off",
    )
    group.add_argument(
        "--evaluate", action="store_true",
        help="measure the saved model on --data-dir: a folder holding real/ and fake/, or a dataset's test/",
    )
    group.add_argument(
        "--export", type=export_formats, metavar="FORMAT[,FORMAT...]",
        help=f"write the saved model as {', '.join(EXPORT_FORMATS)} or all, beside its model.keras (model.onnx, "
        "saved_model/, model.tflite), each checked against Keras on the run's test images",
    )
    group.add_argument(
        "--model", metavar="FILE",
        help="the .keras model to use (default OUTPUT_DIR/<model>/model.keras), or its folder; with --predict, "
        f"also a model.onnx that --export wrote; with --predict or --serve, '{ENSEMBLE}', which averages every model "
        "trained into OUTPUT_DIR",
    )
    group.add_argument(
        "--threshold", type=probability,
        help="p(fake) from which a face is called fake, below which real (default: with --predict, the model's "
        "band from its card: real, uncertain or fake; with --evaluate, 0.5)",
    )
    group.add_argument(
        "--faces", choices=["auto", "off"],
        help="auto: find the faces, cut each out as the dataset frames its faces, and score it (the whole image "
        "where none is found); off: score the whole image, for images already cropped like the dataset's "
        "(default: auto with --predict and --serve, off with --evaluate)",
    )
    group.add_argument(
        "--min-face", type=face_width, metavar="PIXELS",
        help=f"with --faces auto: list a face narrower than this as too small to judge, and do not score it (default {DEFAULT_MIN_FACE})",
    )
    group.add_argument(
        "--frames", type=positive_int, metavar="N",
        help=f"with --predict: how many frames, spread evenly over each video, to judge (default {DEFAULT_FRAMES})",
    )
    group.add_argument(
        "--csv", type=file_or_folder, metavar="FILE",
        help="with --predict: also write one row per scored face to this CSV file; with --cluster, FILE may be a folder "
        "(an existing one, or a name ending with /): it gets CSV shards written by Ray, and summary.json",
    )
    group.add_argument(
        "--cluster", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
        help="with --predict: judge on the Ray cluster at ADDRESS (ray://head:10001, auto), or without it on a Ray "
        "started here; with --csv, the rows go there under a progress bar, and the same command run again judges only "
        f"the files not in its file yet. PATH may then also be a {LIST_FILE_SUFFIX} file listing paths, or a URI (s3://, gs://)",
    )
    group.add_argument(
        "--annotate", type=Path, metavar="DIR",
        help="with --predict: write each image with its faces marked and scored, and each video's sampled frames, to DIR",
    )
    group.add_argument(
        "--gradcam", type=Path, metavar="DIR", help="with --predict: write a Grad-CAM heat map of each face scored to DIR"
    )
    group.add_argument(
        "--serve", action="store_true",
        help="open a local web page that judges the photos and videos dropped on it, as --predict does, until Ctrl-C",
    )
    group.add_argument("--port", type=port_number, help=f"with --serve: the page's port (default {DEFAULT_PORT})")
    group.add_argument(
        "--host", help=f"with --serve: the address the page listens on (default {DEFAULT_HOST}, this machine only; "
        "0.0.0.0 lets anyone who can reach the machine upload)",
    )
    group.add_argument("--jpeg-quality", type=jpeg_quality, metavar="Q", help="with --evaluate: JPEG-compress each image at quality Q (1-100)")
    group.add_argument("--blur", type=blur_sigma, metavar="SIGMA", help="with --evaluate: Gaussian-blur each image with this sigma in pixels")


# The mode each option belongs to, declared once: "training", "predict", "evaluate" or "serve", and
# what to say when it is given to another. parse_arguments refuses such an option, so that
# none is silently ignored; the rules after it concern options that depend on each other.
OPTION_MODES = {
    "gradcam": (("predict",), "--gradcam draws heat maps of --predict's images; add --predict PATH"),
    "csv": (("predict",), "--csv writes --predict's lines; add --predict PATH"),
    "annotate": (("predict",), "--annotate marks the faces of --predict's images and videos; add --predict PATH"),
    "frames": (("predict", "serve"), "--frames samples the videos given to --predict or --serve; add one of them"),
    "cluster": (("predict",), "--cluster judges --predict's files on a Ray cluster; add --predict PATH"),
    "faces": (("predict", "evaluate", "serve"), "--faces says how --predict, --evaluate or --serve reads images; add one of them"),
    "jpeg_quality": (("evaluate",), "--jpeg-quality and --blur perturb the images of --evaluate; add --evaluate"),
    "blur": (("evaluate",), "--jpeg-quality and --blur perturb the images of --evaluate; add --evaluate"),
    "model": (
        ("predict", "evaluate", "export", "serve"),
        "--model names the model for --predict, --evaluate, --export or --serve; add one of them",
    ),
    "port": (("serve",), "--port and --host say where --serve's page listens; add --serve"),
    "host": (("serve",), "--port and --host say where --serve's page listens; add --serve"),
    "tensorboard": (("training",), "--tensorboard logs training; --predict and --evaluate train nothing"),
    "epochs": (("training",), "--epochs sets how long a model trains; --predict and --evaluate train none"),
    "img_size": (
        ("training",),
        "--img-size sets the size a model trains at; --predict and --evaluate read images at the size the model was trained at",
    ),
    "warmup_epochs": (
        ("training",),
        "--warmup-epochs and --fine-tune-learning-rate set how a model trains; --predict and --evaluate train none",
    ),
    "fine_tune_learning_rate": (
        ("training",),
        "--warmup-epochs and --fine-tune-learning-rate set how a model trains; --predict and --evaluate train none",
    ),
}


def mode_of(args):
    """What a command does: "predict", "evaluate", "export", "serve" or "training"."""
    modes = {"predict": args.predict, "evaluate": args.evaluate, "export": args.export, "serve": args.serve}
    return next((mode for mode, given in modes.items() if given), "training")


def check_option_modes(args, defaults):
    """Refuse an option given to a mode it does not belong to (OPTION_MODES), before any default fills it in.

    `defaults` holds each option's value when it is not given, so that a given one is told from it.
    """
    if sum(bool(mode) for mode in (args.predict, args.evaluate, args.export, args.serve)) > 1:
        raise UserError("--predict, --evaluate, --export and --serve are separate runs; give one of them")
    for option, (modes, message) in OPTION_MODES.items():
        if getattr(args, option) not in (None, False, defaults[option]) and mode_of(args) not in modes:
            raise UserError(message)


# Grad-CAM takes gradients inside the Keras model, which an exported file does not give.
GRADCAM_NEEDS_KERAS = "Grad-CAM needs the .keras model, whose layers it reads gradients from; give --model its model.keras, or leave out --gradcam"


def check_option_combinations(args):
    """Refuse the combinations of options that would be silently ignored or cannot work."""
    mistakes = [
        (
            args.min_face is not None and (args.faces or default_faces(args)) == "off",
            "--min-face is the smallest face that --faces auto scores; use it with --predict, or with --evaluate --faces auto",
        ),
        (
            args.model == ENSEMBLE and (args.gradcam or args.evaluate),
            "--model ensemble works with --predict alone: Grad-CAM explains one model, and the ensemble's "
            "test figures are in the results table",
        ),
        (
            args.gradcam and Path(args.model or "").suffix == ".onnx",
            GRADCAM_NEEDS_KERAS,
        ),
        (
            args.cluster and (args.annotate or args.gradcam),
            "--cluster writes rows, not pictures: --annotate and --gradcam work on one machine; leave out --cluster",
        ),
        (
            args.cluster and args.model == ENSEMBLE,
            "--cluster ships one model to its workers; give --model FILE (or leave out --cluster to judge with the ensemble)",
        ),
        (
            args.fine_tune_learning_rate is not None and not args.warmup_epochs,
            "--fine-tune-learning-rate is the rate after the warmup; add --warmup-epochs K, or set --learning-rate",
        ),
        (
            args.warmup_epochs >= args.epochs and mode_of(args) == "training",
            f"--warmup-epochs {args.warmup_epochs} leaves no epoch to fine-tune in --epochs {args.epochs}; "
            "make --epochs larger than --warmup-epochs",
        ),
    ]
    for is_wrong, message in mistakes:
        if is_wrong:
            raise UserError(message)


def default_faces(args):
    """--faces when not given: photos and videos are seldom cropped like the dataset; evaluation sets usually are."""
    return "auto" if args.predict or args.serve else "off"


def parse_arguments(recipe, argv=None):
    """Parse a script's options and check them all, so that a mistake stops the run before any long work."""
    parser = build_parser(recipe)
    args = parser.parse_args(argv)
    # Told apart from their defaults before these fill in the rest.
    check_option_modes(args, {option: parser.get_default(option) for option in OPTION_MODES})
    defaults = dict(DEMO_DEFAULTS, img_size=max(DEMO_DEFAULTS["img_size"], recipe.min_img_size))
    for option, value in (defaults if args.demo else DOCUMENTED_DEFAULTS).items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    if args.img_size < recipe.min_img_size:
        raise UserError(f"--img-size {args.img_size} is too small for {recipe.title}: use {recipe.min_img_size} or more")
    if args.img_size > MAX_IMG_SIZE:
        raise UserError(
            f"--img-size {args.img_size} is more than {MAX_IMG_SIZE}: the dataset's faces are 256 pixels, and "
            f"memory grows with the square of the size; use {MAX_IMG_SIZE} or less"
        )
    if args.weights not in ("imagenet", "none") and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights} is neither imagenet, none, nor an existing weights file")
    check_option_combinations(args)
    if args.faces is None:
        args.faces = default_faces(args)
    if args.min_face is None:
        args.min_face = DEFAULT_MIN_FACE
    if args.frames is None:
        args.frames = DEFAULT_FRAMES
    if args.serve:
        args.host = args.host or DEFAULT_HOST
        args.port = args.port or DEFAULT_PORT
    # Without a warmup there is one phase, trained at --learning-rate, as in the original.
    if args.fine_tune_learning_rate is None:
        args.fine_tune_learning_rate = args.learning_rate / 10 if args.warmup_epochs else args.learning_rate
    args = resolve_data_options(args)
    if args.predict:
        check_prediction_outputs(args)
    elif args.serve:
        check_page_address(args.host, args.port)
    elif args.evaluate:
        args.evaluation_folder = args.data_dir / "test" if args.uses_demo_data else evaluation_folder(args.data_dir)
        refuse_output_inside(args.output_dir, [args.evaluation_folder], "--output-dir")
        # Before the images are checked and the model loads, which take a while.
        ensure_writable_folder(args.output_dir)
    elif mode_of(args) == "training":
        # Found now, so that a wrong path answers at once, and recorded whole, so that a
        # resumed run uses the same data. The demo's is built when the run starts.
        args.data_dir = (args.data_dir if args.uses_demo_data else find_split_root(args.data_dir)).resolve()
        refuse_output_inside(args.output_dir, [args.data_dir], "--output-dir")
        if args.output_dir.resolve() in args.data_dir.parents:
            raise UserError(
                f"the dataset {args.data_dir} is inside --output-dir {args.output_dir}; keep results and data "
                "apart, so that a results folder can be shared or deleted whole: choose an output folder beside it"
            )
    return args


@dataclass(frozen=True)
class TrainingSettings:
    """How a training run goes, as its options gave it: its data, the detector it builds, and how it trains.

    Each field is the option of the same name (see --help), filled in and checked by
    parse_arguments; `demo_data` says that the run trains on the synthetic demo faces.
    """

    data_dir: Path
    output_dir: Path
    demo: bool = False
    demo_data: bool = False
    subset: int | None = None
    seed: int = 42
    img_size: int = 224
    weights: str = "imagenet"
    preprocessing: str = "native"
    unfreeze_rule: str = "conv"
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup_epochs: int = 0
    fine_tune_learning_rate: float = 1e-4
    patience: int | None = None
    pipeline: str = "idg"
    mixed_precision: bool = False
    distribute: str = "none"
    tensorboard: bool = False

    @classmethod
    def from_options(cls, args):
        """The settings of a script's checked options (parse_arguments)."""
        given = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if field.name != "demo_data"}
        return cls(**given, demo_data=args.uses_demo_data)


def check_page_address(host, port):
    """Refuse an address that --serve's page could not listen on (a port taken, a host not of this machine), before the model loads."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            # As the page's server does, so that a port that was just let go counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: the page cannot listen there ({error.strerror or error}); "
                        "give another --port, or stop what uses it") from None


def check_prediction_outputs(args):
    """Check --csv, --annotate and --gradcam before any image is read: each must be writable and outside the images' folders.

    Where each goes is refused before anything is created there. Links are followed first:
    what is checked is the file or folder that would be written.
    """
    try:
        folders_given = [path for path in args.predict if path.is_dir()]
        files_given = [path for path in args.predict if path.is_file()]
    except OSError as error:  # A folder on the way that this user may not enter.
        raise UserError(f"cannot reach {error.filename} ({error.strerror}); check the paths given to --predict") from None
    if args.cluster and any(uri_of(path) for path in args.predict):
        pass  # A URI is listed once Ray's pyarrow is loaded.
    elif not folders_given and not files_given:
        # Said before TensorFlow and the model load; a missing path among others is a warning, later.
        raise UserError(f"--predict {args.predict[0]}: {missing_path_problem(args.predict[0])}; check the path")
    if args.csv and is_folder_name(args.csv):
        check_csv_folder(args.csv, folders_given, args.cluster)
    elif args.csv:
        check_csv_target(args.csv, files_given, folders_given)
    for folder, option in ((args.annotate, "--annotate"), (args.gradcam, "--gradcam")):
        if folder:
            # These are images: beside an image given as a file, they would be scored the next time.
            refuse_output_inside(folder, folders_given + [path.parent for path in files_given], option)
            refuse_a_folder_of_models_or_data(folder, option)
            ensure_writable_folder(folder, option)


class FolderName(type(Path())):
    """A path given with a separator at its end: the name of a folder, which need not exist yet."""


def file_or_folder(text):
    """A Path of the command line, a FolderName where `text` ends with a separator (which Path would drop)."""
    return FolderName(text) if text.endswith(("/", os.sep)) else Path(text)


def is_folder_name(path):
    """Whether `path` names a folder: one that exists, or a FolderName."""
    return isinstance(path, FolderName) or path.is_dir()


def check_csv_folder(folder, folders_given, cluster):
    """Refuse a --csv folder without --cluster, inside the images' folders, among a model's files, or not empty.

    A rerun cannot add to a folder of Ray's shards: a shard a killed run cut short would lose rows unseen.
    """
    if not cluster:
        raise UserError(f"--csv {folder} is a folder: only --cluster writes shards into one; name a file")
    refuse_output_inside(folder, folders_given, "--csv")
    refuse_a_folder_of_models_or_data(folder, "--csv")
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"--csv {folder} already holds files; name a new or empty folder for the shards")
    ensure_writable_folder(folder, "--csv")


def check_csv_target(csv_file, files_given, folders_given):
    """Refuse a --csv that would write over anything but a CSV of --predict: a model, its card, an image, a script.

    The file is opened through any link, so the link's target is what is checked.
    """
    refuse_a_folder(csv_file, "--csv")
    target = csv_file.resolve()
    if any(target == image.resolve() for image in files_given):
        raise UserError(f"--csv {csv_file} is one of the images given to --predict; name another file")
    # A run folder holds a model and what its training wrote; --csv must not replace any of it.
    if is_run_folder(target.parent) or target.suffix == ".keras":
        raise UserError(f"--csv {csv_file} would write over a trained model's files; name a file outside its folder")
    refuse_output_inside(csv_file, folders_given, "--csv")
    if target.is_file():
        refuse_overwriting(csv_file, target)
    ensure_writable_folder(target.parent, "--csv")


# The first columns of the header line of a CSV that --predict writes (plot_loss_accuracy_graph.CSV_COLUMNS).
# This module imports none of ours, so they are copied here; only a file that begins so is written over.
PREDICT_CSV_START = "path,frame,face,"


def refuse_overwriting(csv_file, target):
    """Refuse to empty an existing file, `target` (--csv `csv_file` resolved), unless it is a CSV that --predict wrote.

    Only its first line is read. An empty file holds nothing to lose. A file with another
    name (a hard link) would change under that name too, whatever it holds.
    """
    if target.stat().st_nlink > 1:
        raise UserError(
            f"--csv {csv_file} is a hard link: the same file has another name, where writing it would change it too; "
            "name a new file"
        )
    try:
        with open(target, "rb") as file:
            first_line = file.readline(len(PREDICT_CSV_START))
    except OSError as error:
        raise UserError(f"cannot read --csv {csv_file} ({error.strerror}); name another file") from None
    if first_line and first_line != PREDICT_CSV_START.encode():
        raise UserError(
            f"--csv {csv_file} already holds something other than a CSV of --predict; name a new file, "
            "or remove that one if it is yours to lose"
        )


def is_run_folder(folder):
    """Whether `folder` is a run folder (OUTPUT_DIR/<model>/): it holds a model, a run's lock or a run's metrics."""
    return any((Path(folder) / kept).exists() for kept in ("model.keras", RUN_LOCK, "metrics.json"))


def refuse_a_folder_of_models_or_data(folder, option):
    """Refuse a folder of pictures that is a run folder or in one, or is inside a dataset's class folder (real/ or fake/).

    Links are followed first. Pictures in a class folder would be trained on the next time.
    """
    resolved = Path(folder).resolve()
    # Only the folder and its parent are asked: pytest, for one, keeps a lock named as a run's above its folders.
    for place in (resolved, resolved.parent):
        if is_run_folder(place):
            raise UserError(f"{option} {folder} would put pictures among a trained model's files in {place}; choose a place outside it")
    for place in (resolved, *resolved.parents):
        other_class = {"real": "fake", "fake": "real"}.get(place.name)
        if other_class and (place.parent / other_class).is_dir():
            raise UserError(f"{option} {folder} is inside the dataset's class folder {place}; choose a place outside it")


def missing_path_problem(path):
    """Why a --predict path that is neither a file nor a folder is passed over."""
    if Path(path).is_symlink() and not Path(path).exists():
        return "a broken link; it points to nothing"
    if Path(path).exists():
        return "not a regular file but a device, a pipe or a socket"
    return "no such file or folder"


# ---------------------------------------------------------------------------
# The shared ground: errors, progress, files written whole, one run at a time
# ---------------------------------------------------------------------------


class UserError(Exception):
    """A mistake the user can fix. Scripts print it on one line and exit with status 2."""

    exit_status = 2


class CannotWrite(UserError):
    """A file could not be written, most often as the disk is full: one line, exit status 1.

    Nothing half-written is left, and what was written before stays: the same command,
    run again once there is space, resumes a training run.
    """

    exit_status = 1


@contextlib.contextmanager
def writing(path, *leftovers):
    """Turn a failed write in the block into CannotWrite, naming `path`; remove `leftovers`, the partial files,
    after any failure, Ctrl-C too."""
    try:
        yield
    except BaseException as error:
        for leftover in leftovers:
            # A name the file system refused (too long) was never made, and cannot be unlinked either.
            with contextlib.suppress(OSError):
                Path(leftover).unlink()
        if not isinstance(error, OSError):
            raise
        # h5py puts the errno in its message, not in the error.
        disk_full = error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error)
        reason = "the disk is full; free some space" if disk_full else f"{error.strerror or error}; fix that"
        raise CannotWrite(f"cannot write {path}: {reason}, then run the same command again") from None


class ProgressBar:
    """A progress bar on one line, as Keras draws its own, without loading TensorFlow.

    On a terminal it is redrawn in place; into a file or a pipe, only the finished bar is written.
    """

    WIDTH = 30

    def __init__(self, total, unit):
        self.total, self.unit, self.started = total, unit, time.perf_counter()
        self.redrawn = sys.stdout.isatty()

    def update(self, done, counts=""):
        """Draw the bar at `done` of the total, followed by `counts`, a few words on what was done."""
        finished = done == self.total
        if not (self.redrawn or finished):
            return
        filled = self.WIDTH * done // self.total
        bar = "=" * filled + "." * (self.WIDTH - filled)
        seconds = time.perf_counter() - self.started
        start = "\r" if self.redrawn else ""
        counts = f" - {counts}" if counts else ""
        print(f"{start}{done}/{self.total} {self.unit}s [{bar}] {seconds:.0f} s{counts}", end="\n" if finished else "", flush=True)


# The lines TensorFlow's C++ start-up prints on every machine, a GPU or none, before any of
# ours: notes on oneDNN, CUDA libraries, CPU instructions, and a failed cuInit where there is no GPU.
TENSORFLOW_START_UP_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog"
    r"|I\d{4} [\d:.]+ +\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\]"
    r"|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"
    r"|To enable the following instructions: .* rebuild TensorFlow"
)


@contextlib.contextmanager
def quiet_tensorflow_start():
    """Load TensorFlow, in the block, without the lines its C++ start-up prints; any other line still shows.

    TF_CPP_MIN_LOG_LEVEL does not reach the lines printed before TensorFlow's logging starts,
    so the block's standard error is caught at the file level, and what is not start-up
    noise is printed after it. The GPU is probed in the block too, where a machine without
    one logs a failed cuInit. A user who sets TF_CPP_MIN_LOG_LEVEL keeps every line.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        yield
        return
    # Later, TensorFlow prints its warnings and errors, not its notes.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    with standard_error_without(TENSORFLOW_START_UP_LINE):
        yield
        if "tensorflow" in sys.modules:
            sys.modules["tensorflow"].config.list_physical_devices()


@contextlib.contextmanager
def standard_error_without(noise):
    """Run the block with its standard error caught at the file level, where C++ libraries write, then print
    every line of it that the regular expression `noise` does not match."""
    sys.stderr.flush()
    standard_error = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(standard_error, 2)
            os.close(standard_error)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines():
                if not noise.match(line):
                    print(line, file=sys.stderr)


def write_jpeg(path, bgr_image, quality):
    """Write a JPEG: OpenCV encodes it, Python writes the file; a write that fails leaves no part of a file,
    and says why in one line (see writing).

    cv2.imwrite would take the path as a C string, and crashes on a file name that is not
    UTF-8; and when it fails it says False, not why (a full disk, a name too long).
    """
    encoded, data = cv2.imencode(".jpg", bgr_image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not encoded:
        raise CannotWrite(f"cannot write {path}: OpenCV could not encode the picture as a JPEG")
    with writing(path, path):
        Path(path).write_bytes(data.tobytes())


# How every text file here is written (CSV files, metrics, cards): in UTF-8, which every reader
# can read. A file name that is not UTF-8 (Python keeps its bytes as surrogate escapes) cannot
# be written as UTF-8: it is written as the printed lines show it (printable), each such byte as
# a \udcXX escape. So a CSV's path and its printed line say the same, and no reader stumbles.
TEXT_ENCODING = dict(encoding="utf-8", errors="backslashreplace")


def save_figure(figure, path):
    """Write a matplotlib figure and let it go; a write that fails (a full disk) leaves no part of a file."""
    from matplotlib import pyplot  # Loaded already by whoever drew the figure.

    figure.tight_layout()
    try:
        with writing(path, path):
            figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return path


def write_text_atomically(path, text):
    """Write through a temporary file, so that a reader never sees half a file (in TEXT_ENCODING)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path, temporary):
        temporary.write_text(text, **TEXT_ENCODING)
    os.replace(temporary, path)


def write_json_atomically(path, content):
    write_text_atomically(path, json.dumps(content, indent=2))


def ensure_writable_folder(folder, option="--output-dir"):
    """Create `folder` and check that files can be written there, before any long work; `option` names it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        # mkdir says "File exists" or "Not a directory" when a plain file stands where a folder should be.
        reason = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        if folder.is_dir() and reason == error.strerror:
            # As in /proc, which says "No such file or directory" of a file it will not make.
            reason = f"files cannot be made there: {error.strerror}"
        raise UserError(f"cannot write to {folder} ({reason}); choose another {option}") from None
    return folder


def refuse_a_folder(path, option):
    """Refuse a folder where `option` names a file, before any other check, which would read the folder's parent."""
    try:
        is_folder = path.is_dir()
    except OSError as error:  # A folder on the way that this user may not enter.
        raise UserError(f"cannot reach {path} ({error.strerror}); choose another {option}") from None
    if is_folder:
        raise UserError(f"{option} {path} is a folder; name a file")


def refuse_output_inside(output, image_folders, option):
    """Refuse an output, file or folder, that is or is inside one of the image folders: its files would be read as images."""
    resolved = Path(output).resolve()
    for folder in map(Path, image_folders):
        if resolved == folder.resolve() or folder.resolve() in resolved.parents:
            raise UserError(f"{option} {output} is inside the image folder {folder}; choose a place outside it")


# Locked beyond anything written, as Windows' locks keep other processes from reading the locked bytes.
WINDOWS_LOCK_OFFSET = 2**20


def lock(handle, wait):
    """Lock an open file for this process; return False if another process holds it and `wait` is False.

    The operating system releases the lock when the process ends, however it ends.
    """
    while not lock_at_once(handle):
        if not wait:
            return False
        time.sleep(0.1)
    return True


def lock_at_once(handle):
    """Try once to lock an open file: flock on Linux and macOS, msvcrt's byte lock on Windows."""
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(WINDOWS_LOCK_OFFSET)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # Another process holds it (Linux and macOS).
        return False
    except OSError as error:
        if os.name == "nt":  # Another process holds it (Windows says so with a PermissionError).
            return False
        # Some network file systems cannot lock at all: go on without the lock, and say so.
        print(f"warning: cannot lock {handle.name} ({error.strerror}); make sure no other run writes there", file=sys.stderr)
    return True


@contextlib.contextmanager
def locked(lock_file):
    """Hold lock_file's lock while the block runs, waiting for it if another process holds it."""
    with open(lock_file, "a") as handle:
        lock(handle, wait=True)
        yield


# A run's lock file, in OUTPUT_DIR/<model>/; it holds who runs there.
RUN_LOCK = ".lock"


def pictures_lock_file(folder):
    """The lock of a folder of --annotate or --gradcam pictures, which is the user's own folder:
    kept in the system's temporary folder, so that the folder holds only its pictures.

    It is named after the folder's whole resolved path, so that two runs given the same
    folder by different paths (a link, a relative path) take the same lock. Where all users
    share the temporary folder (Linux), the user's id is part of the name too, as a lock
    file made by one user could not be opened by another: two users writing into one
    folder at once are not kept apart.
    """
    owner = str(os.getuid()) if hasattr(os, "getuid") else ""
    digest = hashlib.sha256(os.fsencode(f"{owner}:{Path(folder).resolve()}")).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"deepfake-predict-{digest}.lock"


@contextlib.contextmanager
def one_run_at_a_time(folder, option="--output-dir", lock_file=None):
    """Let one run at a time write into `folder`: a second one stops at once, and names the first; `option` names the folder.

    The lock file, the folder's RUN_LOCK unless `lock_file` names another, holds who runs
    there while they do, and is emptied when they end. A run killed before it could empty
    it leaves its name behind, but not its lock, which the operating system releases: the
    next run takes the folder over, and says so.
    """
    lock_file = Path(lock_file) if lock_file else folder / RUN_LOCK
    lock_file.touch()
    with open(lock_file, "r+") as handle:
        if not lock(handle, wait=False):
            handle.seek(0)
            holder = handle.read().strip() or "another run"
            raise UserError(f"{folder} is in use by {holder}; wait for that run to end, or give this one another {option}")
        handle.seek(0)
        left_behind = handle.read().strip()
        if left_behind:
            print(f"Taking over {folder} from a run that ended without releasing it ({left_behind})")
        command = " ".join([Path(sys.executable).name, *sys.argv])
        write_lock_holder(handle, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}: {command}")
        try:
            yield
        finally:
            # Emptied, not deleted: a run that has just opened the file must lock this same file.
            write_lock_holder(handle, "")


def open_alone(path, option):
    """Open a file to write it anew, once no other run writes it: a second one stops at once; `option` names the file.

    The file itself is locked, so that no lock file is left beside it; it is left as it
    was until the caller empties it (`start_anew`), once the run is sure to write it.
    """
    handle = open(path, "a+", newline="", **TEXT_ENCODING)
    if not lock(handle, wait=False):
        handle.close()
        raise UserError(f"{option} {path} is being written by another run; wait for it to end, or name another file")
    return handle


def start_anew(handle):
    """Empty a file that open_alone opened (a device or a pipe cannot be emptied, nor needs to be)."""
    if Path(handle.name).is_file():
        handle.seek(0)
        handle.truncate()


def write_lock_holder(handle, holder):
    """Replace what the lock file says about who holds it; on a full disk it says nothing, and the lock still holds."""
    with contextlib.suppress(OSError):
        os.ftruncate(handle.fileno(), 0)
        os.lseek(handle.fileno(), 0, os.SEEK_SET)
        os.write(handle.fileno(), holder.encode())


# ---------------------------------------------------------------------------
# python data_preprocessing.py
# ---------------------------------------------------------------------------


@exits_on_user_error
def main(argv=None):
    parser = OneLineArgumentParser(
        description="Find the dataset, decode every image once, and print how many images each split and "
        "class holds. Bad files are listed by path, never moved or deleted, and the exit status is then 1. "
        "It writes only its cache of verdicts, in OUTPUT_DIR/.cache/, so that the scripts start at once."
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--sample-media", type=Path, metavar="DIR",
        help="write a photo with a face (astronaut.jpg), one without (coffee.jpg) and a 10-second clip (clip.mp4) "
        "into DIR, to try --predict on, and check no dataset",
    )
    args = resolve_data_options(parser.parse_args(argv))
    if args.sample_media:
        ensure_writable_folder(args.sample_media, "--sample-media")
        for path in write_sample_media(args.sample_media):
            print(f"Wrote {path}")
        return 0
    if args.uses_demo_data:
        ensure_demo_dataset(args.data_dir)

    split_root = find_split_root(args.data_dir)
    # Count even a class with no readable image, so that every bad file gets listed.
    dataset = load_dataset(split_root, args.output_dir / ".cache", args.subset, args.seed, require_every_class=False)
    print(f"Dataset: {split_root}")
    print(f"{'split':<6} {'real':>7} {'fake':>7}")
    for split in SPLITS:
        print(f"{split:<6} {dataset.count(split, 'real'):>7} {dataset.count(split, 'fake'):>7}")
    if dataset.bad_files:
        print(f"{len(dataset.bad_files)} bad files, left out of training:")
        for path, problem in sorted(dataset.bad_files.items()):
            print(f"  {path}: {problem}")
        return 1
    print("Every image decodes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
