"""One search: a Ray Tune ``Tuner`` with an Optuna TPE searcher and an ASHA scheduler.

* Trials are :func:`bss.search.trial.train_trial`, each with ``cpus``/``gpus`` from
  :func:`plan_resources` (a fractional GPU lets several trials share one card).
* ``max_concurrent_trials`` limits concurrency; ``time_budget_s`` ends the search (running
  trials are stopped and count as stopped).
* A trial that raises (a NaN loss raises ``TrainingDiverged``) is recorded as failed: Tune goes
  on, Optuna marks it FAIL, MLflow marks its run FAILED with the error as a tag.
* Workers are reused between trials (``reuse_actors``), so torch and the trainer are imported
  once per worker, not once per trial.
* Resume: a search cut off by a kill is *restarted* with the same seed; the trial folders replay
  what already finished (see :mod:`bss.search.trial`). With one trial at a time the restarted
  search proposes the same trials in the same order and ends with the same result as an
  uninterrupted one. (We do not use ``Tuner.restore``: it restores the Optuna study but
  re-runs in-flight trials in a different order, so results would depend on when the kill came.)
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bss.errors import BSSError
from bss.search.promotion import Candidate, PromotionRule
from bss.search.state import atomic_write_json
from bss.search.trial import TrialContext, acquire_trial_lock, read_record, read_rows, train_trial, trial_key

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- Ray and resources


def quiet_environment() -> None:
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files per trial
        "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C raises KeyboardInterrupt: the loop saves its state and exits
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "100",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }.items():
        os.environ.setdefault(key, value)


def local_resources() -> tuple[int, int]:
    """(CPUs this process may use, CUDA GPUs visible)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    import torch

    return cpus, torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(address: str | None = None, cpus: int | None = None, gpus: int | None = None) -> tuple[int, int, bool]:
    """Join ``address`` or start a local Ray; reuse one already running in this process.

    Returns (cluster CPUs, cluster GPUs, whether this call started Ray).
    """
    import ray

    quiet_environment()
    started = False
    if not ray.is_initialized():
        path = os.environ.get("PYTHONPATH", "")
        if str(ROOT) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
        env = {k: os.environ[k] for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE") if k in os.environ}
        try:
            if address:
                ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR", object_store_memory=256 * 1024**2)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise BSSError(f"cannot start or join {where}: {exc}") from None
        started = True
    res = ray.cluster_resources()
    return int(res.get("CPU", 0)), int(res.get("GPU", 0)), started


@dataclass
class Resources:
    cpus_per_trial: float
    gpus_per_trial: float
    concurrency: int

    def describe(self) -> str:
        gpu = f", {self.gpus_per_trial:g} GPU" if self.gpus_per_trial else ""
        return f"{self.concurrency} trial(s) at a time, each {self.cpus_per_trial:g} CPU{gpu}"


def plan_resources(total_cpus: int, total_gpus: int, trials: int, concurrency: int | None = None, cpus_per_trial: float | None = None, gpus_per_trial: float | None = None) -> Resources:
    """Resources per trial and concurrency; every flag left out is filled in.

    * GPUs: 2 trials share each GPU (``gpus_per_trial`` = GPUs / concurrency), CPUs split evenly.
    * CPUs only: 1 CPU per trial up to 8 cores (2 above), as many trials as fit.
    """
    if total_cpus < 1:
        raise BSSError("the Ray cluster reports no CPU.")
    for name, value in (("--cpus-per-trial", cpus_per_trial), ("--gpus-per-trial", gpus_per_trial)):
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise BSSError(f"{name} must be 0 or more, got {value}.")
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise BSSError(f"--cpus-per-trial must be positive, got {cpus_per_trial}.")
    if concurrency is not None and concurrency < 1:
        raise BSSError(f"--concurrency must be at least 1, got {concurrency}.")
    if gpus_per_trial and gpus_per_trial > total_gpus:
        raise BSSError(f"--gpus-per-trial {gpus_per_trial:g} but the cluster has {total_gpus} GPU(s).")
    if gpus_per_trial and gpus_per_trial > 1 and not float(gpus_per_trial).is_integer():
        raise BSSError(f"--gpus-per-trial {gpus_per_trial:g}: above 1 it must be a whole number (Ray cannot split several GPUs fractionally).")
    if gpus_per_trial is None:
        if total_gpus:
            concurrency = concurrency or max(1, min(trials, 2 * total_gpus))
            share = total_gpus / concurrency
            gpus_per_trial = float(math.floor(share)) if share >= 1 else math.floor(share * 100) / 100
        else:
            gpus_per_trial = 0.0
    if gpus_per_trial and concurrency is None:
        concurrency = max(1, min(trials, int(total_gpus / gpus_per_trial + 1e-9)))
    if cpus_per_trial is None:
        if gpus_per_trial:
            cpus_per_trial = float(max(1, min(8, total_cpus // max(1, concurrency))))
        else:
            cpus_per_trial = 1.0 if total_cpus <= 8 else 2.0
    if cpus_per_trial > total_cpus:
        raise BSSError(f"--cpus-per-trial {cpus_per_trial:g} but the cluster has {total_cpus} CPU(s).")
    if concurrency is None:
        concurrency = max(1, min(trials, int(total_cpus // cpus_per_trial)))
    return Resources(float(cpus_per_trial), float(gpus_per_trial), int(concurrency))


# --------------------------------------------------------------------------- console + bookkeeping


def trial_name(trial) -> str:
    """``trial_<n>``: n counts trials in the order the searcher proposed them, from 1."""
    replica = trial.config.get("replica")
    if replica is not None:
        return f"trial_{int(replica)}"
    return f"trial_{int(str(trial.experiment_tag).split('_')[0])}"


def short_params(params: dict) -> str:
    out = []
    for key, value in params.items():
        if key == "replica":
            continue
        name = key.split(".")[-1] if not key.endswith(".args") else key.split(".")[0]
        out.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(out)


def _say(text: str) -> None:
    print(text, flush=True)


def _tune_callback_class():
    from ray.tune import Callback

    class SearchCallback(Callback):
        """Progress lines, per-trial timings, and the final state of each trial's records."""

        def __init__(self, context: TrialContext, rule: PromotionRule, trials: int, label: str, progress: bool):
            self.context, self.rule, self.trials, self.label, self.progress = context, rule, trials, label, progress
            self.started: dict[str, float] = {}
            self.first_result: dict[str, dict] = {}
            self.ended: dict[str, float] = {}
            self.order: dict[str, tuple[int, dict]] = {}
            self.outcome: dict[str, str] = {}
            self.best: dict | None = None
            self.best_trial = 0

        # helpers
        def _ordinal(self, trial) -> int:
            return int(trial_name(trial).rsplit("_", 1)[-1])

        def _folder(self, trial) -> Path:
            ordinal = self._ordinal(trial)
            config = self.context.trial_config(dict(trial.config))
            return Path(self.context.trials_dir) / trial_key(ordinal, config)

        def _counts(self) -> str:
            done = sum(1 for t in self.outcome.values() if t != "running")
            running = sum(1 for t in self.outcome.values() if t == "running")
            best = "-" if self.best is None else f"{self.rule.metric} {self.best['eval_' + self.rule.metric]:.3f} (trial {self.best_trial})"
            return f"done {done}/{self.trials}, running {running}, best {best}"

        # Tune hooks
        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()
            self.outcome[trial.trial_id] = "running"
            ordinal = self._ordinal(trial)
            self.order[trial.trial_id] = (ordinal, dict(trial.config))
            if self.progress:
                _say(f"{self.label} trial {ordinal:2d} start   {short_params(dict(trial.config))}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id not in self.first_result:
                self.first_result[trial.trial_id] = {"entry": result.get("trial_entry_time"), "time": time.time(), "setup_seconds": result.get("setup_seconds"), "cold_start": result.get("cold_start"), "replayed": result.get("replayed")}
            row = result
            if "eval_" + self.rule.metric in row and self.rule.admissible(row) and self.rule.better(row, self.best):
                self.best, self.best_trial = dict(row), self._ordinal(trial)
            if self.progress:
                replay = " (replayed)" if row.get("replayed") else ""
                _say(
                    f"{self.label} trial {self._ordinal(trial):2d} eval {int(row.get('evaluation', 0)):2d}  "
                    f"recall {row.get('eval_recall', float('nan')):.3f}  precision {row.get('eval_precision', float('nan')):.3f}  "
                    f"IoU {row.get('eval_iou', float('nan')):.3f}  loss {row.get('train_loss', float('nan')):.3f}{replay} | {self._counts()}"
                )

        def _finish(self, trial, failed: bool):
            self.ended[trial.trial_id] = time.time()
            folder = self._folder(trial)
            record = read_record(folder) or {}
            state = record.get("state")
            if not failed and state == "running":  # stopped by ASHA or the time budget
                record.update(state="stopped", evaluations=len(read_rows(folder)))
                atomic_write_json(folder / "record.json", record)
                state = "stopped"
                _mark_run(self.context, record.get("run_id"), "KILLED", {"bss.outcome": "stopped"})
            if failed:
                state = "failed"
                if record.get("state") != "failed":
                    error = _error_text(trial) or "the trial's worker died"
                    if record:
                        record.update(state="failed", error=error)
                        atomic_write_json(folder / "record.json", record)
                    _mark_run(self.context, record.get("run_id"), "FAILED", {"bss.outcome": "failed", "bss.error": error})
            self.outcome[trial.trial_id] = state or ("failed" if failed else "stopped")
            if self.progress:
                ordinal = self._ordinal(trial)
                rows = read_rows(folder)
                best = record.get("best")
                if self.outcome[trial.trial_id] == "failed":
                    error = (read_record(folder) or {}).get("error") or _error_text(trial) or "error"
                    text = f"FAILED: {error.strip().splitlines()[-1][:160]}"
                else:
                    verb = {"complete": "finished", "stopped": "stopped early"}.get(self.outcome[trial.trial_id], self.outcome[trial.trial_id])
                    fig = "" if not best else f" - best recall {best['eval_recall']:.3f} precision {best['eval_precision']:.3f} IoU {best['eval_iou']:.3f}"
                    text = f"{verb} after {len(rows)} eval(s){fig}"
                _say(f"{self.label} trial {ordinal:2d} {text} | {self._counts()}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, failed=True)

    return SearchCallback


def _error_text(trial) -> str | None:
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text()[-2000:]
    except OSError:
        pass
    return getattr(trial, "error_msg", None)


def _mark_run(context: TrialContext, run_id: str | None, status: str, tags: dict, only_running: bool = False) -> None:
    """Give a trial's MLflow run its final status (never leave it RUNNING)."""
    if not context.mlflow or not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(context.mlflow["uri"])
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted
        return
    if run.info.lifecycle_stage != "active":
        return
    if run.info.status == "RUNNING" or (status == "FAILED" and not only_running):
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v)[:5000])
        client.set_terminated(run_id, status)


# --------------------------------------------------------------------------- the search


@dataclass
class SearchOutcome:
    candidates: list[Candidate]
    wall_seconds: float
    timings: list[dict] = field(default_factory=list)  # per trial: launch, setup, train, total


def run_search(
    context: TrialContext,
    trials: int,
    resources: Resources,
    storage_dir: str | Path,
    algorithm: str = "tpe",
    scheduler: dict | None = None,
    max_evaluations: int = 1,
    time_budget: float | None = None,
    reuse_actors: bool = True,
    label: str = "",
    progress: bool = True,
    points: list[dict] | None = None,
) -> SearchOutcome:
    """Run one search (``algorithm``: tpe | random | replicas) and collect its trials.

    ``points``: params (choice labels for choices) to try first, in order, before the searcher's
    own proposals (Optuna's ``points_to_evaluate``).
    """
    quiet_environment()
    import warnings

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    warnings.filterwarnings("ignore", module="optuna")
    # a failed trial is one console line from our callback; its traceback is kept in the trial's
    # record.json and its MLflow run (tag bss.error), not dumped by Tune's own loggers
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    storage_dir = Path(storage_dir)
    tune_dir = storage_dir / "tune"
    if tune_dir.exists():  # a previous attempt of this search, cut off: restart it (trial folders replay)
        shutil.rmtree(tune_dir)
    Path(context.trials_dir).mkdir(parents=True, exist_ok=True)
    clean_interrupted(context.trials_dir, context)
    scheduler = scheduler or {"name": "fifo"}
    rule = context.rule

    if algorithm == "replicas":
        search_alg, param_space = None, {"replica": tune.grid_search(list(range(1, trials + 1)))}
        num_samples = 1
    else:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = context.space
        search_alg = OptunaSearch(space=space.optuna_space(), metric="search_score", mode="max", sampler=space.sampler(context.seed, algorithm), points_to_evaluate=points or None)
        param_space, num_samples = None, trials
    if scheduler.get("name") == "asha" and max_evaluations > 1:
        grace = max(1, min(int(scheduler.get("grace_period", 1)), max_evaluations))
        sched = ASHAScheduler(time_attr="training_iteration", max_t=max_evaluations, grace_period=grace, reduction_factor=float(scheduler.get("reduction_factor", 2)))
    else:
        sched = FIFOScheduler()

    callback = _tune_callback_class()(context, rule, trials, label, progress)
    trainable = tune.with_resources(tune.with_parameters(train_trial, context=context), {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="search_score",
            mode="max",
            search_alg=search_alg,
            scheduler=sched,
            num_samples=num_samples,
            max_concurrent_trials=resources.concurrency,
            time_budget_s=time_budget,
            reuse_actors=reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(storage_dir.resolve()), verbose=0, callbacks=[callback], failure_config=tune.FailureConfig(max_failures=0), log_to_file=False),
    )
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start

    candidates, timings = [], []
    for trial_id, (ordinal, params) in sorted(callback.order.items(), key=lambda item: item[1][0]):
        config = context.trial_config(params)
        key = trial_key(ordinal, config)
        folder = Path(context.trials_dir) / key
        record = read_record(folder) or {}
        rows = read_rows(folder)
        state = record.get("state") or callback.outcome.get(trial_id, "lost")
        if state == "running":
            state = callback.outcome.get(trial_id, "lost")
        best = record.get("best")
        checkpoint = record.get("checkpoint") if best else None
        (folder / "best.pt").unlink(missing_ok=True)  # the trainer's own pick, left when ASHA stopped the trial
        candidates.append(
            Candidate(
                ordinal=ordinal,
                key=key,
                state=state,
                params={k: v for k, v in params.items() if k != "replica"} or {"seed": config["seed"]},
                best=best,
                checkpoint=checkpoint,
                config=config,
                run_id=record.get("run_id"),
                error=record.get("error"),
                evaluations=len(rows),
                train_seconds=float(record.get("train_seconds") or (rows[-1]["since_entry"] - rows[-1]["setup_seconds"] if rows else 0.0)),
                setup_seconds=record.get("setup_seconds"),
                history=rows,
            )
        )
        first = callback.first_result.get(trial_id) or {}
        started = callback.started.get(trial_id)
        timings.append(
            {
                "ordinal": ordinal,
                "state": state,
                "replayed": bool(first.get("replayed")),
                "cold_start": first.get("cold_start"),
                "launch_seconds": (first["entry"] - started) if first.get("entry") and started else None,
                "setup_seconds": first.get("setup_seconds"),
                "trial_wall_seconds": (callback.ended.get(trial_id, time.time()) - started) if started else None,
                "train_seconds": candidates[-1].train_seconds,
            }
        )
    # a kill can leave no callback; make sure no trial run stays RUNNING
    for c in candidates:
        if c.state in ("stopped", "lost"):
            _mark_run(context, c.run_id, "KILLED", {"bss.outcome": c.state})
    atomic_write_json(storage_dir / "search.json", {"wall_seconds": wall, "timings": timings, "algorithm": algorithm, "trials": trials, "resources": resources.__dict__})
    return SearchOutcome(candidates=candidates, wall_seconds=wall, timings=timings)


def clean_interrupted(trials_dir: str | Path, context: TrialContext) -> int:
    """Before a (re)started search: a trial folder still 'running' was cut off by a kill.

    Its MLflow run is deleted and the folder removed, so the trial trains again from scratch
    (with a fresh run) if the searcher proposes it again. Each folder is handled under its trial
    lock: a Ray worker of the killed driver that still trains that trial is waited for, so it
    cannot write into the folder (or reopen the deleted run) after the cleanup. Runs of finished
    trials get their final status if a kill came before the trial or the driver could set it,
    and trial runs that no record names (a kill between creating the run and recording its id)
    are deleted. Returns how many folders were removed.
    """
    removed = 0
    for folder in sorted(Path(trials_dir).glob("t*-*")):
        if not folder.is_dir():
            continue
        lock = acquire_trial_lock(trials_dir, folder.name)
        try:
            record = read_record(folder)
            state = (record or {}).get("state")
            if state in (None, "running"):
                if record and record.get("run_id") and context.mlflow:
                    from mlflow.tracking import MlflowClient

                    try:
                        MlflowClient(context.mlflow["uri"]).delete_run(record["run_id"])
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                shutil.rmtree(folder)
                removed += 1
            elif state == "stopped":
                _mark_run(context, record.get("run_id"), "KILLED", {"bss.outcome": "stopped"})
            elif state == "complete":
                _mark_run(context, record.get("run_id"), "FINISHED", {"bss.outcome": "complete"}, only_running=True)
            elif state == "failed":
                _mark_run(context, record.get("run_id"), "FAILED", {"bss.outcome": "failed", "bss.error": record.get("error") or ""}, only_running=True)
        finally:
            if lock is not None:
                lock.close()
    _delete_unrecorded_runs(trials_dir, context)
    return removed


def _delete_unrecorded_runs(trials_dir: str | Path, context: TrialContext) -> None:
    """Delete this search's RUNNING trial runs that no trial record names (orphans of a kill)."""
    if not context.mlflow or not context.mlflow.get("parent_run_id"):
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(context.mlflow["uri"])
        runs = client.search_runs(
            [context.mlflow["experiment_id"]],
            filter_string=f"tags.mlflow.parentRunId = '{context.mlflow['parent_run_id']}' and tags.`bss.kind` = 'trial' and attributes.status = 'RUNNING'",
            max_results=5000,
        )
    except Exception:  # noqa: BLE001 - bookkeeping only
        return
    for run in runs:
        key = run.data.tags.get("bss.trial_key")
        if not key:
            continue
        try:
            record = read_record(Path(trials_dir) / key) or {}
        except Exception:  # noqa: BLE001
            record = {}
        if record.get("run_id") == run.info.run_id:
            continue
        try:
            client.delete_run(run.info.run_id)
        except Exception:  # noqa: BLE001
            pass
