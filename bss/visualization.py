"""Pictures: image | truth | prediction overlays (the loop's metric plot is bss.search.report.plot)."""

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
    height, width = max(p.shape[0] for r in rows for p in r), max(p.shape[1] for r in rows for p in r)
    columns = max(len(r) for r in rows)
    bar = 18
    sheet = np.full((bar + len(rows) * (height + gap) + (bar if caption else 0), columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for c, header in enumerate(headers):
        _text(sheet, header, (c * (width + gap) + 2, bar - 5))
    for r, panels in enumerate(rows):
        top = bar + r * (height + gap)
        for c, panel in enumerate(panels):
            left = c * (width + gap)
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


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks (1.0 when both are empty)."""
    return float(iou_from_counts(mask_counts(a, b)))


def overlay_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path, caption: str = "", gap: int = 4) -> Path:
    """One row per sample: image | truth (green) | prediction (red), with the per-image IoU."""
    panels = [[rgb, tint(rgb, truth, TRUTH_COLOUR), tint(rgb, pred, PRED_COLOUR)] for rgb, truth, pred in rows]
    labels = [["", "", f"IoU {mask_iou(truth, pred):.2f}"] for _, truth, pred in rows]
    return image_grid(panels, path, headers=["image", "truth", "prediction"], labels=labels, caption=caption, gap=gap)


def overlay_rows(predict, data, samples: int, threshold: float) -> list[tuple]:
    """(image, truth, prediction) of the first ``samples`` items of ``data``; ``predict`` maps a
    normalised batch (1, 3, H, W) on the CPU to the foreground probability (H, W) as numpy."""
    from bss.data.segmentation_dataset import denormalize

    rows = []
    for index in range(min(samples, len(data))):
        image, mask = data[index]
        rows.append((denormalize(image), mask[0].numpy() > 0.5, predict(image[None]) > threshold))
    return rows
