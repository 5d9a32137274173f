"""Which box-only images to hand-label next, pre-annotated for VIA.

    python drivers/suggest_labels.py --dataset obstacle --model runs/obstacle/best.pt --count 40
        [--score expected_errors] [--near 0.12] [--out suggestions/obstacle] [--overwrite]

The teacher refines the box of every box-only image (labels.csv rows with region_count 0) as the
next H<n> would; the images are ranked by --score (see bss/active/scores.py), near-duplicate
frames skipped (--near 0: keep them). Writes OUT/via_project.json (VIA 2 project: the chosen
images with the refined masks as polygons, to correct rather than draw), OUT/ranking.csv (the
ranking and the reason for each image) and OUT/suggestions.json. After correcting in VIA, export
the CSV and run drivers/merge_labels.py.
"""

from __future__ import annotations

import argparse
import signal

import _common


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    from bss.active.polygons import DEFAULT_EPSILON, DEFAULT_MAX_POINTS
    from bss.active.scores import DEFAULT_SCORE, SCORES
    from bss.active.select import DEFAULT_NEAR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="source dataset name under --data-root")
    parser.add_argument("--model", required=True, help="the teacher checkpoint (e.g. runs/NAME/best.pt)")
    parser.add_argument("--count", type=int, required=True, help="how many images to suggest")
    parser.add_argument("--data-root", default="datasets")
    parser.add_argument("--out", help="output folder (default suggestions/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--score", choices=SCORES, default=DEFAULT_SCORE, help=f"ranking score (default {DEFAULT_SCORE}, chosen by bench/active_labelling.py)")
    parser.add_argument("--near", type=float, default=DEFAULT_NEAR, help="thumbnail distance below which a frame is a near-duplicate of a chosen one (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --score random")
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="polygon simplification tolerance in pixels (approxPolyDP)")
    parser.add_argument("--max-points", type=int, default=DEFAULT_MAX_POINTS, help="at most this many points per polygon")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    from bss.active.suggest import suggest

    result = suggest(
        args.dataset,
        args.model,
        args.count,
        data_root=args.data_root,
        out=args.out,
        score=args.score,
        near=args.near,
        seed=args.seed,
        epsilon=args.epsilon,
        max_points=args.max_points,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    pool = result.pool
    print(f"{len(pool.names)} box-only images scored; refinement rule {pool.rule_source}")
    for row in result.rows[: len(result.chosen)][:10]:
        print(f"  {row['rank']:>3}  {row['filename']}  {row['reason']}")
    if len(result.chosen) > 10:
        print(f"  ... ({len(result.chosen) - 10} more in ranking.csv)")
    if len(result.chosen) < args.count:
        print(f"only {len(result.chosen)} of the {args.count} asked for could be chosen (images without a box or near-duplicates are left out)")
    print(
        f"{len(result.chosen)} images, {sum(len(v) for v in result.polygons.values())} pre-drawn polygons -> {result.out}/via_project.json "
        f"(VIA 2: Project > Load; ranking in {result.out}/ranking.csv); {len(result.skipped)} near-duplicate(s) skipped"
    )
    return 0


if __name__ == "__main__":
    _common.run(main)
