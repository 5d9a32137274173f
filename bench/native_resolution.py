"""Native resolution benchmark: the planned path beside the whole-frame path, same data, same budget.

The loop plans its resolution from the dataset (``--resolution auto``, the default: patches at a
planned scale and sliding-window inference where thin or small defects would vanish in a
whole-frame input) or squeezes every frame into one input of long side 160
(``--resolution whole``, the path before). This script runs both on the same data with the same
``--budget`` and scores, at each image's own resolution:

* the label IoU of the best ``H<n>`` (all pixels of the box-only images, against ``truth/``),
* the final model's IoU on a held-out TEST the loop never sees (exact masks),
* the final model's inference time per held-out image (``bss.inference.Predictor``, batch 8),
* the loop's wall time and the plan it printed.

Settings (real photos from ``../shared/data/neu_seg``, never written to):

* ``neu_scratches``: the 200x200 photos as they are (scratches ~7 px wide; the plan keeps the
  whole frame at 160x160 there, so both paths are the same: run it to check that);
* ``neu_scratches_2x2``: 2x2 mosaics of the same photos (400x400 frames; hand-labelled photos only
  with hand-labelled ones, so a mosaic is wholly hand-labelled or wholly box-only): the
  scratches as thin in pixels but the frame twice as wide, as a crack in a CCTV frame.

Synthetic settings (``bss.data.synthetic``, 300 frames of which 30 hand-labelled, 60 held-out
frames generated with seed 1000 + seed, as ``self_training_quality.py``):

* ``disconnect_704_thin``: disconnects at the seed's frame size, 704x512, their area x0.1
  (``--area-scale 0.1``): crescent gaps ~12 px thick in boxes ~200 px across, 2.8 px at the
  whole frame's 160x116;
* ``obstacle_1280_small``: obstacles in 1280x960 frames, their area x0.02: boxes ~70 px
  across, ~9 px at the whole frame's 160x120.

One run writes ``bench/results/native_resolution_<tag>.json`` and prints the Markdown table.

    python bench/native_resolution.py                                   # neu_scratches_2x2, seed 0: ~30 min on 2 cores
    python bench/native_resolution.py --datasets neu_scratches_2x2 --budget 6m --tag quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import self_training_quality as stq  # noqa: E402  (the data preparation and scoring are shared)

from bss.data.io import read_image, read_mask, write_image, write_mask  # noqa: E402
from bss.data.layout import SourceDataset  # noqa: E402
from bss.data.via import write_via_csv  # noqa: E402
from bss.search.settings import parse_duration  # noqa: E402

SETTINGS = {
    # dataset: (source under neu_seg, mosaic side, hand labels, held-out images)
    "neu_scratches": ("neu_scratches", 1, 36, 60),
    "neu_scratches_2x2": ("neu_scratches", 2, 14, 15),
}
SYNTHETIC_SETTINGS = {
    # dataset: (generator class, frame WxH, defect area scale, frames, hand labels, held-out frames)
    "disconnect_704_thin": ("disconnect", (704, 512), 0.1, 300, 30, 60),
    "obstacle_1280_small": ("obstacle", (1280, 960), 0.02, 300, 30, 60),
}
PATHS = ("whole", "auto")


# --------------------------------------------------------------------------- mosaics


def _shifted(region_attrs: dict, dx: int, dy: int) -> dict:
    attrs = dict(region_attrs)
    if "all_points_x" in attrs:
        attrs["all_points_x"] = [x + dx for x in attrs["all_points_x"]]
        attrs["all_points_y"] = [y + dy for y in attrs["all_points_y"]]
    elif "x" in attrs:
        attrs["x"], attrs["y"] = attrs["x"] + dx, attrs["y"] + dy
    elif "cx" in attrs:
        attrs["cx"], attrs["cy"] = attrs["cx"] + dx, attrs["cy"] + dy
    return attrs


def _tile(arrays: list[np.ndarray], side: int) -> np.ndarray:
    return np.concatenate([np.concatenate(arrays[r * side : (r + 1) * side], axis=1) for r in range(side)], axis=0)


def mosaic_source(source: Path, out: Path, side: int) -> Path:
    """``side`` x ``side`` mosaics of ``source``'s photos (images, box masks, truth, polygons
    shifted), hand-labelled photos only with hand-labelled ones; written under ``out/<name>``."""
    src = SourceDataset.open(source.name, source.parent)
    name = f"{source.name}_{side}x{side}"
    folder = out / name
    for sub in ("images", "masks", "truth"):
        (folder / sub).mkdir(parents=True)
    hand = {s.stem for s in src.hand_labelled()}
    groups = [sorted((s for s in src.samples if (s.stem in hand) == labelled), key=lambda s: s.stem) for labelled in (True, False)]
    rows, sizes, n = {}, {}, side * side
    for group in groups:
        for start in range(0, len(group) - n + 1, n):
            tiles = group[start : start + n]
            stem = f"m{len(rows):04d}"
            height, width = read_image(tiles[0].image).shape[:2]
            write_image(folder / "images" / f"{stem}.png", _tile([read_image(t.image) for t in tiles], side))
            write_mask(folder / "masks" / f"{stem}.png", _tile([read_mask(t.mask) for t in tiles], side))
            write_mask(folder / "truth" / f"{stem}.png", _tile([read_mask(src.truth_dir / f"{t.stem}.png") for t in tiles], side))
            regions = []
            for k, t in enumerate(tiles):
                dy, dx = (k // side) * height, (k % side) * width
                regions += [{"name": r.shape} | _shifted(r.attrs, dx, dy) for r in src.labels.regions.get(t.image.name, [])]
            rows[f"{stem}.png"] = regions
            sizes[f"{stem}.png"] = (folder / "images" / f"{stem}.png").stat().st_size
    write_via_csv(folder / "labels.csv", rows, sizes)
    return folder


# --------------------------------------------------------------------------- one run


@dataclass
class PathResult:
    path: str  # whole | auto
    plan: list[str]  # the plan's lines as the loop printed them
    loop_seconds: float
    error: str | None
    final_test_iou: float | None
    iter0_test_iou: float | None
    best_h_label_iou: float | None
    seconds_per_image: float | None


def plan_lines(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return [line.strip() for line in lines if "plan" in line.lower() or "network input" in line.lower()][:6]


def inference_seconds(checkpoint: Path, images: list[Path]) -> float:
    """Seconds per image of ``checkpoint`` on ``images`` (batch 8, after one warm-up batch)."""
    from bss.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for _ in predictor.predict_paths(images[:8], progress=False):
        pass
    start = time.perf_counter()
    for _ in predictor.predict_paths(images, progress=False):
        pass
    return (time.perf_counter() - start) / len(images)


def run_path(path: str, setting: stq.Setting, prepared: stq.Prepared, work: Path, budget: float, iterations: int) -> PathResult:
    run_dir = work / f"loop_{path}"
    extra = ["--resolution", path, "--budget", f"{budget:g}", "--iterations", str(iterations)]
    outcome = stq.loop_outcome(setting.dataset, prepared.headroom_root, run_dir, setting, extra, prepared, work)
    log = work / f"{run_dir.name}.log"
    final = outcome.final
    seconds = None
    if final is not None:
        images = sorted((prepared.holdout / "images").iterdir())
        seconds = inference_seconds(run_dir / f"iter_{final.iteration}" / "best.pt", images)
    made = [it.label_iou for it in outcome.iterations if it.label_iou is not None]
    return PathResult(
        path=path,
        plan=plan_lines(log),
        loop_seconds=outcome.seconds,
        error=outcome.error,
        final_test_iou=final.test_iou if final else None,
        iter0_test_iou=outcome.test_iou(0),
        best_h_label_iou=max(made, default=None),
        seconds_per_image=seconds,
    )


def bench_one(dataset: str, seed: int, work: Path, budget: float, iterations: int) -> dict:
    work = work / f"{dataset}-s{seed}"
    if work.exists():
        shutil.rmtree(work)
    photos = stq.NEU_ROOT
    if dataset in SYNTHETIC_SETTINGS:
        defect, frame, area_scale, images, hand, holdout = SYNTHETIC_SETTINGS[dataset]
        setting = stq.Setting(dataset, seed, images, hand, holdout, defect=defect, frame=frame, area_scale=area_scale)
    else:
        source_name, side, hand, holdout = SETTINGS[dataset]
        if side > 1:
            photos = work / "mosaics"
            mosaic_source(stq.NEU_ROOT / source_name, photos, side)
        setting = stq.Setting(dataset, seed, None, hand, holdout)
    prepared = stq.prepare(setting, work, photos=photos)
    stq.say(f"{dataset} seed {seed}: {prepared.source_images} images, {prepared.hand_labels} hand-labelled; held-out TEST {prepared.holdout_images}")
    results = [run_path(path, setting, prepared, work, budget, iterations) for path in PATHS]
    for r in results:
        stq.say("  " + " | ".join(row_cells(dataset, seed, prepared.box_label_iou, r)[2:]))
    return {"dataset": dataset, "seed": seed, "box_label_iou": prepared.box_label_iou, "images": prepared.source_images, "paths": [asdict(r) for r in results]}


# --------------------------------------------------------------------------- reporting

HEAD = "| dataset | seed | path | plan | label IoU boxes -> best H | TEST iter 0 | TEST final | s / image | loop s |"


def row_cells(dataset: str, seed: int, box: float, r: PathResult) -> list[str]:
    plan = "; ".join(r.plan) or "-"
    return [
        dataset,
        str(seed),
        r.path,
        plan.replace("|", "/"),
        f"{stq.fmt(box)} -> {stq.fmt(r.best_h_label_iou)}",
        stq.fmt(r.iter0_test_iou),
        stq.fmt(r.final_test_iou) + (f" ({r.error})" if r.error else ""),
        "-" if r.seconds_per_image is None else f"{r.seconds_per_image:.3f}",
        f"{r.loop_seconds:.0f}",
    ]


def table(runs: list[dict]) -> str:
    lines = [HEAD, "|" + "---|" * (HEAD.count("|") - 1)]
    for run in runs:
        for r in run["paths"]:
            lines.append("| " + " | ".join(row_cells(run["dataset"], run["seed"], run["box_label_iou"], PathResult(**r))) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["neu_scratches_2x2"], choices=[*SETTINGS, *SYNTHETIC_SETTINGS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--budget", type=parse_duration, default=parse_duration("12m"), help="--budget of each loop (default 12m)")
    p.add_argument("--iterations", type=int, default=2, help="iterations of each loop (default 2: iteration 0 and the students of H1)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new folder in the system's temp)")
    p.add_argument("--tag", help="the results file's suffix (default: the start time)")
    args = p.parse_args(argv)
    started = datetime.now(timezone.utc)
    tag = args.tag or started.strftime("%Y%m%d-%H%M%S")
    out = REPO / "bench" / "results" / f"native_resolution_{tag}.json"
    if out.exists():
        raise SystemExit(f"{out} exists: one run per file; pass another --tag")
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"bss-native-{tag}"
    header = {
        "benchmark": "native_resolution",
        "code": stq.code_version(),
        "started": started.isoformat(timespec="seconds"),
        "args": vars(args) | {"work": str(work)},
    }
    runs = []
    for dataset in args.datasets:
        for seed in args.seeds:
            runs.append(bench_one(dataset, seed, work, args.budget, args.iterations))
            out.write_text(json.dumps(header | {"runs": runs}, indent=1, default=str) + "\n")
    body = header | {"runs": runs, "table": table(runs), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out.write_text(json.dumps(body, indent=1, default=str) + "\n")
    stq.say("\n" + body["table"] + f"\n\nresults: {out}")


if __name__ == "__main__":
    main()
