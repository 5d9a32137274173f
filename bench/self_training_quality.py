"""Quality benchmark: does the loop turn boxes into better masks and a better model?

For each dataset and seed, on one split (the loop's own NAME_BASELINE/EVAL/TEST), side by side:

* plain runs of one fixed recipe (the CPU space's fixed keys, lite0, lr 3e-3, Tversky 0.5/0.5):
  boxes only, BASELINE only, BASELINE + boxes (the naive use), full supervision (the true mask of
  every training image: the ceiling), each scored once on TEST;
* the loop (``drivers/search.py``, defaults): TEST IoU of iteration 0 and of the final model,
  the label IoU against the truth of the boxes and of each H<n>, the EVAL label IoU;
* the ratio final / full.

    python bench/self_training_quality.py                                   # the 4 synthetic classes, seed 0
    python bench/self_training_quality.py --datasets obstacle --seeds 0 1 2
    python bench/self_training_quality.py --datasets neu_patches neu_scratches   # real photos from ../shared

Synthetic classes are generated as the loop's embedded default (300 frames, 120 hand-labelled);
``neu_*`` are copied from ``../shared/data/neu_seg`` into the work folder (read-only source).
Results go to ``--out`` (JSON) and are printed as a Markdown table, with medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

NEU = REPO.parent / "shared" / "data" / "neu_seg"
SYNTHETIC = ("obstacle", "deposition", "deformation", "disconnect")
PLAIN = ("boxes", "baseline", "baseline_boxes", "full")

PLAIN_RUN = """
import json, sys, torch
torch.set_num_threads(1)
from bss.config import from_dict, read_yaml
from bss.search.space import load_space
from bss.search.evaluate import evaluate_checkpoint
from bss.training.trainer import Trainer
args = json.loads(sys.argv[1])
base = read_yaml(args["config"])
cfg = load_space(args["space"], base).apply(base, {})
cfg.update(train_dataset=args["train"], evaluation_dataset=args["dataset"] + "_EVAL", data_root=args["root"], output_dir=args["out"], visualization_samples=0, device="cpu", seed=args["seed"], learning_rate=3e-3)
cfg["criterion"] = {"name": "TverskyLoss", "args": {"alpha": 0.5, "beta": 0.5}}
cfg["model"] = {"name": "UNetAttention", "args": {"encoder_name": "tu-efficientnet_lite0", "encoder_weights": "imagenet", "decoder_channels": [64, 32, 16, 16, 8], "dropout": 0.2}}
cfg["tracking"] = {"enabled": False}
result = Trainer(from_dict(cfg), progress=False).fit()
test = evaluate_checkpoint(result.checkpoint, args["dataset"] + "_TEST", args["root"])
print("RESULT " + json.dumps({"eval_iou": result.best_metrics["iou"], "test_iou": test["iou"], "test_dice": test["dice"], "seconds": result.seconds}))
"""


def prepare(dataset: str, seed: int, root: Path) -> None:
    from bss.data.splits import make_splits

    if dataset in SYNTHETIC:
        from bss.data.synthetic import SynthConfig, generate_dataset
        from bss.search.loop import SYNTHETIC as SPEC

        spec = SPEC["cpu"]
        generate_dataset(SynthConfig(dataset, dataset, spec["count"], spec["hand_labelled"], spec["width"], spec["height"], seed), root, workers=2)
    else:
        source = NEU / dataset
        if not source.is_dir():
            raise SystemExit(f"{source} not found: the neu_seg datasets come from ../shared/data/neu_seg")
        shutil.copytree(source, root / dataset)
    make_splits(dataset, root, (0.6, 0.2, 0.2), seed, progress=False)


def plain_run(dataset: str, kind: str, train: str, root: Path, work: Path, seed: int) -> dict:
    args = {
        "config": str(REPO / "config.yaml"),
        "space": str(REPO / "search_spaces" / "cpu.yaml"),
        "train": train,
        "dataset": dataset,
        "root": str(root),
        "out": str(work / f"plain_{kind}"),
        "seed": seed,
    }
    proc = subprocess.run([sys.executable, "-c", PLAIN_RUN, json.dumps(args)], cwd=REPO, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"plain run {kind} on {dataset} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def loop_run(dataset: str, root: Path, work: Path, seed: int) -> dict:
    run_dir = work / "loop"
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "drivers/search.py",
        "--dataset",
        dataset,
        "--data-root",
        str(root),
        "--run-dir",
        str(run_dir),
        "--seed",
        str(seed),
        "--quiet",
        "--tracking-uri",
        f"sqlite:///{work / 'mlflow.db'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (work / "loop.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1], "seconds": time.perf_counter() - start}
    rows = json.loads((run_dir / "report.json").read_text())["iterations"]
    final = next(r for r in rows if r.get("final"))
    made = [r for r in rows if r.get("label_hybrid_iou_pixels") is not None]
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "iterations": [
            {
                k: r.get(k)
                for k in (
                    "iteration",
                    "train_dataset",
                    "eval_iou",
                    "eval_recall",
                    "test_iou",
                    "test_dice",
                    "eval_label_iou",
                    "made",
                    "label_box_iou_pixels",
                    "label_hybrid_iou_pixels",
                    "decision",
                )
            }
            for r in rows
        ],
        "iter0_test_iou": rows[0]["test_iou"],
        "final_iteration": final["iteration"],
        "final_test_iou": final["test_iou"],
        "final_test_dice": final["test_dice"],
        "boxes_label_iou": made[0]["label_box_iou_pixels"] if made else None,
        "best_h_label_iou": max((r["label_hybrid_iou_pixels"] for r in made), default=None),
        "boxes_eval_label_iou": rows[0].get("eval_box_label_iou"),
        "best_eval_label_iou": max((r.get("eval_label_iou") or 0 for r in rows), default=None),
    }


def bench_one(dataset: str, seed: int, work: Path, plain: bool) -> dict:
    from reference_sets import reference_sets

    work = work / f"{dataset}-s{seed}"
    if work.exists():
        shutil.rmtree(work)
    root = work / "datasets"
    root.mkdir(parents=True)
    prepare(dataset, seed, root)
    out = {"dataset": dataset, "seed": seed}
    if plain:
        names = reference_sets(dataset, root)
        names["baseline"] = f"{dataset}_BASELINE"
        with ThreadPoolExecutor(2) as pool:  # two 1-thread runs at a time on 2 cores
            futures = {kind: pool.submit(plain_run, dataset, kind, names[kind], root, work, seed) for kind in PLAIN if kind in names}
            out["plain"] = {kind: f.result() for kind, f in futures.items()}
        for kind in ("boxes", "baseline_boxes", "full"):
            shutil.rmtree(root / f"{dataset}_REF_{kind}", ignore_errors=True)  # not beside the loop's H<n>
    out["loop"] = loop_run(dataset, root, work, seed)
    full = (out.get("plain") or {}).get("full", {}).get("test_iou")
    if full and out["loop"].get("final_test_iou") is not None:
        out["final_over_full"] = out["loop"]["final_test_iou"] / full
    return out


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(results: list[dict]) -> str:
    head = "| dataset | seed | boxes only | BASELINE only | BASELINE + boxes | full (ceiling) | loop iter 0 | loop final (iter) | final / full | label IoU boxes -> best H | EVAL label IoU boxes -> best | loop s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        p, lp = r.get("plain", {}), r["loop"]
        if "error" in lp:
            lines.append(
                f"| {r['dataset']} | {r['seed']} | "
                + " | ".join(fmt(p.get(k, {}).get("test_iou")) for k in PLAIN)
                + f" | error: {lp['error']} | | | | | {lp['seconds']:.0f} |"
            )
            continue
        lines.append(
            f"| {r['dataset']} | {r['seed']} | "
            + " | ".join(fmt(p.get(k, {}).get("test_iou")) for k in PLAIN)
            + f" | {fmt(lp['iter0_test_iou'])} | {fmt(lp['final_test_iou'])} ({lp['final_iteration']}) | {fmt(r.get('final_over_full'))}"
            + f" | {fmt(lp['boxes_label_iou'])} -> {fmt(lp['best_h_label_iou'])} | {fmt(lp['boxes_eval_label_iou'])} -> {fmt(lp['best_eval_label_iou'])} | {lp['seconds']:.0f} |"
        )
    by = {}
    for r in results:
        by.setdefault(r["dataset"], []).append(r)
    if any(len(v) > 1 for v in by.values()):
        lines += [
            "",
            "Medians over seeds (TEST IoU):",
            "",
            "| dataset | seeds | BASELINE only | full | loop iter 0 | loop final | final / full |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, rs in by.items():
            med = lambda vals: statistics.median(vals) if vals else None  # noqa: E731
            lines.append(
                f"| {name} | {len(rs)} | {fmt(med([r['plain']['baseline']['test_iou'] for r in rs if 'plain' in r]))} | {fmt(med([r['plain']['full']['test_iou'] for r in rs if 'plain' in r and 'full' in r['plain']]))}"
                f" | {fmt(med([r['loop']['iter0_test_iou'] for r in rs if 'error' not in r['loop']]))} | {fmt(med([r['loop']['final_test_iou'] for r in rs if 'error' not in r['loop']]))} | {fmt(med([r['final_over_full'] for r in rs if 'final_over_full' in r]))} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(SYNTHETIC))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--work", default="/tmp/bss-quality-bench")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "self_training_quality.json"))
    p.add_argument("--no-plain", action="store_true", help="only the loop (no plain reference runs)")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else []
    for dataset in args.datasets:
        for seed in args.seeds:
            start = time.perf_counter()
            result = bench_one(dataset, seed, Path(args.work), not args.no_plain)
            result["wall_seconds"] = round(time.perf_counter() - start, 1)
            results = [r for r in results if (r["dataset"], r["seed"]) != (dataset, seed)] + [result]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            print(table([result]).splitlines()[-1], flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
