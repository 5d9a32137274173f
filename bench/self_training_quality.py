"""Quality benchmark: how much of full supervision does self-training recover from boxes?

For each dataset and seed, in a scratch data root (never in the repository, never in ../shared):

* **headroom setting**: few hand labels among many box-only images. Synthetic classes: 300 frames,
  30 hand-labelled (1 per 10). ``neu_*`` (real photos, ``../shared/data/neu_seg``): 60 photos held
  out first, then 36 of the remaining 240 keep their polygons (the others get region_count 0).
* **held-out TEST** of ``--holdout`` images (default 60) that the loop never sees, scored against
  their exact masks: synthetic, a separately generated set (seed 1000 + seed); ``neu_*``, the
  photos removed before the loop. The loop's own TEST (a fifth of the few hand labels) is reported
  beside it.
* **the loop** (``drivers/search.py``, defaults unless ``--trials/--iterations/--budget``): every
  iteration's promoted model on the held-out TEST; iteration 0 and the final model (the best by
  EVAL) are the figures; the label IoU against ``truth/`` of the boxes and of the best ``H<n>``.
* **the ceiling**: full supervision through the same search: the loop's iteration 0 alone
  (``--iterations 1``) on a copy of the dataset whose BASELINE holds every training image (every
  image not in EVAL or TEST) with its exact mask; the same EVAL and TEST splits.
* **recovered fraction** = (final - iteration 0) / (ceiling - iteration 0), on the held-out TEST.

One run of this script writes one file, ``bench/results/self_training_quality_<tag>.json`` (tag:
``--tag`` or the start time), with the code version and the settings; earlier results are never
merged in. A line per finished (dataset, seed) as it goes, the Markdown tables at the end.

    python bench/self_training_quality.py                                         # 6 datasets x 3 seeds: hours
    python bench/self_training_quality.py --datasets obstacle neu_patches --seeds 0
    python bench/self_training_quality.py --datasets obstacle --seeds 0 --images 60 --hand-labels 10 \\
        --holdout 40 --trials 2 --iterations 2 --budget 4m --tag quick               # a plumbing check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

from bss.data.io import link_or_copy, read_mask  # noqa: E402
from bss.data.layout import SourceDataset, list_samples  # noqa: E402
from bss.data.synthetic import DEFECTS, SynthConfig, generate_dataset  # noqa: E402
from bss.data.via import write_via_csv  # noqa: E402
from bss.metrics import mask_counts as counts  # noqa: E402
from bss.search.settings import LoopSettings, parse_duration  # noqa: E402

NEU_ROOT = REPO.parent / "shared" / "data" / "neu_seg"
NEU = ("neu_patches", "neu_scratches")
DATASETS = DEFECTS + NEU
HOLDOUT_SEED = 1000  # the synthetic held-out set of seed s is generated with seed 1000 + s
HAND_LABELS = {"synthetic": 30, "photos": 36}  # default hand labels per family (see the docstring)
HEADROOM = 0.05  # ceiling - iteration 0 below this: a setting without headroom (its fraction is noise)


# --------------------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class Setting:
    """One dataset at one seed: what the loop sees and what is held out."""

    dataset: str
    seed: int
    images: int | None  # synthetic: frames generated for the loop (photos: None, the source's images less the hold-out)
    hand_labels: int
    holdout: int
    # synthetic only: the generator's class (None: the dataset's name), frame (WxH; None: the
    # loop's CPU default, 256x192) and defect area (SynthConfig.area_scale)
    defect: str | None = None
    frame: tuple[int, int] | None = None
    area_scale: float = 1.0

    @property
    def defect_class(self) -> str:
        """The generator's class of a synthetic setting (its dataset's name unless ``defect`` says)."""
        return self.defect or self.dataset

    @property
    def synthetic(self) -> bool:
        return self.defect_class in DEFECTS


@dataclass(frozen=True)
class Knobs:
    """Flags passed to ``drivers/search.py`` (None: the loop's default)."""

    trials: int | None = None
    iterations: int | None = None
    budget: float | None = None  # seconds of the whole headroom loop

    def loop_args(self) -> list[str]:
        args = []
        if self.trials is not None:
            args += ["--trials", str(self.trials)]
        if self.iterations is not None:
            args += ["--iterations", str(self.iterations)]
        if self.budget is not None:
            args += ["--budget", f"{self.budget:g}"]
        return args

    def ceiling_args(self) -> list[str]:
        """One iteration; with a budget, the share one of the headroom loop's searches gets."""
        args = ["--iterations", "1"] + (["--trials", str(self.trials)] if self.trials is not None else [])
        if self.budget is not None:
            args += ["--budget", f"{self.budget / (self.iterations or LoopSettings().iterations):g}"]
        return args


@dataclass
class Prepared:
    """The scratch data roots of one setting, and what the loop will see in them."""

    headroom_root: Path  # NAME (few hand labels) + NAME_BASELINE/EVAL/TEST
    ceiling_root: Path  # NAME + NAME_BASELINE (every training image, exact masks) + the same EVAL/TEST
    holdout: Path  # images/ + masks/ (the exact masks) of the held-out images
    source_images: int
    hand_labels: int
    baseline: int
    eval: int
    test: int
    ceiling_baseline: int
    holdout_images: int
    box_label_iou: float  # the box-only images' box masks against their truth (all pixels)


@dataclass
class IterationScore:
    iteration: int
    train_dataset: str
    eval_iou: float | None
    loop_test_iou: float | None  # the loop's own TEST (a few hand labels)
    test_iou: float | None  # the benchmark's held-out TEST
    made: str | None = None  # the H<n> this iteration's model refined
    label_iou: float | None = None  # that H<n>'s refined masks against truth (all pixels)


@dataclass
class LoopOutcome:
    seconds: float
    iterations: list[IterationScore] = field(default_factory=list)
    final_iteration: int | None = None
    error: str | None = None

    @property
    def final(self) -> IterationScore | None:
        return next((it for it in self.iterations if it.iteration == self.final_iteration), None)

    def test_iou(self, iteration: int) -> float | None:
        return next((it.test_iou for it in self.iterations if it.iteration == iteration), None)


@dataclass
class Figures:
    """The figures a run is judged by (held-out TEST IoU unless said otherwise)."""

    iter0: float | None
    final: float | None
    final_iteration: int | None
    ceiling: float | None
    headroom: float | None
    recovered: float | None
    box_label_iou: float
    best_h_label_iou: float | None
    loop_test_iter0: float | None
    loop_test_final: float | None
    loop_seconds: float
    ceiling_seconds: float


@dataclass
class RunResult:
    setting: Setting
    prepared: Prepared
    loop: LoopOutcome
    ceiling: LoopOutcome

    def figures(self) -> Figures:
        loop, final = self.loop, self.loop.final
        iter0, ceiling = loop.test_iou(0), self.ceiling.test_iou(0)
        made = [it.label_iou for it in loop.iterations if it.label_iou is not None]
        return Figures(
            iter0=iter0,
            final=final.test_iou if final else None,
            final_iteration=loop.final_iteration,
            ceiling=ceiling,
            headroom=None if iter0 is None or ceiling is None else ceiling - iter0,
            recovered=recovered_fraction(iter0, final.test_iou if final else None, ceiling),
            box_label_iou=self.prepared.box_label_iou,
            best_h_label_iou=max(made, default=None),
            loop_test_iter0=next((it.loop_test_iou for it in loop.iterations if it.iteration == 0), None),
            loop_test_final=final.loop_test_iou if final else None,
            loop_seconds=loop.seconds,
            ceiling_seconds=self.ceiling.seconds,
        )

    def to_json(self) -> dict:
        """The run as JSON types (paths as text), with its figures."""
        body = asdict(self) | {"figures": asdict(self.figures())}
        body["prepared"] = {k: str(v) if isinstance(v, Path) else v for k, v in body["prepared"].items()}
        return body


def recovered_fraction(iter0: float | None, final: float | None, ceiling: float | None) -> float | None:
    """(final - iteration 0) / (ceiling - iteration 0); None when a figure is missing or the
    ceiling is not above iteration 0 (nothing to recover)."""
    if iter0 is None or final is None or ceiling is None or ceiling <= iter0:
        return None
    return (final - iter0) / (ceiling - iter0)


# --------------------------------------------------------------------------- building the data


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=link_or_copy)


