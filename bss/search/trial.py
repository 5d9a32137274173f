"""The Ray Tune trainable: one trial = one :class:`~bss.training.trainer.Trainer` run.

Each trial trains on the iteration's training set and reports every EVAL evaluation to Tune
(``tune.report``), with ``search_score``: the best value so far of the promotion rule's
objective, which TPE and ASHA maximise. Its folder is a :class:`~bss.search.trial_store.TrialStore`.

That folder doubles as a **replay cache**: when a search is restarted after a kill, a trial whose
folder says it finished (complete, stopped by ASHA, or failed) does not train again; it reports
its recorded rows (or raises its recorded error), so the searcher and ASHA see exactly what the
first run saw and the restarted search proposes the same trials. A trial that was cut off
mid-training trains again from scratch with a fresh MLflow run (its half-written run is deleted
first; a deleted run id is never reopened). Within one search, an attempt lost with its worker
or Ray node is retried by Tune (``max_failures``): the retry records the lost attempt (its run
ends KILLED, tagged ``bss.outcome=lost``) and trains afresh on whichever node Ray picks.

Start-up: the heavy imports (torch, the trainer, MLflow) happen inside the function, once per
worker process; with ``reuse_actors`` the next trial on the same worker skips them. Each report
carries ``setup_seconds`` (trainable entry -> first training step ready), ``import_seconds``
and ``cold_start`` so the benchmark can show the effect.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

from bss.search.promotion import PromotionRule
from bss.search.trial_store import FINISHED_STATES, Superseded, TrialStore, trial_key, trial_ordinal


class TrialFailed(RuntimeError):
    """A replayed trial that failed the first time fails again with the same message."""


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
    tracking: dict | None = None  # {"uri", "experiment_id", "parent_run_id"}
    seeds: dict = field(default_factory=dict)  # retraining: replica -> seed
    study: dict | None = None  # {"storage": Optuna RDB URL, "name": study name}: the searcher's history, for optuna-dashboard

    def trial_config(self, params: dict) -> dict:
        """The resolved training config of a trial, as a plain dict."""
        replica = params.get("replica")
        sampled = {k: v for k, v in params.items() if k != "replica"}
        config = self.space.apply(self.base, sampled) if self.space is not None else json.loads(json.dumps(self.base))
        config["seed"] = int(self.seeds.get(int(replica), self.seed)) if replica is not None else int(self.seed)
        config["device"] = "cuda" if self.gpus > 0 else "cpu"
        config["visualization_samples"] = 0  # the loop draws the promoted model's overlays, not every trial
        return config

    def tracker(self):
        """A :class:`~bss.tracking.Tracker` on the search's experiment, or None without tracking."""
        if not self.tracking:
            return None
        from bss.tracking import Tracker

        return Tracker(self.tracking["uri"], self.tracking["experiment_id"], say=lambda text: None)


def _node() -> dict:
    """Where this attempt runs: the Ray node's id and name (``ray start --node-name``, by default
    its IP), recorded in the trial record (None outside Ray: tests of the attempt alone)."""
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return {"node_id": None, "node_name": None}
    try:
        name = next((n.get("NodeName") for n in ray.nodes() if n.get("NodeID") == node_id), None)
    except Exception:  # noqa: BLE001 - the name is a convenience
        name = None
    return {"node_id": node_id, "node_name": name}


def _numeric(row: dict) -> dict:
    return {k: (float(v) if not isinstance(v, bool) else bool(v)) for k, v in row.items() if isinstance(v, (int, float))}


def train_trial(params: dict, context: TrialContext) -> None:
    """Tune function trainable (bound to ``context`` with ``tune.with_parameters``)."""
    entry, wall_entry = time.perf_counter(), time.time()
    cold = "bss.training.trainer" not in sys.modules
    from ray import tune

    ordinal = int(params["replica"]) if "replica" in params else trial_ordinal(tune.get_context().get_trial_name())
    config = context.trial_config(params)
    store = TrialStore(context.trials_dir, trial_key(ordinal, config))
    report_extra = {"trial_key": store.key, "trial_ordinal": ordinal, "trial_entry_time": wall_entry, "cold_start": cold}
    with store.lock():
        skip = replay(store, report_extra, context.tracker())
        if skip is not None:
            TrialAttempt(context, store, params, config, ordinal, report_extra, entry).run(skip)


