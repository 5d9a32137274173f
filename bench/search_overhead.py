"""Ray Tune's overhead in a BSS search: wall time against the trials' own training time, and
the start-up of a trial with and without a warm (reused) worker.

    python bench/search_overhead.py                      # synthetic obstacle data, 6 trials, 2 at a time
    python bench/search_overhead.py --trials 8 --concurrency 2 --epochs 2 --out runs/bench/overhead.json

For each mode (``reuse_actors`` on = the warm path, off = a fresh worker process per trial) it runs
the same search (same seed: the same trials) and reports

* ``wall``: the search's wall time (``Tuner.fit``), Ray already running;
* ``train``: the sum over trials of their training time (first step -> last evaluation);
* ``ratio``: wall x concurrency / train (1.0 = no overhead: every CPU slot always training);
  run with ``--concurrency 1`` for the clean figure (two trials at a time on 2 cores also slow
  each other's training, which muddles the sum);
* per-trial start-up: trainable entry -> first training step ready (imports, datasets, model),
  split into cold trials (first on a worker: imports torch, smp, MLflow) and warm ones.

Uses FIFO (no early stopping) so both modes train exactly the same trials. The raw JSON goes to
``--out``, by default bench/results/search_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)


def ensure_data(root: Path, count: int) -> None:
    from bss.data.splits import make_splits
    from bss.data.synthetic import SynthConfig, generate_dataset

    if not (root / "obstacle" / "images").is_dir():
        generate_dataset(SynthConfig("obstacle", "obstacle", count, count * 2 // 5, 256, 192, 0), root, workers=2)
    if not (root / "obstacle_BASELINE").is_dir():
        make_splits("obstacle", root, progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="datasets")
    p.add_argument("--count", type=int, default=200, help="images of the synthetic dataset if it must be made")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="max_steps_per_epoch")
    p.add_argument("--modes", default="reuse,fresh", help="comma list of reuse (warm workers) and fresh")
    p.add_argument("--no-mlflow", action="store_true", help="trials without MLflow runs")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "search_overhead.json"), help="the raw JSON")
    args = p.parse_args()

    import logging

    import yaml

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from bss import tracking
    from bss.config import load_config
    from bss.search.promotion import FloorRule
    from bss.search.space import load_space
    from bss.search.stages import trial_base
    from bss.search.trial import TrialContext
    from bss.search.tune_search import Resources, run_search, start_ray

    root = Path(args.data_root).resolve()
    ensure_data(root, args.count)
    work = Path(tempfile.mkdtemp(prefix="bss-overhead-"))
    space_file = work / "space.yaml"
    spec = yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())
    spec["fixed"].update(epochs=args.epochs, max_steps_per_epoch=args.steps, visualization_samples=0)
    space_file.write_text(yaml.safe_dump(spec))
    base = load_config(ROOT / "config.yaml").to_dict()
    space = load_space(space_file, base)
    from bss.search.settings import LoopSettings

    settings = LoopSettings(dataset="obstacle", data_root=str(root))
    base = trial_base(base, settings, "obstacle_BASELINE")

    t0 = time.perf_counter()
    cpus, gpus, _ = start_ray(None, args.concurrency, 0)
    ray_init = time.perf_counter() - t0
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow = None
    if not args.no_mlflow:
        tracker = tracking.Tracker.open(uri, "bench")
        parent = tracker.create("bench", None, {"bss.kind": "bench"})
        mlflow = {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent}

    results = {
        "ray_init_seconds": ray_init,
        "cpus": cpus,
        "trials": args.trials,
        "concurrency": args.concurrency,
        "epochs": args.epochs,
        "steps": args.steps,
        "modes": {},
    }
    for mode in args.modes.split(","):
        context = TrialContext(
            base=base, space=space, rule=FloorRule(floor=0.0), trials_dir=str(work / mode / "trials"), seed=0, iteration=0, cpus=1, tracking=mlflow
        )
        outcome = run_search(
            context,
            args.trials,
            Resources(1, 0, args.concurrency),
            work / mode,
            algorithm="tpe",
            scheduler={"name": "fifo"},
            max_evaluations=args.epochs,
            reuse_actors=(mode == "reuse"),
            label=f"[{mode}]",
            progress=False,
        )
        timings = outcome.timings
        train = sum(t["train_seconds"] or 0 for t in timings)
        cold = [t["setup_seconds"] for t in timings if t["cold_start"] and t["setup_seconds"] is not None]
        warm = [t["setup_seconds"] for t in timings if not t["cold_start"] and t["setup_seconds"] is not None]
        per_trial = [t["trial_wall_seconds"] - t["train_seconds"] for t in timings if t["trial_wall_seconds"]]
        row = {
            "wall_seconds": outcome.wall_seconds,
            "train_seconds_sum": train,
            "ratio": outcome.wall_seconds * args.concurrency / train if train else None,
            "startup_cold_median": statistics.median(cold) if cold else None,
            "startup_warm_median": statistics.median(warm) if warm else None,
            "cold_trials": len(cold),
            "warm_trials": len(warm),
            "trial_overhead_median": statistics.median(per_trial) if per_trial else None,
            "states": [t["state"] for t in timings],
            "timings": timings,
        }
        results["modes"][mode] = row
        print(
            f"{mode:>6}: wall {row['wall_seconds']:.1f} s, trials trained {train:.1f} s in all, ratio {row['ratio']:.2f}; "
            f"start-up cold {row['startup_cold_median'] or float('nan'):.1f} s x{len(cold)}, warm {row['startup_warm_median'] or float('nan'):.2f} s x{len(warm)}; "
            f"per-trial overhead (trial wall - training) median {row['trial_overhead_median']:.1f} s",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"ray.init {ray_init:.1f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