def _test_set(folder: Path, images: list[Path], truth_dir: Path, copy) -> None:
    """A held-out TEST folder: the images and their exact masks as masks/."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for image in images:
        copy(image, folder / "images" / image.name)
        copy(truth_dir / f"{image.stem}.png", folder / "masks" / f"{image.stem}.png")


def synthetic_source(setting: Setting, root: Path, holdout_root: Path) -> Path:
    """The loop's dataset (``images`` frames, ``hand_labels`` polygons) and a held-out set
    generated with another seed, written as ``holdout_root/TEST``."""
    from bss.search.data_stage import SYNTHETIC

    name, defect = setting.dataset, setting.defect_class
    width, height = setting.frame or (SYNTHETIC["cpu"]["width"], SYNTHETIC["cpu"]["height"])
    generate_dataset(SynthConfig(name, defect, setting.images, setting.hand_labels, width, height, setting.seed, setting.area_scale), root, workers=2)
    extra = generate_dataset(
        SynthConfig(name, defect, setting.holdout, 0, width, height, HOLDOUT_SEED + setting.seed, setting.area_scale), holdout_root, workers=2
    ).folder
    _test_set(holdout_root / "TEST", sorted((extra / "images").iterdir()), extra / "truth", link_or_copy)
    shutil.rmtree(extra)
    return holdout_root / "TEST"


def photo_source(setting: Setting, source: Path, root: Path, holdout_root: Path) -> Path:
    """Copy ``source`` (read only) without ``holdout`` images drawn by seed, keep the polygons of
    ``hand_labels`` images drawn by seed among the rest (the others: region_count 0) and every
    truth mask; the held-out images with their truth become ``holdout_root/TEST``."""
    src = SourceDataset.open(source.name, source.parent)
    if src.truth_dir is None:
        raise SystemExit(f"{source}: no truth/ folder; the benchmark scores against the exact masks")
    rng = np.random.default_rng([setting.seed, 18])
    samples = sorted(src.samples, key=lambda s: s.stem)
    held = {samples[i].stem for i in rng.choice(len(samples), setting.holdout, replace=False)}
    labelled = sorted(s.image.name for s in src.hand_labelled() if s.stem not in held)
    if len(labelled) < setting.hand_labels:
        raise SystemExit(f"{source}: only {len(labelled)} hand-labelled images outside the hold-out; --hand-labels {setting.hand_labels} is too many")
    keep = {labelled[i] for i in rng.choice(len(labelled), setting.hand_labels, replace=False)}
    folder = root / setting.dataset
    for sub in ("images", "masks", "truth"):
        (folder / sub).mkdir(parents=True)
    rows, sizes = {}, {}
    for s in samples:
        if s.stem in held:
            continue
        for sub, path in (("images", s.image), ("masks", s.mask), ("truth", src.truth_dir / f"{s.stem}.png")):
            shutil.copy(path, folder / sub / path.name)  # copies, never links: ../shared stays untouchable
        regions = src.labels.regions.get(s.image.name, []) if s.image.name in keep else []
        rows[s.image.name] = [{"name": r.shape} | r.attrs for r in regions]
        sizes[s.image.name] = s.image.stat().st_size
    write_via_csv(folder / "labels.csv", rows, sizes)
    _test_set(holdout_root / "TEST", sorted(s.image for s in samples if s.stem in held), src.truth_dir, shutil.copy)
    return holdout_root / "TEST"


def ceiling_dataset(name: str, headroom_root: Path, ceiling_root: Path) -> int:
    """The same source and EVAL/TEST splits (hard links) under ``ceiling_root``, with a BASELINE of
    every training image (not in EVAL or TEST) and its exact mask; returns its size."""
    held_out = {p.stem for split in ("EVAL", "TEST") for p in (headroom_root / f"{name}_{split}" / "images").iterdir()}
    for folder in (name, f"{name}_EVAL", f"{name}_TEST"):
        _link_tree(headroom_root / folder, ceiling_root / folder)
    source = SourceDataset.open(name, ceiling_root)
    train = [s.image for s in source.samples if s.stem not in held_out]
    _test_set(ceiling_root / f"{name}_BASELINE", train, source.truth_dir, link_or_copy)
    return len(train)


def box_label_iou(root: Path, name: str) -> float:
    """IoU over all pixels of the box-only images' box masks against their truth."""
    source = SourceDataset.open(name, root)
    total = np.zeros(4, dtype=np.int64)
    for s in source.box_only():
        total += np.asarray(counts(read_mask(s.mask), read_mask(source.truth_dir / f"{s.stem}.png")))
    tp, fp, fn, _ = total
    return float(tp / max(tp + fp + fn, 1))


