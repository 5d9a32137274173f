"""The torch Dataset that training and evaluation read: images/ + masks/ at training resolution.

Each image is decoded and resized once (``cache_images``) and kept as uint8 at training
resolution, so an epoch costs no JPEG/PNG decoding. Augmentation (albumentations) runs on the
cached uint8 arrays; normalisation (ImageNet mean/std, as smp's encoders expect) comes last.
"""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from bss.data.io import read_image, read_mask
from bss.data.layout import Sample, list_samples
from bss.errors import DatasetError

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
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-8, 8), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.3),
        ],
        seed=seed,
    )


class SegmentationDataset(Dataset):
    """``(image (3,H,W) float, mask (1,H,W) float 0/1)`` pairs from a dataset folder."""

    def __init__(self, folder: str | Path, image_size: tuple[int, int], augment: bool = False, cache: bool = True, samples: list[Sample] | None = None, seed: int | None = None):
        self.folder = Path(folder)
        self.samples = samples if samples is not None else list_samples(self.folder)
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.transform = train_augmentation(seed) if augment else None
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (uint8 H,W,3) and mask (uint8 H,W, 0/1) at training resolution."""
        if index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        rgb = read_image(sample.image)
        mask = read_mask(sample.mask)
        if mask.shape != rgb.shape[:2]:
            raise DatasetError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {rgb.shape[1]}x{rgb.shape[0]}.")
        pair = resize_image(rgb, self.height, self.width), resize_mask(mask, self.height, self.width)
        if self.cache:
            self._cache[index] = pair
        return pair

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.load(index)
        if self.transform is not None:
            out = self.transform(image=rgb, mask=mask)
            rgb, mask = out["image"], out["mask"]
        return to_tensor(rgb), torch.from_numpy(mask[None].astype(np.float32))
