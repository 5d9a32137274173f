"""One training run: train on ``train_dataset``, evaluate on ``evaluation_dataset``.

:class:`Trainer` is one class with small override hooks (``build_model``, ``build_loss``,
``configure_optimizer``, ``build_datasets``), so a variant is a few lines. It evaluates
``val_per_epoch`` times per epoch, keeps the best checkpoint by ``selection_metric``, writes an
overlay PNG, and logs to the active MLflow run when there is one. Callbacks receive every
evaluation (the search reports them to Ray Tune).

The loop is kept free of per-step overhead (a search pays it once per trial): datasets are read
from the decoded-once cache as uint8 and normalised on the device; the loss is summed on the
device and read once per evaluation (and, on CUDA, every ``CHECK_EVERY`` steps for the NaN
check), and mlflow is only touched when a run is active. ``bench/train_throughput.py`` measures
the result against a bare PyTorch loop.

**EVAL at each image's native size.** The EVAL frames are read from the same decoded-once cache
as the training frames (``Config.frame_size``) and predicted as :class:`bss.inference.Predictor`
predicts (:func:`bss.inference.model_probabilities`: the whole frame, or sliding windows for a
patch plan); each probability map is then resized to its image's own size and counted against
the EVAL mask read there (once per trainer). So a whole-frame plan and a patch plan are scored
on the same pixels, those ``predict.py`` writes. The counting runs on the CPU (one copy of a
batch's probabilities, a cv2 resize and a count per image: well under the forward's cost).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from bss.config import Config
from bss.data.io import check_folder_path, read_mask
from bss.data.layout import resolve_dataset
from bss.data.segmentation_dataset import SegmentationDataset
from bss.errors import BSSError, ConfigError
from bss.inference import model_probabilities, native_counts
from bss.losses import build_loss
from bss.metrics import summarize
from bss.models import build_model
from bss.training.checkpoint import save_checkpoint
from bss.training.runtime import Runtime, seed_everything
from bss.visualization import overlay_grid, overlay_rows


class TrainingDiverged(BSSError):
    """The loss became NaN or infinite; lower the learning rate or change the loss."""


@dataclass
class TrainResult:
    best_metrics: dict
    best_epoch: float
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _SeededSampler(Sampler):
    """Sample indices (shuffled or in order), each paired with its own augmentation seed.

    Order and seeds come from generators seeded with the config's seed, in the main process, so
    a run augments identically whatever the number of DataLoader workers.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, with_seeds: bool = True):
        self.n, self.shuffle, self.with_seeds = n, shuffle, with_seeds
        self.order_generator = torch.Generator().manual_seed(seed)
        self.seed_generator = torch.Generator().manual_seed(seed + 0x5EED)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.order_generator).tolist() if self.shuffle else range(self.n)
        if not self.with_seeds:
            return iter(order)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=self.seed_generator).tolist()
        return iter([(i, seeds[i]) for i in order])


class _MixedSampler(_SeededSampler):
    """``student.hand_fraction``: each epoch of ``n`` draws holds ``round(fraction * n)``
    hand-labelled images and the rest refined ones, each group read in a fresh order pass after
    pass (so a group drawn more often than its size repeats, one drawn less is read on where the
    last epoch stopped), then shuffled together. Every draw has its own augmentation seed, so a
    hand-labelled image drawn twice is augmented twice differently."""

    def __init__(self, refined: list[bool], fraction: float, seed: int, with_seeds: bool = True):
        super().__init__(len(refined), True, seed, with_seeds)
        self.groups = ([i for i, r in enumerate(refined) if not r], [i for i, r in enumerate(refined) if r])
        self.counts = (round(fraction * self.n), self.n - round(fraction * self.n))
        self._queues: tuple[list[int], list[int]] = ([], [])

    def _take(self, group: int, count: int) -> list[int]:
        pool, queue = self.groups[group], self._queues[group]
        while len(queue) < count:
            queue.extend(pool[j] for j in torch.randperm(len(pool), generator=self.order_generator).tolist())
        taken = queue[:count]
        del queue[:count]
        return taken

    def __iter__(self):
        draws = self._take(0, self.counts[0]) + self._take(1, self.counts[1])
        order = [draws[j] for j in torch.randperm(self.n, generator=self.order_generator).tolist()]
        if not self.with_seeds:
            return iter(order)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=self.seed_generator).tolist()
        return iter(list(zip(order, seeds)))