def prepare(setting: Setting, work: Path, photos: Path = NEU_ROOT) -> Prepared:
    """Every dataset of one setting, under ``work``: the headroom source and its splits, the
    ceiling copy, the held-out TEST. A photo dataset is read from ``photos/<dataset>``."""
    from bss.data.splits import make_splits

    headroom_root, ceiling_root, holdout_root = work / "headroom", work / "ceiling", work / "holdout"
    for folder in (headroom_root, ceiling_root, holdout_root):
        folder.mkdir(parents=True)
    if setting.synthetic:
        holdout = synthetic_source(setting, headroom_root, holdout_root)
    else:
        source = photos / setting.dataset
        if not source.is_dir():
            raise SystemExit(f"{source} not found: the neu_seg datasets come from ../shared/data/neu_seg")
        holdout = photo_source(setting, source, headroom_root, holdout_root)
    split = make_splits(setting.dataset, headroom_root, tuple(LoopSettings().split_fractions), setting.seed, progress=False)
    ceiling = ceiling_dataset(setting.dataset, headroom_root, ceiling_root)
    source = SourceDataset.open(setting.dataset, headroom_root)
    return Prepared(
        headroom_root=headroom_root,
        ceiling_root=ceiling_root,
        holdout=holdout,
        source_images=len(source.samples),
        hand_labels=len(source.hand_labelled()),
        baseline=split["BASELINE"],
        eval=split["EVAL"],
        test=split["TEST"],
        ceiling_baseline=ceiling,
        holdout_images=len(list_samples(holdout)),
        box_label_iou=box_label_iou(headroom_root, setting.dataset),
    )


