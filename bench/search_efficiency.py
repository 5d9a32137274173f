"""Search efficiency: the best EVAL Recall (under the precision floor) that TPE + ASHA finds
against random search (no early stopping) with the same number of trials, on the synthetic data.

    python bench/search_efficiency.py                          # cpu.yaml, 8 trials, seeds 0 1 2
    python bench/search_efficiency.py --trials 12 --seeds 0 1 2 3 --out runs/bench/efficiency.json

The raw JSON (every run, and the summary) goes to ``--out``, by default bench/results/search_efficiency.json.

Each (method, seed) is one search of iteration 0 (train on obstacle_BASELINE, judge on
obstacle_EVAL) promoted by the seed's floor rule (``FloorRule``, the loop's ``--promotion floor``:
best recall with precision >= --floor, ties by IoU), not the loop's default ``guarded_recall``,
which needs the EVAL boxes' own IoU measured first.
Both methods draw their first trials from the same seeded random sampler (TPE's start-up trials),
so the comparison starts from the same points. Reported per method: the promoted recall (and its
precision and IoU) per seed, their mean, the search wall time and how many trials ASHA stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

METHODS = {"tpe+asha": ("tpe", "asha"), "random": ("random", "fifo")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="datasets")
    p.add_argument("--count", type=int, default=300, help="images of the synthetic dataset if it must be made")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "cpu.yaml"))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--floor", type=float, default=0.3)
    p.add_argument("--methods", default="tpe+asha,random")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "search_efficiency.json"), help="the raw JSON")
    args = p.parse_args()

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from bench.search_overhead import ensure_data
    from bss.config import load_config
    from bss.search.promotion import FloorRule, choose
    from bss.search.settings import LoopSettings
    from bss.search.space import load_space
    from bss.search.stages import derive_seed, max_evaluations, trial_base
    from bss.search.trial import TrialContext
    from bss.search.tune_search import Resources, run_search, start_ray

    root = Path(args.data_root).resolve()
    ensure_data(root, args.count)
    base = load_config(ROOT / "config.yaml").to_dict()
    space = load_space(args.space, base)
    base = trial_base(base, LoopSettings(dataset="obstacle", data_root=str(root)), "obstacle_BASELINE")
    rule = FloorRule(metric="recall", floor_metric="precision", floor=args.floor)
    start_ray(None, args.concurrency, 0)
    work = Path(tempfile.mkdtemp(prefix="bss-efficiency-"))
    results: dict = {"trials": args.trials, "concurrency": args.concurrency, "floor": args.floor, "space": args.space, "runs": []}
    for seed in args.seeds:
        for method in args.methods.split(","):
            algorithm, scheduler = METHODS[method]
            folder = work / f"{method}-{seed}"
            context = TrialContext(base=base, space=space, rule=rule, trials_dir=str(folder / "trials"), seed=derive_seed(seed, 0), iteration=0, cpus=1)
            outcome = run_search(
                context,
                args.trials,
                Resources(1, 0, args.concurrency),
                folder,
                algorithm=algorithm,
                scheduler=dict(space.scheduler, name=scheduler),
                max_evaluations=max_evaluations(space, base),
                progress=False,
            )
            winner = choose(outcome.candidates, rule)
            run = {
                "method": method,
                "seed": seed,
                "wall_seconds": outcome.wall_seconds,
                "stopped": sum(1 for c in outcome.candidates if c.state == "stopped"),
                "failed": sum(1 for c in outcome.candidates if c.state == "failed"),
                "evaluations": sum(c.evaluations for c in outcome.candidates),
                "recall": winner.best["eval_recall"] if winner else None,
                "precision": winner.best["eval_precision"] if winner else None,
                "iou": winner.best["eval_iou"] if winner else None,
                "params": winner.params if winner else None,
                "trials": [
                    {"params": c.params, "state": c.state, "best": c.best and {k: c.best[k] for k in ("eval_recall", "eval_precision", "eval_iou")}}
                    for c in outcome.candidates
                ],
            }
            results["runs"].append(run)
            print(
                f"seed {seed} {method:>9}: recall {run['recall'] or float('nan'):.3f} (precision {run['precision'] or float('nan'):.3f}, IoU {run['iou'] or float('nan'):.3f}); "
                f"{outcome.wall_seconds:.0f} s, {run['evaluations']} evaluations, {run['stopped']} stopped early",
                flush=True,
            )
    print("\nmethod      mean recall   mean IoU   mean wall s   evaluations")
    for method in args.methods.split(","):
        runs = [r for r in results["runs"] if r["method"] == method]
        rec = [r["recall"] or 0.0 for r in runs]
        iou = [r["iou"] or 0.0 for r in runs]
        summary = {
            "recall_mean": statistics.mean(rec),
            "recall_sd": statistics.pstdev(rec),
            "iou_mean": statistics.mean(iou),
            "wall_mean": statistics.mean(r["wall_seconds"] for r in runs),
            "evaluations_mean": statistics.mean(r["evaluations"] for r in runs),
        }
        results.setdefault("summary", {})[method] = summary
        print(
            f"{method:<10} {summary['recall_mean']:.3f} ± {summary['recall_sd']:.3f}   {summary['iou_mean']:.3f}   {summary['wall_mean']:8.0f}   {summary['evaluations_mean']:8.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
