"""Evaluate a checkpoint on a split, and draw its overlays, exactly as training evaluates.

Images and masks are resized to the checkpoint's ``image_size`` as in
:class:`~bss.data.segmentation_dataset.SegmentationDataset` (no augmentation), thresholded at the
config's ``threshold``, and scored with :class:`~bss.metrics.SegmentationMetrics` (micro IoU,
Dice, Recall, Precision over all pixels), so a TEST figure sits beside the EVAL figure the
trials reported on equal terms.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _loader(dataset, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.inference_mode()
def evaluate_checkpoint(checkpoint: str | Path, dataset: str, data_root: str | Path, batch_size: int = 8, device: str = "cpu") -> dict[str, float]:
    from bss.data.layout import resolve_dataset
    from bss.data.segmentation_dataset import SegmentationDataset
    from bss.metrics import SegmentationMetrics
    from bss.training.checkpoint import load_model

    model, config = load_model(checkpoint, device=device)
    data = SegmentationDataset(resolve_dataset(dataset, data_root), (config.height, config.width), augment=False, cache=False)
    metrics = SegmentationMetrics(config.threshold)
    for images, masks in _loader(data, batch_size):
        metrics.update(model(images.to(device)).float().cpu(), masks)
    return metrics.compute()


@torch.inference_mode()
def draw_overlays(checkpoint: str | Path, dataset: str, data_root: str | Path, path: str | Path, samples: int = 4, device: str = "cpu") -> Path | None:
    """image | truth (green) | prediction (red) for the first ``samples`` images of ``dataset``."""
    from bss.data.layout import resolve_dataset
    from bss.data.segmentation_dataset import SegmentationDataset
    from bss.training.checkpoint import load_model
    from bss.visualization import overlay_grid, overlay_rows

    if samples <= 0:
        return None
    model, config = load_model(checkpoint, device=device)
    data = SegmentationDataset(resolve_dataset(dataset, data_root), (config.height, config.width), augment=False, cache=False)
    rows = overlay_rows(lambda batch: torch.sigmoid(model(batch.to(device)).float())[0, 0].cpu().numpy(), data, samples, config.threshold)
    caption = f"{dataset}, first {len(rows)} images, threshold {config.threshold:g}, at {config.width}x{config.height}"
    return overlay_grid(rows, path, caption=caption) if rows else None
