"""The automated self-training loop (``drivers/search.py``).

Before any training the data stage (:mod:`bss.search.data_stage`) checks the dataset, draws its
splits, and measures the EVAL boxes' own figures. Iteration 0 searches on ``NAME_BASELINE`` and
promotes a model with the promotion rule (:mod:`bss.search.promotion`, image-only EVAL
figures). The promoted model is measured as a teacher on EVAL (:mod:`bss.hybrid.teacher_quality`:
its EVAL label IoU and the refinement rule chosen there). The stop rule (:mod:`bss.search.stop`)
then decides, once: whether the model is a new best, whether it refines the box-only images
into ``NAME_H1`` (only if its label IoU beats the labels trained on now), and whether the loop
goes on. Iteration k >= 1 searches again (the best config so far first; or, with
``retrain_best``, retrains it with new seeds) on ``NAME_H<k>`` and is decided the same way. A
loop whose teacher never beats the boxes still ends with a final model (iteration 0's).

After the last decision every promoted model is evaluated on ``NAME_TEST`` for the report; no
decision ever reads TEST. The final model (the best by EVAL) is copied to ``<run-dir>/best.pt``.

Everything is recorded in MLflow (one parent run per loop, a child run per iteration, a nested
run per trial) and in ``<run-dir>``::

    state.json                 the resume state (bss.search.state)
    base_config.yaml space.yaml  the inputs, frozen at the start (resume reads these)
    iter_<k>/trials/<key>/     every trial (bss.search.trial), iter_<k>/tune/ Ray Tune's files
    iter_<k>/best.pt config.yaml promotion.json overlays.png   the promoted model
    best.pt config.yaml report.md report.json report.csv metrics.png   the final result

Resume (``resume=True``): completed stages (search+promotion, decision, hybrid, TEST report) are
read from ``state.json`` and never redone; an ``H<n>`` is made once (its number is written to the
state before it is made, and an existing folder is adopted only if its manifest names the very
checkpoint we promoted); a search cut off mid-way restarts with its seed and replays finished
trials (bss.search.tune_search).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bss.console import say as _say
from bss.data.io import atomic_path, file_sha256
from bss.environment import set_threads
from bss.errors import BSSError, ConfigError
from bss.search import final_report, stages
from bss.search.data_stage import measure_boxes, prepare_data
from bss.search.plan import for_space, not_applied
from bss.search.promotion import build_promotion_rule
from bss.search.ray_cluster import HeadWatch, local_resources, node_resources, plan_resources, quiet_environment, start_ray, stop_ray
from bss.search.record import IterationRecord, LoopRecord
from bss.search.settings import LoopSettings, parse_duration  # noqa: F401 - parse_duration: the driver's --budget
from bss.search.stages import LoopContext
from bss.search.state import LoopState, RunLock
from bss.search.stop import build_stop_rule
from bss.tracking import Tracker, is_server, probe, run_colour, ui_url, view_state
from bss.tracking.ui import loop_view_key

MIN_SEARCH_SECONDS = 60.0  # no search starts with less of --budget left (the stop rule's min_search_seconds)
_now = time.monotonic  # the budget's clock (tests move it)


def iterations_view(loop_run_id: str) -> dict:
    """The MLflow runs table of one loop's iterations, in order, with the figures that decide
    it: the link the loop prints opens this."""
    return view_state(
        f"tags.bss.kind = 'iteration' and tags.mlflow.parentRunId = '{loop_run_id}'",
        "metrics.`iteration`",
        {
            "metrics": ["iteration", "eval_iou", "eval_dice", "eval_recall", "eval_precision", "eval_label_iou", "test_iou", "test_dice"],
            "tags": ["bss.train_dataset", "bss.decision"],
        },
    )


@dataclass
class RunOptions:
    """How to run a loop: not stored, free to change on --resume."""

    concurrency: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    address: str | None = None
    run_dir: str | None = None  # default runs/<dataset>
    resume: bool = False
    reuse_actors: bool = True
    max_failures: int = 2  # retries of a trial whose worker or Ray node died
    progress: bool = True
    hybrid_batch_size: int = 8


def _loop_options() -> type:
    """:class:`LoopOptions`: every :class:`LoopSettings` field (None = its default, or on --resume
    the run's stored value) plus the :class:`RunOptions`; derived, so a new setting needs no copy."""
    settings = [(name, object, field(default=None)) for name in LoopSettings.names()]
    run = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(RunOptions)]
    return dataclasses.make_dataclass("LoopOptions", settings + run, namespace={"__doc__": _loop_options.__doc__, "__module__": __name__})


