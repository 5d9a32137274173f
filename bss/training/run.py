"""A training run recorded in MLflow: params, per-evaluation metrics, checkpoint and overlays."""
from __future__ import annotations

from bss import tracking
from bss.config import Config
from bss.training.trainer import Trainer, TrainResult


def tracked_training(config: Config, run_name: str | None = None, nested: bool = False, **trainer_kwargs) -> TrainResult:
    """Train ``config``; when ``config.tracking.enabled`` log everything to one MLflow run."""
    if not config.tracking.enabled:
        return Trainer(config, **trainer_kwargs).fit()
    import mlflow

    tracking.setup(config.tracking.uri, config.tracking.experiment)
    with mlflow.start_run(run_name=run_name, nested=nested):
        mlflow.log_params(tracking.flatten(config.to_dict()))
        result = Trainer(config, **trainer_kwargs).fit()
        mlflow.log_metrics({f"best_eval_{k}": v for k, v in result.best_metrics.items()})
        mlflow.log_metric("train_seconds", result.seconds)
        if result.checkpoint is not None:
            mlflow.log_artifact(str(result.checkpoint))
    return result
