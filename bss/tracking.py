"""MLflow set-up shared by training, search and the self-training loop.

Default store: ``sqlite:///mlflow.db`` in the working directory, artifacts in ``mlartifacts/``
beside it (MLflow's file store is in maintenance mode; with SQLite the artifact location must be
set explicitly). Open the UI with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""
from __future__ import annotations

import contextlib
import functools
import math
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


def _guarded(method):
    """A tracking call that never stops the loop: the first failure is reported once and every
    later call is skipped (the loop's own files, state.json and the report, stay complete)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.failure is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store failure: the store is lost for this run
            self.fail(exc)
            return None

    return call


class Tracker:
    """The loop's MLflow runs, by explicit run id (no global active run in the driver).

    The store must work when the loop starts (:func:`setup` raises a clear error otherwise). If
    it fails later (deleted, read-only, server gone), the loop goes on: one warning, then no
    more tracking calls; everything the loop decides lives in its own run folder.
    """

    def __init__(self, uri: str, experiment: str, say=print):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # its errors are raised too, and handled here
        self.uri = normalize_uri(uri)
        self.experiment_id = setup(self.uri, experiment)
        self.client = MlflowClient(self.uri)
        self.failure: str | None = None
        self.say = say

    @property
    def ok(self) -> bool:
        return self.failure is None

    def fail(self, exc: Exception) -> None:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        telling = next((line for line in lines if "Error" in line or "error" in line), lines[0] if lines else "")
        self.failure = f"{type(exc).__name__}: {telling[:300]}"
        self.say(f"warning: the MLflow store {self.uri} failed ({self.failure}); the loop goes on without it, recording to its own run folder (state.json, report.*)")

    @_guarded
    def create(self, name: str, parent: str | None, tags: dict) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    @_guarded
    def reopen(self, run_id: str | None) -> None:
        if run_id and self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str | None, status: str) -> None:
        if run_id and self.ok:
            try:
                self.client.set_terminated(run_id, status)
            except Exception:  # noqa: BLE001 - never hide the real error behind a tracking one
                pass

    @_guarded
    def params(self, run_id: str | None, params: dict) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        have = set(self.client.get_run(run_id).data.params)
        items = [Param(k, v) for k, v in flat.items() if k not in have]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    @_guarded
    def metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if items:
            self.client.log_batch(run_id, metrics=items)

    @_guarded
    def artifact(self, run_id: str | None, path: str | Path, folder: str | None = None) -> None:
        if run_id and Path(path).exists():
            self.client.log_artifact(run_id, str(path), folder)

    @_guarded
    def tag(self, run_id: str | None, key: str, value) -> None:
        if run_id:
            self.client.set_tag(run_id, key, str(value)[:5000])
