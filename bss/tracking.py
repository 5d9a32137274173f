"""MLflow set-up shared by training, search and the self-training loop.

Default store: ``sqlite:///mlflow.db`` in the working directory, artifacts in ``mlartifacts/``
beside it (MLflow's file store is in maintenance mode; with SQLite the artifact location must be
set explicitly). Open the UI with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from bss.errors import BSSError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def artifact_root_for(uri: str) -> str | None:
    """For a SQLite store, an ``mlartifacts`` folder beside the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def normalize_uri(uri: str) -> str:
    """Make a relative SQLite path absolute, so Ray workers in other folders share the store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    return uri


@contextlib.contextmanager
def _store_lock(uri: str):
    """For a SQLite store, an exclusive lock on ``<db>.lock`` while the store and the experiment
    are made: two loops started together on a new store would otherwise race MLflow's table
    creation ("table experiments already exists") and one of them would die."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def setup(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri``, create ``experiment`` if needed; return its id.

    Safe when several processes start on one store at once: SQLite stores are made under a file
    lock, and an experiment created by another process meanwhile is looked up again."""
    import mlflow

    uri = normalize_uri(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        for attempt in range(3):
            try:
                found = mlflow.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else mlflow.create_experiment(experiment, artifact_location=artifact_root_for(uri))
                break
            except Exception as exc:  # noqa: BLE001 - one clear message for any store problem
                if attempt == 2:
                    raise BSSError(f"cannot use the MLflow store {uri} (experiment {experiment!r}): {exc}") from None
                time.sleep(0.5 * (attempt + 1))  # another host created it meanwhile: look again
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"model.args.encoder_name": "resnet34", ...}`` for ``log_params``."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:500]
    return out


def active() -> bool:
    import mlflow

    return mlflow.active_run() is not None
