"""Student recipes on real photos with few hand labels: which training-side change makes the
students trained on H1 beat their teacher (issue 18)?

Setting (``prepare``): ``neu_patches`` (or ``neu_scratches``) from ``../shared/data/neu_seg``
copied to a scratch data root, its 100 hand-labelled images split 36 / 24 / 40 into
BASELINE / EVAL / TEST (``--fractions``), so the teacher learns from 36 hand labels, EVAL
(24) chooses checkpoints and the refinement rule, and TEST (40) is only reported. The other 200
images are box-only. Then, all with ONE fixed recipe (lite0 UNet, Adam lr 3e-3, Tversky 0.5/0.5,
batch 8, ``--size``, ``--steps`` optimizer steps rounded up to whole epochs, 6 EVAL evaluations,
best checkpoint by EVAL IoU):

* ``teacher``: trained on BASELINE (iteration 0), one run per seed; the seed with the best EVAL
  IoU is the teacher that refines the boxes (as the loop promotes the best of a search);
* ``H1``: made by that teacher with the rule :func:`bss.hybrid.teacher_quality.measure_teacher`
  chooses on EVAL, with soft labels (``soft/``);
* ``full``: every training image with its true mask (``truth/``): the ceiling;
* students on H1, one per recipe variant (``VARIANTS``) and seed; ``plain`` is today's student;
  ``finetune`` is ``plain`` plus 60 steps on BASELINE (lr 1e-3) from its best checkpoint.

Every run is a subprocess with one torch thread (``--jobs`` at a time); its result is kept in the
work folder, so a rerun only trains what is missing. Prints a table (median TEST and EVAL IoU,
spread = min-max over seeds, the median's difference to ``plain`` and to the teacher) and writes
the raw rows to ``--out``.

    python bench/student_recipe.py --variants plain ignore init finetune strong --screen hand50 soft --seeds 0 1 2 --full-seeds 0 1 2
    python bench/student_recipe.py --dataset neu_scratches --variants plain --full-seeds 0 \
        --out bench/results/student_recipe_neu_scratches.json

**Headroom setting** (``--hand-labels N``): the data of ``bench/self_training_quality.py``
(``prepare``): few hand labels split as the loop splits them (60/20/20), every other image
box-only, TEST = the 60 held-out images the loop never sees, ``full`` = the true masks of every
training image (its ceiling root); synthetic classes (``obstacle``, ...) are generated (300
frames of 256x192, input 128x160), ``neu_*`` photos copied from ``../shared/data/neu_seg``.

    python bench/student_recipe.py --dataset obstacle --hand-labels 30 --variants plain edge2 --seeds 0 1 \
        --out bench/results/student_recipe_obstacle_headroom.json
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
NEU = REPO.parent / "shared" / "data" / "neu_seg"
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

# student variants: the `student:` config section each trains with (on H1); see bss/config.py
VARIANTS: dict[str, dict] = {
    "plain": {},
    "ignore": {"ignore_band": [0.3, 0.7]},
    "ignore_wide": {"ignore_band": [0.2, 0.8]},
    "hand25": {"hand_fraction": 0.25},
    "hand50": {"hand_fraction": 0.5},
    "soft": {"soft_targets": True},
    "strong": {"augment": "strong"},
    "init": {"init_from": "<teacher>"},
    "edge1": {"ignore_edge": 1},
    "edge2": {"ignore_edge": 2},
    "edge3": {"ignore_edge": 3},
    "edge2_hand25": {"ignore_edge": 2, "hand_fraction": 0.25},
    "ignore_hand25": {"ignore_band": [0.3, 0.7], "hand_fraction": 0.25},
    "ignore_hand50": {"ignore_band": [0.3, 0.7], "hand_fraction": 0.5},
    "soft_hand50": {"soft_targets": True, "hand_fraction": 0.5},
    "init_hand50": {"init_from": "<teacher>", "hand_fraction": 0.5},
}
# two-stage variants: a student of VARIANTS[base], then FINETUNE_STEPS more steps on BASELINE
# (lr 1e-3) from its best checkpoint (config key student.init_from)
FINETUNE = {"finetune": "plain", "hand50_finetune": "hand50"}
FINETUNE_STEPS = 60

RUN = """
import json, sys, torch
torch.set_num_threads(1)
from bss.config import from_dict
from bss.search.evaluate import evaluate_checkpoint
from bss.training.trainer import Trainer
args = json.loads(sys.argv[1])
trainer = Trainer(from_dict(args["config"]), progress=False)
result = trainer.fit()
test = evaluate_checkpoint(result.checkpoint, args["test"], args.get("test_root") or args["config"]["data_root"])
print("RESULT " + json.dumps({"eval_iou": result.best_metrics["iou"], "eval_recall": result.best_metrics["recall"], "eval_precision": result.best_metrics["precision"],
      "test_iou": test["iou"], "test_dice": test["dice"], "test_recall": test["recall"], "test_precision": test["precision"],
      "steps": trainer.epochs * trainer.config.steps_per_epoch(len(trainer.train_set)), "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1)}))
"""


def prepare(dataset: str, root: Path, fractions: tuple[float, float, float], seed: int) -> None:
    """Copy the read-only source into ``root`` and split its hand labels (once)."""
    from bss.data.splits import make_splits

    if (root / f"{dataset}_TEST").is_dir():
        return
    shutil.copytree(NEU / dataset, root / dataset)
    make_splits(dataset, root, fractions, seed, progress=False)


@dataclass(frozen=True)
class Data:
    """Where one setting's runs read: the data root (BASELINE, EVAL, H1), the full-supervision
    training set (name, root) and the TEST folder (name, root)."""

    root: Path
    full: tuple[str, Path]
    test: tuple[str, Path]


def prepare_split(dataset: str, work: Path, fractions: tuple[float, float, float]) -> Data:
    """The first method: the source's hand labels split ``fractions`` (TEST among them)."""
    from reference_sets import reference_sets

    root = work / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    prepare(dataset, root, fractions, 0)
    full = reference_sets(dataset, root, kinds=("full",))["full"]
    return Data(root, (full, root), (f"{dataset}_TEST", root))


def prepare_headroom(dataset: str, work: Path, hand_labels: int, holdout: int) -> Data:
    """The headroom setting of ``bench/self_training_quality.py`` (seed 0), made once."""
    import self_training_quality as quality

    folder = work / "headroom-data"
    done = folder / "prepared.json"
    if not done.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        synthetic = dataset in quality.DEFECTS
        setting = quality.Setting(dataset, 0, 300 if synthetic else None, hand_labels, holdout)
        prepared = quality.prepare(setting, folder)
        done.write_text(json.dumps({k: str(v) for k, v in vars(prepared).items()}, indent=1) + "\n")
    prepared = json.loads(done.read_text())
    held = Path(prepared["holdout"])
    return Data(Path(prepared["headroom_root"]), (f"{dataset}_BASELINE", Path(prepared["ceiling_root"])), (str(held), held.parent))


def base_config(dataset: str, root: Path, size: list[int], steps: int) -> dict:
    return {
        "seed": 0,
        "epochs": 1,
        "train_steps": steps,
        "evaluations": 6,
        "learning_rate": 3e-3,
        "batch_size": 8,
        "criterion": {"name": "TverskyLoss", "args": {"alpha": 0.5, "beta": 0.5}},
        "evaluation_dataset": f"{dataset}_EVAL",
        "image_size": list(size),
        "model": {
            "name": "UNetAttention",
            "args": {"encoder_name": "tu-efficientnet_lite0", "encoder_weights": "imagenet", "decoder_channels": [64, 32, 16, 16, 8], "dropout": 0.2},
        },
        "visualization_samples": 0,
        "data_root": str(root),
        "device": "cpu",
        "tracking": {"enabled": False},
    }


def train(name: str, config: dict, test: tuple[str, Path], work: Path) -> dict:
    """One run in a subprocess, scored on ``test`` (name, data root); its result is cached as
    ``work/name/result.json``."""
    folder = work / name
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = dict(config, output_dir=str(folder))
    payload = {"config": config, "test": test[0], "test_root": str(test[1])}
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(payload)], cwd=REPO, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT ") :]) | {"checkpoint": str(folder / "best.pt")}
    done.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  {name}: EVAL IoU {result['eval_iou']:.3f}  TEST IoU {result['test_iou']:.3f}  ({result['steps']} steps, {result['seconds']:.0f} s)", flush=True)
    return result


def parallel(jobs: int, tasks: dict) -> dict:
    with ThreadPoolExecutor(jobs) as pool:
        futures = {key: pool.submit(*task) for key, task in tasks.items()}
        return {key: f.result() for key, f in futures.items()}


def make_h1(dataset: str, root: Path, teacher: Path, work: Path) -> dict:
    """H1 by ``teacher`` with the rule chosen on EVAL, soft labels on; its manifest's figures."""
    from bss.hybrid import RefineRule, make_hybrid
    from bss.hybrid.teacher_quality import measure_teacher

    target = root / f"{dataset}_H1"
    info_path = work / "h1.json"
    if target.is_dir() and info_path.is_file():
        return json.loads(info_path.read_text())
    quality = measure_teacher(teacher, dataset, root, device="cpu")
    rule = RefineRule.from_dict({**quality.best.rule.to_dict(), "soft": True})
    result = make_hybrid(dataset, teacher, data_root=root, number=1, rule=rule, overwrite=True, progress=False, device="cpu")
    info = {
        "teacher": str(teacher),
        "rule": rule.to_dict(),
        "eval_label_iou": quality.label_iou,
        "eval_box_iou": quality.box_iou_pixels,
        "eval_raw_iou": quality.raw_iou_pixels,
        "label_quality": result.label_quality,
        "counts": result.manifest["counts"],
    }
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def student_config(base: dict, dataset: str, variant: dict, teacher: Path, seed: int) -> dict:
    """A student's config: ``variant`` is its ``student:`` section (``<teacher>``: the teacher's
    checkpoint), and may set ``train_steps``."""
    student = {k: (str(teacher) if v == "<teacher>" else v) for k, v in variant.items() if k != "train_steps"}
    steps = {"train_steps": variant["train_steps"]} if "train_steps" in variant else {}
    return dict(base, seed=seed, train_dataset=f"{dataset}_H1", **steps, **({"student": student} if student else {}))


def summarise(rows: list[dict], teacher_test: float) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    plain = statistics.median(r["test_iou"] for r in by.get("plain", [])) if by.get("plain") else None
    out = []
    for variant, rs in by.items():
        test = [r["test_iou"] for r in rs]
        evals = [r["eval_iou"] for r in rs]
        med = statistics.median(test)
        out.append(
            {
                "variant": variant,
                "seeds": sorted(r["seed"] for r in rs),
                "steps": sorted({r["steps"] for r in rs}),
                "test_iou_median": med,
                "test_iou_min": min(test),
                "test_iou_max": max(test),
                "eval_iou_median": statistics.median(evals),
                "eval_iou_min": min(evals),
                "eval_iou_max": max(evals),
                "minus_plain": None if plain is None else med - plain,
                "minus_teacher": med - teacher_test,
            }
        )
    return out


def table(summary: list[dict]) -> str:
    f = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    lines = [
        "| variant | seeds | steps | TEST IoU median (min-max) | EVAL IoU median (min-max) | TEST - plain | TEST - teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['variant']} | {','.join(map(str, s['seeds']))} | {'/'.join(map(str, s['steps']))} | {s['test_iou_median']:.3f} ({s['test_iou_min']:.3f}-{s['test_iou_max']:.3f})"
            f" | {s['eval_iou_median']:.3f} ({s['eval_iou_min']:.3f}-{s['eval_iou_max']:.3f}) | {f(s['minus_plain'])} | {f(s['minus_teacher'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="neu_patches", help="neu_patches | neu_scratches; with --hand-labels also a synthetic class (obstacle, ...)")
    p.add_argument("--hand-labels", type=int, help="the headroom setting: this many hand labels (see the docstring); default: the source's, split --fractions")
    p.add_argument("--holdout", type=int, default=60, help="headroom setting: held-out TEST images")
    p.add_argument(
        "--variants", nargs="*", default=["plain", "ignore", "hand50", "soft", "strong", "init", "finetune"], help=f"of {', '.join([*VARIANTS, *FINETUNE])}"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="student seeds")
    p.add_argument("--screen", nargs="*", default=[], help="more variants, trained with the first seed only (a screen)")
    p.add_argument("--teacher-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--full-seeds", nargs="*", type=int, default=[0])
    p.add_argument("--teachers-only", action="store_true", help="train the teachers (and full supervision), print them, stop")
    p.add_argument("--fractions", nargs=3, type=float, default=[0.36, 0.24, 0.40], metavar=("BASELINE", "EVAL", "TEST"))
    p.add_argument("--size", type=int, nargs="+", help="training input, H [W] (default: 128 square for NEU's 200x200 photos, 128 160 for synthetic frames)")
    p.add_argument("--steps", type=int, default=240, help="optimizer steps of every run (rounded up to whole epochs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    p.add_argument("--work", default="/tmp/bss-student-recipe")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "student_recipe.json"))
    args = p.parse_args()

    if args.hand_labels is None and args.dataset not in ("neu_patches", "neu_scratches"):
        raise SystemExit(f"--dataset {args.dataset}: a synthetic class needs --hand-labels (the headroom setting)")
    work = Path(args.work) / (args.dataset if args.hand_labels is None else f"{args.dataset}-hand{args.hand_labels}")
    os.environ.setdefault("BSS_CACHE_DIR", str(Path(args.work) / "cache"))  # the runs' decode-once cache
    if args.hand_labels is None:
        data = prepare_split(args.dataset, work, tuple(args.fractions))
    else:
        data = prepare_headroom(args.dataset, work, args.hand_labels, args.holdout)
    root, test = data.root, data.test
    size = args.size or ([128] if args.dataset.startswith("neu_") else [128, 160])
    base = base_config(args.dataset, root, size * 2 if len(size) == 1 else size[:2], args.steps)
    start = time.perf_counter()

    print(f"{args.dataset}: teachers on BASELINE (seeds {args.teacher_seeds}) and full supervision (seeds {args.full_seeds})", flush=True)
    full_name, full_root = data.full
    tasks = {("teacher", s): (train, f"teacher_s{s}", dict(base, seed=s, train_dataset=f"{args.dataset}_BASELINE"), test, work) for s in args.teacher_seeds}
    tasks |= {("full", s): (train, f"full_s{s}", dict(base, seed=s, train_dataset=full_name, data_root=str(full_root)), test, work) for s in args.full_seeds}
    done = parallel(args.jobs, tasks)
    teachers = {s: r for (kind, s), r in done.items() if kind == "teacher"}
    if args.teachers_only:
        for kind, rows in (("teacher", teachers), ("full", {s: r for (k, s), r in done.items() if k == "full"})):
            if rows:
                test = sorted(r["test_iou"] for r in rows.values())
                print(f"{kind}: TEST IoU median {statistics.median(test):.3f} ({test[0]:.3f}-{test[-1]:.3f}) over seeds {sorted(rows)}")
        return
    best_seed = max(teachers, key=lambda s: (teachers[s]["eval_iou"], -s))
    teacher = Path(teachers[best_seed]["checkpoint"])
    h1 = make_h1(args.dataset, root, teacher, work)
    lq = h1["label_quality"] or {}
    print(
        f"H1 by teacher seed {best_seed} (EVAL IoU {teachers[best_seed]['eval_iou']:.3f}, TEST IoU {teachers[best_seed]['test_iou']:.3f}): "
        f"EVAL label IoU {h1['eval_label_iou']:.3f} (boxes {h1['eval_box_iou']:.3f}), rule {h1['rule']['mode']} t={h1['rule']['threshold']} min_fill={h1['rule']['min_fill']}; "
        f"H1 labels vs truth {lq.get('hybrid_iou_pixels', float('nan')):.3f} (boxes {lq.get('box_iou_pixels', float('nan')):.3f})",
        flush=True,
    )

    rows = [{"variant": kind, "seed": s, **r} for (kind, s), r in done.items()]
    unknown = [v for v in args.variants + args.screen if v not in VARIANTS and v not in FINETUNE]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; valid: {', '.join([*VARIANTS, *FINETUNE])}")
    runs = [(v, s) for v in args.variants for s in args.seeds] + [(v, args.seeds[0]) for v in args.screen if v not in args.variants]
    first = {v: VARIANTS[FINETUNE.get(v, v)] for v, _ in runs}
    tasks = {
        (FINETUNE.get(v, v), s): (train, f"{FINETUNE.get(v, v)}_s{s}", student_config(base, args.dataset, first[v], teacher, s), test, work) for v, s in runs
    }
    done = parallel(args.jobs, tasks)
    rows += [{"variant": v, "seed": s, **r} for (v, s), r in done.items() if (v, s) in runs]
    tuned = {}
    for v, s in runs:
        if v in FINETUNE:
            stage1 = done[(FINETUNE[v], s)]["checkpoint"]
            cfg = dict(base, seed=s, train_dataset=f"{args.dataset}_BASELINE", train_steps=FINETUNE_STEPS, learning_rate=1e-3, student={"init_from": stage1})
            tuned[(v, s)] = (train, f"{v}_s{s}", cfg, test, work)
    for (v, s), r in parallel(args.jobs, tuned).items():  # steps: both stages
        rows.append({"variant": v, "seed": s, **r, "steps": done[(FINETUNE[v], s)]["steps"] + r["steps"], "finetune_steps": r["steps"]})

    teacher_test = teachers[best_seed]["test_iou"]
    summary = summarise(rows, teacher_test)
    print()
    print(table(summary))
    print(f"\nteacher = seed {best_seed} (TEST IoU {teacher_test:.3f}); {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    out.write_text(json.dumps({"settings": settings, "h1": h1, "teacher_seed": best_seed, "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
