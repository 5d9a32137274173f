"""Sheets a person can judge: small defects in large frames get native-resolution crops."""

from __future__ import annotations

import numpy as np
from PIL import Image

from bss.visualization import CROP, THUMBNAIL, TRUTH_COLOUR, defect_window, overlay_grid, tint, with_crops


def _frame(height=600, width=900, seed=0):
    return np.random.default_rng(seed).integers(60, 120, (height, width, 3), dtype=np.uint8)


def _green(panel: np.ndarray) -> np.ndarray:
    """Pixels tinted towards the truth colour (green well above red and blue)."""
    p = panel.astype(int)
    return (p[..., 1] > p[..., 0] + 60) & (p[..., 1] > p[..., 2] + 60)


def test_defect_window_centres_a_small_defect_and_skips_a_large_one():
    focus = np.zeros((600, 900), bool)
    focus[300:306, 700:706] = True
    top, bottom, left, right = defect_window(focus)
    assert bottom - top == right - left == 32  # 6 px grown by its size each side, at least 32
    assert top <= 300 and bottom >= 306 and left <= 700 and right >= 706
    big = np.zeros((600, 900), bool)
    big[100:400, 100:500] = True
    assert defect_window(big) is None
    assert defect_window(np.zeros((60, 90), bool)) is None
    edge = np.zeros((600, 900), bool)
    edge[0:4, 896:900] = True  # at the corner: the window stays inside the frame
    top, bottom, left, right = defect_window(edge)
    assert (top, right) == (0, 900) and bottom - top == 32


def test_crops_show_a_small_defect_the_thumbnail_cannot(tmp_path):
    rgb = _frame()
    truth = np.zeros(rgb.shape[:2], bool)
    truth[300:306, 700:706] = True
    rows, headers, cropped = with_crops([[rgb, tint(rgb, truth, TRUTH_COLOUR)]], [truth], ["image", "truth"], [1])
    assert cropped and headers == ["image", "truth", "truth (crop)"]
    thumb, crop = rows[0][1], rows[0][2]
    assert max(thumb.shape[:2]) == THUMBNAIL and crop.shape == (CROP, CROP, 3)
    assert _green(crop).mean() > 20 * _green(thumb).mean() > 0  # the crop shows the defect at 5x
    path = overlay_grid([(rgb, truth, truth)], tmp_path / "overlays.png")
    sheet = np.asarray(Image.open(path))
    assert sheet.shape[1] == 3 * (THUMBNAIL + 4) + 2 * (CROP + 4) - 4  # 3 thumbnails + 2 crops


def test_frames_with_large_defects_keep_the_whole_frame_sheet(tmp_path):
    rgb = _frame(192, 256)
    truth = np.zeros(rgb.shape[:2], bool)
    truth[40:140, 60:200] = True
    rows, headers, cropped = with_crops([[rgb, rgb]], [truth], ["image", "truth"], [1])
    assert not cropped and headers == ["image", "truth"]
    assert rows[0][0].shape == rgb.shape and np.array_equal(rows[0][0], rgb)  # small frames: as they are
