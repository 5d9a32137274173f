"""The driver's Tune callback: one console line per trial event, per-trial timings, and the
trial states only the driver can see (a trial Tune stopped, a worker that died).

Imported by :func:`bss.search.tune_search.run_search` only (it subclasses ``ray.tune.Callback``,
so importing it imports Ray Tune).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from bss.console import say as _say
from bss.search.promotion import PromotionRule
from bss.search.trial import TrialContext
from bss.search.trial_store import TrialStore, trial_key, trial_ordinal


def trial_name(trial) -> str:
    """``trial_<n>``: n counts trials in the order the searcher proposed them, from 1."""
    replica = trial.config.get("replica")
    return f"trial_{int(replica) if replica is not None else trial_ordinal(trial.experiment_tag)}"


def short_params(params: dict) -> str:
    """``lr=0.00123 encoder_name=tu-efficientnet_lite0``: searched params, short names."""
    out = []
    for key, value in params.items():
        if key == "replica":
            continue
        name = key.split(".")[-1] if not key.endswith(".args") else key.split(".")[0]
        out.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(out)


def error_text(trial) -> str | None:
    """The end of a failed trial's traceback, as Tune recorded it."""
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text()[-2000:]
    except OSError:
        pass
    return getattr(trial, "error_msg", None)


def finish_stopped_run(tracker, record: dict) -> None:
    """A trial Tune stopped early (ASHA, the time budget) is a finished trial, not a failure:
    FINISHED with ``bss.outcome=stopped`` and its best evaluation, like a completed trial's."""
    best = record.get("best") or {}
    tracker.metrics(record.get("run_id"), {f"best_{k}": v for k, v in best.items() if k.startswith("eval_")})
    tracker.end(record.get("run_id"), "FINISHED", {"bss.outcome": "stopped"}, only_running=True)


class SearchCallback(Callback):
    """Progress lines, per-trial timings, and the final state of each trial's records."""

    def __init__(self, context: TrialContext, rule: PromotionRule, trials: int, label: str, progress: bool):
        self.context, self.rule, self.trials, self.label, self.progress = context, rule, trials, label, progress
        self.tracker = context.tracker()
        self.started: dict[str, float] = {}
        self.first_result: dict[str, dict] = {}
        self.ended: dict[str, float] = {}
        self.order: dict[str, tuple[int, dict]] = {}  # trial id -> (ordinal, params)
        self.outcome: dict[str, str] = {}
        self.best: dict | None = None
        self.best_trial = 0

    def store(self, trial) -> TrialStore:
        ordinal, params = self.order[trial.trial_id]
        return TrialStore(self.context.trials_dir, trial_key(ordinal, self.context.trial_config(params)))

    def counts(self) -> str:
        done = sum(1 for t in self.outcome.values() if t != "running")
        running = sum(1 for t in self.outcome.values() if t == "running")
        best = "-" if self.best is None else f"{self.rule.metric} {self.best['eval_' + self.rule.metric]:.3f} (trial {self.best_trial})"
        return f"done {done}/{self.trials}, running {running}, best {best}"

    def line(self, trial, text: str) -> None:
        if self.progress:
            _say(f"{self.label} trial {self.order[trial.trial_id][0]:2d} {text}")

    # ---- Tune hooks ---------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        self.outcome[trial.trial_id] = "running"
        self.order[trial.trial_id] = (trial_ordinal(trial_name(trial)), dict(trial.config))
        self.line(trial, f"start   {short_params(dict(trial.config))}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id not in self.first_result:
            self.first_result[trial.trial_id] = {
                "entry": result.get("trial_entry_time"),
                "time": time.time(),
                "setup_seconds": result.get("setup_seconds"),
                "cold_start": result.get("cold_start"),
                "replayed": result.get("replayed"),
            }
        if "eval_" + self.rule.metric in result and self.rule.admissible(result) and self.rule.better(result, self.best):
            self.best, self.best_trial = dict(result), self.order[trial.trial_id][0]
        nan = float("nan")
        self.line(
            trial,
            f"eval {int(result.get('evaluation', 0)):2d}  recall {result.get('eval_recall', nan):.3f}  precision {result.get('eval_precision', nan):.3f}  "
            f"IoU {result.get('eval_iou', nan):.3f}  loss {result.get('train_loss', nan):.3f}{' (replayed)' if result.get('replayed') else ''} | {self.counts()}",
        )

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial that raised and that Tune retries (``max_failures``). If its record still says
        running, its worker or node died: the attempt is recorded as lost and its run ends KILLED.
        (A trial that recorded its own failure replays it at once on the retry.)"""
        store = self.store(trial)
        record = store.mark_lost(error_text(trial) or "the trial's worker died")
        if record.get("state") == "lost" and self.tracker is not None:
            self.tracker.end(record.get("run_id"), "KILLED", {"bss.outcome": "lost"}, only_running=True)
        if record.get("state") == "lost":
            where = (record.get("lost_attempts") or [{}])[-1].get("node_name") or "?"
            self.line(trial, f"LOST with its worker (node {where}); retried | {self.counts()}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finish(trial, failed=True)

    def finish(self, trial, failed: bool) -> None:
        self.ended[trial.trial_id] = time.time()
        store = self.store(trial)
        if failed:
            recorded = (store.record() or {}).get("state") == "failed"  # by the worker, which ended its run
            record = store.mark_failed(error_text(trial) or "the trial's worker died")
            if self.tracker is not None and not recorded:
                self.tracker.end(record.get("run_id"), "FAILED", {"bss.outcome": "failed", "bss.error": record.get("error", "")})
            self.outcome[trial.trial_id] = "failed"
        else:
            record = store.mark_stopped()  # a trial still 'running' was stopped by ASHA or the time budget
            if record.get("state") == "stopped" and self.tracker is not None:
                finish_stopped_run(self.tracker, record)
            self.outcome[trial.trial_id] = record.get("state") or "stopped"
        self.line(trial, f"{self.describe_end(store, record, self.outcome[trial.trial_id], trial)} | {self.counts()}")

    @staticmethod
    def describe_end(store: TrialStore, record: dict, state: str, trial) -> str:
        if state == "failed":
            error = record.get("error") or error_text(trial) or "error"
            return f"FAILED: {error.strip().splitlines()[-1][:160]}"
        best = record.get("best")
        figures = "" if not best else f" - best recall {best['eval_recall']:.3f} precision {best['eval_precision']:.3f} IoU {best['eval_iou']:.3f}"
        verb = {"complete": "finished", "stopped": "stopped early"}.get(state, state)
        return f"{verb} after {len(store.rows())} eval(s){figures}"