def replay(store: TrialStore, report_extra: dict, tracker) -> int | None:
    """Report what a finished trial recorded. Returns None when nothing is left to train, else
    how many recorded evaluations the new attempt must not report again (0: start afresh)."""
    from ray import tune

    record = store.record()
    if record and record.get("state") in FINISHED_STATES:
        rows = store.rows()
        for row in rows:
            tune.report(dict(row, **report_extra, replayed=True))
        if record["state"] == "failed":
            raise TrialFailed(record.get("error") or "the trial failed")
        if record["state"] == "complete" or not rows:
            return None
        # stopped by ASHA the first time, but not now (only with concurrency > 1): train again
        # from scratch and report from where the recording ends (training is deterministic)
        return len(rows)
    if record and record.get("state") in ("running", "lost"):
        # the search's cleanup removed every folder a killed driver left 'running', so this is a
        # retry within this search: the previous attempt died with its worker or node. It stays
        # recorded as lost (its run KILLED, tag bss.outcome=lost); this attempt starts afresh.
        record = store.mark_lost("the trial's worker or node died; retried")
        if tracker is not None:
            tracker.end(record.get("run_id"), "KILLED", {"bss.outcome": "lost"}, only_running=True)
    return 0


class TrialAttempt:
    """One attempt at training a trial: its record, its MLflow run, its reports to Tune."""

    def __init__(self, context: TrialContext, store: TrialStore, params: dict, config: dict, ordinal: int, report_extra: dict, entry: float):
        self.context, self.store, self.params, self.config = context, store, params, config
        self.ordinal, self.report_extra, self.entry = ordinal, report_extra, entry
        self.rule: PromotionRule = context.rule
        self.tracker = context.tracker()
        self.best: dict | None = None
        self.evaluations = 0
        self.skip = 0
        self.run_id: str | None = None
        self.trainer = None

    def run(self, skip: int) -> None:
        previous = self.store.record() or {}
        self.skip = skip
        self.store.start_fresh(keep_rows=bool(skip))
        self.config["output_dir"] = str(self.store.folder)
        self.prepare_imports()
        self.state = {
            "state": "running",
            "attempt": uuid.uuid4().hex,
            "ordinal": self.ordinal,
            "key": self.store.key,
            "iteration": self.context.iteration,
            "params": self.params,
            "config": self.config,
            "run_id": None,
            "best": None,
            "checkpoint": None,
            "evaluations": 0,
            "cold_start": self.report_extra["cold_start"],
            "import_seconds": self.import_seconds,
            "host": socket.gethostname(),
            **_node(),
            "lost_attempts": previous.get("lost_attempts", []) if previous.get("state") == "lost" else [],
        }
        # the record claims the folder (and names no run yet) before the MLflow run exists, so a
        # kill in between leaves a run that no record names: the resumed search deletes such runs
        self.store.claim(self.state)
        self.open_run(previous.get("run_id") if skip else None)
        self.store.save(self.state)
        self.train()

    def prepare_imports(self) -> None:
        import torch

        torch.set_num_threads(max(1, int(round(self.context.cpus))))
        import bss.training.trainer  # noqa: F401 - the heavy import, timed

        self.import_seconds = time.perf_counter() - self.entry

    def open_run(self, previous: str | None) -> None:
        """A trial cut off mid-training always gets a fresh run; a stopped trial trained again
        keeps its run unless that run is gone (deleted), and a deleted run id is never reused."""
        tr = self.tracker
        if tr is None:
            return
        if previous and tr.usable(previous):
            self.run_id = previous
        else:
            self.run_id = tr.create(
                f"iter{self.context.iteration}-trial{self.ordinal:02d}",
                self.context.tracking["parent_run_id"],
                {"bss.kind": "trial", "bss.iteration": self.context.iteration, "bss.trial": self.ordinal, "bss.trial_key": self.store.key},
            )
            used = {k: v for k, v in self.config.items() if k not in ("output_dir", "tracking")}  # what training used
            tr.params(self.run_id, {f"search.{k}": v for k, v in self.params.items()} | used, fresh=True)
        self.state["run_id"] = self.run_id
        self.note_tracking()

    def note_tracking(self) -> None:
        if self.tracker is not None and self.tracker.failure:
            self.state["tracking_error"] = self.tracker.failure

    # ---- training ----------------------------------------------------------------------------
    def train(self) -> None:
        from bss.config import from_dict
        from bss.training.trainer import Trainer

        status, tags = "FAILED", {}
        try:
            self.trainer = Trainer(from_dict(self.config), output_dir=self.store.folder, progress=False)
            self.state["setup_seconds"] = self.setup_seconds = time.perf_counter() - self.entry
            self.trainer.callbacks.append(self.on_evaluation)
            self.trainer.fit()
            if self.state["state"] != "complete":  # (the last evaluation normally completes the trial)
                self.finish({"since_entry": time.perf_counter() - self.entry})
                self.store.save(self.state)
            self.store.remove_trainer_pick()
        except Superseded:
            raise
        except Exception as exc:
            status, tags = self.failed(exc)
            if self.state["state"] == "complete":  # every evaluation is in: the trial stands
                return
            raise
        except BaseException:  # SystemExit: Tune stopped the trial (ASHA, time budget): not a failure
            status, tags = "FINISHED", {"bss.outcome": "stopped"}
            raise
        finally:
            if self.state["state"] != "complete" and self.tracker is not None and self.store.owned_by(self.state["attempt"]):
                if tags.get("bss.outcome") == "stopped" and self.best is not None:
                    self.tracker.metrics(self.run_id, {f"best_{k}": v for k, v in self.best.items() if k.startswith("eval_")})
                self.tracker.end(self.run_id, status, tags)

    def failed(self, exc: Exception) -> tuple[str, dict]:
        """Record a training error; returns the run's final status and tags."""
        message = f"{type(exc).__name__}: {exc}"
        if self.state["state"] == "complete":  # every evaluation is in: the trial stands, note the error
            self.state["warning"] = message[:2000]
            self.store.save(self.state)
            return "FINISHED", {}
        if not self.store.owned_by(self.state["attempt"]):  # taken over: this attempt records nothing
            raise Superseded(f"{self.store.key}: attempt {self.state['attempt']} was superseded ({message[:200]})") from exc
        self.state.update(state="failed", error=message[:2000])
        self.store.save(self.state)
        return "FAILED", {"bss.outcome": "failed", "bss.error": message}

    def on_evaluation(self, row: dict) -> None:
        from ray import tune

        from bss.training.checkpoint import save_checkpoint

        self.evaluations += 1
        row, rule = _numeric(row), self.rule
        if rule.better(row, self.best):
            self.best = dict(row)
            scores = {k[len("eval_") :]: v for k, v in row.items() if k.startswith("eval_")}
            save_checkpoint(self.store.checkpoint, self.trainer.model, self.trainer.config, scores, row["epoch"])
        row.update(
            objective=rule.objective(row),
            search_score=rule.objective(self.best),
            setup_seconds=self.setup_seconds,
            import_seconds=self.import_seconds,
            since_entry=time.perf_counter() - self.entry,
        )
        if self.evaluations <= self.skip:  # recorded and reported by the first attempt
            return
        self.store.append_row(row)
        if self.tracker is not None:
            self.tracker.metrics(self.run_id, row, step=self.evaluations)
        self.state.update(best=self.best, checkpoint=str(self.store.checkpoint), evaluations=self.evaluations)
        if abs(row["epoch"] - self.trainer.epochs) < 1e-6:
            # the last evaluation: the trial is complete now. ASHA may answer this report with
            # STOP (it has reached max_t), so everything final is written before it.
            self.finish(row)
        self.note_tracking()
        self.store.save(self.state)
        tune.report(dict(row, **self.report_extra, replayed=False))

    def finish(self, row: dict) -> None:
        self.state.update(state="complete", train_seconds=row["since_entry"] - self.setup_seconds)
        tr = self.tracker
        if tr is None:
            return
        if self.best is not None:
            tr.metrics(self.run_id, {f"best_{k}": v for k, v in self.best.items() if k.startswith("eval_")})
        tr.metrics(self.run_id, {"train_seconds": self.state["train_seconds"], "setup_seconds": self.setup_seconds})
        tr.end(self.run_id, "FINISHED", {"bss.outcome": "complete"})
        self.note_tracking()
