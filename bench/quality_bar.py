"""Where issue 18's bar stands: every self-training quality run so far, per dataset.

Reads ``bench/results/self_training_quality_*.json`` (or the files given), takes each (dataset,
seed) from the newest file that ran it (by its start time; the row names that file and its code
version, so a table that mixes code versions says so), and prints per dataset the medians over
its seeds and the bar's verdict (issue 18): where there is headroom (median ceiling - iteration 0
>= 0.05), the final model above iteration 0 and a recovered fraction of at least 0.5 on the
synthetic classes and 0.3 on the ``neu_*`` photos, the best ``H<n>`` above the boxes, all as
medians over 3 seeds. Reads only; runs nothing.

    python bench/quality_bar.py
    python bench/quality_bar.py bench/results/self_training_quality_synth_s0.json bench/results/self_training_quality_noise_s0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import self_training_quality as stq  # noqa: E402  (the figures, the headroom floor and Spread are shared)

BAR = {"synthetic": 0.5, "photos": 0.3}  # the median recovered fraction issue 18 asks for
SEEDS = 3  # the bar is a median over this many seeds


@dataclass(frozen=True)
class Run:
    dataset: str
    seed: int
    figures: dict  # stq.Figures as JSON
    source: str  # the results file's name
    code: str  # its `git describe`
    started: str


def read_runs(files: list[Path]) -> list[Run]:
    """Every finished-or-not run with figures in ``files``; for a (dataset, seed) run more than
    once, the one from the file that started last."""
    newest: dict[tuple[str, int], Run] = {}
    for path in files:
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: not a readable results file ({exc})") from None
        if not isinstance(body, dict) or body.get("benchmark") != "self_training_quality":
            continue  # another benchmark, or the old method's file (no per-run figures)
        for r in body.get("runs", []):
            run = Run(
                r["setting"]["dataset"], r["setting"]["seed"], r["figures"], path.name, (body.get("code") or {}).get("describe") or "?", body.get("started", "")
            )
            key = (run.dataset, run.seed)
            if key not in newest or run.started >= newest[key].started:
                newest[key] = run
    return sorted(newest.values(), key=lambda r: (r.dataset, r.seed))


def _median(runs: list[Run], key: str) -> float | None:
    return stq.Spread.of([r.figures.get(key) for r in runs]).median


def bar_for(dataset: str) -> float:
    return BAR["synthetic" if dataset in stq.DEFECTS else "photos"]


def verdict(dataset: str, runs: list[Run]) -> str:
    """The bar's verdict for one dataset's runs (one per seed)."""
    bar = bar_for(dataset)
    iter0, final, headroom = _median(runs, "iter0"), _median(runs, "final"), _median(runs, "headroom")
    recovered, boxes, best_h = _median(runs, "recovered"), _median(runs, "box_label_iou"), _median(runs, "best_h_label_iou")
    short = []
    if iter0 is None or final is None or final <= iter0:
        short.append(f"final {stq.fmt(final)} not above iteration 0 {stq.fmt(iter0)}")
    if recovered is None or recovered < bar:
        short.append(f"recovered {stq.fmt(recovered)} < {bar}")
    if boxes is None or best_h is None or best_h <= boxes:
        short.append(f"best H {stq.fmt(best_h)} not above the boxes {stq.fmt(boxes)}")
    if headroom is not None and headroom < stq.HEADROOM:
        status = f"no headroom (median ceiling - iteration 0 = {headroom:.3f} < {stq.HEADROOM})"
    else:
        status = "met" if not short else "not met: " + "; ".join(short)
    return status if len(runs) >= SEEDS else f"{status} so far; {len(runs)} of {SEEDS} seeds"


HEAD = "| dataset | seeds | TEST iter 0 | TEST final | TEST ceiling | recovered (bar) | label IoU boxes -> best H | verdict | runs (file, code) |"


def table(runs: list[Run]) -> str:
    by_dataset: dict[str, list[Run]] = {}
    for r in runs:
        by_dataset.setdefault(r.dataset, []).append(r)
    lines = [HEAD, "|" + "---|" * (HEAD.count("|") - 1)]
    for dataset, rs in by_dataset.items():
        spread = {
            key: stq.Spread.of([r.figures.get(key) for r in rs]) for key in ("iter0", "final", "ceiling", "recovered", "box_label_iou", "best_h_label_iou")
        }
        bar = bar_for(dataset)
        sources = ", ".join(f"s{r.seed}: {r.source.removeprefix('self_training_quality_').removesuffix('.json')} @{r.code}" for r in rs)
        cells = [
            dataset,
            " ".join(str(r.seed) for r in rs),
            str(spread["iter0"]),
            str(spread["final"]),
            str(spread["ceiling"]),
            f"{spread['recovered']} ({bar})",
            f"{spread['box_label_iou']} -> {spread['best_h_label_iou']}",
            verdict(dataset, rs),
            sources,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="results files (default: bench/results/self_training_quality_*.json)")
    args = p.parse_args(argv)
    files = args.files or sorted((REPO / "bench" / "results").glob("self_training_quality_*.json"))
    runs = read_runs(files)
    if not runs:
        raise SystemExit("no self-training quality runs in " + (", ".join(map(str, files)) or "bench/results"))
    print(table(runs))


if __name__ == "__main__":
    main()
