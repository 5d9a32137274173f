"""Active-labelling benchmark (issue 14): are the images `suggest_labels.py` picks better to
hand-label than random ones?

A simulated user, per seed, on a synthetic class (exact truth known):

1. Data: ``--count`` frames (``--size``), ``--start`` x 2 of them hand-labelled, split 50/25/25:
   BASELINE ``--start``, EVAL and TEST ``--start / 2`` each. The rest are box-only (the pool).
2. The teacher T0 is trained on BASELINE (one fixed recipe: the CPU space's step budget, lite0,
   lr 3e-3, Tversky 0.5/0.5, input ``--input``).
3. The pool is scored with T0 (``bss.active.suggest.score_pool``, the rule chosen on EVAL).
   Cheap measurements for every score of ``bss.active.scores`` (no training): the label IoU of
   the whole training set (BASELINE + pool) against the truth if the ``--add`` images chosen by
   the score got their true masks and the rest kept T0's refined masks; the Spearman correlation
   of the score with each pool image's wrong pixels; the IoU of the pre-annotation polygons
   (``via_project.json``) against the truth, beside that of the boxes.
4. For each strategy of ``--strategies`` (default: the default score and ``random``), a perfect
   annotator labels the ``--add`` images chosen: their exact outlines go through the real round
   trip (a VIA CSV export -> ``merge_labels`` -> ``add_to_baseline``). Then, with the same budget:
   T1 trained on the new BASELINE (TEST IoU: the loop's iteration 0), T1 refines the pool into H1
   (rule chosen on EVAL; label IoU of all H1 labels against the truth) and, with ``--final``, T2
   trained on H1 (TEST IoU: iteration 1). One fixed recipe instead of a search: a search per
   strategy and seed does not fit the 2-core budget.

    python bench/active_labelling.py                       # 3 seeds, ~25 min on 2 quiet cores (no T2)
    python bench/active_labelling.py --seeds 0 --strategies expected_errors combined random

Results: ``--out`` (JSON) and a Markdown table (medians and min-max over seeds).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

import numpy as np  # noqa: E402

TRAIN = """
import json, sys, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from bss.config import from_dict, read_yaml
from bss.search.space import load_space
from bss.search.evaluate import evaluate_checkpoint
from bss.training.trainer import Trainer
base = read_yaml(args["config"])
cfg = load_space(args["space"], base).apply(base, {})
if args["steps"]:
    cfg.update(train_steps=args["steps"], epochs=min(cfg["epochs"], 4))
