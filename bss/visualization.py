"""Pictures: image | truth | prediction overlays (the loop's metric plot is bss.search.report.plot)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from bss.data.io import write_image

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


def overlay_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: str | Path, gap: int = 4) -> Path:
    """Write a PNG with one row per sample: image | truth (green) | prediction (red)."""
    if not rows:
        raise ValueError("no samples to draw")
    tiles = []
    for rgb, truth, pred in rows:
        panels = [rgb, tint(rgb, truth, TRUTH_COLOUR), tint(rgb, pred, PRED_COLOUR)]
        spacer = np.full((rgb.shape[0], gap, 3), 255, dtype=np.uint8)
        tiles.append(np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1))
    width = max(t.shape[1] for t in tiles)
    spaced = []
    for tile in tiles:
        tile = np.pad(tile, ((0, gap), (0, width - tile.shape[1]), (0, 0)), constant_values=255)
        spaced.append(tile)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, np.concatenate(spaced, axis=0))
    return path


def overlay_rows(predict, data, samples: int, threshold: float) -> list[tuple]:
    """(image, truth, prediction) of the first ``samples`` items of ``data``; ``predict`` maps a
    normalised batch (1, 3, H, W) on the CPU to the foreground probability (H, W) as numpy."""
    from bss.data.segmentation_dataset import denormalize

    rows = []
    for index in range(min(samples, len(data))):
        image, mask = data[index]
        rows.append((denormalize(image), mask[0].numpy() > 0.5, predict(image[None]) > threshold))
    return rows
