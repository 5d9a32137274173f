"""make_hybrid in the driver against make_hybrid on a Ray cluster of local worker nodes (issue 22).

    python bench/scale.py [--sizes 300 3000] [--nodes 2] [--frame 64x48] [--json out.json]

For each size N: a synthetic obstacle dataset of N box-only frames (``bss.data.synthetic``, plus
``--labelled`` hand-labelled ones for the splits) and one randomly initialised toy model
(UNetAttention/resnet18, depth 3, at 64x64: a forward pass costs the same whatever the weights).
Then, on one cluster (``ray start`` head with 0 CPUs + ``--nodes`` 1-CPU worker nodes, one token
file, as tests/cluster.py):

* ``local``: ``make_hybrid`` in this process with ``--threads`` torch threads (the default path),
* ``ray``: ``make_hybrid(address=...)``: one actor per worker node, each with the same threads.

Times are end to end (a Ray run includes joining the cluster, starting the actors and loading the
checkpoint on each). Both write the same masks (checked). On a shared 2-core machine the worker
nodes share the local path's cores: this measures the overhead of the distribution, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)


def make_checkpoint(path: Path) -> Path:
    from bss.config import from_dict
    from bss.models import build_model
    from bss.training.checkpoint import save_checkpoint

    model = {"name": "UNetAttention", "args": {"encoder_name": "resnet18", "encoder_weights": None, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
    cfg = from_dict({"image_size": [64, 64], "model": model, "tracking": {"enabled": False}, "train_dataset": "bench_BASELINE"})
    return save_checkpoint(path, build_model(cfg.model).eval(), cfg, {}, 0)


def make_data(root: Path, n: int, labelled: int, frame: tuple[int, int]) -> str:
    from bss.data.splits import make_splits
    from bss.data.synthetic import SynthConfig, generate_dataset

    name = f"scale{n}"
    generate_dataset(SynthConfig(name=name, count=n + labelled, hand_labelled=labelled, width=frame[0], height=frame[1], seed=0), root)
    make_splits(name, root, progress=False)
    return name


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def masks(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "masks").iterdir())}


def run(args, work: Path) -> list[dict]:
    from cluster import RayNodes

    from bss.data.io import parse_size
    from bss.hybrid import make_hybrid

    checkpoint = make_checkpoint(work / "model.pt")
    frame = parse_size(args.frame, "--frame")
    nodes = RayNodes(token=work / "token")
    rows = []
    try:
        nodes.head(cpus=0)
        for i in range(args.nodes):
            nodes.worker(f"w{i + 1}")
        os.environ.update({k: v for k, v in nodes.env.items() if k.startswith("RAY_AUTH")})
        for n in args.sizes:
            root = work / f"data{n}"
            name = make_data(root, n, args.labelled, frame)
            common = {"batch_size": args.batch_size, "progress": False, "threads": args.threads, "overwrite": True}
            local_s, local = timed(lambda: make_hybrid(name, checkpoint, root, number=1, **common))
            ray_s, remote = timed(lambda: make_hybrid(name, checkpoint, root, number=2, address=nodes.address, **common))
            same = masks(local.path) == masks(remote.path)
            refined = local.refined
            row = {"images": refined, "local_s": round(local_s, 2), "ray_s": round(ray_s, 2), "nodes": remote.nodes, "same_masks": same}
            row.update(local_img_s=round(refined / local_s, 1), ray_img_s=round(refined / ray_s, 1))
            rows.append(row)
            print(
                f"{refined:>6} images  local {local_s:7.2f} s ({row['local_img_s']:6.1f} img/s)   "
                f"ray {args.nodes} nodes {ray_s:7.2f} s ({row['ray_img_s']:6.1f} img/s)   same masks: {same}",
                flush=True,
            )
            shutil.rmtree(root)
    finally:
        nodes.shutdown()
    if len(rows) >= 2:  # the fixed cost (joining, actors, checkpoint loads) cancels out between two sizes
        a, b = rows[0], rows[-1]
        extra = b["images"] - a["images"]
        print(
            f"between {a['images']} and {b['images']} images: local {extra / (b['local_s'] - a['local_s']):.1f} img/s, "
            f"ray {extra / (b['ray_s'] - a['ray_s']):.1f} img/s; ray's fixed cost about {a['ray_s'] - a['images'] * (b['ray_s'] - a['ray_s']) / extra:.1f} s",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 3000], help="box-only images per run")
    parser.add_argument("--nodes", type=int, default=2, help="1-CPU worker nodes of the local cluster")
    parser.add_argument("--frame", default="64x48", help="synthetic frame size WIDTHxHEIGHT")
    parser.add_argument("--labelled", type=int, default=20, help="hand-labelled frames (BASELINE/EVAL/TEST)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local path and of each Ray actor")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    print(f"make_hybrid, {args.frame} frames, toy UNet at 64x64, {args.threads} torch thread(s); {os.cpu_count()} CPUs here", flush=True)
    with tempfile.TemporaryDirectory(prefix="bss-scale-") as tmp:
        rows = run(args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
