"""One search: a Ray Tune ``Tuner`` with a searcher (:mod:`bss.search.searchers`) and an ASHA scheduler.

* Trials are :func:`bss.search.trial.train_trial`, each with ``cpus``/``gpus`` from
  :func:`~bss.search.ray_cluster.plan_resources` (a fractional GPU lets several trials share one card).
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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bss.data.io import atomic_write_json
from bss.search.promotion import Candidate
from bss.search.ray_cluster import Resources, local_resources, plan_resources, quiet_environment, start_ray  # noqa: F401 - re-exported
from bss.search.searchers import get_searcher
from bss.search.trial import TrialContext, train_trial
from bss.search.trial_store import TrialStore, trial_key


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
    max_failures: int = 2,
) -> SearchOutcome:
    """Run one search (``algorithm``: a name in :data:`~bss.search.searchers.SEARCHERS`) and
    collect its trials. ``points``: params (choice labels for choices) to try first, in order,
    before the searcher's own proposals (Optuna's ``points_to_evaluate``). ``max_failures``: how
    often Tune retries a trial whose worker or node died (a trial that failed on its own replays
    its failure at once on a retry, without training)."""
    quiet_environment()
    from bss.search.tune_callback import SearchCallback

    # a failed trial is one console line from our callback; its traceback is kept in the trial's
    # record.json and its MLflow run (tag bss.error), not dumped by Tune's own loggers
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    storage_dir = Path(storage_dir)
    if (storage_dir / "tune").exists():  # a previous attempt of this search, cut off: restart it (trial folders replay)
        shutil.rmtree(storage_dir / "tune")
    Path(context.trials_dir).mkdir(parents=True, exist_ok=True)
    clean_interrupted(context.trials_dir, context)
    callback = SearchCallback(context, context.rule, trials, label, progress)
    tuner = build_tuner(
        context,
        get_searcher(algorithm).build(context, trials, points),
        resources,
        storage_dir,
        scheduler,
        max_evaluations,
        time_budget,
        reuse_actors,
        callback,
        max_failures,
    )
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start
    candidates, timings = collect(context, callback)
    atomic_write_json(
        storage_dir / "search.json", {"wall_seconds": wall, "timings": timings, "algorithm": algorithm, "trials": trials, "resources": resources.__dict__}
    )
    return SearchOutcome(candidates=candidates, wall_seconds=wall, timings=timings)


def build_tuner(
    context: TrialContext,
    searcher: tuple,
    resources: Resources,
    storage_dir: Path,
    scheduler: dict | None,
    max_evaluations: int,
    time_budget,
    reuse_actors: bool,
    callback,
    max_failures: int = 2,
):
    """The Tune ``Tuner`` of one search; ``searcher``: what :meth:`Searcher.build` returned."""
    from ray import tune

    from bss.search.tune_callback import trial_name

    search_alg, param_space, num_samples = searcher
    trainable = tune.with_resources(tune.with_parameters(train_trial, context=context), {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial})
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="search_score",
            mode="max",
            search_alg=search_alg,
            scheduler=build_scheduler(scheduler or {"name": "fifo"}, max_evaluations),
            num_samples=num_samples,
            max_concurrent_trials=resources.concurrency,
            time_budget_s=time_budget,
            reuse_actors=reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(storage_dir.resolve()),
            verbose=0,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=max_failures),
            log_to_file=False,
        ),
    )


def build_scheduler(scheduler: dict, max_evaluations: int):
    """ASHA over evaluations (``training_iteration``) when asked for and there is more than one; else FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if scheduler.get("name") != "asha" or max_evaluations <= 1:
        return FIFOScheduler()
    grace = max(1, min(int(scheduler.get("grace_period", 1)), max_evaluations))
    return ASHAScheduler(
        time_attr="training_iteration", max_t=max_evaluations, grace_period=grace, reduction_factor=float(scheduler.get("reduction_factor", 2))
    )


def collect(context: TrialContext, callback) -> tuple[list[Candidate], list[dict]]:
    """Every trial the search started, in proposal order, read back from its store; and timings."""
    from bss.search.tune_callback import finish_stopped_run

    tracker = context.tracker()
    candidates, timings = [], []
    for trial_id, (ordinal, params) in sorted(callback.order.items(), key=lambda item: item[1][0]):
        config = context.trial_config(params)
        store = TrialStore(context.trials_dir, trial_key(ordinal, config))
        record, rows = store.record() or {}, store.rows()
        state = record.get("state") or callback.outcome.get(trial_id, "lost")
        if state == "running":
            state = callback.outcome.get(trial_id, "lost")
        if state == "stopped" and tracker is not None:  # a kill can leave no callback: no run stays RUNNING
            finish_stopped_run(tracker, record)
        elif state == "lost" and tracker is not None:
            tracker.end(record.get("run_id"), "KILLED", {"bss.outcome": "lost"}, only_running=True)
        store.remove_trainer_pick()  # left when ASHA stopped the trial
        best = record.get("best")
        train_seconds = float(record.get("train_seconds") or (rows[-1]["since_entry"] - rows[-1]["setup_seconds"] if rows else 0.0))
        candidates.append(
            Candidate(
                ordinal=ordinal,
                key=store.key,
                state=state,
                params={k: v for k, v in params.items() if k != "replica"} or {"seed": config["seed"]},
                best=best,
                checkpoint=record.get("checkpoint") if best else None,
                config=config,
                run_id=record.get("run_id"),
                error=record.get("error"),
                evaluations=len(rows),
                train_seconds=train_seconds,
                setup_seconds=record.get("setup_seconds"),
                history=rows,
                where={k: record.get(k) for k in ("host", "node_id", "node_name")} | {"lost_attempts": record.get("lost_attempts") or []},
            )
        )
        timings.append(_timing(callback, trial_id, ordinal, state, train_seconds))
    return candidates, timings


def _timing(callback, trial_id: str, ordinal: int, state: str, train_seconds: float) -> dict:
    first = callback.first_result.get(trial_id) or {}
    started = callback.started.get(trial_id)
    return {
        "ordinal": ordinal,
        "state": state,
        "replayed": bool(first.get("replayed")),
        "cold_start": first.get("cold_start"),
        "launch_seconds": (first["entry"] - started) if first.get("entry") and started else None,
        "setup_seconds": first.get("setup_seconds"),
        "trial_wall_seconds": (callback.ended.get(trial_id, time.time()) - started) if started else None,
        "train_seconds": train_seconds,
    }


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
    tracker = context.tracker()
    final = {"stopped": "FINISHED", "complete": "FINISHED", "failed": "FAILED"}
    removed = 0
    for store in TrialStore.all(trials_dir):
        with store.lock():
            record = store.record() or {}
            state = record.get("state")
            if state in (None, "running", "lost"):
                if tracker is not None:
                    tracker.delete(record.get("run_id"))
                store.remove()
                removed += 1
            elif state in final and tracker is not None:
                tags = {"bss.outcome": state} | ({"bss.error": record.get("error") or ""} if state == "failed" else {})
                tracker.end(record.get("run_id"), final[state], tags, only_running=True)
    if tracker is not None and context.tracking.get("parent_run_id"):
        for run_id, tags in tracker.running_children(context.tracking["parent_run_id"], "trial"):
            key = tags.get("bss.trial_key")
            try:
                named = key and (TrialStore(trials_dir, key).record() or {}).get("run_id") == run_id
            except Exception:  # noqa: BLE001 - an unreadable record names nothing
                named = False
            if key and not named:
                tracker.delete(run_id)
    return removed
