"""The self-training loop: search, promote, refine boxes into NAME_H<n>, repeat; recorded in MLflow.

    python drivers/search.py --dataset obstacle                 # the embedded default (synthetic data if missing)
    python drivers/search.py --dataset obstacle --resume        # continue after Ctrl-C or a kill
    python drivers/search.py --dataset pipes --trials 24 --iterations 4 --address auto

Without a GPU the CPU search space (search_spaces/cpu.yaml) is used, with one the GPU space
(search_spaces/default.yaml). Everything goes to --run-dir (default runs/<dataset>) and MLflow
(open it with: mlflow ui --backend-store-uri sqlite:///mlflow.db).
"""
from __future__ import annotations

import argparse

import _common

from bss.search.loop import parse_duration
from bss.search.promotion import PROMOTION_RULES
from bss.search.stop import STOP_RULES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="source dataset under --data-root; NAME_BASELINE/EVAL/TEST are made if missing; a missing synthetic class (obstacle, deposition, deformation, disconnect) is generated")
    g.add_argument("--data-root", help="folder holding the datasets (default: datasets)")
    g.add_argument("--config", help="base training config (default: config.yaml)")
    g = p.add_argument_group("search")
    g.add_argument("--space", help="search space YAML (default: search_spaces/cpu.yaml without a GPU, search_spaces/default.yaml with one)")
    g.add_argument("--trials", type=int, help="trials per search (default: the space's searcher.trials)")
    g.add_argument("--concurrency", type=int, help="trials at a time (default: as many as the resources allow)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS", help="wall-clock limit of each search; running trials are stopped")
    g.add_argument("--budget", type=parse_duration, metavar="DURATION", help="wall-clock budget of the whole loop (600, 90s, 10m, 1.5h): each search gets its share of the time left, and no later search starts with less than a minute left")
    g.add_argument("--algorithm", choices=("tpe", "random"), help="searcher (default: the space's; tpe)")
    g.add_argument("--scheduler", choices=("asha", "fifo"), help="early stopping (default: the space's; asha)")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: 1, or 2 above 8 cores; with a GPU, CPUs / concurrency)")
    g.add_argument("--gpus-per-trial", type=float, help="GPU share per trial, e.g. 0.5: two trials per GPU (default: GPUs / concurrency; 2 trials per GPU)")
    g.add_argument("--address", help="join this Ray cluster (e.g. auto or 10.0.0.1:6379); default: start a local one")
    g.add_argument("--no-reuse-actors", dest="reuse_actors", action="store_false", help="a fresh worker process per trial (slower start-up; for benchmarks)")
    g = p.add_argument_group("the loop")
    g.add_argument("--iterations", type=int, help="iterations including iteration 0 on BASELINE (default: 3)")
    g.add_argument("--promotion", choices=tuple(PROMOTION_RULES), help="promotion rule (default: guarded_recall: best EVAL --metric among models within --margin of the best EVAL IoU and above the EVAL boxes' own IoU; floor: best --metric with --floor-metric >= --floor)")
    g.add_argument("--metric", choices=("recall", "iou", "dice", "precision"), help="EVAL metric that promotes and decides (default: recall)")
    g.add_argument("--margin", type=float, help="guarded_recall: --metric decides among models within this EVAL IoU of the best (default: 0.03)")
    g.add_argument("--floor-metric", choices=("precision", "iou", "dice", "recall"), help="floor rule: EVAL metric that must clear --floor to be promoted (default: precision)")
    g.add_argument("--floor", type=float, help="floor rule: minimum EVAL --floor-metric of a promoted model (default: 0.3)")
    g.add_argument("--stop", choices=tuple(STOP_RULES), help="stop rule (default: guarded)")
    g.add_argument("--tolerance", type=float, help="stop when the EVAL IoU falls more than this below the best so far (default: 0.02)")
    g.add_argument("--patience", type=int, help="stop after this many iterations in a row without a new best (default: 1)")
    g.add_argument("--retrain-best", action="store_const", const=True, help="iterations >= 1 retrain the best config so far with --trials seeds instead of searching")
    g.add_argument("--seed", type=int, help="seed of the data, the splits, the searcher and the trials (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", help="run folder (default: runs/<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the loop in --run-dir from its last completed stage")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's tracking.uri, sqlite:///mlflow.db)")
    g.add_argument("--experiment", help="MLflow experiment (default: bss-search)")
    g.add_argument("--quiet", action="store_true", help="no per-trial lines")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    from bss.search.loop import LoopOptions, run_loop

    opts = LoopOptions(
        dataset=args.dataset,
        data_root=args.data_root,
        config=args.config,
        space=args.space,
        trials=args.trials,
        concurrency=args.concurrency,
        time_budget=args.time_budget,
        budget=args.budget,
        iterations=args.iterations,
        promotion=args.promotion,
        metric=args.metric,
        margin=args.margin,
        stop=args.stop,
        floor_metric=args.floor_metric,
        floor=args.floor,
        tolerance=args.tolerance,
        patience=args.patience,
        retrain_best=args.retrain_best,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        address=args.address,
        run_dir=args.run_dir,
        resume=args.resume,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        seed=args.seed,
        algorithm=args.algorithm,
        scheduler=args.scheduler,
        reuse_actors=args.reuse_actors,
        progress=not args.quiet,
    )
    run_loop(opts)
    return 0


if __name__ == "__main__":
    _common.run(main)
