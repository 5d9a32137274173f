"""Batched inference: images on disk -> foreground probabilities at each image's own size.

This is the one place that turns images into probabilities, and it does so exactly as training
preprocessed them (:mod:`bss.data.segmentation_dataset`): decode to RGB, resize to the
checkpoint's ``image_size`` (``resize_image``), ImageNet normalisation (``to_tensor``), the
model, ``sigmoid``. The probability map is then resized (bilinear) back to the image's own
height and width. Mixed precision and channels-last follow the checkpoint's config, as in
evaluation.

Images stream through a :class:`~torch.utils.data.DataLoader` (decode + resize in worker
processes), batches run under :func:`torch.inference_mode`, and results are yielded one image at
a time, so memory stays flat however many images there are.

    predictor = Predictor.from_checkpoint("runs/train/best.pt")
    for item, prob in predictor.predict(ImageFolderDataset(paths, predictor.input_size)):
        ...  # prob: float32 (H, W) in [0, 1] at the image's own size; item["path"], item["index"]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bss.config import Config
from bss.data.io import read_image, read_mask
from bss.data.segmentation_dataset import MEAN, STD, resize_image
from bss.errors import BSSError
from bss.training.runtime import Runtime, pick_device


class ImageFolderDataset(Dataset):
    """Images (and optionally masks that travel with them) resized as training does.

    ``item["image"]`` is the uint8 (h, w, 3) image at the model's input size (a quarter of the
    bytes of a float tensor to pass between processes); :meth:`Predictor.probabilities`
    normalises it on the device.

    ``extras`` maps a key to one mask path (or ``None``) per image; each is read with
    :func:`~bss.data.io.read_mask` in the worker and handed back at the image's own size.
    ``keep_image`` also hands back the decoded RGB image (for overlays). A file that cannot be
    read is reported back as ``item["error"]`` (the exception, re-raised as is in the main
    process instead of a worker traceback).
    """

    def __init__(
        self, paths: Sequence[str | Path], input_size: tuple[int, int], extras: dict[str, Sequence[str | Path | None]] | None = None, keep_image: bool = False
    ):
        self.paths = [Path(p) for p in paths]
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.extras = {k: list(v) for k, v in (extras or {}).items()}
        for key, values in self.extras.items():
            if len(values) != len(self.paths):
                raise ValueError(f"extras[{key!r}] has {len(values)} entries for {len(self.paths)} images")
        self.keep_image = keep_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        item: dict = {"index": index, "path": path}
        try:
            rgb = read_image(path)
            item["size"] = rgb.shape[:2]
            item["image"] = torch.from_numpy(np.ascontiguousarray(resize_image(rgb, self.height, self.width)))
            for key, values in self.extras.items():
                item[key] = read_mask(values[index]) if values[index] is not None else None
        except BSSError as exc:
            return {"index": index, "path": path, "error": type(exc)(str(exc))}
        if self.keep_image:
            item["rgb"] = rgb
        return item


def collate_items(items: list[dict]) -> tuple[torch.Tensor | None, list[dict]]:
    """Stack the model inputs; keep everything else (different sizes) as a list of dicts."""
    bad = [it for it in items if "error" in it]
    if bad:
        return None, bad
    images = torch.stack([it.pop("image") for it in items])
    return images, items


def default_workers() -> int:
    """DataLoader workers for inference: none on a machine of 2 cores or fewer (a worker would
    only take a core from the model's own threads), else up to 4, leaving 2 cores to the model."""
    return max(0, min(4, (os.cpu_count() or 1) - 2))


def resize_probability(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float32 probability map resized (bilinear) to (height, width)."""
    if prob.shape == (height, width):
        return prob
    return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)


class Predictor:
    """A trained model plus the exact preprocessing it was trained with.

    ``input_size`` overrides the checkpoint's ``image_size`` (e.g. to predict at the images' own
    resolution); it must suit the architecture (multiples of 32 for a depth-5 encoder).
    ``tta`` averages the probability of the image and of its horizontal mirror.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: Config,
        device: str | torch.device = "auto",
        input_size: tuple[int, int] | None = None,
        tta: bool = False,
        source: str = "model",
    ):
        device = pick_device(str(device))
        self.config = config
        self.runtime = Runtime.from_config(dataclasses.replace(config, device=str(device), compile=False))
        self.model = self.runtime.prepare_model(model).eval()
        self.input_size = tuple(int(v) for v in (input_size or (config.height, config.width)))
        self.tta = bool(tta)
        self.source = source
        self.threads: int | None = None  # torch's threads, where the caller fixed them (bss.environment.deterministic_inference)
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self.check_input_size()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", input_size: tuple[int, int] | None = None, tta: bool = False
    ) -> "Predictor":
        from bss.training.checkpoint import load_model

        model, config = load_model(path, "cpu")
        return cls(model, config, device=device, input_size=input_size, tta=tta, source=str(path))

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def describe(self) -> dict:
        """What the manifest records about how probabilities were made."""
        return {
            "input_size": list(self.input_size),
            "trained_image_size": [self.config.height, self.config.width],
            "tta": "hflip" if self.tta else None,
            "device": str(self.device),
            "amp": str(self.runtime.amp_dtype).replace("torch.", "") if self.runtime.amp_dtype else None,
            "torch_threads": self.threads if self.device.type == "cpu" else None,
            "preprocessing": "RGB, resize_image to input_size, ImageNet mean/std, sigmoid; probability resized bilinearly to the image size",
        }

    @torch.inference_mode()
    def check_input_size(self) -> None:
        """One forward pass on a blank input: the model must map (1, 3, h, w) to (1, 1, h, w).

        At the trained size (which training already ran) a 64x64 probe checks the same things
        (RGB input, one output channel) at a fraction of the cost; an overridden size is probed
        as it is.
        """
        h, w = self.input_size
        if h <= 0 or w <= 0:
            raise BSSError(f"{self.source}: input size {h}x{w} must be positive.")
        ph, pw = (64, 64) if (h, w) == (self.config.height, self.config.width) else (h, w)
        (x,) = self.runtime.to_device(torch.zeros(1, 3, ph, pw))
        try:
            with self.runtime.autocast():
                out = self.model(x)
        except (RuntimeError, ValueError) as exc:
            raise BSSError(
                f"{self.source}: the model cannot take {ph}x{pw} RGB inputs (trained at {self.config.height}x{self.config.width}): {str(exc).splitlines()[0][:200]}"
            ) from None
        if tuple(out.shape) != (1, 1, ph, pw):
            raise BSSError(
                f"{self.source}: the model maps a 1x3x{ph}x{pw} input to {list(out.shape)}, not 1x1x{ph}x{pw}; "
                "a binary segmentation checkpoint (classes: 1) with an input size its encoder accepts (multiples of 32) is needed."
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, h, w, 3) -> the model's float input on the device, the values
        :func:`bss.data.segmentation_dataset.to_tensor` gives; float (B, 3, h, w) passes as it is."""
        if images.dtype == torch.uint8:
            images = images.to(self.device, non_blocking=self.device.type == "cuda").permute(0, 3, 1, 2).float()
            if self._norm is None:
                self._norm = tuple(torch.from_numpy(v).view(1, 3, 1, 1).to(self.device) for v in (MEAN, STD))
            mean, std = self._norm
            images = images.div_(255.0).sub_(mean).div_(std)
        (x,) = self.runtime.to_device(images.contiguous())
        return x

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """A batch, uint8 (B, h, w, 3) or normalised float (B, 3, h, w) -> foreground
        probabilities (B, h, w), float32 on the CPU."""
        x = self.normalize(images)
        with self.runtime.autocast():
            prob = torch.sigmoid(self.model(x).float())
            if self.tta:
                prob = 0.5 * (prob + torch.sigmoid(self.model(torch.flip(x, dims=[3])).float()).flip(dims=[3]))
        return prob[:, 0].float().cpu()

    def loader(self, dataset: Dataset, batch_size: int = 8, num_workers: int = 0) -> DataLoader:
        # no cv2.setNumThreads() in the workers: after fork it can block forever on the parent's
        # OpenCV thread pool (pthread_cond_destroy) when the parent already resized images
        return DataLoader(
            dataset,
            batch_size=max(1, int(batch_size)),
            shuffle=False,
            num_workers=int(num_workers),
            collate_fn=collate_items,
            pin_memory=self.device.type == "cuda",  # page-locked batches: asynchronous copies to the GPU
            prefetch_factor=2 if num_workers > 0 else None,
        )

    def predict(
        self, dataset: Dataset, batch_size: int = 8, num_workers: int = 0, progress: bool = True, desc: str = "predicting"
    ) -> Iterator[tuple[dict, np.ndarray]]:
        """Yield ``(item, probability)`` per image, in order; probability float32 (H, W) at the image's size."""
        with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for images, items in self.loader(dataset, batch_size, num_workers):
                if images is None:
                    raise items[0]["error"]
                probs = self.probabilities(images).numpy()
                for item, prob in zip(items, probs):
                    height, width = item["size"]
                    yield item, resize_probability(prob, height, width)
                bar.update(len(items))

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 8, num_workers: int = 0, progress: bool = True) -> Iterator[tuple[Path, np.ndarray]]:
        """``(path, probability)`` for each image path, in order."""
        for item, prob in self.predict(ImageFolderDataset(paths, self.input_size), batch_size, num_workers, progress):
            yield item["path"], prob

    def predict_image(self, rgb: np.ndarray) -> np.ndarray:
        """The probability map (H, W) of one RGB uint8 image already in memory."""
        h, w = self.input_size
        prob = self.probabilities(torch.from_numpy(np.ascontiguousarray(resize_image(rgb, h, w)))[None]).numpy()[0]
        return resize_probability(prob, rgb.shape[0], rgb.shape[1])
