"""Evaluate a checkpoint on a split, and draw its overlays, exactly as ``predict.py`` predicts.

The TEST figures go through :class:`bss.inference.Predictor`: each image resized to the
checkpoint's frame, predicted whole or by sliding windows (a patch plan), the probability resized
back to the image's own size, thresholded at the config's ``threshold`` and counted against the
mask at that size (micro IoU, Dice, Recall, Precision over all pixels, :func:`bss.metrics.summarize`).
So a TEST figure counts the pixels ``predict.py`` would write, and sits beside the EVAL figures
the trials reported (counted the same way by the trainer) on equal terms.
"""

from __future__ import annotations

from pathlib import Path

import torch


def evaluate_checkpoint(checkpoint: str | Path, dataset: str, data_root: str | Path, batch_size: int = 8, device: str = "cpu") -> dict[str, float]:
    """IoU, Dice, Recall, Precision over all pixels of ``dataset``'s images (see the module)."""
    from bss.metrics import summarize

    return summarize(image_counts(checkpoint, dataset, data_root, batch_size, device))


def image_iou(checkpoint: str | Path, dataset: str, data_root: str | Path, batch_size: int = 8, device: str = "cpu") -> list[float]:
    """The IoU of each image of ``dataset`` (in its samples' order) at the image's own size; an
    image whose truth and prediction are both empty scores 1."""
    out = []
    for tp, fp, fn, _ in image_counts(checkpoint, dataset, data_root, batch_size, device):
        union = tp + fp + fn
        out.append(tp / union if union else 1.0)
    return out


def image_counts(checkpoint: str | Path, dataset: str, data_root: str | Path, batch_size: int = 8, device: str = "cpu") -> list[list[int]]:
    """``[TP, FP, FN, TN]`` of each image of ``dataset``, in its samples' order, as ``predict.py`` masks it."""
    from bss.data.layout import list_samples, resolve_dataset
    from bss.errors import DatasetError
    from bss.inference import ImageFolderDataset, Predictor, native_counts

    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    samples = list_samples(resolve_dataset(dataset, data_root))
    data = ImageFolderDataset([s.image for s in samples], predictor.input_size, extras={"truth": [s.mask for s in samples]})
    counts = []
    for item, prob in predictor.predict(data, batch_size, progress=False):
        truth = item["truth"] > 0
        if truth.shape != prob.shape:
            sample = samples[item["index"]]
            raise DatasetError(
                f"{sample.mask}: mask is {truth.shape[1]}x{truth.shape[0]} but its image {sample.image.name} is {prob.shape[1]}x{prob.shape[0]}."
            )
        counts.append([int(v) for v in native_counts(prob, truth, predictor.config.threshold)])
    return counts


@torch.inference_mode()
def draw_overlays(checkpoint: str | Path, dataset: str, data_root: str | Path, path: str | Path, samples: int = 4, device: str = "cpu") -> Path | None:
    """image | truth (green) | prediction (red) for the first ``samples`` images of ``dataset``, at the checkpoint's frame size."""
    from bss.data.layout import resolve_dataset
    from bss.data.segmentation_dataset import SegmentationDataset
    from bss.inference import Predictor
    from bss.visualization import overlay_grid, overlay_rows

    if samples <= 0:
        return None
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    config, (height, width) = predictor.config, predictor.input_size
    data = SegmentationDataset(resolve_dataset(dataset, data_root), (height, width), augment=False, cache=False)
    rows = overlay_rows(lambda batch: predictor.probabilities(batch)[0].numpy(), data, samples, config.threshold)
    how = f", sliding {config.width}x{config.height} windows" if predictor.window else ""
    caption = f"{dataset}, first {len(rows)} images, threshold {config.threshold:g}, at {width}x{height}{how}"
    return overlay_grid(rows, path, caption=caption) if rows else None
