"""A training run recorded in MLflow: params, per-evaluation metrics, checkpoint and overlays."""

from __future__ import annotations

from bss.config import Config
from bss.data.io import check_folder_path
from bss.tracking import Tracker
from bss.training.trainer import Trainer, TrainResult


def tracked_training(config: Config, run_name: str | None = None, **trainer_kwargs) -> TrainResult:
    """Train ``config``; when ``config.tracking.enabled`` log everything to one MLflow run."""
    check_folder_path(trainer_kwargs.get("output_dir") or config.output_dir, "output_dir")  # before any MLflow run is made
    if not config.tracking.enabled:
        return Trainer(config, **trainer_kwargs).fit()
    tracker = Tracker.open(config.tracking.uri, config.tracking.experiment, going_on="training goes on without it")
    run_id = tracker.create(run_name or "train", None, {"bss.kind": "train"})
    tracker.params(run_id, {k: v for k, v in config.to_dict().items() if k != "tracking"}, fresh=True)
    try:
        result = Trainer(config, run_log=tracker.run(run_id), **trainer_kwargs).fit()
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    tracker.metrics(run_id, {f"best_eval_{k}": v for k, v in (result.best_metrics or {}).items()} | {"train_seconds": result.seconds})
    if result.checkpoint is not None:
        tracker.artifact(run_id, result.checkpoint)
    tracker.end(run_id, "FINISHED")
    return result