LoopOptions = _loop_options()


@dataclass
class LoopResult:
    run_dir: Path
    record: LoopRecord
    rows: list[dict] = field(default_factory=list)
    final_iteration: int | None = None
    stopped: str | None = None
    report: dict | None = None


def load_inputs(settings: LoopSettings, run_dir: Path, resuming: bool):
    """The base config (validated) and the search space; on resume, from the frozen copies."""
    from bss.config import from_dict, read_yaml
    from bss.search.space import load_space

    config_path = run_dir / "base_config.yaml" if resuming else Path(settings.config)
    space_path = run_dir / "space.yaml" if resuming else Path(settings.space)
    if not config_path.is_file():
        raise ConfigError(f"config file {config_path} not found" + (" (the run folder is incomplete; start a new run)." if resuming else "; pass --config."))
    base = read_yaml(config_path)
    try:
        base = from_dict(base).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    space = load_space(space_path, base)
    settings.trials = settings.trials or int(space.searcher.get("trials", 8))
    settings.algorithm = settings.algorithm or space.searcher["algorithm"]
    settings.scheduler = settings.scheduler or space.scheduler["name"]
    return base, space, (config_path, space_path)


class Loop:
    """Sequences the stages (:mod:`bss.search.stages`) and owns resume: every stage whose record
    the state holds is skipped, every other one runs and records itself."""

    def __init__(self, opts):
        self.opts = opts
        self.run_dir = Path(opts.run_dir or f"runs/{opts.dataset}")
        self.ctx: LoopContext | None = None
        self.current_run: str | None = None
        self.ray_started = False

    def run_loop(self) -> LoopResult:
        """Run or resume the loop, holding the run folder's lock throughout (a second driver on
        the same --run-dir is refused at once; a killed driver's lock goes with its process)."""
        lock = RunLock(self.run_dir).acquire()
        try:
            return self._run()
        finally:
            lock.release()

    # ---- set-up ------------------------------------------------------------------------
    def stored_state(self) -> LoopState | None:
        stored = LoopState.load(self.run_dir)
        if stored is not None and not self.opts.resume:
            raise BSSError(f"{self.run_dir} already holds a loop ({self.run_dir / 'state.json'}); pass --resume to continue it, or --run-dir to start another.")
        if stored is None and self.opts.resume:
            raise BSSError(
                f"nothing to resume: {self.run_dir / 'state.json'} does not exist. Leave out --resume to start, or pass the --run-dir of the run to continue."
            )
        return stored

    def time_left(self) -> float | None:
        """Seconds of ``--budget`` left (None without one); the budget counts from this start."""
        budget = self.settings.budget
        return None if budget is None else float(budget) - (_now() - self.started)

    def new_state(self, inputs: tuple[Path, Path], space, data) -> LoopState:
        """A new run's state, written once its data is ready (a failed start leaves no run folder)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for src, name in zip(inputs, ("base_config.yaml", "space.yaml")):
            with atomic_path(self.run_dir / name) as tmp:
                shutil.copyfile(src, tmp)
        self.settings.config_digest = file_sha256(self.run_dir / "base_config.yaml")[:12]
        self.settings.space_digest = space.digest()
        state = LoopState.new(self.run_dir, self.settings.to_dict())
        state.record.data = data
        state.save()
        return state

    def state_with_data(self, stored: LoopState | None, inputs, space, cpus: int) -> LoopState:
        """The run's state with its data stage done: the dataset checked (a resumed run checked
        its files at its start), its record and the EVAL boxes' figures."""
        data = prepare_data(self.settings, cpus, self.opts.progress, _say, check_files=stored is None)
        state = stored or self.new_state(inputs, space, data)
        if state.record.data is None or state.record.data.box_only is None:  # a run from before the count
            state.record.data = dataclasses.replace(state.record.data or data, box_only=data.box_only)
        if state.record.boxes_eval is None:
            state.record.boxes_eval = measure_boxes(self.settings)
        state.save()
        return state

    def header(self, resources, space) -> None:
        s = self.settings
        mode = "search (TPE + ASHA)" if s.algorithm == "tpe" and s.scheduler == "asha" else f"search ({s.algorithm}, {s.scheduler})"
        _say(f"BSS self-training loop: dataset {s.dataset} (data root {s.data_root}), run folder {self.run_dir}" + ("  [resumed]" if self.opts.resume else ""))
        _say(
            f"  {s.iterations} iteration(s) max; each: {mode} of {s.trials} trials"
            + (" (iterations >= 1: retrain the best config)" if s.retrain_best else "")
            + f"; {resources.describe()}"
        )
        _say(f"  search space {s.space}: " + "; ".join(space.describe()))

    def describe_plan(self, record: LoopRecord, space, base: dict) -> None:
        """The plan (:mod:`bss.search.plan`), one line each, or why it is not applied; a run from
        before the plan has none (its trials keep the fingerprint's input size)."""
        why_not = not_applied(space, base)
        if why_not:
            _say(f"  plan: not applied ({why_not}): trials keep the input size they are given")
        elif record.data.plan is not None:
            for line in for_space(record.data.plan, space).describe():
                _say("  " + line)

    def describe_rules(self, record: LoopRecord, space, base: dict, rule, stop_rule) -> None:
        boxes = record.boxes_eval
        if record.data and record.data.fingerprint:
            planned = record.data.plan is not None and not not_applied(space, base)  # the plan's lines say the input
            _say("  " + record.data.fingerprint.describe(space.sets("image_size"), planned))
            self.describe_plan(record, space, base)
        _say(
            f"  the EVAL boxes themselves: IoU {boxes.iou:.3f}  Dice {boxes.dice:.3f}  Recall {boxes.recall:.3f}  Precision {boxes.precision:.3f} "
            "(a teacher's refined EVAL labels must beat this)"
        )
        _say(f"  promotion: {rule.describe()}")
        _say(f"  stop rule: {stop_rule.describe()}")

    def start_tracking(self, state: LoopState, base: dict) -> tuple[Tracker, str]:
        """The loop's MLflow run (created once, reopened on resume) and the link to its iterations."""
        s, record = self.settings, state.record
        tracker = Tracker.open(
            s.tracking_uri or base["tracking"]["uri"],
            s.experiment,
            say=_say,
            going_on="the loop goes on without it, recording to its own run folder (state.json, report.*)",
        )
        if not record.parent_run_id:
            run_id = tracker.create(f"loop {s.dataset}", None, {"bss.kind": "loop", "bss.dataset": s.dataset, "bss.run_dir": str(self.run_dir.resolve())})
            tracker.params(run_id, {k: v for k, v in s.to_dict().items() if k != "tracking_uri"})
            tracker.artifact(run_id, self.run_dir / "base_config.yaml", "inputs")
            tracker.artifact(run_id, self.run_dir / "space.yaml", "inputs")
            record.parent_run_id = run_id
            state.save()
        else:
            tracker.reopen(record.parent_run_id)
        if record.tracking_uri != tracker.uri:
            record.tracking_uri = tracker.uri
            state.save()
        _say(f"  MLflow: {tracker.uri}, experiment {s.experiment}, loop run {record.parent_run_id}")
        view_key = loop_view_key(record.parent_run_id)
        tracker.share_view(view_key, iterations_view(record.parent_run_id))
        if is_server(tracker.uri):
            view = f"open {ui_url(tracker.experiment_id, base=tracker.uri.rstrip('/'), view=view_key)}"
        else:  # drivers/ui.py starts mlflow ui on this store and prints this link (on another port if 5000 is taken)
            view = f"python drivers/ui.py --run-dir {self.run_dir}  ->  {ui_url(tracker.experiment_id, view=view_key)}"
        _say(f"    view: {view}")
        return tracker, view

    def build_run(self, cpus: int, gpus: int) -> LoopContext | LoopResult:
        """The whole :class:`LoopContext` (or, for a loop finished earlier, its result)."""
        s, o = self.settings, self.opts
        stored = self.stored
        base, space, inputs = load_inputs(s, self.run_dir, stored is not None)
        probe(s.tracking_uri or base["tracking"]["uri"])  # a tracking server that does not answer: said now, before any data, Ray or run folder
        resources = plan_resources(cpus, gpus, s.trials, o.concurrency, o.cpus_per_trial, o.gpus_per_trial, node_resources() if o.address else None)
        rule = build_promotion_rule(
            s.promotion, metric=s.metric, margin=s.margin, floor_metric=s.floor_metric, floor=s.floor, label_z=float(s.noise_z) if s.label_guard else 0.0
        )
        stop_rule = build_stop_rule(
            s.stop,
            metric=s.metric,
            tolerance=float(s.tolerance),
            patience=int(s.patience),
            min_search_seconds=MIN_SEARCH_SECONDS,
            ties=s.ties,
            noise_z=float(s.noise_z),
        )
        if stored is not None and stored.record.finished:
            _say(f"{self.run_dir}: this loop finished earlier; its report is {(stored.record.report or {}).get('md')}.")
            rows = final_report.table_rows(stored.record)
            final_report.print_summary(stored.record, s, self.run_dir, rows, None, _say)
            return self.result(stored.record, rows)
        self.header(resources, space)
        state = self.state_with_data(stored, inputs, space, cpus)
        self.describe_rules(state.record, space, base, rule, stop_rule)
        if not self.ray_started:
            _, _, self.ray_started = start_ray(None, cpus, gpus)
        tracker, view = self.start_tracking(state, base)
        return LoopContext(
            self.run_dir, s, state, tracker, base, space, resources, rule, stop_rule, gpus, self.time_left, _say,
            o.reuse_actors, o.max_failures, o.progress, o.hybrid_batch_size, view, o.address,
        )  # fmt: skip

    def iteration_run(self, k: int, it: IterationRecord) -> str:
        if not it.run_id:
            tags = {"bss.kind": "iteration", "bss.iteration": k, "bss.train_dataset": it.train_dataset} | run_colour(k)
            it.run_id = self.ctx.tracker.create(f"iteration {k}", self.ctx.record.parent_run_id, tags)
            self.ctx.state.save()
        else:
            self.ctx.tracker.reopen(it.run_id)
        return it.run_id

    # ---- sequencing -----------------------------------------------------------------------
    def _run(self) -> LoopResult:
        set_threads()  # the driver's torch threads: its own decision, never its caller's (bss.environment)
        self.started = _now()
        quiet_environment()
        self.stored = self.stored_state()
        if self.opts.address:
            cpus, gpus, self.ray_started = start_ray(self.opts.address)
        else:
            cpus, gpus = local_resources()
        given = {name: getattr(self.opts, name) for name in LoopSettings.names()}
        self.settings = LoopSettings.resolve(given, self.stored.settings if self.stored else None, gpus)
        try:
            built = self.build_run(cpus, gpus)
            if isinstance(built, LoopResult):
                return built
            self.ctx = built
            return self.iterate()
        finally:
            if self.ray_started:
                stop_ray()

    def iterate(self) -> LoopResult:
        """Every iteration not done yet, then the report; the MLflow runs end with the outcome."""
        ctx = self.ctx
        monitor = ctx.tracker.system_metrics(ctx.record.parent_run_id)  # CPU, memory, GPU of the loop
        HeadWatch.on_lost(lambda message: self.abort("FAILED", message))
        try:
            for k in range(self.settings.iterations):
                if not self.iteration(k):
                    break
            rows = final_report.report_stage(ctx)
            view = ctx.view if ctx.tracker.ok else f"{ctx.view}  (recorded until the store failed: {ctx.tracker.failure})"
            final_report.print_summary(ctx.record, ctx.settings, ctx.run_dir, rows, view, _say)
            return self.result(ctx.record, rows)
        except KeyboardInterrupt:
            self.abort("KILLED")
            _say(f"\ninterrupted: completed stages are saved in {ctx.state.path}; continue with the same command and --resume")
            raise
        except BaseException:
            self.abort("FAILED")
            raise
        finally:
            Tracker.stop_system_metrics(monitor)

    def iteration(self, k: int) -> bool:
        """Run iteration k's stages that are not done yet; False: the loop stops here."""
        ctx, record, s = self.ctx, self.ctx.record, self.settings
        if k < len(record.iterations) and record.iterations[k].done:
            decision = record.iterations[k].decision
            _say(f"iteration {k}: done earlier ({decision.verdict if decision else ''}); skipped")
            return not record.stopped
        if record.stopped or k >= len(record.iterations) and k > 0:  # stopped, or no training set was made for k
            return False
        it = record.iteration(k)
        if k == 0:
            it.train_dataset = it.train_dataset or f"{s.dataset}_BASELINE"
        self.current_run = self.iteration_run(k, it)
        if not it.searched:
            stages.search_stage(ctx, k, it)
        stages.teacher_stage(ctx, k, it)
        decision = it.decision or stages.decide_stage(ctx, k, it)
        if not decision.stop and ctx.iterations_left(k) > 0 and not (it.hybrid and it.hybrid.done):
            stages.next_dataset_stage(ctx, k, it, decision)
        it.done = True
        ctx.state.save()
        ctx.tracker.end(it.run_id, "FINISHED")
        self.current_run = None
        return not decision.stop

    def result(self, record: LoopRecord, rows: list[dict]) -> LoopResult:
        best = record.best
        return LoopResult(self.run_dir, record, rows, best.iteration if best else None, record.stopped, record.report)

    def abort(self, status: str, why: str | None = None) -> None:
        if self.ctx is None:
            return
        tags = {"bss.error": why} if why else None
        self.ctx.tracker.end(self.current_run, status, tags)
        self.ctx.tracker.end(self.ctx.record.parent_run_id, status, tags)


