"""The Ray Tune trainable: one trial = one :class:`~bss.training.trainer.Trainer` run.

Each trial trains on the iteration's training set and reports every EVAL evaluation to Tune
(``tune.report``), with ``search_score``: the best value so far of the promotion rule's
objective, which TPE and ASHA maximise. Everything a trial produces lives in its folder
``<run-dir>/iter_<k>/trials/<key>/``::

    record.json   state (running | complete | stopped | failed), params, config, best row, MLflow run id
    rows.jsonl    one line per evaluation, appended (and fsync'd) *before* it is reported
    promote.pt    the weights of the best evaluation under the promotion rule

The key is ``t<ordinal>-<hash of the resolved config>``. That folder doubles as a **replay
cache**: when a search is restarted after a kill, a trial whose folder says it finished
(complete, stopped by ASHA, or failed) does not train again; it reports its recorded rows (or
raises its recorded error), so the searcher and ASHA see exactly what the first run saw and the
restarted search proposes the same trials. A trial that was cut off mid-training trains again
from scratch with a fresh MLflow run (its half-written run is deleted first; a deleted run id is
never reopened). Each attempt holds a lock on its trial key (``<trials>/.<key>.lock``) and stamps
its record with an ``attempt`` id: after a SIGKILL the killed driver's Ray worker can live on for
a moment, so the resumed search waits for that lock before cleaning up, and an attempt whose
folder was removed or taken over stops without writing anything (:class:`Superseded`).

Start-up: the heavy imports (torch, the trainer, MLflow) happen inside the function, once per
worker process; with ``reuse_actors`` the next trial on the same worker skips them. Each report
carries ``setup_seconds`` (trainable entry -> first training step ready), ``import_seconds``
and ``cold_start`` so the benchmark can show the effect.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bss.search.promotion import PromotionRule
from bss.search.state import atomic_write_json, read_json

RECORD = "record.json"
ROWS = "rows.jsonl"
CHECKPOINT = "promote.pt"
FINISHED_STATES = ("complete", "stopped", "failed")


LOCK_WAIT = 120.0  # seconds to wait for a previous attempt's worker to die after a kill


class TrialFailed(RuntimeError):
    """A replayed trial that failed the first time fails again with the same message."""


class Superseded(RuntimeError):
    """This attempt no longer owns its trial folder (a resumed search took it over): stop quietly."""


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled params; pickled once per search."""

    base: dict  # config dict: base config + the loop's keys (datasets, data_root, device...)
    space: object | None  # SearchSpace (None: retraining a fixed config with several seeds)
    rule: PromotionRule
    trials_dir: str
    seed: int
    iteration: int
    cpus: float = 1.0
    gpus: float = 0.0
    mlflow: dict | None = None  # {"uri", "experiment_id", "parent_run_id"}
    seeds: dict = field(default_factory=dict)  # retraining: replica -> seed

    def trial_config(self, params: dict) -> dict:
        """The resolved training config of a trial, as a plain dict."""
        replica = params.get("replica")
        sampled = {k: v for k, v in params.items() if k != "replica"}
        config = self.space.apply(self.base, sampled) if self.space is not None else json.loads(json.dumps(self.base))
        config["seed"] = int(self.seeds.get(int(replica), self.seed)) if replica is not None else int(self.seed)
        config["device"] = "cuda" if self.gpus > 0 else "cpu"
        config["visualization_samples"] = 0  # the loop draws the promoted model's overlays, not every trial
        return config


