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

**Students** (``student``, the config's :class:`~bss.config.StudentConfig`): on a hybrid dataset
``NAME_H<n>`` each image is hand-labelled or *refined* (its manifest's ``origin``). With
``ignore_band`` or ``soft_targets`` the target of a refined image is built from its teacher
probability ``soft/<stem>.png`` at load time: float32, the hard mask (or the probability), with
:data:`~bss.losses.masked.IGNORE` where the probability lies in the band. With ``ignore_edge`` a
band of pixels along the refined mask's edge, inside the image's boxes (the rectangles of its
manifest row), is :data:`~bss.losses.masked.IGNORE` as well (no ``soft/`` needed). The target is
augmented as the mask (the same geometric transforms, nearest-neighbour), so mask and ignore
move together. Without those options the masks are the uint8 0/1 masks, exactly as before.

Augmentation is reproducible by seed. ``dataset[(i, s)]`` augments sample ``i`` with its own
seed ``s`` (the trainer's sampler draws them from the config's seed), so the result does not
depend on the number of DataLoader workers or on whether they persist between epochs.

**Patches** (``patch``, the config's :class:`~bss.config.PatchConfig`, as nnU-Net trains):
``image_size`` is then the *frame* size (the planned scale) at which frames are resized and
cached (one cache entry, shared with the sliding-window evaluation at that size), and each item
is a ``patch``-sized cut of its frame, so small defects keep their pixels. A ``foreground``
share of the patches is centred on a random foreground pixel of the target (shifted into the
frame; a student's ignored pixels are not foreground), the others lie anywhere, as does every
patch of a frame without foreground. One patch is drawn per image per epoch. The cut comes
after the target is built (image, mask and ignored pixels are cut alike) and before
augmentation (which then costs a patch, not a frame). Its position comes from the item's seed
(or, without one, its index), so it too is the same for any number of workers.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bss.config import StudentConfig
from bss.data.cache import MemoryCache, ResizedCache, default_memory_bytes, warn_no_disk_cache
from bss.data.io import image_size, read_image, read_mask
from bss.data.layout import Sample, list_samples
from bss.errors import DatasetError
from bss.losses.masked import IGNORE

if TYPE_CHECKING:
    import albumentations as A

PATCH_SALT = 0x9A7C4  # keeps a patch's position generator apart from the augmentation's (same item seed)
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


def train_augmentation(seed: int | None = None, strength: str = "default") -> A.Compose:
    """Label-preserving augmentation for CCTV frames; ``seed`` makes it reproducible.

    ``default``: mild (flip, small affine, colour jitter). ``strong`` (``student.augment``, the
    Noisy Student idea: a student learns under more noise than its teacher): larger affine, more
    colour jitter, blur or sensor noise. Neither flips vertically (CCTV frames have an up)."""
    import albumentations as A  # here, so that a dataset without augmentation needs no albumentations

    if strength == "strong":
        transforms = [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-20, 20), p=0.8),
            A.RandomBrightnessContrast(brightness_limit=0.35, contrast_limit=0.35, p=0.8),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=25, val_shift_limit=20, p=0.5),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.4),
        ]
    else:
        transforms = [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-8, 8), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.3),
        ]
    compose = A.Compose(transforms, seed=seed)
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


