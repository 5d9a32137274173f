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

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from bss.data.io import file_sha256
from bss.errors import BSSError, ConfigError, DatasetError
from bss.search.promotion import PromotionRule, build_promotion_rule, promote
from bss.search.state import LoopState, RunLock
from bss.search.stop import Outcome, build_stop_rule
from bss.tracking import Tracker
from bss.search.tune_search import Resources, local_resources, plan_resources, quiet_environment, run_search, start_ray

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
# The embedded default: a synthetic dataset generated when --dataset names a defect class that
# the data root does not hold. CPU: small enough for the whole loop in minutes on 2 cores.
SYNTHETIC = {"cpu": {"count": 300, "hand_labelled": 120, "width": 256, "height": 192}, "gpu": {"count": 1000, "hand_labelled": 200, "width": 256, "height": 192}}

# settings that change results: stored at the start, a different value on --resume is an error
RESULT_SETTINGS = ("dataset", "data_root", "config", "space", "trials", "iterations", "promotion", "metric", "margin", "floor_metric", "floor", "stop", "tolerance", "patience", "retrain_best", "seed", "algorithm", "scheduler", "time_budget", "budget", "split_fractions")


@dataclass
class LoopOptions:
    dataset: str
    data_root: str | None = None
    config: str | None = None  # base training config (default config.yaml)
    space: str | None = None  # default: search_spaces/cpu.yaml without a GPU, default.yaml with one
    trials: int | None = None  # per search (default: the space's searcher.trials)
    concurrency: int | None = None
    time_budget: float | None = None  # seconds per search
    budget: float | None = None  # seconds for the whole loop (each start of it): split over the searches left
    iterations: int | None = None  # including iteration 0 (default 3)
    promotion: str | None = None  # guarded_recall | floor (bss.search.promotion)
    metric: str | None = None  # recall
    margin: float | None = None  # guarded_recall: recall decides among models within this of the best EVAL IoU
    floor_metric: str | None = None  # floor rule: precision
    floor: float | None = None  # floor rule: 0.3
    stop: str | None = None  # guarded (bss.search.stop)
    tolerance: float | None = None  # 0.02
    patience: int | None = None  # 1
    retrain_best: bool | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    address: str | None = None
    run_dir: str | None = None  # default runs/<dataset>
    resume: bool = False
    tracking_uri: str | None = None  # default: the config's tracking.uri
    experiment: str | None = None  # default bss-search
    seed: int | None = None  # 0
    algorithm: str | None = None  # tpe | random (default: the space's searcher.algorithm)
    scheduler: str | None = None  # asha | fifo (default: the space's scheduler.name)
    split_fractions: tuple | None = None
    reuse_actors: bool = True
    progress: bool = True
    hybrid_batch_size: int = 8


DEFAULTS = {"data_root": "datasets", "config": "config.yaml", "iterations": 3, "promotion": "guarded_recall", "metric": "recall", "margin": 0.03, "floor_metric": "precision", "floor": 0.3, "stop": "guarded", "tolerance": 0.02, "patience": 1, "retrain_best": False, "seed": 0, "experiment": "bss-search", "split_fractions": [0.6, 0.2, 0.2]}


@dataclass
class LoopResult:
    run_dir: Path
    state: dict
    rows: list[dict] = field(default_factory=list)
    final_iteration: int | None = None
    stopped: str | None = None
    report: dict | None = None


BUDGET_RESERVE = 0.15  # of the time left: teacher measurement, hybrid, TEST evaluation, report
MIN_SEARCH_SECONDS = 60.0  # a later search with less than this left is not started
_now = time.monotonic  # the budget's clock (tests move it)


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds (for ``--budget``)."""
    value = str(text).strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise BSSError(f"--budget {text!r}: give a duration such as 600, 90s, 10m or 1.5h.") from None
    if not seconds > 0 or seconds == float("inf"):
        raise BSSError(f"--budget {text!r} must be a positive duration.")
    return seconds


def search_budget(time_left: float | None, searches_left: int, per_search: float | None) -> float | None:
    """Seconds for the next search: its share of the loop's time left (after a reserve for the
    stages around the searches), and never more than ``--time-budget``."""
    if time_left is None:
        return per_search
    share = max(1.0, time_left * (1.0 - BUDGET_RESERVE) / max(1, searches_left))
    return share if per_search is None else min(share, per_search)


def derive_seed(*parts: int) -> int:
    """A seed for (loop seed, iteration, ...) that does not collide across iterations."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def _say(text: str = "") -> None:
    print(text, flush=True)


def _count_images(folder: Path) -> int:
    images = folder / "images"
    return sum(1 for _ in images.iterdir()) if images.is_dir() else 0


# --------------------------------------------------------------------------- settings


