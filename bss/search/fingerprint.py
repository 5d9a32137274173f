"""A dataset's fingerprint, and the settings the loop derives from it (as nnU-Net plans a
configuration from the data): the images' median shape, how thin the defects are and how small
the objects are, all in native pixels. :mod:`bss.search.plan` turns it into the scale, the frame
and the network input (patches or whole frames).

The training budget itself is in optimizer steps (the config's ``train_steps``, at least
``epochs`` passes), so it needs no fingerprint: 72 images and 5,000 are both trained enough.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from bss.data.io import image_size, is_image, read_mask

LONG_SIDE = 160  # a whole frame's longer side on a CPU (bss.search.plan.WHOLE_SIDE)
SAMPLE = 200  # image headers (and masks) read for each median
MIN_AREA = 4  # mask components smaller than this (pixels) are rasterisation specks, not defects


def median_shape(images: Path, sample: int = SAMPLE) -> tuple[int, int]:
    """Median (height, width) of up to ``sample`` images of a folder (headers only)."""
    shapes = [image_size(p) for p in spread(sorted(p for p in Path(images).iterdir() if is_image(p)), sample)]
    return int(statistics.median(h for h, _ in shapes)), int(statistics.median(w for _, w in shapes))


def input_size(shape: tuple[int, int], long_side: int = LONG_SIDE) -> list[int]:
    """[height, width], multiples of 32, the longer side ``long_side``, the aspect ratio kept."""
    h, w = shape
    scale = long_side / max(h, w)
    return [max(32, int(round(h * scale / 32)) * 32), max(32, int(round(w * scale / 32)) * 32)]


def spread(paths: list[Path], sample: int = SAMPLE) -> list[Path]:
    """Up to ``sample`` of ``paths``, evenly spread (a sorted folder's first files may all be alike)."""
    return paths[:: max(1, len(paths) // sample)][:sample]


def _components(mask: np.ndarray):
    """(labels, count, stats, kept) of a binary mask's 8-connected components; ``kept`` leaves out
    the specks (under MIN_AREA pixels)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA]
    return labels, n, stats, keep


def thicknesses(mask: np.ndarray) -> list[float]:
    """Each defect's thickness in pixels: 2 x the largest distance of its pixels to the background,
    less 1 (the distance runs between pixel centres, so a 1-px line is 1 from the background and
    a 3-px line's centre is 2): a crack's width, a blob's diameter."""
    import cv2

    labels, n, _, keep = _components(mask)
    if not keep:
        return []
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    largest = np.zeros(n, dtype=np.float32)
    inside = labels > 0
    np.maximum.at(largest, labels[inside], distance[inside])
    return [float(2 * largest[i] - 1) for i in keep]


def box_sizes(mask: np.ndarray) -> list[float]:
    """The size, in pixels, of each box of a box mask (each connected component's bounding box):
    the square root of its area, so a 20x20 box is 20 px and a long thin one (a scratch's, 10x100)
    is 32 px: thinness is the thickness measure's business, smallness this one's."""
    import cv2

    _, _, stats, keep = _components(mask)
    return [float(np.sqrt(stats[i, cv2.CC_STAT_WIDTH] * stats[i, cv2.CC_STAT_HEIGHT])) for i in keep]


def measure(masks: Iterable[Path], measure_one, sample: int = SAMPLE) -> tuple[float | None, int]:
    """(median over every component of up to ``sample`` masks, components): None where no mask holds one."""
    values = [v for path in spread(sorted(masks), sample) for v in measure_one(read_mask(path))]
    return (round(float(statistics.median(values)), 1) if values else None), len(values)


@dataclass
class Fingerprint:
    """What the loop plans from the data: the images' median shape and the network input at
    today's whole-frame size, and (since issue 19) the defects' median thickness in the hand
    labels and the boxes' median size, in native pixels (None: not measured, an older run,
    or no defect found)."""

    median_shape: list  # [height, width]
    input_size: list  # [height, width], multiples of 32: the whole frame at LONG_SIDE
    thickness: float | None = None  # median over hand-labelled components (native px)
    box_size: float | None = None  # median size (square root of the area) of the box-only images' boxes (native px)
    defects: int | None = None  # components the thickness was measured on
    boxes: int | None = None  # boxes the size was measured on

    def describe(self, space_sets_size: bool, planned: bool = False) -> str:
        """One line; with ``planned`` (the plan's lines follow, with its input) no input size."""
        sized = "the search space's" if space_sets_size else f"[{self.input_size[0]}, {self.input_size[1]}] (from the images' shape)"
        line = f"images: median {self.median_shape[1]}x{self.median_shape[0]} (WxH)"
        if self.thickness is not None:
            line += f"; defects: median thickness {self.thickness:g} px ({self.defects} defects in the hand labels)"
        if self.box_size is not None:
            line += f"; boxes: median size {self.box_size:g} px ({self.boxes} boxes)"
        return line if planned else line + f"; whole-frame network input {sized}"


def fingerprint(source: Path, hand_masks: Path | None = None, box_masks: Iterable[Path] = ()) -> Fingerprint:
    """The fingerprint of the source dataset ``source``: its images' shape, the defects' thickness
    in the hand masks of ``hand_masks`` (a folder, e.g. ``NAME_BASELINE/masks``: exact shapes, not
    boxes) and the size of the boxes of ``box_masks`` (the box-only images' masks)."""
    shape = median_shape(Path(source) / "images")
    hand = sorted(p for p in Path(hand_masks).iterdir() if is_image(p)) if hand_masks and Path(hand_masks).is_dir() else []
    thickness, defects = measure(hand, thicknesses)
    side, boxes = measure(list(box_masks), box_sizes)
    return Fingerprint(list(shape), input_size(shape), thickness, side, defects or None, boxes or None)
