"""Images stored sideways with an EXIF Orientation tag are read as they are shown (as VIA, browsers
and cv2.imread show them): hand polygons drawn in VIA on the turned picture, box masks, the cache
and predict's outputs all line up with the picture's pixels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_source_dataset, run_driver, tiny_config_dict
from PIL import Image

from bss.config import from_dict
from bss.data.io import image_size, read_image, read_mask, write_mask
from bss.data.segmentation_dataset import SegmentationDataset
from bss.data.splits import make_splits
from bss.data.via import write_via_csv
from bss.predict import predict_folder
from bss.training.trainer import Trainer

SHOWN = (48, 64)  # (height, width) of every picture as shown
STORE = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # shown -> stored pixels


def write_turned_jpeg(path, shown_rgb: np.ndarray, orientation: int) -> None:
    """Save ``shown_rgb`` as a JPEG whose stored pixels, turned by its EXIF ``orientation``, show it."""
    im = Image.fromarray(shown_rgb)
    if STORE[orientation] is not None:
        im = im.transpose(STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, quality=95, exif=exif.tobytes())


def picture(k: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A dark picture (as shown) with a bright square off the centre, and the square (x0, y0, x1, y1)."""
    h, w = SHOWN
    rgb = np.full((h, w, 3), 30, np.uint8)
    x0, y0 = 4 + 3 * k, 5 + 2 * k  # near the top left: any turn moves it
    x1, y1 = x0 + 14, y0 + 10
    rgb[y0 : y1 + 1, x0 : x1 + 1] = 230
    return rgb, (x0, y0, x1, y1)


def make_turned_dataset(root, stored_box_for: int | None = None):
    """A dataset of JPEGs with orientations 1, 3, 6, 8 (all hand-labelled) and two box-only ones;
    polygons and box masks are drawn on the pictures as shown. ``stored_box_for``: that image's
    box mask is drawn on its stored (unturned) pixels instead."""
    folder = root / "turned"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows, squares = {}, {}
    for k, o in enumerate((1, 3, 6, 8, 6, 8)):
        name = f"frame_{k}_o{o}.jpg"
        rgb, (x0, y0, x1, y1) = picture(k)
        write_turned_jpeg(folder / "images" / name, rgb, o)
        box = np.zeros(SHOWN, np.uint8)
        box[max(0, y0 - 2) : y1 + 3, max(0, x0 - 2) : x1 + 3] = 1
        if k == stored_box_for:
            box = np.asarray(Image.fromarray(box).transpose(STORE[o]))
        write_mask(folder / "masks" / f"frame_{k}_o{o}.png", box)
        polygon = {"name": "polygon", "all_points_x": [x0, x1, x1, x0], "all_points_y": [y0, y0, y1, y1]}
        rows[name] = [polygon] if k < 4 else []
        squares[name] = (x0, y0, x1, y1)
    write_via_csv(folder / "labels.csv", rows)
    return folder, squares


def square_mask(square) -> np.ndarray:
    x0, y0, x1, y1 = square
    out = np.zeros(SHOWN, np.uint8)
    out[y0 : y1 + 1, x0 : x1 + 1] = 1
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max(1, (a | b).sum()))


def bright(rgb: np.ndarray) -> np.ndarray:
    return (rgb.mean(axis=2) > 130).astype(np.uint8)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_read_image_and_image_size_apply_the_orientation(tmp_path, orientation):
    rgb, square = picture(1)
    write_turned_jpeg(tmp_path / "a.jpg", rgb, orientation)
    shown = read_image(tmp_path / "a.jpg")
    assert shown.shape[:2] == SHOWN and image_size(tmp_path / "a.jpg") == SHOWN
    assert iou(bright(shown), square_mask(square)) > 0.95
    stored = image_size(tmp_path / "a.jpg", stored=True)
    assert stored == (SHOWN if orientation == 3 else SHOWN[::-1])


def test_preprocess_draws_hand_masks_on_the_picture_as_shown(tmp_path):
    root = tmp_path / "datasets"
    folder, squares = make_turned_dataset(root)
    run = run_driver("preprocess.py", "--dataset", "turned", "--data-root", root, "--fractions", "0.5", "0.25", "0.25")
    assert run.returncode == 0, run.stderr
    seen = set()
    for split in ("BASELINE", "EVAL", "TEST"):
        for image in sorted((root / f"turned_{split}" / "images").iterdir()):
            mask = read_mask(root / f"turned_{split}" / "masks" / f"{image.stem}.png")
            rgb = read_image(image)
            assert mask.shape == rgb.shape[:2] == SHOWN
            assert iou(bright(rgb), mask) > 0.95, image.name  # the polygon lies on the bright square
            seen.add(image.name)
    assert seen == {n for n in squares if int(n.split("_")[1]) < 4}
    # the training data (decoded once into the cache, resized) is aligned too
    dataset = SegmentationDataset(root / "turned_BASELINE", SHOWN, cache=True, cache_dir=tmp_path / "cache")
    for i in range(len(dataset)):
        rgb, mask = dataset.load(i)
        assert iou(bright(rgb), mask) > 0.95


def test_box_mask_of_the_stored_pixels_is_refused_by_name(tmp_path):
    root = tmp_path / "datasets"
    folder, _ = make_turned_dataset(root, stored_box_for=2)  # orientation 6: stored 48 wide, 64 high
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    run = run_driver("preprocess.py", "--dataset", "turned", "--data-root", root)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "frame_2_o6.png" in lines[0] and "48x64" in lines[0] and "64x48" in lines[0] and "EXIF orientation 6" in lines[0]
    assert sorted(p.name for p in root.iterdir()) == ["turned"]  # no split written
    assert before == {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_predict_outputs_follow_the_picture_as_shown(tmp_path):
    root = tmp_path / "datasets"
    make_source_dataset(root, n=6, labelled=5, size=(32, 32))
    make_splits("toy", root, progress=False)
    checkpoint = Trainer(from_dict(tiny_config_dict(root, tmp_path, epochs=1, visualization_samples=0)), progress=False).fit().checkpoint
    images = tmp_path / "new"
    images.mkdir()
    squares = {}
    for k, o in enumerate((3, 6, 8)):
        rgb, squares[f"n{o}"] = picture(k)
        write_turned_jpeg(images / f"n{o}.jpg", rgb, o)
    out = tmp_path / "out"
    predict_folder(checkpoint, images, out, probabilities=True, progress=False)
    for stem, square in squares.items():
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        prob = np.asarray(Image.open(out / "probabilities" / f"{stem}.png"))
        overlay = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        assert mask.shape == prob.shape == SHOWN and overlay.shape == SHOWN + (3,)
        shown = read_image(images / f"{stem}.jpg")
        outside = mask == 0
        assert np.array_equal(overlay[outside], shown[outside])  # the overlay is drawn on the picture as shown
        untinted = np.where(outside[..., None], overlay, shown)
        assert iou(bright(untinted), square_mask(square)) > 0.95  # its bright square is where the polygon would be
