"""Batched inference: images on disk -> foreground probabilities at each image's own size.

This is the one place that turns images into probabilities, and it does so exactly as training
preprocessed them (:mod:`bss.data.segmentation_dataset`): decode to RGB, resize to the
checkpoint's frame (``Config.frame_size``: ``image_size`` for whole frames, ``patches.frame_size``
for a patch plan; ``resize_image``), ImageNet normalisation (``to_tensor``), the model,
``sigmoid``. The probability map is then resized (bilinear) back to the image's own height and
width. Mixed precision and channels-last follow the checkpoint's config, as in evaluation.

**Sliding windows** (a config with ``patches.frame_size``, as nnU-Net predicts): a network trained
on ``image_size`` patches of the frame never saw the whole frame at once, and squeezing the frame
to one input would undo the planned scale. So :func:`frame_probabilities` slides windows of
``image_size`` over the frame (``patches.overlap`` of a window apart, the last one flush with
the edge so every pixel is covered; a frame smaller than a window is padded), runs them in
batches of the config's ``batch_size`` (the training batch: as many inputs of the window's size
went through the network with their gradients, so as many windows fit wherever training did;
on a GPU that is the plan's batch; ``predict.py --batch-size`` counts frames per loaded batch,
not windows), and blends the overlaps with Gaussian importance weights (sigma = window / 8), divided
by the summed weights: a window's border, where the network saw the least context, counts least,
and no seam is left where windows meet. EVAL (the trainer), TEST, the teacher, ``make_hybrid``,
``suggest_labels`` and ``predict.py`` all come through here, so they all predict alike.

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
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bss.config import Config
from bss.data.io import read_image, read_mask
from bss.data.segmentation_dataset import MEAN, STD, resize_image
from bss.errors import BSSError
from bss.metrics import mask_counts
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


def native_counts(prob: np.ndarray, truth: np.ndarray, threshold: float) -> list[int]:
    """``[TP, FP, FN, TN]`` of a probability map (any size) against a truth mask at the image's
    native size: the probability is resized to the truth's shape first, then thresholded, exactly
    as ``predict.py`` makes its masks, so a figure counts the pixels a user gets."""
    return mask_counts(resize_probability(prob, truth.shape[0], truth.shape[1]) > threshold, truth)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Where the windows of one axis start: ``round(window * (1 - overlap))`` apart (at least 1),
    the last flush with the far edge, so every pixel of ``length`` is covered (a ``length`` no
    longer than the window: one window at 0)."""
    if length <= window:
        return [0]
    stride = max(1, int(round(window * (1.0 - overlap))))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def gaussian_weights(window: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """nnU-Net's importance map of a window: a Gaussian centred on it, sigma = side / 8 on each
    axis, 1 at the centre (float64). Its smallest value (a corner, exp(-16) ~ 1e-7) is still
    positive, so the blend never divides by zero."""
    axes = []
    for side in window:
        offset = torch.arange(side, dtype=torch.float64, device=device) - (side - 1) / 2.0
        axes.append(torch.exp(-0.5 * (offset / (side / 8.0)) ** 2))
    weights = axes[0][:, None] * axes[1][None, :]
    return weights / weights.max()


def frame_probabilities(
    predict: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, window: tuple[int, int], overlap: float = 0.5, batch_size: int = 32
) -> torch.Tensor:
    """Probabilities (B, H, W), float32 on ``frames``' device, of normalised frames (B, 3, H, W) by
    sliding windows (see the module): ``predict`` maps a batch of windows (N, 3, h, w) to their
    probabilities (N, h, w); at most ``batch_size`` windows go through it at once. A frame
    smaller than the window on a side is padded there with zeros (the mean colour once
    normalised) and cropped back. The blend is summed in float64, so a constant prediction
    comes back as that constant."""
    count, _, height, width = frames.shape
    wh, ww = int(window[0]), int(window[1])
    frames = torch.nn.functional.pad(frames, (0, max(0, ww - width), 0, max(0, wh - height)))
    boxes = [(y, x) for y in window_starts(frames.shape[2], wh, overlap) for x in window_starts(frames.shape[3], ww, overlap)]
    weights = gaussian_weights((wh, ww), frames.device)
    total = torch.zeros((count, frames.shape[2], frames.shape[3]), dtype=torch.float64, device=frames.device)
    norm = torch.zeros(frames.shape[2:], dtype=torch.float64, device=frames.device)
    for y, x in boxes:
        norm[y : y + wh, x : x + ww] += weights
    tiles = [(i, y, x) for i in range(count) for y, x in boxes]
    for first in range(0, len(tiles), max(1, int(batch_size))):
        chunk = tiles[first : first + max(1, int(batch_size))]
        probs = predict(torch.stack([frames[i, :, y : y + wh, x : x + ww] for i, y, x in chunk]))
        for (i, y, x), prob in zip(chunk, probs):
            total[i, y : y + wh, x : x + ww] += prob.double() * weights
    return (total / norm)[:, :height, :width].float()


def model_probabilities(
    model: torch.nn.Module,
    runtime: Runtime,
    images: torch.Tensor,
    window: tuple[int, int] | None = None,
    overlap: float = 0.5,
    tta: bool = False,
    window_batch: int = 32,
) -> torch.Tensor:
    """Probabilities (B, H, W), float32 on the device, of normalised images (B, 3, H, W) on the
    device: the whole input through ``model`` at once, or (``window``) by sliding windows,
    ``window_batch`` at a time (the callers give the config's ``batch_size``). The Predictor and
    the trainer's EVAL both predict through this one function."""

    def predict(batch: torch.Tensor) -> torch.Tensor:
        (batch,) = runtime.to_device(batch)  # stacked windows: the model's memory format again
        with runtime.autocast():
            prob = torch.sigmoid(model(batch).float())
            if tta:
                prob = 0.5 * (prob + torch.sigmoid(model(torch.flip(batch, dims=[3])).float()).flip(dims=[3]))
        return prob[:, 0].float()

    return predict(images) if window is None else frame_probabilities(predict, images, window, overlap, window_batch)


class Predictor:
    """A trained model plus the exact preprocessing it was trained with.

    ``input_size``: the size every image is resized to, the checkpoint's ``Config.frame_size`` by
    default: ``image_size`` (the whole frame is one network input) or, for a patch plan,
    ``patches.frame_size``, over which ``window`` (``image_size``) slides. An override (e.g. to
    predict at the images' own resolution) must suit the architecture when the frame is one input
    (multiples of 32 for a depth-5 encoder); with windows any size goes.
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
        self.input_size = tuple(int(v) for v in (input_size or config.frame_size))
        self.window = config.window  # None: the frame is one input
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
            "sliding_window": {
                "window": list(self.window),
                "overlap": self.config.patches.overlap,
                "weights": "gaussian, sigma = window / 8",
                "windows_per_batch": self.config.batch_size,
            }
            if self.window
            else None,
            "tta": "hflip" if self.tta else None,
            "device": str(self.device),
            "amp": str(self.runtime.amp_dtype).replace("torch.", "") if self.runtime.amp_dtype else None,
            "torch_threads": self.threads if self.device.type == "cpu" else None,
            "preprocessing": "RGB, resize_image to input_size, ImageNet mean/std, sigmoid"
            + (" of Gaussian-blended sliding windows" if self.window else "")
            + "; probability resized bilinearly to the image size",
        }

    @torch.inference_mode()
    def check_input_size(self) -> None:
        """One forward pass on a blank input: the model must map (1, 3, h, w) to (1, 1, h, w).

        At the trained size (which training already ran) a 64x64 probe checks the same things
        (RGB input, one output channel) at a fraction of the cost; an overridden size is probed
        as it is. With sliding windows the network only ever sees the trained window.
        """
        h, w = self.input_size
        if h <= 0 or w <= 0:
            raise BSSError(f"{self.source}: input size {h}x{w} must be positive.")
        ph, pw = (64, 64) if self.window or (h, w) == (self.config.height, self.config.width) else (h, w)
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
        """A batch, uint8 (B, h, w, 3) or normalised float (B, 3, h, w) at ``input_size`` ->
        foreground probabilities (B, h, w), float32 on the CPU (by sliding windows for a patch plan)."""
        x = self.normalize(images)
        return model_probabilities(self.model, self.runtime, x, self.window, self.config.patches.overlap, self.tta, self.config.batch_size).cpu()

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