def patch_origin(foreground: np.ndarray, size: tuple[int, int], share: float, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a ``size`` patch of a frame whose foreground pixels are ``foreground`` (bool).

    With probability ``share`` the patch is centred on a foreground pixel drawn uniformly (so
    larger objects are drawn more often, as in nnU-Net), shifted just enough to stay inside the
    frame, so it still holds that pixel; otherwise (or without foreground) its position is
    uniform. The pixel lookup scans the frame once (well under a millisecond at 704x512, cheaper
    than reading it), so no per-image coordinate cache is needed."""
    height, width = foreground.shape
    patch_height, patch_width = size
    if rng.random() < share:
        pixels = np.flatnonzero(foreground)
        if pixels.size:
            y, x = divmod(int(pixels[rng.integers(pixels.size)]), width)
            return min(max(y - patch_height // 2, 0), height - patch_height), min(max(x - patch_width // 2, 0), width - patch_width)
    return int(rng.integers(height - patch_height + 1)), int(rng.integers(width - patch_width + 1))


def refined_boxes(folder: Path, samples: list[Sample]) -> list[list[list[int]] | None]:
    """Per sample, the box rectangles ``[x0, y0, x1, y1)`` (native pixels) of its refined mask when
    it was refined from boxes by a teacher (origin ``refined`` in the folder's H<n> manifest), else
    None: hand-labelled images and folders without such a manifest."""
    path = folder / "manifest.json"
    if not path.is_file():
        return [None] * len(samples)
    try:
        entries = json.loads(path.read_text()).get("images", [])
        refined = {
            Path(e["image"]).stem: [list(map(int, b["bbox"])) for b in e.get("boxes", [])]
            for e in entries
            if isinstance(e, dict) and e.get("origin") == "refined"
        }
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc}).") from None
    return [refined.get(s.stem) for s in samples]


def edge_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels of the edge of ``mask`` (0/1), on either side (bool)."""
    if width <= 0:
        return np.zeros(mask.shape, dtype=bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    binary = (mask > 0).astype(np.uint8)
    return cv2.dilate(binary, kernel) != cv2.erode(binary, kernel, borderType=cv2.BORDER_REPLICATE)


def box_area(boxes: list[list[int]], native: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The union of ``boxes`` ([x0, y0, x1, y1) at the ``native`` (height, width)) at ``size`` (bool),
    each rectangle widened to whole pixels there."""
    (nh, nw), (h, w) = native, size
    area = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        area[int(y0 * h // nh) : -(-y1 * h // nh), int(x0 * w // nw) : -(-x1 * w // nw)] = True
    return area


class SegmentationDataset(Dataset):
    """``(image (3,H,W) float, mask (1,H,W) float 0/1)`` pairs from a dataset folder.

    ``cache``: True (default) decodes and resizes each sample once into the disk cache
    (``cache_dir``, default :func:`bss.data.cache.default_cache_dir`) with at most
    ``memory_bytes`` of it also held in this process; ``"memory"`` keeps at most ``memory_bytes``
    in memory and decodes the rest each time; False decodes every time. The cache is built on
    first use (or by :meth:`prepare`).

    ``student``: how refined images are targeted and augmented (see the module's docstring);
    None or the defaults: as a plain dataset.

    ``patch``: (height, width) of the patches cut from each frame of ``image_size`` (the frame
    size, at least the patch's on each side), ``foreground`` the share of them centred on the
    mask (see the module's docstring); None: items are whole frames.
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
        student: StudentConfig | None = None,
        patch: tuple[int, int] | None = None,
        foreground: float = 1 / 3,
    ):
        self.folder = Path(folder)
        self.samples = samples if samples is not None else list_samples(self.folder)
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.patch = (int(patch[0]), int(patch[1])) if patch is not None else None
        if self.patch is not None and (self.patch[0] > self.height or self.patch[1] > self.width):
            raise ValueError(f"patch {list(self.patch)} is larger than the frame {[self.height, self.width]} it is cut from.")
        self.foreground = float(foreground)
        self.student = student or StudentConfig()
        self.transform = train_augmentation(seed, self.student.augment) if augment else None
        self.boxes = refined_boxes(self.folder, self.samples)
        self.refined = [boxes is not None for boxes in self.boxes]
        self.student_targets = self.student.needs_targets and any(self.refined)  # float32 targets with IGNORE
        self._soft: dict[int, np.ndarray] = {}
        self._native: dict[int, tuple[int, int]] = {}  # (height, width) of refined images, for ignore_edge
        if self.student_targets and self.student.needs_soft:
            self._check_soft_files()
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

    # ---- student targets --------------------------------------------------------------------
    def soft_path(self, index: int) -> Path:
        return self.folder / "soft" / f"{self.samples[index].stem}.png"

    def _check_soft_files(self) -> None:
        missing = [self.soft_path(i) for i, refined in enumerate(self.refined) if refined and not self.soft_path(i).is_file()]
        if missing:
            keys = " and ".join(
                k for k, on in (("student.ignore_band", self.student.ignore_band is not None), ("student.soft_targets", self.student.soft_targets)) if on
            )
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(
                f"{missing[0]} not found{more}: config key {keys} needs the teacher's probability of every refined image; "
                "make the hybrid dataset with soft labels (drivers/make_hybrid.py --soft, RefineRule(soft=True))."
            )

    def soft(self, index: int) -> np.ndarray:
        """The teacher probability of refined sample ``index``, uint8 (0-255) at training resolution (kept in memory)."""
        if index not in self._soft:
            path = self.soft_path(index)
            prob = np.asarray(Image.open(path).convert("L"))
            if prob.shape != image_size(self.samples[index].image):
                h, w = image_size(self.samples[index].image)
                raise DatasetError(f"{path}: soft label is {prob.shape[1]}x{prob.shape[0]} but its image is {w}x{h}.")
            self._soft[index] = resize_image(prob, self.height, self.width)
        return self._soft[index]

    def target(self, index: int, mask: np.ndarray) -> np.ndarray:
        """The float32 training target of sample ``index`` from its (resized) ``mask``: a
        hand-labelled image's mask; a refined image's mask or teacher probability
        (``soft_targets``), with :data:`IGNORE` where the probability is in ``ignore_band`` and
        within ``ignore_edge`` pixels of the mask's edge inside its boxes."""
        if not self.refined[index]:
            return mask.astype(np.float32)
        prob = self.soft(index).astype(np.float32) / 255.0 if self.student.needs_soft else None
        target = prob if self.student.soft_targets else mask.astype(np.float32)
        if self.student.ignore_band is not None:
            low, high = self.student.ignore_band
            target = np.where((prob >= low) & (prob <= high), np.float32(IGNORE), target)
        if self.student.ignore_edge > 0:
            if index not in self._native:
                self._native[index] = image_size(self.samples[index].image)
            native = self._native[index]
            band = edge_band(mask, self.student.ignore_edge) & box_area(self.boxes[index], native, mask.shape)
            target = np.where(band, np.float32(IGNORE), target)
        return target

    # ---- patches ----------------------------------------------------------------------------
    @staticmethod
    def patch_rng(index: int, seed: int | None) -> np.random.Generator:
        """The generator of item ``index``'s patch position: from its seed (drawn by the trainer's
        sampler, so the same for any number of workers), else from the index alone (a fixed
        patch per image); mixed with :data:`PATCH_SALT` so it is not the augmentation's stream."""
        return np.random.default_rng((PATCH_SALT, index) if seed is None else (PATCH_SALT, index, seed))

    def cut_patch(self, index: int, seed: int | None, rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same ``patch`` of image and mask (or a student's target, whose IGNORE, -1, is not
        foreground), copied so the frame can be freed and augmentation gets contiguous arrays."""
        top, left = patch_origin(mask > 0.5, self.patch, self.foreground, self.patch_rng(index, seed))
        rows, cols = slice(top, top + self.patch[0]), slice(left, left + self.patch[1])
        return np.ascontiguousarray(rgb[rows, cols]), np.ascontiguousarray(mask[rows, cols])

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
        """Sample ``index`` (its patch, with ``patch``) after augmentation (uint8; a student's
        target: float32, see :meth:`target`), with its own ``seed`` when given."""
        rgb, mask = self.load(index)
        if self.student_targets:
            mask = self.target(index, mask)
        if self.patch is not None:
            rgb, mask = self.cut_patch(index, seed, rgb, mask)
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
