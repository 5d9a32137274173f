"""The self-training loop: search, promote, refine boxes into NAME_H<n>, repeat; recorded in MLflow.

    python drivers/search.py --dataset obstacle                 # the embedded default (synthetic data if missing)
    python drivers/search.py --dataset obstacle --resume        # continue after Ctrl-C or a kill
    python drivers/search.py --dataset pipes --trials 24 --iterations 4 --address auto

Without a GPU the CPU search space (search_spaces/cpu.yaml) is used, with one the GPU space
(search_spaces/default.yaml). Everything goes to --run-dir (default runs/<dataset>) and MLflow
(open it with: python drivers/ui.py --run-dir runs/<dataset>).
"""

from __future__ import annotations

import argparse
import dataclasses

import _common
from bss.config import METRICS
from bss.search.promotion import PROMOTION_RULES
from bss.search.searchers import SPACE_SEARCHERS
from bss.search.settings import help_text, parse_duration
from bss.search.stop import STOP_RULES, TIES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help=help_text("dataset"))
    g.add_argument("--data-root", help=help_text("data_root"))
    g.add_argument("--config", help=help_text("config"))
    g.add_argument("--split-fractions", type=float, nargs=3, metavar=("BASELINE", "EVAL", "TEST"), help=help_text("split_fractions"))
    g.add_argument("--resolution", metavar="auto|whole", help=help_text("resolution"))
    g.add_argument("--patch-size", type=int, metavar="PIXELS", help=help_text("patch_size"))
    g = p.add_argument_group("search")
    g.add_argument("--space", help=help_text("space"))
    g.add_argument("--trials", type=int, help=help_text("trials"))
    g.add_argument("--concurrency", type=int, help="trials at a time (default: as many as the resources allow)")
    g.add_argument("--time-budget", type=float, metavar="SECONDS", help=help_text("time_budget"))
    g.add_argument("--budget", type=parse_duration, metavar="DURATION", help=help_text("budget"))
    g.add_argument("--algorithm", choices=SPACE_SEARCHERS, help=help_text("algorithm"))
    g.add_argument("--scheduler", choices=("asha", "fifo"), help=help_text("scheduler"))
    g.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: 1, or 2 above 8 cores; with a GPU, CPUs / concurrency)")
    g.add_argument("--gpus-per-trial", type=float, help="GPU share per trial, e.g. 0.5: two trials per GPU (default: GPUs / concurrency; 2 trials per GPU)")
    g.add_argument("--address", help="join this Ray cluster (e.g. auto or 10.0.0.1:6379); default: start a local one")
    g.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="retries of a trial whose worker or Ray node died, on any node (default: 2; a trial that fails on its own is not trained again)",
    )
    g.add_argument("--no-reuse-actors", dest="reuse_actors", action="store_false", help="a fresh worker process per trial (slower start-up; for benchmarks)")
    g = p.add_argument_group("the loop")
    g.add_argument("--iterations", type=int, help=help_text("iterations"))
    g.add_argument("--promotion", choices=tuple(PROMOTION_RULES), help=help_text("promotion"))
    g.add_argument("--metric", choices=METRICS, help=help_text("metric"))
    g.add_argument("--margin", type=float, help=help_text("margin"))
    g.add_argument("--label-guard", action=argparse.BooleanOptionalAction, default=None, help=help_text("label_guard"))
    g.add_argument("--floor-metric", choices=METRICS, help=help_text("floor_metric"))
    g.add_argument("--floor", type=float, help=help_text("floor"))
    g.add_argument("--stop", choices=tuple(STOP_RULES), help=help_text("stop"))
    g.add_argument("--tolerance", type=float, help=help_text("tolerance"))
    g.add_argument("--patience", type=int, help=help_text("patience"))
    g.add_argument("--noise-z", type=float, help=help_text("noise_z"))
    g.add_argument("--ties", choices=TIES, help=help_text("ties"))
    g.add_argument("--retrain-best", action="store_const", const=True, help=help_text("retrain_best"))
    g.add_argument("--seed", type=int, help=help_text("seed"))
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", help="run folder (default: runs/<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the loop in --run-dir from its last completed stage")
    g.add_argument("--tracking-uri", help=help_text("tracking_uri"))
    g.add_argument("--experiment", help=help_text("experiment"))
    g.add_argument("--quiet", action="store_true", help="no per-trial lines")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    from bss.search.loop import LoopOptions, run_loop

    fields = {f.name for f in dataclasses.fields(LoopOptions)}
    opts = LoopOptions(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.quiet)
    run_loop(opts)
    return 0


if __name__ == "__main__":
    _common.run(main)
