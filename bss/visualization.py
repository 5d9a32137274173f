"""Pictures: image | truth | prediction overlays (the loop's metric plot is bss.search.report.plot).

Whole frames are drawn as thumbnails (long side at most :data:`THUMBNAIL`). Where a defect is
small against its frame (a few pixels of a 1540x645 photo), a thumbnail cannot show whether its
mask is good, so each row also gets *crops* around the defect at native resolution (enlarged
with nearest-neighbour, so pixels stay visible), and the crop's place is outlined on the
thumbnails (:func:`with_crops`).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from bss.data.io import write_image
from bss.metrics import iou_from_counts, mask_counts

TRUTH_COLOUR = np.array([0, 255, 0], dtype=np.float32)
PRED_COLOUR = np.array([255, 40, 40], dtype=np.float32)


def tint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``rgb`` with ``mask`` pixels blended towards ``colour`` and the mask outline drawn."""
    out = rgb.astype(np.float32)
    sel = mask.astype(bool)
    out[sel] = (1 - alpha) * out[sel] + alpha * colour
    out = np.ascontiguousarray(out.astype(np.uint8))
    contours, _ = cv2.findContours(sel.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4, colour=(0, 0, 0), background=None) -> None:
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = origin
    if background is not None:
        cv2.rectangle(image, (x - 2, y - h - 2), (x + w + 2, y + base), background, -1)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def image_grid(
    rows: list[list[np.ndarray]], path: str | Path, headers: list[str] = (), labels: list[list[str]] | None = None, caption: str = "", gap: int = 4
) -> Path:
    """A PNG of ``rows`` of RGB panels, a header over each column, a label in the corner of each
    panel (``labels[row][column]``, "" for none) and a caption line at the bottom."""
    if not rows:
        raise ValueError("no samples to draw")
    height = max(p.shape[0] for r in rows for p in r)
    widths = [max(r[c].shape[1] for r in rows if c < len(r)) for c in range(max(len(r) for r in rows))]  # each column as wide as its widest panel
    lefts = [sum(widths[:c]) + c * gap for c in range(len(widths))]
    bar = 18
    sheet = np.full((bar + len(rows) * (height + gap) + (bar if caption else 0), lefts[-1] + widths[-1], 3), 255, dtype=np.uint8)
    for c, header in enumerate(headers):
        _text(sheet, header, (lefts[c] + 2, bar - 5))
    for r, panels in enumerate(rows):
        top = bar + r * (height + gap)
        for c, panel in enumerate(panels):
            left = lefts[c]
            sheet[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
            label = labels[r][c] if labels and c < len(labels[r]) else ""
            if label:
                _text(sheet, label, (left + 3, top + 13), colour=(255, 255, 255), background=(0, 0, 0))
    if caption:
        _text(sheet, caption, (2, sheet.shape[0] - 5))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, sheet)
    return path


THUMBNAIL = 320  # long side of a whole-frame panel
CROP = 160  # side of a crop panel
SMALL = 0.25  # a defect whose bounding box's long side is below this share of the frame's short side gets crops
CROP_COLOUR = (255, 160, 0)


def thumbnail(panel: np.ndarray, long_side: int = THUMBNAIL) -> np.ndarray:
    """``panel`` shrunk (area) so that its long side is at most ``long_side``; small panels unchanged."""
    scale = long_side / max(panel.shape[:2])
    if scale >= 1:
        return panel
    return cv2.resize(panel, (max(1, round(panel.shape[1] * scale)), max(1, round(panel.shape[0] * scale))), interpolation=cv2.INTER_AREA)


def defect_window(focus: np.ndarray, margin: float = 1.0, min_side: int = 32) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a square window around the largest connected component of
    ``focus`` (its bounding box grown by ``margin`` times its size on each side, at least
    ``min_side``, inside the frame), or None when ``focus`` is empty or the defect is not small
    against the frame (see :data:`SMALL`): then the thumbnail shows it well enough."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(focus.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    height, width = focus.shape
    if max(w, h) >= SMALL * min(height, width):
        return None
    side = min(max(min_side, round(max(w, h) * (1 + 2 * margin))), height, width)
    top = min(max(0, y + h // 2 - side // 2), height - side)
    left = min(max(0, x + w // 2 - side // 2), width - side)
    return top, top + side, left, left + side


def crop_panel(panel: np.ndarray, window: tuple[int, int, int, int], side: int = CROP) -> np.ndarray:
    """The ``window`` of ``panel`` at native resolution, enlarged (nearest) to ``side`` x ``side``."""
    top, bottom, left, right = window
    return cv2.resize(panel[top:bottom, left:right], (side, side), interpolation=cv2.INTER_NEAREST)


def outline(panel: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = window
    out = np.ascontiguousarray(panel.copy())
    cv2.rectangle(out, (left, top), (right - 1, bottom - 1), CROP_COLOUR, max(1, round(max(panel.shape[:2]) / THUMBNAIL)))
    return out


def with_crops(
    rows: list[list[np.ndarray]], focus: list[np.ndarray], headers: list[str], crop_columns: list[int]
) -> tuple[list[list[np.ndarray]], list[str], bool]:
    """Rows of whole-frame panels -> thumbnails, plus crops of columns ``crop_columns`` around the
    defect of each row's ``focus`` mask where it is small against the frame (see
    :func:`defect_window`). Returns the rows, the headers (crop columns named "<header> (crop)")
    and whether any row got crops. Rows without a small defect get blank crop panels."""
    windows = [defect_window(f) for f in focus]
    cropped = any(w is not None for w in windows)
    out = []
    blank = np.full((CROP, CROP, 3), 255, dtype=np.uint8)
    for panels, window in zip(rows, windows):
        panels = list(panels) + [np.full_like(panels[0], 255)] * (len(headers) - len(panels))  # a row without truth: blank truth
        whole = [thumbnail(outline(p, window) if window else p) for p in panels]
        if cropped:
            whole += [crop_panel(panels[c], window) if window else blank for c in crop_columns]
        out.append(whole)
    if cropped:
        headers = list(headers) + [f"{headers[c]} (crop)" for c in crop_columns]
    return out, list(headers), cropped


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks (1.0 when both are empty)."""
    return float(iou_from_counts(mask_counts(a, b)))


def overlay_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path, caption: str = "", gap: int = 4) -> Path:
    """One row per sample: image | truth (green) | prediction (red), with the per-image IoU; where
    the truth is small against the frame, crops of truth and prediction around it (:func:`with_crops`)."""
    panels = [[rgb, tint(rgb, truth, TRUTH_COLOUR), tint(rgb, pred, PRED_COLOUR)] for rgb, truth, pred in rows]
    panels, headers, _ = with_crops(panels, [truth if truth.any() else pred for _, truth, pred in rows], ["image", "truth", "prediction"], [1, 2])
    labels = [["", "", f"IoU {mask_iou(truth, pred):.2f}"] for _, truth, pred in rows]
    return image_grid(panels, path, headers=headers, labels=labels, caption=caption, gap=gap)


def overlay_rows(predict, data, samples: int, threshold: float) -> list[tuple]:
    """(image, truth, prediction) of the first ``samples`` items of ``data``; ``predict`` maps a
    normalised batch (1, 3, H, W) on the CPU to the foreground probability (H, W) as numpy."""
    from bss.data.segmentation_dataset import denormalize

    rows = []
    for index in range(min(samples, len(data))):
        image, mask = data[index]
        rows.append((denormalize(image), mask[0].numpy() > 0.5, predict(image[None]) > threshold))
    return rows
