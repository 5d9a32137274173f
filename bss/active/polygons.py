"""A binary mask -> simplified polygons that VIA can draw and a user can correct.

Each outer contour of the mask (OpenCV ``findContours``, ``RETR_EXTERNAL``) becomes one
polygon, simplified with ``cv2.approxPolyDP``: the tolerance starts at ``epsilon`` pixels and
doubles until the polygon has at most ``max_points`` points (so a ragged mask still gives a
polygon that can be edited by hand). Components smaller than ``min_area`` pixels are dropped
(specks the user would only have to delete). Holes cannot be expressed as VIA polygons (an
image's hand mask is the union of its regions), so they are filled: the polygons describe the
mask with its holes filled. ``epsilon = 0`` and ``max_points = 0`` keep every contour point
(an exact outline, for tests and the simulated annotator).

Points are pixel corners as VIA and :func:`bss.data.via.rasterize` use them: the contour of
pixel centres, which ``cv2.fillPoly`` fills back to the same pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_EPSILON = 1.0  # pixels
DEFAULT_MAX_POINTS = 40
DEFAULT_MIN_AREA = 6  # pixels


def mask_to_polygons(mask: np.ndarray, epsilon: float = DEFAULT_EPSILON, max_points: int = DEFAULT_MAX_POINTS, min_area: int = DEFAULT_MIN_AREA) -> list[dict]:
    """VIA polygon shape attributes (``{"name": "polygon", "all_points_x": [...], "all_points_y": [...]}``),
    one per outer contour, largest first."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    shapes = []
    for contour in sorted(contours, key=lambda c: -cv2.contourArea(c)):
        if _fill(contour, binary.shape).sum() < max(1, min_area):
            continue
        points = contour
        if epsilon > 0 or max_points > 0:
            tol = max(float(epsilon), 0.5)
            points = cv2.approxPolyDP(contour, tol, True)
            while max_points > 0 and len(points) > max_points:
                tol *= 2.0
                points = cv2.approxPolyDP(contour, tol, True)
        points = points.reshape(-1, 2)
        if len(points) < 3:  # a thin line or a dot: its bounding rectangle's corner pixels
            x, y, w, h = cv2.boundingRect(contour)
            points = np.array([[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]])
        shapes.append({"name": "polygon", "all_points_x": [int(v) for v in points[:, 0]], "all_points_y": [int(v) for v in points[:, 1]]})
    return shapes


def _fill(contour: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [contour], 1)
    return out


def draw_polygons(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """The union of polygon shapes as a 0/1 uint8 mask (as :func:`bss.data.via.rasterize` draws them)."""
    out = np.zeros((height, width), np.uint8)
    for s in shapes:
        pts = np.stack([s["all_points_x"], s["all_points_y"]], axis=1)
        cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out