class Trainer:
    CHECK_EVERY = 50  # on CUDA, steps between reads of the running loss (NaN check)

    def __init__(self, config: Config, output_dir: str | Path | None = None, callbacks: list[Callable[[dict], None]] = (), progress: bool = True, run_log=None):
        """``run_log``: a :class:`bss.tracking.RunLog` that gets every evaluation and the overlays (None: not tracked)."""
        self.config = config
        self.run_log = run_log
        self.output_dir = check_folder_path(output_dir or config.output_dir, "output_dir")
        self.callbacks = list(callbacks)
        self.progress = progress
        seed_everything(config.seed)
        self.runtime = Runtime.from_config(config)
        self.train_set, self.eval_set = self.build_datasets()
        self._native_truth: list | None = None  # the EVAL masks at native size, read on the first evaluation
        self.epochs = config.planned_epochs(len(self.train_set))  # train_steps: from the training set's size
        self.model = self.runtime.prepare_model(self.build_model())
        self.loss_fn = self.build_loss()
        self.optimizer = self.configure_optimizer(self.model)

    # ---- hooks -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        model = build_model(self.config.model)
        if self.config.student.init_from:
            self.init_weights(model, Path(self.config.student.init_from))
        return model

    @staticmethod
    def init_weights(model: torch.nn.Module, checkpoint: Path) -> None:
        """``student.init_from``: start from the weights of ``checkpoint`` (e.g. the teacher's);
        a missing checkpoint or one of another architecture is a ConfigError naming the key."""
        from bss.training.checkpoint import load_state_into

        try:
            load_state_into(model, checkpoint)
        except BSSError as exc:
            raise ConfigError(f"config key 'student.init_from': {exc}") from None
        except RuntimeError as exc:
            raise ConfigError(
                f"config key 'student.init_from': the weights of {checkpoint} do not fit the model of config key 'model' (train the student with the checkpoint's model.args): {str(exc)[:200]}"
            ) from None

    def build_loss(self) -> torch.nn.Module:
        return build_loss(self.config.criterion)

    def configure_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        # on CUDA the fused kernel: one launch for all parameters, and no host sync under a GradScaler
        return torch.optim.Adam(model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay, fused=self.runtime.is_cuda or None)

    def build_datasets(self) -> tuple[SegmentationDataset, SegmentationDataset]:
        cfg = self.config
        patch = cfg.window  # patches of image_size cut from frames of frame_size (None: whole frames)
        train = SegmentationDataset(
            resolve_dataset(cfg.train_dataset, cfg.data_root),
            cfg.frame_size,
            augment=cfg.augment,
            cache=cfg.cache_images,
            seed=cfg.seed,
            student=cfg.student,
            patch=patch,
            foreground=cfg.patches.foreground,
        )
        # EVAL frames at the frame size (the training frames' cache entry), predicted whole or by windows, scored natively
        evaluation = SegmentationDataset(resolve_dataset(cfg.evaluation_dataset, cfg.data_root), cfg.frame_size, augment=False, cache=cfg.cache_images)
        return train, evaluation

    # ---- loops -----------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        """A DataLoader over ``dataset``; a :class:`SegmentationDataset` is read through its raw
        view (uint8, normalised on the device) with per-item augmentation seeds."""
        cfg = self.config
        workers = cfg.num_workers
        drop_last = shuffle and len(dataset) > cfg.batch_size
        sampler = None
        if isinstance(dataset, SegmentationDataset):
            dataset = dataset.as_raw()
            with_seeds = dataset.transform is not None or dataset.patch is not None  # a patch's position is drawn from its seed too
            mixed = shuffle and cfg.student.hand_fraction > 0 and 0 < sum(dataset.refined) < len(dataset)  # both kinds of image
            sampler = (
                _MixedSampler(dataset.refined, cfg.student.hand_fraction, cfg.seed, with_seeds)
                if mixed
                else _SeededSampler(len(dataset), shuffle, cfg.seed, with_seeds)
            )
            shuffle = False
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.runtime.uses_pinned_memory,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def train_step(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a collated batch (raw uint8 or normalised float).

        Returns the detached loss, still on the device: reading it (``float(loss)``) waits for
        the GPU, so :meth:`fit` sums the losses on the device and reads them once per evaluation.
        """
        images, masks = self.runtime.prepare_batch(images, masks)
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits.float(), masks)
        self.runtime.backward_step(loss, self.optimizer)
        return loss.detach()

    def _diverged(self, value: float) -> TrainingDiverged:
        return TrainingDiverged(f"the training loss became {value} (learning rate {self.config.learning_rate}); lower the learning rate or change the loss.")

    @property
    def native_truth(self) -> list:
        """The EVAL masks (bool) at their images' own size, read once per trainer."""
        if self._native_truth is None:
            self._native_truth = [read_mask(sample.mask) > 0 for sample in self.eval_set.samples]
        return self._native_truth

    def frame_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, H, W) on the device of normalised frames on the device, as the
        Predictor makes them: the whole frame, or sliding windows of ``image_size`` for a patch plan
        (``batch_size`` windows at a time)."""
        return model_probabilities(self.model, self.runtime, images, self.config.window, self.config.patches.overlap, window_batch=self.config.batch_size)

    @torch.inference_mode()
    def evaluate(self, loader: DataLoader | None = None) -> dict[str, float]:
        """EVAL figures at each image's native size (see the module); ``loader`` reads the EVAL
        set in order (the default one does)."""
        self.model.eval()
        truth, counts = self.native_truth, []
        for images, masks in loader or self._loader(self.eval_set, shuffle=False):
            images, _ = self.runtime.prepare_batch(images, masks)
            for prob in self.frame_probabilities(images).cpu().numpy():
                counts.append(native_counts(prob, truth[len(counts)], self.config.threshold))
        self.model.train()
        return summarize(counts)

    def evaluation_steps(self, steps: int) -> set[int]:
        """The global steps (1-based) after which EVAL is evaluated, for ``steps`` per epoch."""
        cfg, total = self.config, self.epochs * steps
        if cfg.evaluations:  # spread evenly over the whole run
            count = min(cfg.evaluations, total)
            return {max(1, math.ceil(total * (k + 1) / count)) for k in range(count)}
        per_epoch = [max(1, math.ceil(steps * (k + 1) / cfg.val_per_epoch)) for k in range(cfg.val_per_epoch)]  # val_per_epoch in every epoch
        return {e * steps + s for e in range(self.epochs) for s in per_epoch}

    def fit(self) -> TrainResult:
        cfg, start = self.config, time.perf_counter()
        train_loader, eval_loader = self._loader(self.train_set, True), self._loader(self.eval_set, False)
        steps = len(train_loader) if not cfg.max_steps_per_epoch else min(cfg.max_steps_per_epoch, len(train_loader))
        eval_at = self.evaluation_steps(steps)
        # reading a loss waits for the GPU: on CUDA the running sum is checked every CHECK_EVERY
        # steps and at each evaluation; on the CPU it costs nothing, so every step
        check_every = 1 if not self.runtime.is_cuda else self.CHECK_EVERY
        best, best_epoch, history, checkpoint = None, 0.0, [], None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        evaluation = 0
        for epoch in range(self.epochs):
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress, leave=False)
            epoch_start = last_postfix = time.perf_counter()
            step = 0
            for step, (images, masks) in enumerate(train_loader, start=1):
                if step > steps:
                    step = steps
                    break
                loss = self.train_step(images, masks)
                loss_sum += loss
                evaluate_now = epoch * steps + step in eval_at
                if evaluate_now or step % check_every == 0:
                    if not math.isfinite(float(loss_sum)):
                        raise self._diverged(float(loss) if not math.isfinite(float(loss)) else float(loss_sum))
                if self.progress:
                    bar.update(1)
                    if time.perf_counter() - last_postfix > 1.0:  # one read of the loss a second
                        bar.set_postfix(loss=f"{float(loss):.4f}")
                        last_postfix = time.perf_counter()
                if not evaluate_now:
                    continue
                evaluation += 1
                scores = self.evaluate(eval_loader)
                row = {
                    "epoch": epoch + step / steps,
                    "evaluation": evaluation,
                    "train_loss": float(loss_sum) / step,
                    "epoch_seconds": time.perf_counter() - epoch_start,
                }
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
            if self.progress and history:
                tqdm.write(
                    f"epoch {epoch + 1}/{self.epochs}: loss {float(loss_sum) / max(step, 1):.4f}  eval IoU {history[-1]['eval_iou']:.3f}  Dice {history[-1]['eval_dice']:.3f}  Recall {history[-1]['eval_recall']:.3f}  Precision {history[-1]['eval_precision']:.3f}"
                )
        if cfg.visualization_samples:
            self.write_overlays(self.output_dir / "overlays.png", checkpoint)
        return TrainResult(best_metrics=best, best_epoch=best_epoch, checkpoint=checkpoint, history=history, seconds=time.perf_counter() - start)

    def _log(self, row: dict, step: int) -> None:
        if self.run_log is not None:  # a lost store never stops training (bss.tracking's policy)
            self.run_log.metrics(row, step)

    @torch.inference_mode()
    def write_overlays(self, path: Path, checkpoint: Path | None) -> Path:
        """image | truth | prediction for the first ``visualization_samples`` EVAL images, best weights."""
        if checkpoint is not None:
            from bss.training.checkpoint import load_state_into

            load_state_into(self.model, checkpoint)
        self.model.eval()

        def predict(batch: torch.Tensor):
            (batch,) = self.runtime.to_device(batch)
            return self.frame_probabilities(batch)[0].cpu().numpy()

        rows = overlay_rows(predict, self.eval_set, self.config.visualization_samples, self.config.threshold)
        self.model.train()
        overlay_grid(rows, path, caption=f"{self.config.evaluation_dataset}, first {len(rows)} images, threshold {self.config.threshold:g}")
        if self.run_log is not None:
            self.run_log.artifact(path)
        return path
