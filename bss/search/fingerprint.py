"""A dataset's fingerprint, and the settings the loop derives from it (as nnU-Net plans a
configuration from the data): the network input size keeps the images' aspect ratio.

The training budget itself is in optimizer steps (the config's ``train_steps``, at least
``epochs`` passes), so it needs no fingerprint: 72 images and 5,000 are both trained enough.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bss.data.io import image_size, is_image

LONG_SIDE = 160  # the input's longer side when the search space does not set image_size (CPU-sized)
SAMPLE = 200  # image headers read for the median shape


def median_shape(images: Path, sample: int = SAMPLE) -> tuple[int, int]:
    """Median (height, width) of up to ``sample`` images of a folder (headers only)."""
    paths = sorted(p for p in Path(images).iterdir() if is_image(p))
    step = max(1, len(paths) // sample)
    shapes = [image_size(p) for p in paths[::step][:sample]]
    return int(statistics.median(h for h, _ in shapes)), int(statistics.median(w for _, w in shapes))


def input_size(shape: tuple[int, int], long_side: int = LONG_SIDE) -> list[int]:
    """[height, width], multiples of 32, the longer side ``long_side``, the aspect ratio kept."""
    h, w = shape
    scale = long_side / max(h, w)
    return [max(32, int(round(h * scale / 32)) * 32), max(32, int(round(w * scale / 32)) * 32)]


@dataclass
class Fingerprint:
    """What the loop plans from the data: the images' median shape and the network input."""

    median_shape: list  # [height, width]
    input_size: list  # [height, width], multiples of 32

    def describe(self, space_sets_size: bool) -> str:
        sized = "the search space's" if space_sets_size else f"[{self.input_size[0]}, {self.input_size[1]}] (from the images' shape)"
        return f"images: median {self.median_shape[1]}x{self.median_shape[0]} (WxH); network input {sized}"


def fingerprint(source: Path) -> Fingerprint:
    shape = median_shape(Path(source) / "images")
    return Fingerprint(list(shape), input_size(shape))