# --------------------------------------------------------------------------- running and scoring


def run_loop(name: str, root: Path, run_dir: Path, seed: int, extra: list[str], tracking: str, log: Path) -> tuple[float, str | None]:
    """``drivers/search.py`` in its own process; (seconds, the error line or None)."""
    cmd = [sys.executable, "drivers/search.py", "--dataset", name, "--data-root", str(root), "--run-dir", str(run_dir)]
    cmd += ["--seed", str(seed), "--quiet", "--tracking-uri", tracking, "--experiment", f"bench-quality-{run_dir.name}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    log.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return seconds, f"exit {proc.returncode}: {lines[-1] if lines else ''}"
    return seconds, None


def score_loop(run_dir: Path, holdout: Path, seconds: float) -> LoopOutcome:
    """Every iteration's promoted model (``iter_<k>/best.pt``) on the held-out TEST, beside the
    loop's own figures from ``report.json``."""
    from bss.search.evaluate import evaluate_checkpoint

    rows = json.loads((run_dir / "report.json").read_text())["iterations"]
    outcome = LoopOutcome(seconds, final_iteration=next((r["iteration"] for r in rows if r.get("final")), None))
    for r in rows:
        checkpoint = run_dir / f"iter_{r['iteration']}" / "best.pt"
        test = evaluate_checkpoint(checkpoint, str(holdout), holdout.parent)["iou"] if checkpoint.is_file() else None
        outcome.iterations.append(
            IterationScore(
                iteration=r["iteration"],
                train_dataset=r["train_dataset"],
                eval_iou=r.get("eval_iou"),
                loop_test_iou=r.get("test_iou"),
                test_iou=None if test is None else float(test),
                made=r.get("made"),
                label_iou=r.get("label_hybrid_iou_pixels"),
            )
        )
    return outcome


def loop_outcome(name: str, root: Path, run_dir: Path, setting: Setting, extra: list[str], prepared: Prepared, work: Path) -> LoopOutcome:
    seconds, error = run_loop(name, root, run_dir, setting.seed, extra, f"sqlite:///{work / 'mlflow.db'}", work / f"{run_dir.name}.log")
    if error is not None:
        return LoopOutcome(seconds, error=error)
    return score_loop(run_dir, prepared.holdout, seconds)


def bench_one(setting: Setting, knobs: Knobs, work: Path, keep: bool) -> RunResult:
    work = work / f"{setting.dataset}-s{setting.seed}"
    if work.exists():
        shutil.rmtree(work)
    prepared = prepare(setting, work)
    say(
        f"{setting.dataset} seed {setting.seed}: {prepared.source_images} images, {prepared.hand_labels} hand-labelled "
        f"(BASELINE {prepared.baseline}, EVAL {prepared.eval}, TEST {prepared.test}); ceiling BASELINE {prepared.ceiling_baseline}; "
        f"held-out TEST {prepared.holdout_images}"
    )
    name = setting.dataset
    loop = loop_outcome(name, prepared.headroom_root, work / "loop", setting, knobs.loop_args(), prepared, work)
    ceiling = loop_outcome(name, prepared.ceiling_root, work / "ceiling_loop", setting, knobs.ceiling_args(), prepared, work)
    if not keep:  # the logs and report files stay; the images, checkpoints and trials go
        for run_dir in (work / "loop", work / "ceiling_loop"):
            for report in run_dir.glob("report.*"):
                shutil.copy(report, work / f"{run_dir.name}_{report.name}")
        for folder in ("headroom", "ceiling", "holdout", "loop", "ceiling_loop", "mlartifacts"):
            shutil.rmtree(work / folder, ignore_errors=True)
    return RunResult(setting, prepared, loop, ceiling)


# --------------------------------------------------------------------------- reporting


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


@dataclass
class Spread:
    median: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, values: list[float | None]) -> "Spread":
        vals = [v for v in values if v is not None]
        return cls(statistics.median(vals), min(vals), max(vals)) if vals else cls(None, None, None)

    def __str__(self) -> str:
        if self.median is None:
            return "-"
        return fmt(self.median) if self.low == self.high else f"{fmt(self.median)} ({fmt(self.low)}-{fmt(self.high)})"