cfg.update(train_dataset=args["train"], evaluation_dataset=args["dataset"] + "_EVAL", data_root=args["root"], output_dir=args["out"], visualization_samples=0, device="cpu", seed=args["seed"], learning_rate=3e-3, image_size=args["input"])
cfg["criterion"] = {"name": "TverskyLoss", "args": {"alpha": 0.5, "beta": 0.5}}
cfg["model"] = {"name": "UNetAttention", "args": {"encoder_name": "tu-efficientnet_lite0", "encoder_weights": "imagenet", "decoder_channels": [64, 32, 16, 16, 8], "dropout": 0.2}}
cfg["tracking"] = {"enabled": False}
result = Trainer(from_dict(cfg), progress=False).fit()
test = evaluate_checkpoint(result.checkpoint, args["dataset"] + "_TEST", args["root"])
print("RESULT " + json.dumps({"checkpoint": str(result.checkpoint), "eval_iou": result.best_metrics["iou"], "test_iou": test["iou"], "test_dice": test["dice"], "seconds": result.seconds}))
"""


STEPS = 0  # --steps: 0 keeps the CPU space's train_steps


def train(dataset: str, train_set: str, root: Path, out: Path, seed: int, input_size: list[int], threads: int = 1) -> dict:
    args = {
        "steps": STEPS,
        "config": str(REPO / "config.yaml"),
        "space": str(REPO / "search_spaces" / "cpu.yaml"),
        "train": train_set,
        "dataset": dataset,
        "root": str(root),
        "out": str(out),
        "seed": seed,
        "input": input_size,
        "threads": threads,
    }
    proc = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(args)], cwd=REPO, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"training on {train_set} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def counts(label, truth) -> np.ndarray:
    label, truth = np.asarray(label) > 0, np.asarray(truth) > 0
    return np.array([np.count_nonzero(label & truth), np.count_nonzero(label & ~truth), np.count_nonzero(~label & truth)], dtype=np.int64)


def iou(c) -> float:
    return float(c[0] / max(1, c.sum()))


def spearman(a, b) -> float:
    from bss.active.scores import percentile_ranks

    ra, rb = percentile_ranks(np.asarray(a)), percentile_ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def measure_scores(pool, source: Path, baseline_stems: set[str], add: int, seed: int) -> dict:
    """The no-training measurements of every score (see the module doc)."""
    from bss.active.polygons import draw_polygons, mask_to_polygons
    from bss.active.scores import SCORES
    from bss.active.suggest import rank
    from bss.data.io import read_mask

    truths = [read_mask(source / "truth" / n) for n in pool.names]
    refined = [pool.refined_mask(i) for i in range(len(pool.names))]
    boxes = [read_mask(source / "masks" / n) for n in pool.names]
    per_image = [counts(r, t) for r, t in zip(refined, truths)]
    wrong = [int(c[1] + c[2]) for c in per_image]
    baseline = sum((counts(read_mask(source / "truth" / f"{s}.png"), read_mask(source / "truth" / f"{s}.png")) for s in baseline_stems), np.zeros(3, np.int64))
    truth_counts = [counts(t, t) for t in truths]
    table = pool.table(seed)
    out = {"pool": len(pool.names), "t0_label_iou_all": iou(baseline + sum(per_image)), "per_score": {}}
    for score in SCORES:
        chosen = set(rank(pool, add, score, seed=seed).chosen)
        total = baseline + sum((truth_counts[i] if i in chosen else per_image[i]) for i in range(len(pool.names)))
        pre = sum((counts(draw_polygons(mask_to_polygons(refined[i]), *truths[i].shape), truths[i]) for i in chosen), np.zeros(3, np.int64))
        box = sum((counts(boxes[i], truths[i]) for i in chosen), np.zeros(3, np.int64))
        out["per_score"][score] = {
            "label_iou_all_if_labelled": iou(total),
            "wrong_pixels_removed": int(sum(wrong[i] for i in chosen)),
            "spearman_with_wrong_pixels": spearman(table[score], wrong),
            "preannotation_iou": iou(pre),
            "box_iou_of_chosen": iou(box),
        }
    return out


def clone(src_root: Path, dst_root: Path, dataset: str) -> None:
    """A hard-linked copy of the source and its splits (labels.csv copied: the merge rewrites it)."""
    for name in (dataset, f"{dataset}_BASELINE", f"{dataset}_EVAL", f"{dataset}_TEST"):
        shutil.copytree(src_root / name, dst_root / name, copy_function=os.link)
    (dst_root / dataset / "labels.csv").unlink()
    shutil.copy2(src_root / dataset / "labels.csv", dst_root / dataset / "labels.csv")
    if (dst_root / f"{dataset}_BASELINE" / "manifest.json").exists():
        text = (dst_root / f"{dataset}_BASELINE" / "manifest.json").read_text()
        (dst_root / f"{dataset}_BASELINE" / "manifest.json").unlink()
        (dst_root / f"{dataset}_BASELINE" / "manifest.json").write_text(text)


def strategy_run(strategy: str, pool, dataset: str, root: Path, work: Path, seed: int, add: int, input_size: list[int], final: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from bss.active.baseline import add_to_baseline
    from bss.active.merge import merge_labels
    from bss.active.polygons import mask_to_polygons
    from bss.active.suggest import rank
    from bss.data.io import read_mask
    from bss.data.layout import list_samples
    from bss.data.via import write_via_csv
    from bss.hybrid.make import make_hybrid
    from bss.hybrid.teacher_quality import measure_teacher

    start = time.perf_counter()
    sroot = work / strategy / "datasets"
    sroot.mkdir(parents=True)
    clone(root, sroot, dataset)
    source = sroot / dataset
    chosen = [pool.names[i] for i in rank(pool, add, strategy, seed=seed).chosen]
    # the perfect annotator: exact outlines of the truth, exported as VIA would
    export = work / strategy / "via_export.csv"
    rows = {n: mask_to_polygons(read_mask(source / "truth" / n), epsilon=0, max_points=0, min_area=1) for n in chosen}
    write_via_csv(export, rows, {n: (source / "images" / n).stat().st_size for n in chosen})
    merged = merge_labels(dataset, export, sroot)
    added = add_to_baseline(dataset, sroot)
    t1 = train(dataset, f"{dataset}_BASELINE", sroot, work / strategy / "t1", seed, input_size)
    quality = measure_teacher(t1["checkpoint"], dataset, sroot, device="cpu")
    hybrid = make_hybrid(dataset, t1["checkpoint"], sroot, rule=quality.best.rule, progress=False, device="cpu")
    total = np.zeros(3, np.int64)
    for s in list_samples(hybrid.path):
        total += counts(read_mask(s.mask), read_mask(source / "truth" / s.mask.name))
    t2 = train(dataset, hybrid.path.name, sroot, work / strategy / "t2", seed, input_size) if final else {"eval_iou": None, "test_iou": None}
    return {
        "strategy": strategy,
        "chosen": chosen,
        "merged": len(merged.merged),
        "baseline_added": len(added),
        "baseline_images": len(list_samples(sroot / f"{dataset}_BASELINE")),
        "t1_eval_iou": t1["eval_iou"],
        "t1_test_iou": t1["test_iou"],
        "t1_eval_label_iou": quality.label_iou,
        "h1_label_iou_all": iou(total),
        "h1_label_iou_refined": (hybrid.label_quality or {}).get("hybrid_iou_pixels"),
        "t2_eval_iou": t2["eval_iou"],
        "t2_test_iou": t2["test_iou"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def bench_seed(args, seed: int) -> dict:
    from bss.active.suggest import score_pool
    from bss.data.splits import make_splits
    from bss.data.synthetic import SynthConfig, generate_dataset

    start = time.perf_counter()
    work = Path(args.work) / f"{args.dataset}-s{seed}"
    if work.exists():
        shutil.rmtree(work)
    root = work / "datasets"
    root.mkdir(parents=True)
    width, height = args.size
    generate_dataset(SynthConfig(args.dataset, args.dataset, args.count, 2 * args.start, width, height, seed), root, workers=2)
    make_splits(args.dataset, root, (0.5, 0.25, 0.25), seed, progress=False)
    t0 = train(args.dataset, f"{args.dataset}_BASELINE", root, work / "t0", seed, args.input, threads=2)
    import torch

    torch.set_num_threads(2)
    pool = score_pool(args.dataset, t0["checkpoint"], root, device="cpu")
    baseline_stems = {p.stem for p in (root / f"{args.dataset}_BASELINE" / "images").iterdir()}
    scores = measure_scores(pool, root / args.dataset, baseline_stems, args.add, seed)
    with ThreadPoolExecutor(2) as ex:  # two strategies at a time, one core each
        futures = [ex.submit(strategy_run, s, pool, args.dataset, root, work, seed, args.add, args.input, args.final) for s in args.strategies]
        runs = [f.result() for f in futures]
    return {
        "dataset": args.dataset,
        "seed": seed,
        "t0": {k: t0[k] for k in ("eval_iou", "test_iou")},
        "rule": pool.rule.to_dict(),
        "scores": scores,
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
    }


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def spread(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(results: list[dict]) -> str:
    lines = []
    strategies = [r["strategy"] for r in results[0]["runs"]]
    lines += [
        "Retrained (T1: BASELINE + the new hand labels; T2, with --final: trained on the H1 that T1 made), median (min-max) over seeds:",
        "",
        "| strategy | T1 TEST IoU | H1 label IoU (all training labels) | H1 label IoU (refined only) | T2 TEST IoU (final) | T2 - T1 |",
        "|---|---|---|---|---|---|",
    ]
    for s in strategies:
        runs = [next(x for x in r["runs"] if x["strategy"] == s) for r in results]
        lines.append(
            f"| {s} | {spread([x['t1_test_iou'] for x in runs])} | {spread([x['h1_label_iou_all'] for x in runs])} | {spread([x['h1_label_iou_refined'] for x in runs if x['h1_label_iou_refined'] is not None])} | {spread([x['t2_test_iou'] for x in runs])} | {spread([x['t2_test_iou'] - x['t1_test_iou'] for x in runs if x['t2_test_iou'] is not None])} |"
        )
    if len(strategies) > 1:
        ref = strategies[-1]
        for s in strategies[:-1]:
            pairs = [(next(x for x in r["runs"] if x["strategy"] == s), next(x for x in r["runs"] if x["strategy"] == ref)) for r in results]
            diffs = {k: [a[k] - b[k] for a, b in pairs if a[k] is not None and b[k] is not None] for k in ("t1_test_iou", "h1_label_iou_all", "t2_test_iou")}
            lines.append(
                f"| {s} - {ref} (paired by seed) | {spread(diffs['t1_test_iou'])} | {spread(diffs['h1_label_iou_all'])} | | {spread(diffs['t2_test_iou'])} | |"
            )
    lines += ["", "Per seed:", "", "| seed | T0 TEST IoU | strategy | T1 TEST IoU | H1 label IoU (all) | T2 TEST IoU | s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for x in r["runs"]:
            lines.append(
                f"| {r['seed']} | {fmt(r['t0']['test_iou'])} | {x['strategy']} | {fmt(x['t1_test_iou'])} | {fmt(x['h1_label_iou_all'])} | {fmt(x['t2_test_iou'])} | {x['seconds']:.0f} |"
            )
    lines += [
        "",
        "Scores measured without training (T0's refined labels; the training set's label IoU if the chosen images got their truth), median (min-max) over seeds:",
        "",
        "| score | training-set label IoU after labelling | wrong pixels removed | Spearman(score, wrong pixels) | pre-annotation IoU vs truth | boxes' IoU on the same images |",
        "|---|---|---|---|---|---|",
    ]
    for score in results[0]["scores"]["per_score"]:
        ps = [r["scores"]["per_score"][score] for r in results]
        lines.append(
            f"| {score} | {spread([p['label_iou_all_if_labelled'] for p in ps])} | {statistics.median([p['wrong_pixels_removed'] for p in ps]):.0f} | {spread([p['spearman_with_wrong_pixels'] for p in ps])} | {spread([p['preannotation_iou'] for p in ps])} | {spread([p['box_iou_of_chosen'] for p in ps])} |"
        )
    lines.append(f"| (none labelled: T0's labels) | {spread([r['scores']['t0_label_iou_all'] for r in results])} | | | | |")
    return "\n".join(lines)


def main() -> None:
    from bss.active.scores import DEFAULT_SCORE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="obstacle", help="synthetic defect class")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--count", type=int, default=240, help="frames generated")
    p.add_argument("--start", type=int, default=40, help="hand labels in BASELINE at the start (EVAL and TEST get half as many each)")
    p.add_argument("--add", type=int, default=40, help="hand labels added")
    p.add_argument("--size", type=int, nargs=2, default=[192, 144], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--input", type=int, nargs=2, default=[96, 128], metavar=("HEIGHT", "WIDTH"), help="network input")
    p.add_argument("--strategies", nargs="+", default=[DEFAULT_SCORE, "random"], help="scores to retrain with; the last one is the reference")
    p.add_argument("--final", action="store_true", help="also train T2 on H1 (the loop's iteration 1; about twice the time)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per training (0: the CPU space's train_steps, 120) and at most 4 passes")
    p.add_argument("--work", default="/tmp/bss-active-bench")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "active_labelling.json"))
    args = p.parse_args()
    global STEPS
    STEPS = args.steps
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(bench_seed(args, seed))
        print(f"seed {seed}: {results[-1]['seconds']:.0f} s", flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": vars(args), "results": results, "wall_seconds": round(time.perf_counter() - start, 1)}, indent=1) + "\n")
    print(report(results))
    print(f"\nwall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