def resolve_settings(opts: LoopOptions, stored: dict | None, gpus: int) -> dict:
    given = {k: getattr(opts, k) for k in RESULT_SETTINGS + ("experiment", "tracking_uri")}
    if isinstance(given.get("split_fractions"), tuple):
        given["split_fractions"] = list(given["split_fractions"])
    if stored is not None:
        for key in RESULT_SETTINGS:
            value = given.get(key)
            if value is not None and key in stored and value != stored[key] and not (key in ("config", "space", "data_root") and Path(str(value)).resolve() == Path(str(stored[key])).resolve()):
                flag = "--" + key.replace("_", "-")
                raise BSSError(f"--resume continues with the settings the run started with; {flag} was {stored[key]!r}, now {value!r}. Leave it out, or start a new run with another --run-dir.")
        return dict(stored)
    settings = {k: (v if v is not None else DEFAULTS.get(k)) for k, v in given.items()}
    if settings["space"] is None:
        settings["space"] = str(SPACES / ("default.yaml" if gpus else "cpu.yaml"))
    settings["device_kind"] = "gpu" if gpus else "cpu"
    return settings


def _check_numbers(s: dict) -> None:
    if s["iterations"] is not None and s["iterations"] < 1:
        raise BSSError(f"--iterations must be at least 1, got {s['iterations']}.")
    if s["trials"] is not None and s["trials"] < 1:
        raise BSSError(f"--trials must be at least 1, got {s['trials']}.")
    if s.get("budget") is not None and s["budget"] <= 0:
        raise BSSError(f"--budget must be positive, got {s['budget']}.")
    if s["time_budget"] is not None and s["time_budget"] <= 0:
        raise BSSError(f"--time-budget must be positive (seconds per search), got {s['time_budget']}.")
    if s["algorithm"] not in (None, "tpe", "random"):
        raise BSSError(f"--algorithm must be tpe or random, got {s['algorithm']!r}.")
    if s["scheduler"] not in (None, "asha", "fifo"):
        raise BSSError(f"--scheduler must be asha or fifo, got {s['scheduler']!r}.")


def load_inputs(settings: dict, run_dir: Path, resuming: bool):
    """The base config (validated) and the search space; on resume, from the frozen copies."""
    from bss.config import from_dict, read_yaml
    from bss.search.space import load_space

    config_path = run_dir / "base_config.yaml" if resuming else Path(settings["config"])
    space_path = run_dir / "space.yaml" if resuming else Path(settings["space"])
    if not config_path.is_file():
        raise ConfigError(f"config file {config_path} not found" + (" (the run folder is incomplete; start a new run)." if resuming else "; pass --config."))
    base = read_yaml(config_path)
    try:
        base = from_dict(base).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    space = load_space(space_path, base)
    return base, space, config_path, space_path


def trial_base(base: dict, settings: dict, train_dataset: str, image_size: list | None = None) -> dict:
    """The config every trial starts from; ``image_size`` (from the dataset's fingerprint) replaces
    the base config's, and a search space that fixes or searches ``image_size`` overrides both."""
    cfg = copy.deepcopy(base)
    if image_size is not None:
        cfg["image_size"] = list(image_size)
    dataset = settings["dataset"]
    cfg.update(
        train_dataset=train_dataset,
        evaluation_dataset=f"{dataset}_EVAL",
        data_root=str(Path(settings["data_root"]).resolve()),
        visualization_samples=0,
    )
    cfg["tracking"] = dict(cfg.get("tracking") or {}, enabled=False)
    return cfg


def max_evaluations(space, base: dict, train_images: int = 1) -> int:
    """The most evaluations a trial on ``train_images`` images can report (ASHA's max_t)."""
    from bss.config import from_dict

    worst = 1
    probes = [{}]
    if space is not None:
        for p in space.params:
            probes += [{p.key: v} for v in (p.labels if p.kind == "choice" else (p.low, p.high))]
    for probe in probes:
        cfg = from_dict(space.apply(base, probe) if space is not None else base)
        worst = max(worst, cfg.planned_evaluations(train_images))
    return worst


# --------------------------------------------------------------------------- data


def prepare_data(settings: dict, cpus: int, progress: bool, check_files: bool = True) -> dict:
    """The source dataset (generated when it is a missing synthetic class) and its splits;
    ``check_files`` decodes every image and box mask once (a resumed run checked them at its start)."""
    from bss.data.splits import SPLITS, make_splits

    dataset, root = settings["dataset"], Path(settings["data_root"])
    if not dataset or dataset != Path(dataset).name:
        raise BSSError(f"--dataset {dataset!r} must be a dataset name under --data-root (a folder name, no '/').")
    source = root / dataset
    info = {"generated": False, "splits_made": False}
    if not (source / "images").is_dir():
        from bss.data.synthetic import DEFECTS, SynthConfig, generate_dataset

        if dataset not in DEFECTS:
            from bss.data.layout import resolve_dataset

            resolve_dataset(dataset, root)  # raises DatasetError listing what is there
        spec = SYNTHETIC[settings.get("device_kind", "cpu")]
        _say(f"dataset {source} not found: generating the synthetic '{dataset}' dataset, the embedded default "
             f"({spec['count']} images {spec['width']}x{spec['height']}, {spec['hand_labelled']} hand-labelled, seed {settings['seed']}) ...")
        start = time.perf_counter()
        report = generate_dataset(SynthConfig(dataset, dataset, spec["count"], spec["hand_labelled"], spec["width"], spec["height"], int(settings["seed"])), root, workers=max(1, min(2, cpus)))
        _say(f"  wrote {report.folder} in {time.perf_counter() - start:.0f} s")
        info["generated"] = True
    splits = {s: root / f"{dataset}_{s}" for s in SPLITS}
    present = [s for s, p in splits.items() if p.is_dir()]
    if present and check_files:  # make_splits checks the files itself
        from bss.data.layout import SourceDataset

        SourceDataset.open(dataset, root).check_files(progress)
    if not present:
        counts = make_splits(dataset, root, tuple(settings["split_fractions"]), int(settings["seed"]), progress=False)
        _say(f"made the splits of {dataset}: " + ", ".join(f"{dataset}_{s} {n}" for s, n in counts.items()) + f" images (seed {settings['seed']})")
        info["splits_made"] = True
    elif len(present) < len(SPLITS):
        missing = [str(splits[s]) for s in SPLITS if s not in present]
        raise DatasetError(f"the splits of {dataset} are incomplete: {', '.join(missing)} missing. Remove the other {dataset}_BASELINE/EVAL/TEST folders to redraw them, or run drivers/preprocess.py.")
    info["counts"] = {s: _count_images(p) for s, p in splits.items()}
    from bss.search.fingerprint import fingerprint

    info["fingerprint"] = fingerprint(source)
    return info


