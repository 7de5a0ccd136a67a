"""The figures explain themselves: the kept epoch, whole-epoch ticks, warmup shading,
readable Grad-CAM overlays and titles that fit, each checked on tiny data made here."""

import math

import cv2
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import pytest

import plot_loss_accuracy_graph as figures
from data_augmentation import Face, FaceFrame, in_reading_order, read_upright


def make_history(val_losses, phases=None):
    """A history.csv's rows, as read_history returns them, with the given val_loss per epoch."""
    epoch_count = len(val_losses)
    history = pd.DataFrame(
        {
            "epoch": range(epoch_count),
            "accuracy": np.linspace(0.6, 0.9, epoch_count),
            "loss": np.linspace(0.7, 0.3, epoch_count),
            "val_accuracy": np.linspace(0.55, 0.85, epoch_count),
            "val_loss": val_losses,
            "seconds": 1.0,
        }
    )
    if phases is not None:
        history["phase"] = phases
    return history


def read_png(path):
    """The pixels of a PNG written by the module, failing if it is not one."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return image


# ---------------------------------------------------------------------------
# The training curves
# ---------------------------------------------------------------------------


def test_kept_epoch_is_the_first_lowest_val_loss():
    # Epochs 3 and 5 tie; ModelCheckpoint kept epoch 3, as only a lower val_loss replaces it.
    assert figures.kept_epoch(make_history([0.9, 0.5, 0.4, 0.6, 0.4])) == 3


def test_kept_epoch_ignores_nan():
    assert figures.kept_epoch(make_history([math.nan, 0.5, math.nan, 0.7])) == 2


def test_kept_epoch_is_none_when_no_val_loss_is_finite():
    assert figures.kept_epoch(make_history([math.nan, math.inf])) is None
    assert figures.kept_epoch(make_history([])) is None


@pytest.mark.parametrize(
    "history",
    [
        make_history([0.5]),
        make_history([0.6, 0.4, 0.5]),
        make_history([0.6, 0.5, 0.4, 0.45], phases=["warmup", "warmup", "fine-tune", "fine-tune"]),
        make_history([math.nan, math.nan]),
    ],
    ids=["one-epoch", "no-phase", "with-phase", "no-finite-val-loss"],
)
def test_plot_history_writes_a_png(tmp_path, history):
    path = figures.plot_history(history, tmp_path / "history.png", "VGG16")
    assert path == tmp_path / "history.png"
    height, width = read_png(path).shape[:2]
    assert (width, height) == (1200, 500)


@pytest.mark.parametrize("epoch_count", [1, 2, 7, 40])
def test_epoch_ticks_are_whole_epochs_from_one(epoch_count):
    figure = figures.history_figure(make_history(np.linspace(0.9, 0.2, epoch_count)), "VGG16")
    figure.canvas.draw()
    for axis in figure.axes:
        low, high = axis.get_xlim()
        shown_ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        labels = [label.get_text().replace("\N{MINUS SIGN}", "-") for label in axis.get_xticklabels()]
        assert shown_ticks, "no epoch has a tick"
        assert all(tick == int(tick) and 1 <= tick <= epoch_count for tick in shown_ticks)
        assert all(label.isdigit() for label in labels if label)
    plt.close(figure)


def test_history_marks_the_kept_epoch_and_shades_warmup():
    history = make_history([0.6, 0.5, 0.3, 0.4], phases=["warmup", "warmup", "fine-tune", "fine-tune"])
    figure = figures.history_figure(history, "VGG16")
    for axis in figure.axes:
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert "kept: epoch 3 (lowest val_loss)" in legend
        assert "warmup: head only" in legend
    plt.close(figure)


def test_history_without_phases_shades_nothing():
    figure = figures.history_figure(make_history([0.6, 0.5]), "VGG16")
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "warmup: head only" not in legend
    assert "kept: epoch 2 (lowest val_loss)" in legend
    plt.close(figure)


# ---------------------------------------------------------------------------
# Grad-CAM overlays
# ---------------------------------------------------------------------------


def write_grey_image(path, height, width):
    cv2.imwrite(str(path), np.full((height, width), 128, np.uint8))
    return path


def write_rgba_image(path, height, width):
    image = np.zeros((height, width, 4), np.uint8)
    image[..., :3] = 128
    image[..., 3] = 200
    cv2.imwrite(str(path), image)
    return path


@pytest.mark.parametrize(
    "write_image, height, width",
    [(write_grey_image, 20, 30), (write_rgba_image, 40, 40)],
    ids=["grey-20x30", "rgba-40x40"],
)
def test_gradcam_overlay_enlarges_small_images_and_draws_the_heat_map(tmp_path, write_image, height, width):
    image_path = write_image(tmp_path / "face.png", height, width)
    # A hot spot in one corner, on a small map, as a conv layer gives it.
    heatmap = np.zeros((7, 7))
    heatmap[:3, :3] = 1.0
    path = figures.save_gradcam_overlay(read_upright(image_path), heatmap, tmp_path / "overlay.png", 0.81414, "fake")
    assert path == tmp_path / "overlay.png"
    overlay = read_png(path).astype(int)
    assert max(overlay.shape[:2]) >= figures.SMALLEST_SHOWN_SIDE
    # The plain enlargement, with the same title and colour bar, differs only where the heat map is drawn.
    plain_path = figures.save_gradcam_overlay(read_upright(image_path), heatmap, tmp_path / "plain.png", 0.81414, "fake", opacity=0)
    plain = read_png(plain_path).astype(int)
    assert overlay.shape == plain.shape
    changed = np.abs(overlay - plain).max(axis=-1) > 20
    # The map covers the whole image, shown at least SMALLEST_SHOWN_SIDE on its longer side.
    assert changed.sum() > figures.SMALLEST_SHOWN_SIDE**2 / 2
    blue, red = overlay[..., 0], overlay[..., 2]
    hot = changed & (red - blue > 30)
    cold = changed & (blue - red > 30)
    assert hot.sum() > 1000 and cold.sum() > 1000, "the hot spot and the cold rest do not both show"


def test_a_flat_gradcam_map_says_in_words_that_nothing_raised_the_score(tmp_path, monkeypatch):
    figures_drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: figures_drawn.append(figure) or path)
    face = np.full((40, 40, 3), 128, np.uint8)
    # A face judged real, whose map of the evidence for real is zero everywhere.
    figures.save_gradcam_overlay(face, np.zeros((7, 7)), tmp_path / "flat.png", 0.09, "real", evidence_for="real")
    hot_spot = np.zeros((7, 7))
    hot_spot[3, 3] = 1.0
    figures.save_gradcam_overlay(face, hot_spot, tmp_path / "spot.png", 0.91, "fake", evidence_for="fake")
    (flat_image, flat_bar), (spot_image, spot_bar) = [figure.axes for figure in figures_drawn]
    assert [text.get_text() for text in flat_image.texts] == ["nothing here lowered p(fake)"]
    assert flat_bar.get_ylabel() == "Grad-CAM: share of the\nevidence for real"
    assert list(spot_image.texts) == [] and spot_bar.get_ylabel() == "Grad-CAM: share of the\nevidence for fake"
    for figure in figures_drawn:
        plt.close(figure)


def test_gradcam_overlay_keeps_enlarged_pixels_sharp(tmp_path):
    # A checkerboard of single black and white pixels turns grey wherever it is smoothed.
    checkerboard = np.indices((150, 200)).sum(axis=0) % 2 * 255
    image_path = tmp_path / "checkerboard.png"
    cv2.imwrite(str(image_path), checkerboard.astype(np.uint8))
    plain_path = figures.save_gradcam_overlay(read_upright(image_path), np.zeros((7, 7)), tmp_path / "plain.png", 0.5, "fake", opacity=0)
    plain = read_png(plain_path)
    grey = (plain.min(axis=-1) > 40) & (plain.max(axis=-1) < 215)
    # Only the antialiased edges of the text and colour bar may be grey, not the image's 49,000 pixels.
    assert grey.sum() < 5000


def test_gradcam_overlay_caps_the_size_of_large_images(tmp_path):
    image_path = write_grey_image(tmp_path / "large.png", 800, 1000)
    path = figures.save_gradcam_overlay(read_upright(image_path), np.ones((7, 7)), tmp_path / "overlay.png", 0.2, "real")
    # The image at most LARGEST_SHOWN_SIDE, plus the colour bar and the margins.
    assert max(read_png(path).shape[:2]) < figures.LARGEST_SHOWN_SIDE + 200


def test_a_large_image_is_drawn_from_a_copy_as_small_as_it_is_shown(tmp_path, monkeypatch):
    """Drawn whole, an 88-megapixel photo and its heat map took 6.7 GB to make a figure of 768 px."""
    drawn = []
    imshow = plt.Axes.imshow
    monkeypatch.setattr(plt.Axes, "imshow", lambda axis, image, **options: drawn.append(image.shape) or imshow(axis, image, **options))
    figures.save_gradcam_overlay(np.zeros((3000, 2000, 3), np.uint8), np.ones((7, 7)), tmp_path / "overlay.png", 0.2, "real")
    assert len(drawn) == 2 and max(max(shape[:2]) for shape in drawn) <= figures.LARGEST_SHOWN_SIDE


# ---------------------------------------------------------------------------
# Evaluation figures with long titles
# ---------------------------------------------------------------------------

LONG_TITLE = "VGG16 on faces-140k-sample, JPEG quality 75, blur 1.0"


def test_wrapped_title_keeps_what_the_figure_shows_on_its_own_line():
    title = figures.wrapped_title(LONG_TITLE, "ROC curve (fake is positive)", 40)
    lines = title.split("\n")
    assert len(lines) > 2
    assert all(len(line) <= 40 for line in lines)
    assert lines[-1] == "ROC curve (fake is positive)"
    assert figures.wrapped_title("VGG16", "ROC curve", 40) == "VGG16: ROC curve"


def test_long_evaluation_titles_fit_their_figures(tmp_path, monkeypatch):
    predictions = pd.DataFrame(
        {"path": [f"{index}.png" for index in range(8)], "label": ["fake", "real"] * 4, "p_fake": np.linspace(0, 1, 8)}
    )
    metrics = {"test_eer": 0.25, "confusion_matrix": [[3, 1], [1, 3]], "threshold": 0.5}
    # Keep each figure as it is saved, to measure its title.
    saved_figures = []
    save_figure = figures.save_figure

    def keep_and_save_figure(figure, path):
        saved_figures.append(figure)
        return save_figure(figure, path)

    monkeypatch.setattr(figures, "save_figure", keep_and_save_figure)
    paths = figures.plot_evaluation(predictions, metrics, tmp_path, LONG_TITLE)
    assert [path.name for path in paths] == list(figures.EVALUATION_PLOTS)
    expected = ["ROC curve", "precision-recall curve", "confusion matrix at p(fake) 0.5"]
    for figure, path, what in zip(saved_figures, paths, expected):
        read_png(path)
        title = figure.axes[0].title
        assert "\n" in title.get_text() and what in title.get_text()
        title_box = title.get_window_extent()
        figure_box = figure.bbox
        assert figure_box.x0 <= title_box.x0 and title_box.x1 <= figure_box.x1, f"{path.name}: title too wide"
        assert title_box.y1 <= figure_box.y1, f"{path.name}: title cut off at the top"


# --- The band of --predict's verdicts, from the validation split -----------------


def test_the_band_is_exactly_what_its_rule_gives():
    # 30 real faces at 0.00 to 0.29, then 20 in the middle at 0.40 to 0.59 (fake, real, fake,
    # ...), then 30 fake ones at 0.70 to 0.99.
    scores = [index / 100 for index in range(30)] + [0.40 + index / 100 for index in range(20)]
    scores += [0.70 + index / 100 for index in range(30)]
    labels = [0] * 30 + [1 - index % 2 for index in range(20)] + [1] * 30
    real_below, fake_from = figures.uncertain_band(np.array(labels), np.array(scores))
    # Below 0.42: 31 of 32 faces are real (0.969); below 0.43, 31 of 33 (0.939), under 0.95.
    # From 0.58: 31 of 32 are fake; from 0.57, 31 of 33.
    assert (real_below, fake_from) == (pytest.approx(0.42), pytest.approx(0.58))
    verdicts = figures.Verdicts(real_below, fake_from)
    assert [verdicts(score) for score in (0.41, real_below, 0.5, fake_from)] == ["real", "uncertain", "uncertain", "fake"]


def test_a_model_that_does_not_separate_the_classes_calls_every_face_uncertain():
    labels = np.array([0, 1] * 50)
    assert figures.uncertain_band(labels, np.full(100, 0.5)) == (None, None)
    # Too few faces on a side to set it, however pure they are.
    assert figures.uncertain_band(np.array([0] * 10 + [1] * 10), np.linspace(0, 1, 20)) == (None, None)
    assert figures.Verdicts(None, None)(0.99) == "uncertain"
    assert figures.Verdicts(0.5, 0.5)(0.5) == "fake" and figures.Verdicts(0.5, 0.5)(0.49) == "real"


@pytest.mark.parametrize(
    "band, sentence",
    [
        ((0.5, 0.5), "real where p(fake) is under 0.5, fake from 0.5 up"),
        ((0.151, 0.85), "real where p(fake) is under 0.151, fake where it is 0.850 or more, uncertain in between"),
        ((0.405, None), "real where p(fake) is under 0.405, uncertain above it (no score was high enough to call a validation face fake)"),
        ((None, 0.85), "fake where p(fake) is 0.850 or more, uncertain below it (no score was low enough to call a validation face real)"),
        ((None, None), "uncertain whatever the score, as the model's card gives no band; --threshold T gives real under T, fake from T up"),
    ],
)
def test_the_band_is_said_in_a_sentence_for_each_of_its_shapes(band, sentence):
    assert str(figures.Verdicts(*band)) == sentence


def test_the_ensembles_band_is_chosen_on_its_models_weighted_validation_scores(tmp_path):
    # Two models' validation scores: 30 real faces low, 30 fake ones high, each model noisier on one side.
    paths = [f"valid/{index}.jpg" for index in range(60)]
    labels = ["real"] * 30 + ["fake"] * 30
    first, second = tmp_path / "vgg16", tmp_path / "vgg19"
    rng = np.random.default_rng(0)
    scores = {}
    for folder, spread in ((first, 0.1), (second, 0.3)):
        folder.mkdir()
        scores[folder] = np.r_[rng.uniform(0, spread, 30), rng.uniform(1 - spread, 1, 30)]
        pd.DataFrame({"path": paths, "label": labels, "p_fake": scores[folder]}).to_csv(folder / figures.VALID_PREDICTIONS, index=False)
    band = figures.ensemble_band([first, second], [0.75, 0.25])
    averaged = 0.75 * scores[first] + 0.25 * scores[second]
    assert (band.real_below, band.fake_from) == figures.uncertain_band(np.array([0] * 30 + [1] * 30), averaged)
    assert band.real_below is not None and band.fake_from is not None
    # A model trained before valid_predictions.csv was kept: no band, and the words say what to do.
    (second / figures.VALID_PREDICTIONS).unlink()
    unbanded = figures.ensemble_band([first, second], [0.75, 0.25])
    assert unbanded.thresholds() == [] and str(unbanded).startswith(f"uncertain whatever the score, as {second} has no valid_predictions.csv")
    assert "train that model again" in str(unbanded)


def test_the_csv_columns_only_grow_at_the_end():
    assert figures.CSV_COLUMNS == (
        "path", "frame", "face", "crop_x", "crop_y", "crop_size", "mirrored", "confidence", "p_fake", "verdict", "note", "model",
    )


def test_faces_are_numbered_in_reading_order():
    """A 2x2 grid with uneven heights: face 1 top left, face 2 top right, then the bottom row."""
    def face(x, y, size=100):
        return Face(box=(x, y, size, size), confidence=0.99, landmarks={})

    bottom_left, top_right, top_left, bottom_right = face(0, 300), face(300, 30), face(10, 0, 140), face(320, 290)
    assert in_reading_order([bottom_left, top_right, top_left, bottom_right]) == [top_left, top_right, bottom_left, bottom_right]


def test_a_face_label_says_why_the_face_was_not_judged():
    frame = FaceFrame(50, 50, 40)
    assert figures.face_label(figures.FaceResult(1, face_frame=frame, p_fake=0.734)) == "p_fake 0.73"
    assert figures.face_label(figures.FaceResult(2, face_frame=frame, note=figures.FACE_TOO_SMALL)) == "too small"
    assert figures.face_label(figures.FaceResult(3, face_frame=frame, note=figures.FACE_AT_BORDER)) == "cut by the border"
    faceless = figures.PictureResult(None, [], figures.Verdicts(None, None), note=figures.NO_FACE)
    assert [figures.face_label(face) for face in figures.marks_of(faceless)] == ["no face found: not judged"]


def test_labels_of_faces_side_by_side_do_not_cover_each_other():
    taken, shape, size = [], (400, 600), (120, 20)
    for corner in ([100, 100], [110, 105], [105, 98]):
        x, y = figures.label_place(size, corner, taken, shape)
        assert not any(x < x1 and x0 < x + size[0] and y < y1 and y0 < y + size[1] for x0, y0, x1, y1 in taken)
        taken.append((x, y, x + size[0], y + size[1]))
    assert taken[0][:2] == (100, 80)  # The first stays just above its face.
