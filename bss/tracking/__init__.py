"""MLflow, for the whole project: this package is the only code that imports it.

Default store: ``sqlite:///mlflow.db`` in the working directory, artifacts in ``mlartifacts/``
beside it (MLflow's file store is in maintenance mode; with SQLite the artifact location must be
set explicitly). Open the UI with ``python drivers/ui.py`` (:mod:`bss.tracking.ui`).

Which failures stop a run, in one place:

* **At the start** (:func:`setup`, :meth:`Tracker.open`): a store that cannot be opened or an
  experiment that cannot be made is one :class:`~bss.errors.BSSError` naming the URI. Nothing
  has been trained yet, so the user fixes the URI and starts again. A tracking server is first
  asked ``GET <uri>/health`` (:func:`probe`, a few seconds): one that does not answer is said at
  once, not after MLflow's own retries (minutes per call).
* **Later** (every :class:`Tracker` call): the first failure is reported once through ``say``
  and recorded in :attr:`Tracker.failure`; every later call is skipped. A driver's tracker on a
  server also watches it (:class:`ServerWatch`): a server that stops answering is reported
  within seconds, even while no call is due. Training, the search and
  the loop go on: everything they decide lives in their own files (state.json, trial records),
  so a lost store loses the dashboard, never the run.
* **Cleanup** (deleting a killed attempt's run, giving a run its final status) never raises.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from bss.environment import quiet
from bss.errors import BSSError

# MLflow's HTTP client retries a refused or silent request 7 times with a backoff that grows to
# 2 minutes, and waits 120 s for each answer: a tracking server that is down took minutes per
# call. A few short retries keep a brief blip harmless and say a real loss in seconds. A value
# the user set wins (setdefault), so a slow server can be given more.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_SECONDS = 5.0  # how long a tracking server gets to answer GET /health at the start

quiet(extra=HTTP_SETTINGS)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def health(uri: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when the tracking server ``uri`` answers ``GET <uri>/health`` within ``timeout``
    seconds (any HTTP status: a server behind a login or a proxy answers too), else why not."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered, with a status of its own
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return getattr(reason, "strerror", None) or str(reason)


def probe(uri: str, timeout: float = PROBE_SECONDS) -> None:
    """Before any MLflow call: a tracking server that does not answer is one clear error (a
    file or database store is left to :func:`setup`)."""
    if not is_server(uri):
        return
    why = health(uri, timeout)
    if why is not None:
        raise BSSError(
            f"the MLflow tracking server {uri} does not answer (GET {uri.rstrip('/')}/health: {why}). "
            f"Start it (mlflow server --host HOST --port PORT), check the URI, or record to a local store instead (--tracking-uri sqlite:///mlflow.db)."
        )


def artifact_root_for(uri: str) -> str | None:
    """For a SQLite store, an ``mlartifacts`` folder beside the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def normalize_uri(uri: str) -> str:
    """Make a relative SQLite path absolute, so Ray workers in other folders share the store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).expanduser().resolve())
    return uri


def _store_lock(uri: str):
    """For a SQLite store, an exclusive lock on ``<db>.lock`` while the store and the experiment
    are made: two loops started together on a new store would otherwise race MLflow's table
    creation ("table experiments already exists") and one of them would die."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from bss import filelock

    return filelock.held(f"{uri[len('sqlite:///') :]}.lock")


