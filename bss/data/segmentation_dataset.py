"""The torch Dataset that training and evaluation read: images/ + masks/ at training resolution.

Each image is decoded and resized once (``cache``, the config's ``cache_images``) into a bounded
cache (:mod:`bss.data.cache`: uint8 arrays at training resolution in a cache folder shared by
trials, read back without decoding), so an epoch costs no JPEG/PNG decoding and a process's
memory does not grow with the dataset. Augmentation (albumentations) runs on the cached uint8
arrays; normalisation (ImageNet mean/std, as smp's encoders expect) comes last.

``dataset[i]`` gives normalised float tensors. The trainer reads a *raw* view instead
(:meth:`SegmentationDataset.as_raw`): uint8 ``(H, W, 3)`` images and ``(H, W)`` masks, a quarter
of the bytes to collate, pin and copy, normalised on the device by
:meth:`bss.training.runtime.Runtime.prepare_batch` to exactly the same values.

Augmentation is reproducible by seed. ``dataset[(i, s)]`` augments sample ``i`` with its own
seed ``s`` (the trainer's sampler draws them from the config's seed), so the result does not
depend on the number of DataLoader workers or on whether they persist between epochs.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from bss.data.cache import MemoryCache, ResizedCache, default_memory_bytes, warn_no_disk_cache
from bss.data.io import read_image, read_mask
from bss.data.layout import Sample, list_samples
from bss.errors import DatasetError

if TYPE_CHECKING:
    import albumentations as A

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def resize_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if rgb.shape[0] > height else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float (3, H, W)."""
    return torch.from_numpy(((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: float (3, H, W) -> uint8 (H, W, 3)."""
    rgb = image.detach().cpu().float().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def train_augmentation(seed: int | None = None) -> A.Compose:
    """Mild, label-preserving augmentation for CCTV frames; ``seed`` makes it reproducible."""
    import albumentations as A  # here, so that a dataset without augmentation needs no albumentations

    compose = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-8, 8), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.3),
        ],
        seed=seed,
    )
    if seed is not None:
        seed_augmentation(compose, seed)
    return compose


def seed_augmentation(compose: A.Compose, seed: int) -> None:
    """Give every transform of ``compose`` ONE shared generator seeded with ``seed``.

    (albumentations 2.0's ``Compose(seed=...)`` gives each transform its own generator with the
    same seed, so transforms with the same ``p`` always fire together: flip and affine were never
    applied one without the other.)
    """
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


class SegmentationDataset(Dataset):
    """``(image (3,H,W) float, mask (1,H,W) float 0/1)`` pairs from a dataset folder.

    ``cache``: True (default) decodes and resizes each sample once into the disk cache
    (``cache_dir``, default :func:`bss.data.cache.default_cache_dir`) with at most
    ``memory_bytes`` of it also held in this process; ``"memory"`` keeps at most ``memory_bytes``
    in memory and decodes the rest each time; False decodes every time. The cache is built on
    first use (or by :meth:`prepare`).
    """

    def __init__(
        self,
        folder: str | Path,
        image_size: tuple[int, int],
        augment: bool = False,
        cache: bool | str = True,
        samples: list[Sample] | None = None,
        seed: int | None = None,
        cache_dir: str | Path | None = None,
        memory_bytes: int | None = None,
    ):
        self.folder = Path(folder)
        self.samples = samples if samples is not None else list_samples(self.folder)
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.transform = train_augmentation(seed) if augment else None
        self.cache = cache
        self.cache_dir = cache_dir
        self.memory_bytes = default_memory_bytes() if memory_bytes is None else int(memory_bytes)
        self.raw = False
        self._store: ResizedCache | MemoryCache | None = None

    def __len__(self) -> int:
        return len(self.samples)

    # ---- decoding and caching ---------------------------------------------------------------
    def decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read and resize sample ``index`` from its files (no cache)."""
        sample = self.samples[index]
        rgb = read_image(sample.image)
        mask = read_mask(sample.mask)
        if mask.shape != rgb.shape[:2]:
            raise DatasetError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {rgb.shape[1]}x{rgb.shape[0]}.")
        return resize_image(rgb, self.height, self.width), resize_mask(mask, self.height, self.width)

    def prepare(self) -> "SegmentationDataset":
        """Build (or open) the cache now rather than on the first read; returns ``self``."""
        if self._store is not None or not self.cache:
            return self
        if self.cache == "memory":
            self._store = MemoryCache(len(self), self.decode, self.memory_bytes)
            return self
        files = [(s.image, s.mask) for s in self.samples]
        try:
            self._store = ResizedCache.open_or_build(files, self.height, self.width, self.decode, root=self.cache_dir, memory_bytes=self.memory_bytes)
        except OSError as exc:  # no writable cache folder: bounded memory cache instead
            from bss.data.cache import default_cache_dir

            warn_no_disk_cache(Path(self.cache_dir or default_cache_dir()), exc)
            self._store = MemoryCache(len(self), self.decode, self.memory_bytes)
        return self

    @property
    def resident_bytes(self) -> int:
        """Bytes of cached samples held in this process's memory (bounded by ``memory_bytes``)."""
        return self._store.resident_bytes if self._store is not None else 0

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (uint8 H,W,3) and mask (uint8 H,W, 0/1) at training resolution."""
        if not self.cache:
            return self.decode(index)
        if self._store is None:
            self.prepare()
        return self._store[index]

    # ---- items ------------------------------------------------------------------------------
    def as_raw(self) -> "SegmentationDataset":
        """A view of the same samples and cache whose items are uint8 ``(H, W, 3)`` image and
        ``(H, W)`` mask tensors, unnormalised (see :meth:`bss.training.runtime.Runtime.prepare_batch`)."""
        self.prepare()
        view = copy.copy(self)
        view.transform = copy.deepcopy(self.transform)
        view.raw = True
        return view

    def augmented(self, index, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` after augmentation (uint8), with its own ``seed`` when given."""
        rgb, mask = self.load(index)
        if self.transform is not None:
            if seed is not None:
                seed_augmentation(self.transform, seed)
            out = self.transform(image=rgb, mask=mask)
            rgb, mask = out["image"], out["mask"]
        return rgb, mask

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rgb, mask = self.augmented(int(index), seed)
        if self.raw:
            return torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(np.ascontiguousarray(mask))
        return to_tensor(rgb), torch.from_numpy(mask[None].astype(np.float32))
