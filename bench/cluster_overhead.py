"""Tune overhead of a BSS search on a real multi-node Ray cluster, next to Ray Tune's bare figure,
with MLflow on SQLite or on a tracking server.

    python bench/cluster_overhead.py                          # 1 and 2 worker nodes, 4 trials per search
    python bench/cluster_overhead.py --nodes 1 --trials 6 --steps 24 --out runs/bench/cluster_overhead.json

For each cluster (a head with 0 CPUs and N 1-CPU worker nodes, ``ray start`` on this machine,
as in tests/test_cluster.py) it runs, one trial per node at a time:

* ``bare``: a Tune function trainable that only reports ``--evaluations`` times (Tune's own cost);
* ``bss sqlite``: the BSS trainable (bss.search.trial.train_trial through run_search), MLflow on
  a SQLite file;
* ``bss server``: the same, MLflow through ``mlflow server`` (http, artifacts proxied).

Per search: wall (``Tuner.fit``), the sum of the trials' training time (first step -> last
evaluation), ``fixed per trial`` = (wall x concurrency - training) / trials, and the ratio wall x
concurrency / training; ``ratio at 60 s`` puts the same fixed cost on trials of 60 s of training.
It also times the MLflow calls of one trial (create, params, one metrics batch per evaluation,
final metrics, end) on SQLite and on the server, directly, without Ray.
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
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)


def bare_trainable(config):
    from ray import tune

    for i in range(int(config["evaluations"])):
        tune.report({"search_score": float(i), "evaluation": i + 1})


def run_bare(trials: int, concurrency: int, evaluations: int, storage: Path) -> dict:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(bare_trainable, {"cpu": 1}),
        param_space={"evaluations": evaluations, "x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(metric="search_score", mode="max", num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name="bare", storage_path=str(storage), verbose=0, log_to_file=False),
    )
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, "train_seconds_sum": 0.0, "fixed_per_trial": wall * concurrency / trials}


def run_bss(context_args: dict, tracking: dict | None, trials: int, concurrency: int, evaluations: int, work: Path, label: str) -> dict:
    from bss.search.trial import TrialContext
    from bss.search.tune_search import Resources, run_search

    context = TrialContext(**context_args, trials_dir=str(work / label / "trials"), tracking=tracking)
    outcome = run_search(
        context, trials, Resources(1, 0, concurrency), work / label, algorithm="tpe", scheduler={"name": "fifo"}, max_evaluations=evaluations, progress=False
    )
    train = sum(t["train_seconds"] or 0 for t in outcome.timings)
    fixed = (outcome.wall_seconds * concurrency - train) / trials
    warm = [t["setup_seconds"] for t in outcome.timings if not t["cold_start"] and t["setup_seconds"] is not None]
    cold = [t["setup_seconds"] for t in outcome.timings if t["cold_start"] and t["setup_seconds"] is not None]
    return {
        "wall_seconds": outcome.wall_seconds,
        "train_seconds_sum": train,
        "train_per_trial": train / trials,
        "fixed_per_trial": fixed,
        "ratio": outcome.wall_seconds * concurrency / train,
        "ratio_at_60s": (60.0 + fixed) / 60.0,
        "setup_cold_median": statistics.median(cold) if cold else None,
        "setup_warm_median": statistics.median(warm) if warm else None,
        "states": [t["state"] for t in outcome.timings],
        "node_names": sorted({(json.loads((Path(context.trials_dir) / c.key / "record.json").read_text()).get("node_name") or "") for c in outcome.candidates}),
    }


def tracking_calls(uri: str, evaluations: int, repeats: int = 5) -> float:
    """Seconds of the MLflow calls one trial makes (median of ``repeats``)."""
    from bss import tracking

    tracker = tracking.Tracker.open(uri, "calls")
    parent = tracker.create("parent", None, {"bss.kind": "bench"})
    params = {f"p{i}": i for i in range(40)}
    row = {f"eval_m{i}": 0.5 for i in range(12)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run = tracker.create("trial", parent, {"bss.kind": "trial"})
        tracker.params(run, params, fresh=True)
        for step in range(evaluations):
            tracker.metrics(run, row, step=step + 1)
        tracker.metrics(run, {"best_eval_iou": 0.5, "train_seconds": 1.0})
        tracker.end(run, "FINISHED", {"bss.outcome": "complete"})
        times.append(time.perf_counter() - start)
    assert tracker.ok, tracker.failure
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(Path(tempfile.gettempdir()) / "bss-bench-data"))
    p.add_argument("--count", type=int, default=80)
    p.add_argument("--nodes", default="1,2", help="worker-node counts to run (1 CPU each)")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="max_steps_per_epoch")
    p.add_argument("--out", default="runs/bench/cluster_overhead.json")
    args = p.parse_args()

    import logging

    import yaml
    from cluster import MlflowServer, RayNodes
    from search_overhead import ensure_data

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from bss import tracking
    from bss.config import load_config
    from bss.search.promotion import FloorRule
    from bss.search.ray_cluster import start_ray, stop_ray
    from bss.search.settings import LoopSettings
    from bss.search.space import load_space
    from bss.search.stages import trial_base

    root = Path(args.data_root).resolve()
    ensure_data(root, args.count)
    work = Path(tempfile.mkdtemp(prefix="bss-cluster-overhead-"))
    spec = yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())
    spec["fixed"].update(epochs=args.epochs, max_steps_per_epoch=args.steps, visualization_samples=0)
    (work / "space.yaml").write_text(yaml.safe_dump(spec))
    base = load_config(ROOT / "config.yaml").to_dict()
    space = load_space(work / "space.yaml", base)
    base = trial_base(base, LoopSettings(dataset="obstacle", data_root=str(root)), "obstacle_BASELINE")
    evaluations = args.epochs
    context_args = {"base": base, "space": space, "rule": FloorRule(floor=0.0), "seed": 0, "iteration": 0, "cpus": 1}

    server = MlflowServer(work / "server")
    results: dict = {"trials": args.trials, "epochs": args.epochs, "steps": args.steps, "rows": []}
    try:
        results["mlflow_calls_per_trial"] = {
            "sqlite": tracking_calls(f"sqlite:///{work / 'calls.db'}", evaluations),
            "server": tracking_calls(server.uri, evaluations),
        }
        print(
            f"MLflow calls of one trial: sqlite {results['mlflow_calls_per_trial']['sqlite']:.3f} s, server {results['mlflow_calls_per_trial']['server']:.3f} s",
            flush=True,
        )
        for n in [int(x) for x in args.nodes.split(",")]:
            nodes = RayNodes(token=work / "token")  # one token for every cluster this process joins
            try:
                nodes.head(cpus=0)
                for i in range(n):
                    nodes.worker(f"w{i + 1}")
                import os

                os.environ.update({k: v for k, v in nodes.env.items() if k.startswith("RAY_AUTH")})
                start_ray(nodes.address)
                stores = {"sqlite": f"sqlite:///{work / f'n{n}.db'}", "server": server.uri}
                for label in ("bare", "sqlite", "server"):
                    if label == "bare":
                        row = run_bare(args.trials, n, evaluations, work / f"n{n}-bare")
                    else:
                        tracker = tracking.Tracker.open(stores[label], f"bench-n{n}")
                        parent = tracker.create("bench", None, {"bss.kind": "bench"})
                        mlflow = {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent}
                        row = run_bss(context_args, mlflow, args.trials, n, evaluations, work, f"n{n}-{label}")
                    row.update(nodes=n, what=label)
                    results["rows"].append(row)
                    print(
                        f"{n} node(s) {label:>6}: wall {row['wall_seconds']:.1f} s, training {row['train_seconds_sum']:.1f} s, "
                        f"fixed per trial {row['fixed_per_trial']:.2f} s, ratio {row.get('ratio') or float('nan'):.3f}, at 60 s trials {row.get('ratio_at_60s') or float('nan'):.3f}",
                        flush=True,
                    )
                stop_ray()
            finally:
                nodes.shutdown()
    finally:
        server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