def setup(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri``, create ``experiment`` if needed; return its id.

    Safe when several processes start on one store at once: SQLite stores are made under a file
    lock, and an experiment created by another process meanwhile is looked up again."""
    uri = normalize_uri(uri)
    probe(uri)
    import mlflow

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
    mark_model_training(uri, exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def mark_model_training(uri: str, experiment_id: str) -> None:
    """MLflow 3's UI opens an experiment on its GenAI traces view unless the experiment says it
    is model training: the tag makes it open on its runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    key, value = EXPERIMENT_KIND
    if client.get_experiment(experiment_id).tags.get(key) != value:
        client.set_experiment_tag(experiment_id, key, value)


def ui_url(experiment_id: str, search_filter: str | None = None, base: str = "http://127.0.0.1:5000", view: str | None = None) -> str:
    """The experiment's runs table in ``mlflow ui`` (its model-training view), filtered, or laid
    out as the shared view ``view`` (see :meth:`Tracker.share_view`) says."""
    from urllib.parse import quote

    query = "workflowType=machine_learning"
    if view:
        query += f"&viewStateShareKey={quote(view)}"
    elif search_filter:
        query += f"&searchFilter={quote(search_filter)}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


SHARED_VIEW_TAG = "mlflow.sharedViewState."
# Okabe-Ito's colour-blind-safe palette, ordered so that neighbours differ most: MLflow's own
# colours come from a hash of the run id, and two of three iterations could look alike
RUN_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")


def run_colour(index: int) -> dict[str, str]:
    """The tag that gives the ``index``-th run of a series its own colour in the MLflow UI."""
    return {"mlflow.runColor": RUN_COLOURS[index % len(RUN_COLOURS)]}


def view_state(search_filter: str, order_by: str, columns: dict[str, list[str]]) -> dict:
    """A runs-table layout as the MLflow UI's "Share" button stores it: the filter, the sort key
    (ascending) and the columns shown (``{"metrics": [...], "params": [...], "tags": [...]}``).
    Sorting by anything but the start time shows the matching runs flat, not folded under
    their parent."""

    def column(kind: str, key: str) -> str:
        return f"{kind}.`{key}`"

    selected = [column("attributes", "Dataset")] + [column(kind, key) for kind, keys in columns.items() for key in keys]
    return {"searchFilter": search_filter, "orderByKey": order_by, "orderByAsc": True, "selectedColumns": selected, "runsHiddenMode": "SHOW_ALL"}


@functools.cache
def source_tags() -> dict[str, str]:
    """Where a run's code came from: the entry point and the git commit (MLflow's own tags, so
    the UI shows them), and whether the work tree had uncommitted changes."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "bss"}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return tags
    if commit:
        tags.update({"mlflow.source.git.commit": commit, "bss.git_dirty": str(bool(dirty)).lower()})
    return tags


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


def _guarded(method):
    """A tracking call that never stops the caller: the first failure is reported once and every
    later call is skipped (see the module docstring)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.failure is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any store failure: the store is lost for this process
            self.fail(exc)
            return None

    return call


def _quiet_loggers() -> None:
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # its errors are raised too, and handled here
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # a lost store is said once, by Tracker.fail, not every 10 s by the monitor


class ServerWatch:
    """Asks a tracking server ``GET /health`` every ``interval`` seconds in a daemon thread; after
    ``misses`` unanswered asks in a row the tracker fails (one warning, every later call skipped),
    so a server that went away is said within ``misses * (interval + timeout)`` seconds even
    while the loop trains and calls nothing. The thread ends with its tracker or its failure."""

    def __init__(self, tracker: "Tracker", interval: float = 3.0, timeout: float = 3.0, misses: int = 3):
        self.tracker = weakref.ref(tracker)
        self.uri, self.interval, self.timeout, self.misses = tracker.uri, interval, timeout, misses
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="bss-tracking-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        missed, since = 0, None
        while not self.stopped.wait(self.interval):
            tracker = self.tracker()
            if tracker is None or tracker.failure is not None:
                return
            del tracker  # not kept alive while waiting
            why = health(self.uri, self.timeout)
            missed, since = (0, None) if why is None else (missed + 1, since or time.monotonic())
            if missed >= self.misses:
                tracker = self.tracker()
                if tracker is not None:
                    tracker.fail_with(f"the server stopped answering ({why}; {missed} health checks over {time.monotonic() - since:.0f} s)")
                return

    def stop(self) -> None:
        self.stopped.set()


class Tracker:
    """MLflow runs by explicit run id (no global active run anywhere).

    ``Tracker.open(uri, experiment)`` in a driver makes the store and the experiment (and fails
    with one clear error if it cannot); ``Tracker(uri, experiment_id)`` in a Ray worker connects to
    an experiment the driver made. After that, store failures follow the module's policy.
    """

    def __init__(self, uri: str, experiment_id: str, say=print, going_on: str = "going on without it"):
        from mlflow.tracking import MlflowClient

        _quiet_loggers()
        self.uri = normalize_uri(uri)
        self.experiment_id = experiment_id
        self.failure: str | None = None
        self.say, self.going_on = say, going_on
        self._failing = threading.Lock()
        self.watch: ServerWatch | None = None
        try:
            self.client = MlflowClient(self.uri)
        except Exception as exc:  # noqa: BLE001 - a worker whose store is gone trains on untracked
            self.client = None
            self.fail(exc)

    @classmethod
    def open(cls, uri: str, experiment: str, say=print, going_on: str = "going on without it") -> "Tracker":
        _quiet_loggers()
        tracker = cls(uri, setup(normalize_uri(uri), experiment), say=say, going_on=going_on)
        if is_server(tracker.uri) and tracker.ok:
            tracker.watch = ServerWatch(tracker)
        return tracker

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks, and with them this tracker: a copy has no lock and no watch of its own."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_failing", "watch")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _failing=threading.Lock(), watch=None)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def fail(self, exc: Exception) -> None:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        telling = next((line for line in lines if "Error" in line or "error" in line), lines[0] if lines else "")
        self.fail_with(f"{type(exc).__name__}: {telling[:300]}")

    def fail_with(self, failure: str) -> None:
        """Record the first failure and say it once (a call and the server watch may fail together)."""
        with self._failing:
            if self.failure is not None:
                return
            self.failure = failure
        if self.watch is not None:
            self.watch.stop()
        self.say(f"warning: the MLflow store {self.uri} failed ({self.failure}); {self.going_on}")

    # ---- runs ----------------------------------------------------------------------------
    @_guarded
    def create(self, name: str, parent: str | None, tags: dict) -> str:
        tags = source_tags() | {k: str(v) for k, v in tags.items()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    @_guarded
    def reopen(self, run_id: str | None) -> None:
        if run_id and self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    @_guarded
    def share_view(self, key: str, state: dict) -> None:
        """Store a runs-table layout in the experiment, as the UI's "Share" button does; the
        link ``ui_url(experiment_id, view=key)`` opens it."""
        import json

        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))

    def usable(self, run_id: str | None) -> bool:
        """Whether ``run_id`` can be logged to again: it exists and is not deleted."""
        if not run_id or not self.ok:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 - gone
            return False

    def end(self, run_id: str | None, status: str, tags: dict | None = None, only_running: bool = False) -> None:
        """Give ``run_id`` its final ``status`` (FINISHED | KILLED | FAILED) and ``tags``. A deleted
        run is left alone, and with ``only_running`` so is a run that already has a final status.
        Never raises: it runs on the way out of errors, which it must not hide."""
        if not run_id or not self.ok:
            return
        try:
            run = self.client.get_run(run_id)
            if run.info.lifecycle_stage != "active" or (only_running and run.info.status != "RUNNING"):
                return
            for key, value in (tags or {}).items():
                self.client.set_tag(run_id, key, str(value)[:5000])
            self.client.set_terminated(run_id, status)
        except Exception:  # noqa: BLE001 - see the docstring
            pass

    def delete(self, run_id: str | None) -> None:
        """Delete a run (a killed attempt's); a run already gone is fine. Never raises."""
        if run_id and self.ok:
            try:
                self.client.delete_run(run_id)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def running_children(self, parent: str, kind: str) -> list[tuple[str, dict]]:
        """(run id, tags) of the RUNNING runs of ``kind`` under ``parent``; [] when the store fails."""
        if not self.ok:
            return []
        try:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`bss.kind` = '{kind}' and attributes.status = 'RUNNING'",
                max_results=5000,
            )
        except Exception:  # noqa: BLE001 - bookkeeping only
            return []
        return [(run.info.run_id, dict(run.data.tags)) for run in runs]

    # ---- logging -------------------------------------------------------------------------
    @_guarded
    def params(self, run_id: str | None, params: dict, fresh: bool = False) -> None:
        """Log ``params`` (flattened); keys the run already has are skipped unless ``fresh``."""
        if not run_id:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        have = set() if fresh else set(self.client.get_run(run_id).data.params)
        items = [Param(k, v) for k, v in flat.items() if k not in have]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    @_guarded
    def metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        """Log the finite numbers of ``metrics`` (bools and strings are skipped) at ``step``."""
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    @_guarded
    def artifact(self, run_id: str | None, path: str | Path, folder: str | None = None) -> None:
        if run_id and Path(path).exists():
            self.client.log_artifact(run_id, str(path), folder)

    @_guarded
    def tag(self, run_id: str | None, key: str, value) -> None:
        if run_id:
            self.client.set_tag(run_id, key, str(value)[:5000])

    @_guarded
    def image(self, run_id: str | None, image, key: str, step: int = 0) -> None:
        """An image (uint8 (H, W, 3) array) under ``key`` at ``step``: the UI shows a slider over steps."""
        if run_id and image is not None:
            self.client.log_image(run_id, image, key=key, step=step)

    @_guarded
    def dataset(self, run_id: str | None, name: str, digest: str, source: str, profile: dict, context: str) -> None:
        """Dataset lineage (``mlflow.log_input``): the dataset ``name`` with its ``digest``,
        ``source`` path and ``profile`` (counts), used in ``context`` (training, evaluation, ...)."""
        if not run_id:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": str(source)}), profile=json.dumps(profile))
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    @_guarded
    def describe(self, run_id: str | None, markdown: str) -> None:
        """The run's description (the UI's "Description" box)."""
        if run_id:
            self.client.set_tag(run_id, "mlflow.note.content", markdown[:20000])

    @_guarded
    def system_metrics(self, run_id: str | None, interval: float = 10.0):
        """Start logging CPU, memory, disk (and GPU) use to ``run_id`` every ``interval`` seconds
        in a background thread; returns the monitor (call :meth:`stop_system_metrics`), or None."""
        if not run_id:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        return monitor

    @staticmethod
    def stop_system_metrics(monitor) -> None:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception:  # noqa: BLE001 - the store may be gone; the thread ends either way
                pass

    @_guarded
    def register_model(self, run_id: str | None, checkpoint: str | Path, name: str, alias: str = "best") -> str | None:
        """Log ``checkpoint`` as a pyfunc model (:mod:`bss.tracking.model`) under ``run_id``,
        register it as ``name`` and point ``alias`` at it; returns the version."""
        if not run_id:
            return None
        from bss.tracking.model import log_segmentation_model

        return log_segmentation_model(self.uri, str(checkpoint), run_id, name, alias)

    def run(self, run_id: str | None) -> "RunLog":
        return RunLog(self, run_id)


class RunLog:
    """One run of a :class:`Tracker`, for code that logs to a single run (the trainer)."""

    def __init__(self, tracker: Tracker, run_id: str | None):
        self.tracker, self.run_id = tracker, run_id

    def metrics(self, metrics: dict, step: int = 0) -> None:
        self.tracker.metrics(self.run_id, metrics, step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.tracker.artifact(self.run_id, path, folder)