def progress_line(r: RunResult) -> str:
    f, s = r.figures(), r.setting
    errors = "; ".join(f"{what} failed: {o.error}" for what, o in (("loop", r.loop), ("ceiling", r.ceiling)) if o.error)
    return (
        f"{s.dataset} seed {s.seed}: TEST IoU iter 0 {fmt(f.iter0)} -> final {fmt(f.final)} (iteration {f.final_iteration}), ceiling {fmt(f.ceiling)}, "
        f"recovered {fmt(f.recovered)}; label IoU boxes {fmt(f.box_label_iou)} -> best H {fmt(f.best_h_label_iou)}; "
        f"loop {f.loop_seconds:.0f} s, ceiling {f.ceiling_seconds:.0f} s" + (f"  [{errors}]" if errors else "")
    )


RUN_HEAD = (
    "| dataset | seed | hand / images | TEST iter 0 | TEST final (iter) | TEST ceiling | headroom | recovered | label IoU boxes -> best H "
    "| loop's own TEST iter 0 -> final | loop s | ceiling s |"
)
MEDIAN_HEAD = "| dataset | seeds | TEST iter 0 | TEST final | TEST ceiling | headroom | recovered | label IoU boxes | label IoU best H | loop s |"


def run_row(r: RunResult) -> str:
    f, s, p = r.figures(), r.setting, r.prepared
    final = f"{fmt(f.final)} ({f.final_iteration})" if f.final is not None else "-"
    errors = " ".join(f"{what}: {o.error}" for what, o in (("loop", r.loop), ("ceiling", r.ceiling)) if o.error)
    recovered = fmt(f.recovered) + (" (no headroom)" if f.headroom is not None and f.headroom < HEADROOM else "")
    cells = [
        s.dataset,
        str(s.seed),
        f"{p.hand_labels} / {p.source_images}",
        fmt(f.iter0),
        final,
        fmt(f.ceiling),
        fmt(f.headroom),
        recovered,
        f"{fmt(f.box_label_iou)} -> {fmt(f.best_h_label_iou)}",
        f"{fmt(f.loop_test_iter0)} -> {fmt(f.loop_test_final)}",
        f"{f.loop_seconds:.0f}",
        f"{f.ceiling_seconds:.0f}" + (f" {errors}" if errors else ""),
    ]
    return "| " + " | ".join(cells) + " |"


