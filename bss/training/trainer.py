"""One training run: train on ``train_dataset``, evaluate on ``evaluation_dataset``.

:class:`Trainer` is one class with small override hooks (``build_model``, ``build_loss``,
``configure_optimizer``, ``build_datasets``), so a variant is a few lines. It evaluates
``val_per_epoch`` times per epoch, keeps the best checkpoint by ``selection_metric``, writes an
overlay PNG, and logs to the active MLflow run when there is one. Callbacks receive every
evaluation (the search reports them to Ray Tune).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bss.config import Config
from bss.data.layout import resolve_dataset
from bss.data.segmentation_dataset import SegmentationDataset, denormalize
from bss.errors import BSSError
from bss.losses import build_loss
from bss.metrics import SegmentationMetrics
from bss.models import build_model
from bss.training.checkpoint import save_checkpoint
from bss.training.runtime import Runtime, seed_everything
from bss.visualization import overlay_grid


class TrainingDiverged(BSSError):
    """The loss became NaN or infinite; lower the learning rate or change the loss."""


@dataclass
class TrainResult:
    best_metrics: dict
    best_epoch: float
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    def __init__(self, config: Config, output_dir: str | Path | None = None, callbacks: list[Callable[[dict], None]] = (), progress: bool = True):
        self.config = config
        self.output_dir = Path(output_dir or config.output_dir)
        self.callbacks = list(callbacks)
        self.progress = progress
        seed_everything(config.seed)
        self.runtime = Runtime.from_config(config)
        self.train_set, self.eval_set = self.build_datasets()
        self.model = self.runtime.prepare_model(self.build_model())
        self.loss_fn = self.build_loss()
        self.optimizer = self.configure_optimizer(self.model)

    # ---- hooks -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        return build_model(self.config.model)

    def build_loss(self) -> torch.nn.Module:
        return build_loss(self.config.criterion)

    def configure_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def build_datasets(self) -> tuple[SegmentationDataset, SegmentationDataset]:
        cfg = self.config
        size = (cfg.height, cfg.width)
        train = SegmentationDataset(resolve_dataset(cfg.train_dataset, cfg.data_root), size, augment=cfg.augment, cache=cfg.cache_images, seed=cfg.seed)
        evaluation = SegmentationDataset(resolve_dataset(cfg.evaluation_dataset, cfg.data_root), size, augment=False, cache=cfg.cache_images)
        return train, evaluation

    # ---- loops -----------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed)
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.config.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.runtime.device.type == "cuda",
            generator=generator,
        )

    def train_step(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        images, masks = self.runtime.to_device(images, masks)
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits.float(), masks)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss.item()} (learning rate {self.config.learning_rate}); lower the learning rate or change the loss.")
        self.runtime.backward_step(loss, self.optimizer)
        return float(loss.detach())

    @torch.inference_mode()
    def evaluate(self, loader: DataLoader | None = None) -> dict[str, float]:
        self.model.eval()
        metrics = SegmentationMetrics(self.config.threshold)
        for images, masks in loader or self._loader(self.eval_set, shuffle=False):
            images, masks = self.runtime.to_device(images, masks)
            with self.runtime.autocast():
                logits = self.model(images)
            metrics.update(logits, masks)
        self.model.train()
        return metrics.compute()

    def fit(self) -> TrainResult:
        cfg, start = self.config, time.perf_counter()
        train_loader, eval_loader = self._loader(self.train_set, True), self._loader(self.eval_set, False)
        steps = len(train_loader) if not cfg.max_steps_per_epoch else min(cfg.max_steps_per_epoch, len(train_loader))
        eval_at = {max(1, math.ceil(steps * (k + 1) / cfg.val_per_epoch)) for k in range(cfg.val_per_epoch)}
        best, best_epoch, history, checkpoint = None, 0.0, [], None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        evaluation = 0
        for epoch in range(cfg.epochs):
            losses: list[float] = []
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
            epoch_start = time.perf_counter()
            for step, (images, masks) in enumerate(train_loader, start=1):
                if step > steps:
                    break
                losses.append(self.train_step(images, masks))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if step not in eval_at:
                    continue
                evaluation += 1
                scores = self.evaluate(eval_loader)
                row = {"epoch": epoch + step / steps, "evaluation": evaluation, "train_loss": float(np.mean(losses)), "epoch_seconds": time.perf_counter() - epoch_start}
                row.update({f"eval_{k}": v for k, v in scores.items()})
                improved = best is None or scores[cfg.selection_metric] > best[cfg.selection_metric]
                if improved:
                    best, best_epoch = scores, row["epoch"]
                    checkpoint = save_checkpoint(self.output_dir / "best.pt", self.model, cfg, scores, row["epoch"])
                row["is_best"] = improved
                history.append(row)
                self._log(row, evaluation)
                for callback in self.callbacks:
                    callback(dict(row, checkpoint=str(checkpoint)))
            bar.close()
            if self.progress:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {np.mean(losses):.4f}  eval IoU {history[-1]['eval_iou']:.3f}  Dice {history[-1]['eval_dice']:.3f}  Recall {history[-1]['eval_recall']:.3f}  Precision {history[-1]['eval_precision']:.3f}")
        if cfg.visualization_samples:
            self.write_overlays(self.output_dir / "overlays.png", checkpoint)
        return TrainResult(best_metrics=best, best_epoch=best_epoch, checkpoint=checkpoint, history=history, seconds=time.perf_counter() - start)

    def _log(self, row: dict, step: int) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    @torch.inference_mode()
    def write_overlays(self, path: Path, checkpoint: Path | None) -> Path:
        """image | truth | prediction for the first ``visualization_samples`` EVAL images, best weights."""
        if checkpoint is not None:
            from bss.training.checkpoint import load_state_into

            load_state_into(self.model, checkpoint)
        self.model.eval()
        rows = []
        for index in range(min(self.config.visualization_samples, len(self.eval_set))):
            image, mask = self.eval_set[index]
            (batch,) = self.runtime.to_device(image[None])
            with self.runtime.autocast():
                prob = torch.sigmoid(self.model(batch).float())[0, 0].cpu().numpy()
            rows.append((denormalize(image), mask[0].numpy() > 0.5, prob > self.config.threshold))
        self.model.train()
        overlay_grid(rows, path)
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_artifact(str(path))
        return path


def train(config: Config, **kwargs) -> TrainResult:
    return Trainer(config, **kwargs).fit()