# --------------------------------------------------------------------------- the loop


class Loop:
    def __init__(self, opts: LoopOptions):
        self.opts = opts
        self.run_dir = Path(opts.run_dir or f"runs/{opts.dataset}")
        self.state: LoopState | None = None
        self.tracker: Tracker | None = None
        self.current_run: str | None = None

    # ---- set-up ------------------------------------------------------------------------
    def setup(self) -> None:
        opts = self.opts
        quiet_environment()
        stored = LoopState.load(self.run_dir)
        if stored is not None and not opts.resume:
            raise BSSError(f"{self.run_dir} already holds a loop ({self.run_dir / 'state.json'}); pass --resume to continue it, or --run-dir to start another.")
        if stored is None and opts.resume:
            raise BSSError(f"nothing to resume: {self.run_dir / 'state.json'} does not exist. Leave out --resume to start, or pass the --run-dir of the run to continue.")
        self.ray_started = False
        if opts.address:
            self.cpus, self.gpus, self.ray_started = start_ray(opts.address)
        else:
            self.cpus, self.gpus = local_resources()
        self.settings = resolve_settings(opts, stored.settings if stored else None, self.gpus)
        _check_numbers(self.settings)
        self.base, self.space, config_path, space_path = load_inputs(self.settings, self.run_dir, stored is not None)
        s = self.settings
        if s["trials"] is None:
            s["trials"] = int(self.space.searcher.get("trials", 8))
        s["algorithm"] = s["algorithm"] or self.space.searcher["algorithm"]
        s["scheduler"] = s["scheduler"] or self.space.scheduler["name"]
        self.rule = self.promotion_rule(floor_iou=0.0)  # checks the flags now; the IoU floor comes with the data
        self.stop_rule = build_stop_rule(s["stop"], metric=s["metric"], tolerance=float(s["tolerance"]), patience=int(s["patience"]))
        self.resources: Resources = plan_resources(self.cpus, self.gpus, s["trials"], opts.concurrency, opts.cpus_per_trial, opts.gpus_per_trial)
        self.inputs = (config_path, space_path)
        self.state = stored

    def promotion_rule(self, floor_iou: float) -> PromotionRule:
        s = self.settings
        return build_promotion_rule(s["promotion"], metric=s["metric"], margin=s["margin"], floor_iou=floor_iou, floor_metric=s["floor_metric"], floor=s["floor"])

    def measure_boxes(self) -> dict:
        """The EVAL box masks' own IoU/Dice/Recall/Precision against the exact masks (once per run)."""
        from bss.hybrid.teacher_quality import box_quality

        st, s = self.state, self.settings
        if "boxes_eval" not in st.data:
            st.set("boxes_eval", box_quality(s["dataset"], s["data_root"]))
        boxes = st.get("boxes_eval")
        self.rule = self.promotion_rule(floor_iou=float(boxes["iou"]))
        fp = st.get("data", {}).get("fingerprint")
        if fp:
            sized = "the search space's" if self.space.sets("image_size") else f"[{fp['input_size'][0]}, {fp['input_size'][1]}] (from the images' shape)"
            _say(f"  images: median {fp['median_shape'][1]}x{fp['median_shape'][0]} (WxH); network input {sized}")
        _say(f"  the EVAL boxes themselves: IoU {boxes['iou']:.3f}  Dice {boxes['dice']:.3f}  Recall {boxes['recall']:.3f}  Precision {boxes['precision']:.3f} (a model must segment better than this)")
        _say(f"  promotion: {self.rule.describe()}")
        _say(f"  stop rule: {self.stop_rule.describe()}")
        return boxes

    def create_state(self) -> None:
        """A new run's state, written once its data is ready (a failed start leaves no run folder)."""
        s, (config_path, space_path) = self.settings, self.inputs
        if self.state is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config_path, self.run_dir / "base_config.yaml.tmp")
            (self.run_dir / "base_config.yaml.tmp").replace(self.run_dir / "base_config.yaml")
            shutil.copyfile(space_path, self.run_dir / "space.yaml.tmp")
            (self.run_dir / "space.yaml.tmp").replace(self.run_dir / "space.yaml")
            s["config_digest"] = file_sha256(self.run_dir / "base_config.yaml")[:12]
            s["space_digest"] = self.space.digest()
            self.state = LoopState.new(self.run_dir, s)
            self.state.save()

    def header(self) -> None:
        s, r = self.settings, self.resources
        mode = "search (TPE + ASHA)" if s["algorithm"] == "tpe" and s["scheduler"] == "asha" else f"search ({s['algorithm']}, {s['scheduler']})"
        _say(f"BSS self-training loop: dataset {s['dataset']} (data root {s['data_root']}), run folder {self.run_dir}" + ("  [resumed]" if self.opts.resume else ""))
        _say(f"  {s['iterations']} iteration(s) max; each: {mode} of {s['trials']} trials" + (" (iterations >= 1: retrain the best config)" if s["retrain_best"] else "") + f"; {r.describe()}")
        _say(f"  search space {s['space']}: " + "; ".join(self.space.describe()))

    def start_tracking(self) -> None:
        s = self.settings
        uri = s.get("tracking_uri") or self.base["tracking"]["uri"]
        self.tracker = Tracker(uri, s.get("experiment") or "bss-search", say=_say)
        st = self.state
        if not st.get("parent_run_id"):
            run_id = self.tracker.create(f"loop {s['dataset']}", None, {"bss.kind": "loop", "bss.dataset": s["dataset"], "bss.run_dir": str(self.run_dir.resolve())})
            self.tracker.params(run_id, {k: v for k, v in s.items() if k not in ("tracking_uri",)})
            self.tracker.artifact(run_id, self.run_dir / "base_config.yaml", "inputs")
            self.tracker.artifact(run_id, self.run_dir / "space.yaml", "inputs")
            st.set("parent_run_id", run_id)
        else:
            self.tracker.reopen(st.get("parent_run_id"))
        _say(f"  MLflow: {self.tracker.uri}, experiment {s.get('experiment') or 'bss-search'}, loop run {st.get('parent_run_id')}")

    # ---- stages --------------------------------------------------------------------------
    def iteration_run(self, k: int, it: dict) -> str:
        if not it.get("run_id"):
            it["run_id"] = self.tracker.create(f"iteration {k}", self.state.get("parent_run_id"), {"bss.kind": "iteration", "bss.iteration": k, "bss.train_dataset": it["train_dataset"]})
            self.state.save()
        else:
            self.tracker.reopen(it["run_id"])
        return it["run_id"]

    def best_config(self) -> dict:
        promoted = self.state.iterations[self.state.get("best")["iteration"]]["promoted"]
        return yaml.safe_load(Path(promoted["config_path"]).read_text())

    def time_left(self) -> float | None:
        """Seconds of ``--budget`` left (None without one); the budget counts from this start."""
        budget = self.settings.get("budget")
        return None if budget is None else float(budget) - (_now() - self.started)

    def incumbent(self) -> list[dict] | None:
        """The best model's searched params, tried first by the next search (Optuna's
        points_to_evaluate): with a handful of trials, the known-good config on the new labels is
        the most informative first trial, and TPE proposes the rest."""
        best = self.state.get("best")
        if best is None:
            return None
        params = self.state.iterations[best["iteration"]]["promoted"]["params"]
        return [dict(params)] if set(params) == {p.key for p in self.space.params} else None

    def search(self, k: int, it: dict, run_id: str) -> None:
        s = self.settings
        iter_dir = self.run_dir / f"iter_{k}"
        retrain = bool(s["retrain_best"]) and k >= 1 and self.state.get("best") is not None
        seed = derive_seed(int(s["seed"]), k)
        from bss.search.trial import TrialContext

        if retrain:
            base = trial_base(self.best_config(), s, it["train_dataset"])
            space, algorithm = None, "replicas"
            seeds = {j: derive_seed(int(s["seed"]), k, j) for j in range(1, s["trials"] + 1)}
        else:
            base = trial_base(self.base, s, it["train_dataset"], self.state.get("data", {}).get("fingerprint", {}).get("input_size"))
            space, algorithm, seeds = self.space, s["algorithm"], {}
        context = TrialContext(
            base=base,
            space=space,
            rule=self.rule,
            trials_dir=str((iter_dir / "trials").resolve()),
            seed=seed,
            iteration=k,
            cpus=self.resources.cpus_per_trial,
            gpus=self.resources.gpus_per_trial,
            mlflow={"uri": self.tracker.uri, "experiment_id": self.tracker.experiment_id, "parent_run_id": run_id} if self.tracker.ok and run_id else None,
            seeds=seeds,
        )
        scheduler = dict(self.space.scheduler, name=s["scheduler"]) if not retrain else {"name": "fifo"}
        points = None if retrain else self.incumbent()
        n_images = _count_images(Path(s["data_root"]) / it["train_dataset"])
        what = f"retrain the best config (iteration {self.state.get('best')['iteration']}) with {s['trials']} seed(s)" if retrain else f"search {s['trials']} trials" + (" (the first: the best config so far)" if points else "")
        _say(f"\n== iteration {k}: {what} on {it['train_dataset']} ({n_images} images), judged on {s['dataset']}_EVAL ==")
        self.tracker.params(run_id, {"train_dataset": it["train_dataset"], "mode": "retrain" if retrain else "search", "trials": s["trials"], "seed": seed, "algorithm": algorithm})
        outcome = run_search(
            context,
            s["trials"],
            self.resources,
            iter_dir,
            algorithm=algorithm,
            scheduler=scheduler,
            max_evaluations=max_evaluations(space, base, n_images),
            time_budget=search_budget(self.time_left(), int(s["iterations"]) - k, s["time_budget"]),
            reuse_actors=self.opts.reuse_actors,
            label=f"[iter {k}]",
            progress=self.opts.progress,
            points=points,
        )
        counts = {state: sum(1 for c in outcome.candidates if c.state == state) for state in ("complete", "stopped", "failed", "lost")}
        winner = self.rule.choose(outcome.candidates)
        it["search"] = {
            "done": True,
            "mode": "retrain" if retrain else "search",
            "wall_seconds": round(outcome.wall_seconds, 2),
            "counts": counts,
            "trials": [{"ordinal": c.ordinal, "key": c.key, "state": c.state, "params": c.params, "evaluations": c.evaluations, "best": c.best, "error": (c.error or "")[-300:] or None, "run_id": c.run_id} for c in outcome.candidates],
            "timings": outcome.timings,
        }
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        self.tracker.metrics(run_id, {"search_seconds": outcome.wall_seconds, "trials_complete": counts["complete"], "trials_stopped": counts["stopped"], "trials_failed": counts["failed"]})
        if winner is None:
            it["promoted"] = None
            self.state.save()
            _say(f"iteration {k}: no trial reached {self.rule.floor_text()} ({summary}, {outcome.wall_seconds:.0f} s)")
            if k == 0:
                raise BSSError(self.no_model_message(outcome.candidates))
            return
        promoted = promote(winner, k, iter_dir)
        overlays = None
        try:
            from bss.search.evaluate import draw_overlays

            overlays = draw_overlays(promoted.checkpoint, f"{s['dataset']}_EVAL", s["data_root"], iter_dir / "overlays.png", samples=int(self.base.get("visualization_samples", 4)) or 4)
        except BSSError as exc:  # a picture is not worth stopping the loop
            _say(f"warning: could not draw the overlays: {exc}")
        it["promoted"] = promoted.to_dict()
        self.state.save()
        tr = self.tracker
        tr.metrics(run_id, promoted.metrics)
        tr.params(run_id, {f"promoted.{k2}": v for k2, v in promoted.params.items()} | {"promoted.trial": promoted.ordinal})
        tr.tag(run_id, "bss.promoted_trial_run", promoted.run_id or "")
        for path in (promoted.checkpoint, promoted.config_path, iter_dir / "promotion.json", overlays):
            if path:
                tr.artifact(run_id, path, "promoted")
        m = promoted.metrics
        _say(f"iteration {k}: promoted trial {promoted.ordinal} ({short(promoted.params)}) - EVAL recall {m['eval_recall']:.3f} precision {m['eval_precision']:.3f} IoU {m['eval_iou']:.3f} Dice {m['eval_dice']:.3f}   [{summary}; {outcome.wall_seconds:.0f} s]")

    def no_model_message(self, candidates) -> str:
        """Why iteration 0 has nothing to promote, with the numbers and what to change."""
        s = self.settings
        rows = [c for c in candidates if c.best]
        best = max(rows, key=lambda c: float(c.best["eval_iou"]), default=None)
        boxes = self.state.get("boxes_eval") or {}
        figures = "no trial finished an evaluation"
        if best is not None:
            b = best.best
            figures = f"the best trial ({best.ordinal}) reached EVAL IoU {b['eval_iou']:.3f}, Recall {b['eval_recall']:.3f}, Precision {b['eval_precision']:.3f}"
        if boxes:
            figures += f"; the EVAL boxes themselves score IoU {boxes['iou']:.3f}, Recall {boxes['recall']:.3f}, Precision {boxes['precision']:.3f}"
        failed = sum(c.state == "failed" for c in candidates)
        budget = f" (the --time-budget of {s['time_budget']:g} s may have cut them short)" if s["time_budget"] else ""
        return (
            f"iteration 0: none of the {len(candidates)} trials reached {self.rule.floor_text()}{budget}" + (f", {failed} failed" if failed else "") + f", so there is no model to promote: {figures}. "
            "Give the trials more training (the space's fixed: train_steps), more --trials or a larger image_size, or hand-label more images; start again with another --run-dir."
        )

    def decide(self, k: int, it: dict) -> dict:
        """The stop rule on this run's history (bss.search.stop); the state keeps the best so far."""
        history = [Outcome(j, (x.get("promoted") or {}).get("metrics"), bool((x.get("decision") or {}).get("new_best"))) for j, x in enumerate(self.state.iterations[: k + 1])]
        decision = self.stop_rule.decide(history).to_dict()
        if decision["new_best"]:
            self.state.data["best"] = {"iteration": k, "value": decision["value"], "checkpoint": it["promoted"]["checkpoint"]}
        it["decision"] = decision
        if decision["stop"]:
            self.state.data["stopped"] = decision["verdict"]
        self.state.save()
        self.tracker.tag(it["run_id"], "bss.decision", decision["verdict"])
        best = self.state.get("best")
        _say(f"iteration {k}: {decision['verdict']}" + ("" if decision["stop"] else f"; best so far: iteration {best['iteration']}"))
        return decision

    def measure_teacher(self, k: int, it: dict) -> dict | None:
        """EVAL label IoU of the promoted model as a teacher, and the refinement rule chosen on EVAL."""
        if not it.get("promoted"):
            return None
        if "teacher" not in it:
            from bss.hybrid.teacher_quality import measure_teacher

            start = time.perf_counter()
            quality = measure_teacher(it["promoted"]["checkpoint"], self.settings["dataset"], self.settings["data_root"], batch_size=self.opts.hybrid_batch_size, device="cpu" if not self.gpus else "auto")
            it["teacher"] = dict(quality.to_dict(), seconds=round(time.perf_counter() - start, 2))
            self.state.save()
            self.tracker.metrics(it["run_id"], {"eval_label_iou": quality.label_iou, "eval_box_label_iou": quality.box_iou_pixels, "eval_raw_label_iou": quality.raw_iou_pixels, "eval_default_rule_label_iou": quality.default.iou_pixels})
            self.tracker.params(it["run_id"], {f"refine.{key}": v for key, v in quality.best.rule.to_dict().items()})
            self.say_teacher(k, it["teacher"])
        return it["teacher"]

    def say_teacher(self, k: int, t: dict) -> None:
        rule = t["rule"]
        _say(
            f"iteration {k}: as a teacher on EVAL: label IoU {t['label_iou_pixels']:.3f} with the chosen rule ({rule['mode']}, threshold {rule['threshold']:g}, min_fill {rule['min_fill']:g}, "
            f"fallback {rule['fallback']}{', holes filled' if rule['fill_holes'] else ''}; default rule {t['default_rule_iou_pixels']:.3f}); the EVAL boxes {t['box_iou_pixels']:.3f}, raw prediction {t['raw_iou_pixels']:.3f}"
        )

    def current_label_iou(self, k: int) -> tuple[float, str]:
        """EVAL label IoU of the labels iteration k trained on: the teacher that made its H<n>, or the boxes."""
        train = self.state.iterations[k]["train_dataset"]
        for j in range(k - 1, -1, -1):
            prev = self.state.iterations[j]
            if (prev.get("hybrid") or {}).get("name") == train:
                return float(prev["teacher"]["label_iou_pixels"]), f"{train} (made with EVAL label IoU {prev['teacher']['label_iou_pixels']:.3f})"
        boxes = self.state.iterations[k]["teacher"]["box_iou_pixels"]
        return float(boxes), f"the boxes (EVAL label IoU {boxes:.3f})"

    def make_next_dataset(self, k: int, it: dict, decision: dict) -> None:
        s = self.settings
        hybrid = it.setdefault("hybrid", {})
        if not decision["new_best"]:  # the best model is the one that made the current set
            hybrid.update(done=True, reused=it["train_dataset"])
            self.state.iteration(k + 1)["train_dataset"] = it["train_dataset"]
            self.state.save()
            _say(f"iteration {k}: no new best, iteration {k + 1} trains again on {it['train_dataset']} with new seeds")
            return
        from bss.hybrid import RefineRule, hybrid_name, make_hybrid, next_number, read_manifest

        teacher = self.measure_teacher(k, it)
        current, what = self.current_label_iou(k)
        if teacher["label_iou_pixels"] <= current:
            verdict = f"stop: the new teacher's EVAL label IoU {teacher['label_iou_pixels']:.3f} does not beat the current training labels, {what}; no H<n> is made"
            hybrid.update(done=True, refused=verdict)
            decision.update(stop=True, verdict=f"{decision['verdict']}; then {verdict}")
            self.state.data["stopped"] = verdict
            self.state.save()
            self.tracker.tag(it["run_id"], "bss.decision", decision["verdict"])
            _say(f"iteration {k}: {verdict}")
            return
        rule = RefineRule.from_dict(teacher["rule"])
        nxt = self.state.iteration(k + 1)
        dataset, root = s["dataset"], Path(s["data_root"])
        checkpoint = Path(self.state.get("best")["checkpoint"])
        if "number" not in hybrid:
            hybrid["number"] = int(next_number(dataset, root))
            hybrid["checkpoint_sha256"] = file_sha256(checkpoint)
            self.state.save()  # the number is fixed before the folder exists: a resume never makes a second one
        number = hybrid["number"]
        folder = root / hybrid_name(dataset, number)
        start = time.perf_counter()
        if folder.exists():
            manifest = read_manifest(folder)
            made_by = (manifest.get("checkpoint") or {}).get("sha256")
            if made_by != hybrid["checkpoint_sha256"]:
                raise BSSError(f"{folder} exists but was not made by this run's iteration-{k} model (its manifest names another checkpoint); it is left alone. Move it away and --resume, or start a new run.")
            label_quality = manifest.get("label_quality")
            _say(f"iteration {k}: {folder.name} already made by this run (adopted after a resume)")
        else:
            _say(f"iteration {k}: refining the box-only images of {dataset} with the promoted model -> {folder.name} ...")
            result = make_hybrid(dataset, checkpoint, data_root=root, number=number, rule=rule, overwrite=False, batch_size=self.opts.hybrid_batch_size, progress=False)
            manifest, label_quality, folder = result.manifest, result.label_quality, Path(result.path)
        hybrid.update(done=True, path=str(folder), name=folder.name, images=_count_images(folder), label_quality=label_quality, seconds=round(time.perf_counter() - start, 2))
        nxt["train_dataset"] = folder.name
        self.state.save()
        run_id = it["run_id"]
        self.tracker.artifact(run_id, folder / "manifest.json", "hybrid")
        self.tracker.artifact(run_id, folder / "label_quality.json", "hybrid")
        if label_quality:
            self.tracker.metrics(run_id, {f"hybrid_{k2}": v for k2, v in label_quality.items() if isinstance(v, (int, float))})
        self.tracker.tag(run_id, "bss.hybrid", folder.name)
        quality = ""
        if label_quality:
            quality = f"; label IoU vs truth: boxes {label_quality.get('box_iou_pixels', float('nan')):.3f} -> refined {label_quality.get('hybrid_iou_pixels', float('nan')):.3f}"
        _say(f"iteration {k}: {folder.name}: {hybrid['images']} images{quality}")

    # ---- the final report ------------------------------------------------------------------
    def table_rows(self, evaluate_test: bool = False) -> list[dict]:
        s, st = self.settings, self.state
        best = st.get("best")
        rows = []
        for it in st.iterations:
            if not it.get("search", {}).get("done"):
                continue
            promoted = it.get("promoted")
            if promoted and "test" not in it and evaluate_test:  # after the last decision: TEST never steers the loop
                from bss.search.evaluate import evaluate_checkpoint

                it["test"] = evaluate_checkpoint(promoted["checkpoint"], f"{s['dataset']}_TEST", s["data_root"], device="cpu")
                st.save()
            counts = it["search"]["counts"]
            row = {
                "iteration": it["index"],
                "train_dataset": it["train_dataset"],
                "mode": it["search"]["mode"],
                "trials": sum(counts.values()),
                "trials_ok": counts.get("complete", 0) + counts.get("stopped", 0),
                "trials_failed": counts.get("failed", 0),
                "promoted_trial": promoted["ordinal"] if promoted else None,
                "decision": (it.get("decision") or {}).get("verdict", ""),
                "final": bool(best and best["iteration"] == it["index"]),
                "search_seconds": it["search"]["wall_seconds"],
            }
            for m in ("iou", "dice", "recall", "precision"):
                row[f"eval_{m}"] = promoted["metrics"].get(f"eval_{m}") if promoted else None
                row[f"test_{m}"] = it.get("test", {}).get(m) if promoted else None
            if it.get("teacher"):
                row["eval_label_iou"] = it["teacher"]["label_iou_pixels"]  # this model as a teacher, EVAL boxes refined
                row["eval_box_label_iou"] = it["teacher"]["box_iou_pixels"]
            if it.get("hybrid", {}).get("name"):
                row["made"] = it["hybrid"]["name"]
                for key, value in (it["hybrid"].get("label_quality") or {}).items():
                    if isinstance(value, (int, float)):
                        row[f"label_{key}"] = value
            rows.append(row)
        return rows

    def report(self) -> LoopResult:
        from bss.search.report import write_report

        s, st = self.settings, self.state
        rows = self.table_rows(evaluate_test=True)
        best = st.get("best")
        final = best["iteration"] if best else None
        notes = [
            f"Dataset `{s['dataset']}`; promotion: {self.rule.describe()}; {s['trials']} trials per iteration ({s['algorithm']} + {s['scheduler']}); seed {s['seed']}.",
            f"Stopped: {st.get('stopped') or 'ran all ' + str(s['iterations']) + ' iterations'}. Final model: iteration {final} (`{self.run_dir / 'best.pt'}`).",
            f"EVAL = `{s['dataset']}_EVAL` (every decision); TEST = `{s['dataset']}_TEST`, evaluated only after the last decision.",
        ]
        paths = write_report(rows, self.run_dir, f"BSS self-training loop: {s['dataset']}", notes)
        if final is not None:
            promoted = st.iterations[final]["promoted"]
            for name, src in (("best.pt", promoted["checkpoint"]), ("config.yaml", promoted["config_path"])):
                shutil.copyfile(src, self.run_dir / (name + ".tmp"))
                (self.run_dir / (name + ".tmp")).replace(self.run_dir / name)
        parent = st.get("parent_run_id")
        tr = self.tracker
        for path in paths.values():
            tr.artifact(parent, path, "report")
        if final is not None:
            tr.artifact(parent, self.run_dir / "best.pt", "final")
            tr.artifact(parent, self.run_dir / "config.yaml", "final")
            row = next(r for r in rows if r["iteration"] == final)
            tr.metrics(parent, {f"final_{k}": v for k, v in row.items() if k.startswith(("eval_", "test_")) and v is not None} | {"final_iteration": final})
        for r in rows:
            tr.metrics(parent, {k: v for k, v in r.items() if k.startswith(("eval_", "test_")) and v is not None}, step=r["iteration"])
            it = st.iterations[r["iteration"]]
            if r.get("test_iou") is not None:
                tr.metrics(it["run_id"], {f"test_{m}": r[f"test_{m}"] for m in ("iou", "dice", "recall", "precision")})
        st.data["report"] = {k: str(v) for k, v in paths.items()}
        st.data["finished"] = True
        st.save()
        tr.end(parent, "FINISHED")
        return self.summary(rows)

    def summary(self, rows: list[dict]) -> LoopResult:
        from bss.search.report import table_lines

        st = self.state
        best = st.get("best")
        final = best["iteration"] if best else None
        _say("\nsummary (* = final model; EVAL decided everything, TEST is only reported):")
        for line in table_lines(rows):
            _say("  " + line)
        stopped = st.get("stopped")
        _say("\n" + (f"stopped early: {stopped[len('stop: '):] if stopped.startswith('stop: ') else stopped}" if stopped else f"ran all {len(rows)} iteration(s)"))
        if final is not None:
            _say(f"final model: {self.run_dir / 'best.pt'} (iteration {final}); report: {self.run_dir / 'report.md'}, plot: {self.run_dir / 'metrics.png'}")
        return LoopResult(self.run_dir, st.data, rows, final, st.get("stopped"), st.get("report"))

    # ---- driver ------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        """Run or resume the loop, holding the run folder's lock throughout (a second driver on
        the same --run-dir is refused at once; a killed driver's lock goes with its process)."""
        lock = RunLock(self.run_dir).acquire()
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> LoopResult:
        self.started = _now()
        self.setup()
        if self.state is not None and self.state.get("finished"):
            _say(f"{self.run_dir}: this loop finished earlier; its report is {self.state.get('report', {}).get('md')}.")
            return self.summary(self.table_rows())
        self.header()
        data = prepare_data(self.settings, self.cpus, self.opts.progress, check_files=self.state is None)
        self.create_state()
        st = self.state
        if "data" not in st.data:
            st.set("data", data)
        self.measure_boxes()
        if not self.ray_started:
            _, _, self.ray_started = start_ray(None, self.cpus, self.gpus)
        self.start_tracking()
        try:
            s = self.settings
            for k in range(int(s["iterations"])):
                if k < len(st.iterations) and st.iterations[k].get("done"):
                    it = st.iterations[k]
                    _say(f"iteration {k}: done earlier ({(it.get('decision') or {}).get('verdict', '')}); skipped")
                    continue
                if st.get("stopped"):
                    break
                left = self.time_left()
                if k > 0 and left is not None and left < MIN_SEARCH_SECONDS and not (st.iterations[k] if k < len(st.iterations) else {}).get("search", {}).get("done"):
                    verdict = f"stop: the --budget of {s['budget']:g} s is spent ({max(0.0, left):.0f} s left)"
                    st.data["stopped"] = verdict
                    st.save()
                    _say(f"iteration {k}: {verdict}")
                    break
                it = st.iteration(k)
                if k == 0:
                    it.setdefault("train_dataset", f"{s['dataset']}_BASELINE")
                self.current_run = run_id = self.iteration_run(k, it)
                if not it.get("search", {}).get("done"):
                    self.search(k, it, run_id)
                self.measure_teacher(k, it)
                decision = it.get("decision") or self.decide(k, it)
                if not decision["stop"] and k + 1 < int(s["iterations"]) and not it.get("hybrid", {}).get("done"):
                    self.make_next_dataset(k, it, decision)
                it["done"] = True
                st.save()
                self.tracker.end(run_id, "FINISHED")
                self.current_run = None
                if decision["stop"]:
                    break
            return self.report()
        except KeyboardInterrupt:
            self._abort("KILLED")
            _say(f"\ninterrupted: completed stages are saved in {st.path}; continue with the same command and --resume")
            raise
        except BaseException:
            self._abort("FAILED")
            raise
        finally:
            if self.ray_started:
                import ray

                ray.shutdown()

    def _abort(self, status: str) -> None:
        if self.tracker is None:
            return
        self.tracker.end(self.current_run, status)
        self.tracker.end(self.state.get("parent_run_id") if self.state else None, status)


def short(params: dict) -> str:
    from bss.search.tune_search import short_params

    return short_params(params)


def run_loop(opts: LoopOptions) -> LoopResult:
    """Run (or resume) the self-training loop described by ``opts``."""
    return Loop(opts).run()

