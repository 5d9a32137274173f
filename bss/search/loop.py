"""The automated self-training loop (``drivers/search.py``).

Iteration 0 searches on ``NAME_BASELINE`` and promotes a model with the promotion rule
(:mod:`bss.search.promotion`; its IoU floor is the EVAL boxes' own IoU, measured first). The
promoted model is measured as a teacher on EVAL (:mod:`bss.hybrid.teacher_quality`: its EVAL
label IoU and the refinement rule chosen there) and refines the box-only images into
``NAME_H1``, unless its labels would be no better than the current ones. Iteration k >= 1
searches again (the best config so far first; or, with ``retrain_best``, retrains it with new
seeds) on ``NAME_H<k>`` and is judged on ``NAME_EVAL`` by the stop rule (:mod:`bss.search.stop`):
a new best refines the next ``H<k+1>``; an EVAL IoU drop beyond the tolerance, no admissible
model, or ``patience`` iterations without gain stop the loop.

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

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bss.data.io import file_sha256
from bss.environment import set_threads
from bss.errors import BSSError, ConfigError, DatasetError
from bss.search import final_report, stages
from bss.search.promotion import build_promotion_rule
from bss.search.ray_cluster import HeadWatch, local_resources, node_resources, plan_resources, quiet_environment, start_ray, stop_ray
from bss.search.settings import LoopSettings, parse_duration  # noqa: F401 - parse_duration: the driver's --budget
from bss.search.stages import LoopRun, count_images
from bss.search.state import LoopState, RunLock
from bss.search.stop import build_stop_rule
from bss.tracking import Tracker, run_colour, ui_command, ui_url, view_state

# The embedded default: a synthetic dataset generated when --dataset names a defect class that
# the data root does not hold. CPU: small enough for the whole loop in minutes on 2 cores.
SYNTHETIC = {
    "cpu": {"count": 300, "hand_labelled": 120, "width": 256, "height": 192},
    "gpu": {"count": 1000, "hand_labelled": 200, "width": 256, "height": 192},
}
MIN_SEARCH_SECONDS = 60.0  # a later search with less than this left is not started
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
class LoopOptions:
    """What a caller asks for: any :class:`~bss.search.settings.LoopSettings` field (None = its
    default, or on --resume the run's stored value) plus how to run (not stored, free to change)."""

    dataset: str
    data_root: str | None = None
    config: str | None = None
    space: str | None = None
    trials: int | None = None
    time_budget: float | None = None
    budget: float | None = None
    iterations: int | None = None
    promotion: str | None = None
    metric: str | None = None
    margin: float | None = None
    floor_metric: str | None = None
    floor: float | None = None
    stop: str | None = None
    tolerance: float | None = None
    patience: int | None = None
    retrain_best: bool | None = None
    seed: int | None = None
    algorithm: str | None = None
    scheduler: str | None = None
    split_fractions: tuple | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    # how to run
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


@dataclass
class LoopResult:
    run_dir: Path
    state: dict
    rows: list[dict] = field(default_factory=list)
    final_iteration: int | None = None
    stopped: str | None = None
    report: dict | None = None


def _say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- inputs and data


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
    return base, space, config_path, space_path


def prepare_data(settings: LoopSettings, cpus: int, progress: bool, check_files: bool = True) -> dict:
    """The source dataset (generated when it is a missing synthetic class) and its splits;
    ``check_files`` decodes every image and box mask once (a resumed run checked them at its start)."""
    from bss.data.splits import SPLITS, make_splits

    dataset, root = settings.dataset, Path(settings.data_root)
    if not dataset or dataset != Path(dataset).name:
        raise BSSError(f"--dataset {dataset!r} must be a dataset name under --data-root (a folder name, no '/').")
    source = root / dataset
    info = {"generated": False, "splits_made": False}
    if not (source / "images").is_dir():
        from bss.data.synthetic import DEFECTS, SynthConfig, generate_dataset

        if dataset not in DEFECTS:
            from bss.data.layout import resolve_dataset

            resolve_dataset(dataset, root)  # raises DatasetError listing what is there
        spec = SYNTHETIC[settings.device_kind]
        _say(
            f"dataset {source} not found: generating the synthetic '{dataset}' dataset, the embedded default "
            f"({spec['count']} images {spec['width']}x{spec['height']}, {spec['hand_labelled']} hand-labelled, seed {settings.seed}) ..."
        )
        start = time.perf_counter()
        report = generate_dataset(
            SynthConfig(dataset, dataset, spec["count"], spec["hand_labelled"], spec["width"], spec["height"], settings.seed),
            root,
            workers=max(1, min(2, cpus)),
        )
        _say(f"  wrote {report.folder} in {time.perf_counter() - start:.0f} s")
        info["generated"] = True
    splits = {s: root / f"{dataset}_{s}" for s in SPLITS}
    present = [s for s, p in splits.items() if p.is_dir()]
    if present and check_files:  # make_splits checks the files itself
        from bss.data.layout import SourceDataset

        SourceDataset.open(dataset, root).check_files(progress)
    if not present:
        counts = make_splits(dataset, root, tuple(settings.split_fractions), settings.seed, progress=False)
        _say(f"made the splits of {dataset}: " + ", ".join(f"{dataset}_{s} {n}" for s, n in counts.items()) + f" images (seed {settings.seed})")
        info["splits_made"] = True
    elif len(present) < len(SPLITS):
        missing = [str(splits[s]) for s in SPLITS if s not in present]
        raise DatasetError(
            f"the splits of {dataset} are incomplete: {', '.join(missing)} missing. Remove the other {dataset}_BASELINE/EVAL/TEST folders to redraw them, or run drivers/preprocess.py."
        )
    info["counts"] = {s: count_images(p) for s, p in splits.items()}
    from bss.search.fingerprint import fingerprint

    info["fingerprint"] = fingerprint(source)
    return info


# --------------------------------------------------------------------------- the loop


class Loop:
    """Sequences the stages (:mod:`bss.search.stages`) and owns resume: every stage whose record
    the state holds is skipped, every other one runs and records itself."""

    def __init__(self, opts: LoopOptions):
        self.opts = opts
        self.run_dir = Path(opts.run_dir or f"runs/{opts.dataset}")
        self.run: LoopRun | None = None
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
    def setup(self) -> tuple[LoopSettings, LoopState | None, int, int]:
        opts = self.opts
        quiet_environment()
        stored = LoopState.load(self.run_dir)
        if stored is not None and not opts.resume:
            raise BSSError(f"{self.run_dir} already holds a loop ({self.run_dir / 'state.json'}); pass --resume to continue it, or --run-dir to start another.")
        if stored is None and opts.resume:
            raise BSSError(
                f"nothing to resume: {self.run_dir / 'state.json'} does not exist. Leave out --resume to start, or pass the --run-dir of the run to continue."
            )
        if opts.address:
            cpus, gpus, self.ray_started = start_ray(opts.address)
        else:
            cpus, gpus = local_resources()
        given = {name: getattr(opts, name) for name in LoopSettings.names()}
        settings = LoopSettings.resolve(given, stored.settings if stored else None, gpus)
        return settings, stored, cpus, gpus

    def build_run(self, settings: LoopSettings, stored: LoopState | None, cpus: int, gpus: int) -> tuple[LoopRun, tuple[Path, Path]]:
        base, space, config_path, space_path = load_inputs(settings, self.run_dir, stored is not None)
        settings.trials = settings.trials or int(space.searcher.get("trials", 8))
        settings.algorithm = settings.algorithm or space.searcher["algorithm"]
        settings.scheduler = settings.scheduler or space.scheduler["name"]
        s, o = settings, self.opts
        run = LoopRun(
            run_dir=self.run_dir,
            settings=s,
            state=stored,
            tracker=None,
            base=base,
            space=space,
            resources=plan_resources(cpus, gpus, s.trials, o.concurrency, o.cpus_per_trial, o.gpus_per_trial, node_resources() if o.address else None),
            rule=self.promotion_rule(s, floor_iou=0.0),  # checks the flags now; the IoU floor comes with the data
            stop_rule=build_stop_rule(s.stop, metric=s.metric, tolerance=float(s.tolerance), patience=int(s.patience)),
            gpus=gpus,
            time_left=self.time_left,
            say=_say,
            reuse_actors=o.reuse_actors,
            max_failures=o.max_failures,
            progress=o.progress,
            hybrid_batch_size=o.hybrid_batch_size,
        )
        return run, (config_path, space_path)

    @staticmethod
    def promotion_rule(s: LoopSettings, floor_iou: float):
        return build_promotion_rule(s.promotion, metric=s.metric, margin=s.margin, floor_iou=floor_iou, floor_metric=s.floor_metric, floor=s.floor)

    def time_left(self) -> float | None:
        """Seconds of ``--budget`` left (None without one); the budget counts from this start."""
        budget = self.run.settings.budget
        return None if budget is None else float(budget) - (_now() - self.started)

    def create_state(self, inputs: tuple[Path, Path]) -> None:
        """A new run's state, written once its data is ready (a failed start leaves no run folder)."""
        run = self.run
        if run.state is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for src, name in zip(inputs, ("base_config.yaml", "space.yaml")):
            shutil.copyfile(src, self.run_dir / f"{name}.tmp")
            (self.run_dir / f"{name}.tmp").replace(self.run_dir / name)
        run.settings.config_digest = file_sha256(self.run_dir / "base_config.yaml")[:12]
        run.settings.space_digest = run.space.digest()
        run.state = LoopState.new(self.run_dir, run.settings.to_dict())
        run.state.save()

    def measure_boxes(self) -> dict:
        """The EVAL box masks' own IoU/Dice/Recall/Precision against the exact masks (once per run)."""
        from bss.hybrid.teacher_quality import box_quality

        run, st, s = self.run, self.run.state, self.run.settings
        if "boxes_eval" not in st.data:
            st.set("boxes_eval", box_quality(s.dataset, s.data_root))
        boxes = st.get("boxes_eval")
        run.rule = self.promotion_rule(s, floor_iou=float(boxes["iou"]))
        fp = st.get("data", {}).get("fingerprint")
        if fp:
            sized = "the search space's" if run.space.sets("image_size") else f"[{fp['input_size'][0]}, {fp['input_size'][1]}] (from the images' shape)"
            _say(f"  images: median {fp['median_shape'][1]}x{fp['median_shape'][0]} (WxH); network input {sized}")
        _say(
            f"  the EVAL boxes themselves: IoU {boxes['iou']:.3f}  Dice {boxes['dice']:.3f}  Recall {boxes['recall']:.3f}  Precision {boxes['precision']:.3f} (a model must segment better than this)"
        )
        _say(f"  promotion: {run.rule.describe()}")
        _say(f"  stop rule: {run.stop_rule.describe()}")
        return boxes

    def header(self) -> None:
        s, r = self.run.settings, self.run.resources
        mode = "search (TPE + ASHA)" if s.algorithm == "tpe" and s.scheduler == "asha" else f"search ({s.algorithm}, {s.scheduler})"
        _say(f"BSS self-training loop: dataset {s.dataset} (data root {s.data_root}), run folder {self.run_dir}" + ("  [resumed]" if self.opts.resume else ""))
        _say(
            f"  {s.iterations} iteration(s) max; each: {mode} of {s.trials} trials"
            + (" (iterations >= 1: retrain the best config)" if s.retrain_best else "")
            + f"; {r.describe()}"
        )
        _say(f"  search space {s.space}: " + "; ".join(self.run.space.describe()))

    def start_tracking(self) -> None:
        run, s, st = self.run, self.run.settings, self.run.state
        run.tracker = Tracker.open(
            s.tracking_uri or run.base["tracking"]["uri"],
            s.experiment,
            say=_say,
            going_on="the loop goes on without it, recording to its own run folder (state.json, report.*)",
        )
        if not st.get("parent_run_id"):
            run_id = run.tracker.create(f"loop {s.dataset}", None, {"bss.kind": "loop", "bss.dataset": s.dataset, "bss.run_dir": str(self.run_dir.resolve())})
            run.tracker.params(run_id, {k: v for k, v in s.to_dict().items() if k != "tracking_uri"})
            run.tracker.artifact(run_id, self.run_dir / "base_config.yaml", "inputs")
            run.tracker.artifact(run_id, self.run_dir / "space.yaml", "inputs")
            st.set("parent_run_id", run_id)
        else:
            run.tracker.reopen(st.get("parent_run_id"))
        loop_run_id = st.get("parent_run_id")
        _say(f"  MLflow: {run.tracker.uri}, experiment {s.experiment}, loop run {loop_run_id}")
        view = f"bss-loop-{loop_run_id}"
        run.tracker.share_view(view, iterations_view(loop_run_id))
        run.view = f"{ui_command(run.tracker.uri)}  ->  {ui_url(run.tracker.experiment_id, view=view)}"
        _say(f"    view: {run.view}")

    def iteration_run(self, k: int, it: dict) -> str:
        if not it.get("run_id"):
            it["run_id"] = self.run.tracker.create(
                f"iteration {k}",
                self.run.state.get("parent_run_id"),
                {"bss.kind": "iteration", "bss.iteration": k, "bss.train_dataset": it["train_dataset"]} | run_colour(k),
            )
            self.run.state.save()
        else:
            self.run.tracker.reopen(it["run_id"])
        return it["run_id"]

    # ---- sequencing -----------------------------------------------------------------------
    def _run(self) -> LoopResult:
        set_threads()  # the driver's torch threads: its own decision, never its caller's (bss.environment)
        self.started = _now()
        settings, stored, cpus, gpus = self.setup()
        self.run, inputs = self.build_run(settings, stored, cpus, gpus)
        if stored is not None and stored.get("finished"):
            _say(f"{self.run_dir}: this loop finished earlier; its report is {stored.get('report', {}).get('md')}.")
            return self.result(final_report.table_rows(self.run))
        self.header()
        data = prepare_data(settings, cpus, self.opts.progress, check_files=stored is None)
        self.create_state(inputs)
        if "data" not in self.run.state.data:
            self.run.state.set("data", data)
        self.measure_boxes()
        if not self.ray_started:
            _, _, self.ray_started = start_ray(None, cpus, gpus)
        self.start_tracking()
        monitor = self.run.tracker.system_metrics(self.run.state.get("parent_run_id"))  # CPU, memory, GPU of the loop
        HeadWatch.on_lost(lambda message: self.abort("FAILED", message))
        try:
            for k in range(settings.iterations):
                if not self.iteration(k):
                    break
            rows = final_report.report_stage(self.run)
            return self.result(rows)
        except KeyboardInterrupt:
            self.abort("KILLED")
            _say(f"\ninterrupted: completed stages are saved in {self.run.state.path}; continue with the same command and --resume")
            raise
        except BaseException:
            self.abort("FAILED")
            raise
        finally:
            Tracker.stop_system_metrics(monitor)
            if self.ray_started:
                stop_ray()

    def iteration(self, k: int) -> bool:
        """Run iteration k's stages that are not done yet; False: the loop stops here."""
        run, st, s = self.run, self.run.state, self.run.settings
        if k < len(st.iterations) and st.iterations[k].get("done"):
            _say(f"iteration {k}: done earlier ({(st.iterations[k].get('decision') or {}).get('verdict', '')}); skipped")
            return not st.get("stopped")
        if st.get("stopped") or self.budget_spent(k):
            return False
        it = st.iteration(k)
        if k == 0:
            it.setdefault("train_dataset", f"{s.dataset}_BASELINE")
        self.current_run = run_id = self.iteration_run(k, it)
        if not it.get("search", {}).get("done"):
            stages.search_stage(run, k, it)
        stages.teacher_stage(run, k, it)
        decision = it.get("decision") or stages.decide_stage(run, k, it)
        if not decision["stop"] and k + 1 < s.iterations and not it.get("hybrid", {}).get("done"):
            stages.next_dataset_stage(run, k, it, decision)
        it["done"] = True
        st.save()
        run.tracker.end(run_id, "FINISHED")
        self.current_run = None
        return not decision["stop"]

    def budget_spent(self, k: int) -> bool:
        """--budget: no later search starts with less than MIN_SEARCH_SECONDS left (records the stop)."""
        st, left = self.run.state, self.time_left()
        started = k < len(st.iterations) and st.iterations[k].get("search", {}).get("done")
        if k == 0 or left is None or left >= MIN_SEARCH_SECONDS or started:
            return False
        verdict = f"stop: the --budget of {self.run.settings.budget:g} s is spent ({max(0.0, left):.0f} s left)"
        st.data["stopped"] = verdict
        st.save()
        _say(f"iteration {k}: {verdict}")
        return True

    def result(self, rows: list[dict]) -> LoopResult:
        final_report.print_summary(self.run, rows)
        st = self.run.state
        best = st.get("best")
        return LoopResult(self.run_dir, st.data, rows, best["iteration"] if best else None, st.get("stopped"), st.get("report"))

    def abort(self, status: str, why: str | None = None) -> None:
        if self.run is None or self.run.tracker is None:
            return
        tags = {"bss.error": why} if why else None
        self.run.tracker.end(self.current_run, status, tags)
        self.run.tracker.end(self.run.state.get("parent_run_id") if self.run.state else None, status, tags)


def run_loop(opts: LoopOptions) -> LoopResult:
    """Run (or resume) the self-training loop described by ``opts``."""
    return Loop(opts).run_loop()