def median_row(dataset: str, runs: list[RunResult]) -> str:
    figs = [r.figures() for r in runs]
    cells = [dataset, str(len(runs))]
    for key in ("iter0", "final", "ceiling", "headroom", "recovered", "box_label_iou", "best_h_label_iou"):
        cells.append(str(Spread.of([getattr(f, key) for f in figs])))
    cells.append(f"{statistics.median(f.loop_seconds for f in figs):.0f}")
    return "| " + " | ".join(cells) + " |"


def tables(results: list[RunResult]) -> str:
    def rule(head: str) -> str:
        return "|" + "---|" * (head.count("|") - 1)

    lines = [RUN_HEAD, rule(RUN_HEAD)] + [run_row(r) for r in results]
    by_dataset: dict[str, list[RunResult]] = {}
    for r in results:
        by_dataset.setdefault(r.setting.dataset, []).append(r)
    lines += ["", "Medians over seeds, (min-max):", "", MEDIAN_HEAD, rule(MEDIAN_HEAD)]
    lines += [median_row(name, runs) for name, runs in by_dataset.items()]
    return "\n".join(lines)


def code_version() -> dict:
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {
        "describe": git("describe", "--always", "--dirty", "--tags"),
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
    }


def write_results(out: Path, header: dict, results: list[RunResult], finished: bool) -> None:
    body = header | {"finished": finished, "runs": [r.to_json() for r in results]}
    if finished:
        body["table"] = tables(results)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(out)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--images", type=int, default=300, help="synthetic: frames the loop sees (default 300; neu: the photos left after the hold-out)")
    p.add_argument(
        "--hand-labels", type=int, help=f"hand-labelled images the loop sees (default: {HAND_LABELS['synthetic']} synthetic, {HAND_LABELS['photos']} neu)"
    )
    p.add_argument("--holdout", type=int, default=60, help="held-out TEST images (default 60)")
    p.add_argument("--trials", type=int, help="trials per search (default: the loop's)")
    p.add_argument("--iterations", type=int, help="iterations of the headroom loop (default: the loop's)")
    p.add_argument("--budget", type=parse_duration, help="--budget of the headroom loop (600, 10m); the ceiling gets budget / iterations")
    p.add_argument("--work", type=Path, help="scratch folder for the data and the runs (default: a new folder in the system's temp)")
    p.add_argument("--keep", action="store_true", help="keep the data, checkpoints and trials in --work (default: only logs and reports)")
    p.add_argument("--tag", help="the results file's suffix (default: the start time)")
    args = p.parse_args(argv)
    if any(not 0 <= s < HOLDOUT_SEED for s in args.seeds):
        p.error(f"seeds must be in 0..{HOLDOUT_SEED - 1} (the synthetic held-out set uses seed {HOLDOUT_SEED} + seed)")
    return args


def settings(args: argparse.Namespace) -> list[Setting]:
    out = []
    for dataset in args.datasets:
        family = "synthetic" if dataset in DEFECTS else "photos"
        hand = args.hand_labels or HAND_LABELS[family]
        for seed in args.seeds:
            out.append(Setting(dataset, seed, args.images if family == "synthetic" else None, hand, args.holdout))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    tag = args.tag or started.strftime("%Y%m%d-%H%M%S")
    out = REPO / "bench" / "results" / f"self_training_quality_{tag}.json"
    if out.exists():
        raise SystemExit(f"{out} exists: one run per file; pass another --tag")
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"bss-quality-{tag}"
    knobs = Knobs(args.trials, args.iterations, args.budget)
    todo = settings(args)
    header = {
        "benchmark": "self_training_quality",
        "code": code_version(),
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "knobs": asdict(knobs),
        "settings": [asdict(s) for s in todo],
        "work": str(work),
        "machine": {"cpus": os.cpu_count()},
    }
    say(f"{len(todo)} run(s); results: {out}; scratch: {work}")
    results: list[RunResult] = []
    for n, setting in enumerate(todo, 1):
        result = bench_one(setting, knobs, work, args.keep)
        results.append(result)
        write_results(out, header, results, finished=False)
        say(f"[{n}/{len(todo)}] " + progress_line(result))
    header["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_results(out, header, results, finished=True)
    say("\n" + tables(results))
    say(f"\nresults: {out}")


if __name__ == "__main__":
    main()