def run_loop(opts) -> LoopResult:
    """Run (or resume) the self-training loop described by ``opts`` (a :class:`LoopOptions`)."""
    return Loop(opts).run_loop()


def ui_target(run_dir: str | Path | None, tracking_uri: str | None = None, experiment: str | None = None):
    """Where ``drivers/ui.py`` looks (a :class:`bss.tracking.ui.Target`): a loop's run folder gives
    its store, experiment and loop run; without one, the store and experiment a loop uses by
    default (the config's ``tracking.uri``) and the latest loop in it."""
    from bss.config import TrackingConfig
    from bss.tracking import normalize_uri
    from bss.tracking.ui import Target

    default_experiment = LoopSettings.__dataclass_fields__["experiment"].default
    if run_dir is None:
        return Target(normalize_uri(tracking_uri or TrackingConfig.uri), experiment or default_experiment)
    stored = LoopState.load(run_dir)
    if stored is None:
        raise BSSError(f"{run_dir}: no loop here ({Path(run_dir) / 'state.json'} not found); pass the --run-dir of a loop, or leave it out.")
    record = stored.record
    uri = tracking_uri or record.tracking_uri or record.settings.get("tracking_uri")
    if not uri:  # a run from before the record kept its store: the frozen config's
        from bss.config import read_yaml

        uri = ((read_yaml(Path(run_dir) / "base_config.yaml") or {}).get("tracking") or {}).get("uri") or TrackingConfig.uri
    return Target(normalize_uri(uri), experiment or record.settings.get("experiment") or default_experiment, record.parent_run_id)