def config_hash(config: dict) -> str:
    text = json.dumps({k: v for k, v in config.items() if k != "output_dir"}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def trial_key(ordinal: int, config: dict) -> str:
    return f"t{ordinal:03d}-{config_hash(config)}"


def ordinal_from_name(name: str) -> int:
    """Trial names are ``trial_<n>`` (see tune_search.trial_name)."""
    try:
        return int(str(name).rsplit("_", 1)[-1])
    except ValueError:
        return 0


def read_record(folder: str | Path) -> dict | None:
    path = Path(folder) / RECORD
    return read_json(path) if path.is_file() else None


def read_rows(folder: str | Path) -> list[dict]:
    path = Path(folder) / ROWS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill: everything before it counts
            break
    return rows


def lock_path(trials_dir: str | Path, key: str) -> Path:
    return Path(trials_dir) / f".{key}.lock"


def acquire_trial_lock(trials_dir: str | Path, key: str, timeout: float = LOCK_WAIT):
    """An exclusive lock on one trial key, held by the attempt that trains it (``flock``).

    After a SIGKILL of the driver, its Ray worker can outlive it for a moment and keep writing
    into the trial folder (and its MLflow run). The resumed search takes the lock before it
    cleans up or re-runs that trial, so it waits for that worker to die (the kernel releases
    the lock with the process). Returns the open handle (close it to release), or None when
    locking is unavailable or the wait timed out (the ownership checks still apply then).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    path = lock_path(trials_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.05)


def _owned(folder: Path, attempt: str) -> bool:
    """Whether ``folder`` still belongs to this attempt (not removed nor taken over since)."""
    if not folder.is_dir():
        return False
    try:
        record = read_record(folder)
    except Exception:  # noqa: BLE001
        return False
    return record is not None and record.get("attempt") == attempt


def _save_record(folder: Path, state: dict) -> None:
    """Write the attempt's record, unless the folder was taken over (then raise Superseded)."""
    if not _owned(folder, state["attempt"]):
        raise Superseded(f"{folder.name}: attempt {state['attempt']} was superseded")
    atomic_write_json(folder / RECORD, state)


def _append_row(folder: Path, row: dict) -> None:
    if not folder.is_dir():
        raise Superseded(f"{folder.name}: the trial folder was removed")
    with open(folder / ROWS, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _numeric(row: dict) -> dict:
    return {k: (float(v) if not isinstance(v, bool) else bool(v)) for k, v in row.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------- MLflow (trial side)


def _mlflow_client(ctx: TrialContext):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(ctx.mlflow["uri"])
    return MlflowClient(ctx.mlflow["uri"])


def _create_run(ctx: TrialContext, ordinal: int, key: str, params: dict, config: dict) -> str | None:
    if not ctx.mlflow:
        return None
    from mlflow.entities import Param

    from bss import tracking

    client = _mlflow_client(ctx)
    tags = {
        "mlflow.parentRunId": ctx.mlflow["parent_run_id"],
        "bss.kind": "trial",
        "bss.iteration": str(ctx.iteration),
        "bss.trial": str(ordinal),
        "bss.trial_key": key,
    }
    run = client.create_run(ctx.mlflow["experiment_id"], run_name=f"iter{ctx.iteration}-trial{ordinal:02d}", tags=tags)
    logged = {f"search.{k}": str(v)[:500] for k, v in params.items()}
    logged.update(tracking.flatten(config))
    items = [Param(k, v) for k, v in logged.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id


def _end_run(ctx: TrialContext, run_id: str | None, status: str, tags: dict | None = None) -> None:
    if not ctx.mlflow or not run_id:
        return
    try:
        client = _mlflow_client(ctx)
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, str(v)[:5000])
        client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - the driver fixes statuses afterwards anyway
        pass


def _run_usable(ctx: TrialContext, run_id: str | None) -> bool:
    """Whether a recorded MLflow run can be reopened (exists and is not deleted)."""
    if not ctx.mlflow or not run_id:
        return False
    try:
        return _mlflow_client(ctx).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - gone
        return False


def _delete_stale_run(ctx: TrialContext, run_id: str | None) -> None:
    if ctx.mlflow and run_id:
        try:
            _mlflow_client(ctx).delete_run(run_id)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _start_run(mlflow, run_id: str, state: dict) -> None:
    """Make the trial's run active for the trainer's logging; a store failure only stops tracking."""
    try:
        mlflow.start_run(run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - a tracking failure is not a training failure
        state["tracking_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        _drop_active_run(mlflow)


def _drop_active_run(mlflow) -> None:
    """Forget the active run without talking to the store (which failed)."""
    from mlflow.tracking import fluent

    fluent._active_run_stack.set([])  # noqa: SLF001 - MLflow 3's per-thread stack of active runs


# --------------------------------------------------------------------------- the trainable


def train_trial(params: dict, context: TrialContext) -> None:
    """Tune function trainable (bound to ``context`` with ``tune.with_parameters``)."""
    entry, wall_entry = time.perf_counter(), time.time()
    cold = "bss.training.trainer" not in sys.modules
    from ray import tune

    ordinal = int(params["replica"]) if "replica" in params else ordinal_from_name(tune.get_context().get_trial_name())
    config = context.trial_config(params)
    key = trial_key(ordinal, config)
    lock = acquire_trial_lock(context.trials_dir, key)
    try:
        _train_trial(params, context, entry, wall_entry, cold, ordinal, config, key)
    finally:
        if lock is not None:
            lock.close()


def _train_trial(params: dict, context: TrialContext, entry: float, wall_entry: float, cold: bool, ordinal: int, config: dict, key: str) -> None:
    from ray import tune

    folder = Path(context.trials_dir) / key
    record = read_record(folder)
    rule = context.rule
    base_metrics = {"trial_key": key, "trial_ordinal": ordinal, "trial_entry_time": wall_entry, "cold_start": cold}

    skip = 0
    if record and record.get("state") in FINISHED_STATES:
        rows = read_rows(folder)
        for row in rows:
            tune.report(dict(row, **base_metrics, replayed=True))
        if record["state"] == "failed":
            raise TrialFailed(record.get("error") or "the trial failed")
        if record["state"] == "complete" or not rows:
            return
        # stopped by ASHA the first time, but not now (only with concurrency > 1): train again
        # from scratch and report from where the recording ends (training is deterministic)
        skip = len(rows)
    elif record:  # cut off mid-training by a kill: start over
        _delete_stale_run(context, record.get("run_id"))
    if folder.exists() and not skip:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config["output_dir"] = str(folder)

    import torch

    torch.set_num_threads(max(1, int(round(context.cpus))))
    from bss.config import from_dict
    from bss.training.checkpoint import save_checkpoint
    from bss.training.trainer import Trainer

    import_seconds = time.perf_counter() - entry
    attempt = uuid.uuid4().hex
    state = {
        "state": "running",
        "attempt": attempt,
        "ordinal": ordinal,
        "key": key,
        "iteration": context.iteration,
        "params": params,
        "config": config,
        "run_id": None,
        "best": None,
        "checkpoint": None,
        "evaluations": 0,
        "cold_start": cold,
        "import_seconds": import_seconds,
    }
    # the record claims the folder (and names no run yet) before the MLflow run exists, so a
    # kill in between leaves a run that no record names: the resumed search deletes such runs
    atomic_write_json(folder / RECORD, state)
    # a trial cut off mid-training always gets a fresh run; a stopped trial trained again keeps
    # its run unless that run is gone (deleted), and a deleted run id is never reused
    reuse = bool(skip and record.get("run_id") and _run_usable(context, record.get("run_id")))
    try:
        run_id = record.get("run_id") if reuse else _create_run(context, ordinal, key, params, config)
    except Exception as exc:  # noqa: BLE001 - a tracking failure is not a training failure
        run_id, reuse = None, False
        state["tracking_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    state["run_id"] = run_id
    _save_record(folder, state)

    import mlflow

    if context.mlflow:
        mlflow.set_tracking_uri(context.mlflow["uri"])
    status, tags = "FAILED", {}
    superseded = False
    try:
        trainer = Trainer(from_dict(config), output_dir=folder, progress=False)
        setup_seconds = time.perf_counter() - entry
        state["setup_seconds"] = setup_seconds
        best: dict | None = None
        evaluations = 0

        def on_evaluation(row: dict) -> None:
            nonlocal best, evaluations
            evaluations += 1
            row = _numeric(row)
            if rule.better(row, best):
                best = dict(row)
                scores = {k[len("eval_"):]: v for k, v in row.items() if k.startswith("eval_")}
                save_checkpoint(folder / CHECKPOINT, trainer.model, trainer.config, scores, row["epoch"])
            row["objective"] = rule.objective(row)
            row["search_score"] = rule.objective(best)
            row["setup_seconds"] = setup_seconds
            row["import_seconds"] = import_seconds
            row["since_entry"] = time.perf_counter() - entry
            if evaluations <= skip:
                return
            if evaluations == skip + 1 and skip and reuse:
                _start_run(mlflow, run_id, state)  # resume logging where the recording ended
            _append_row(folder, row)
            state.update(best=best, checkpoint=str(folder / CHECKPOINT), evaluations=evaluations)
            if abs(row["epoch"] - trainer.epochs) < 1e-6:
                # the last evaluation: the trial is complete now. ASHA may answer this report
                # with STOP (it has reached max_t), so everything final is written before it.
                finish(row)
            _save_record(folder, state)
            tune.report(dict(row, **base_metrics, replayed=False))

        def finish(row: dict) -> None:
            nonlocal status, tags
            state.update(state="complete", train_seconds=row["since_entry"] - setup_seconds)
            status, tags = "FINISHED", {"bss.outcome": "complete"}
            try:
                if mlflow.active_run() is not None and best is not None:
                    mlflow.log_metrics({f"best_{k}": v for k, v in best.items() if k.startswith("eval_")})
                    mlflow.log_metrics({"train_seconds": state["train_seconds"], "setup_seconds": setup_seconds})
                if mlflow.active_run() is not None:
                    mlflow.end_run(status)
            except Exception as exc:  # noqa: BLE001 - the trial is complete all the same
                state["tracking_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                _drop_active_run(mlflow)
            _end_run(context, run_id, status, tags)

        trainer.callbacks.append(on_evaluation)
        if run_id and not reuse:
            _start_run(mlflow, run_id, state)
        trainer.fit()
        if state["state"] != "complete":  # (the last evaluation normally completes the trial)
            finish({"since_entry": time.perf_counter() - entry})
            _save_record(folder, state)
        (folder / "best.pt").unlink(missing_ok=True)  # the trainer's own pick; promote.pt is ours
    except Superseded:
        superseded = True
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        if state["state"] == "complete":  # every evaluation is in: the trial stands, note the error
            state["warning"] = message[:2000]
            _save_record(folder, state)
            return
        if not _owned(folder, attempt):  # the folder was taken over: this attempt records nothing
            superseded = True
            raise Superseded(f"{key}: attempt {attempt} was superseded ({message[:200]})") from exc
        state.update(state="failed", error=message[:2000])
        _save_record(folder, state)
        tags = {"bss.outcome": "failed", "bss.error": message}
        raise
    except BaseException:  # SystemExit: Tune stopped the trial (ASHA, time budget)
        if state["state"] != "complete":
            status, tags = "KILLED", {"bss.outcome": "stopped"}
        raise
    finally:
        if superseded:  # the run may be deleted or in other hands: only drop the local handle
            if mlflow.active_run() is not None:
                try:
                    mlflow.end_run(status)
                except Exception:  # noqa: BLE001
                    pass
        elif state["state"] != "complete" or mlflow.active_run() is not None:
            if mlflow.active_run() is not None:
                try:
                    mlflow.end_run(status)
                except Exception:  # noqa: BLE001 - the store is gone: drop the local handle only
                    _drop_active_run(mlflow)
            _end_run(context, run_id, status, tags)
