"""Throughput and memory of make_hybrid against a bare loop of the same model's forward passes.

    python bench/hybrid_throughput.py [--sizes 100 400] [--checkpoint best.pt] [--data-root DIR --dataset NAME]
                                      [--batch-size 8] [--workers N] [--repeats 3] [--json out.json]

For each dataset size N (box-only images) a fresh child process (so peak memory is its own):

1. runs make_hybrid once and samples the resident memory (PSS) of the process and its
   DataLoader workers every 20 ms (peak, and its rise over the memory before the call),
2. then alternates, ``--repeats`` times each (default 3), a *bare loop* (the same images already decoded,
   resized and normalised in memory, batched, ``sigmoid(model(x))`` under inference_mode: the
   forward passes and nothing else) and make_hybrid (decode, resize, forward, resize back, refine,
   write masks, link images, manifest), and reports the best images/s of each, their ratio, and
   the CPU time per image of each (process and workers together).

Without ``--checkpoint`` a randomly initialised model is saved (a forward pass costs the same
whatever the weights); without ``--dataset`` a synthetic obstacle dataset (256x192) is generated.
Timings on a shared CPU are noisy: compare the two figures of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bss.environment import quiet  # noqa: E402

quiet(offline=True)


# ------------------------------------------------------------------------------- memory
def _pss_kib(pid: int) -> int:
    """Proportional set size: resident memory with pages shared between processes (a forked
    DataLoader worker shares its parent's) split between them, so a tree's sum counts them once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def tree_pss_kib(pid: int | None = None) -> int:
    """Resident memory (PSS) of a process and all its descendants (KiB)."""
    pid = pid or os.getpid()
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _pss_kib(p)
        stack += _children(p)
    return total


class PeakSampler:
    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = tree_pss_kib()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_pss_kib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss_kib())


def _cpu_seconds() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ------------------------------------------------------------------------------- setup
def make_checkpoint(path: Path, image_size: list[int], encoder: str) -> Path:
    from bss.config import from_dict
    from bss.models import build_model
    from bss.training.checkpoint import save_checkpoint

    cfg = from_dict(
        {
            "image_size": image_size,
            "model": {"name": "UNetAttention", "args": {"encoder_name": encoder, "encoder_weights": None}},
            "tracking": {"enabled": False},
        }
    )
    return save_checkpoint(path, build_model(cfg.model).eval(), cfg, {}, 0)


def make_subset(source_root: Path, dataset: str, n: int, out_root: Path) -> str:
    """``bench<n>``: the hand-labelled images of ``dataset`` plus its first ``n`` box-only ones (hard links), split."""
    from bss.data.io import link_or_copy
    from bss.data.layout import SourceDataset
    from bss.data.splits import make_splits
    from bss.data.via import write_via_csv

    source = SourceDataset.open(dataset, source_root)
    box_only = source.box_only()
    if len(box_only) < n:
        raise SystemExit(f"{dataset} has only {len(box_only)} box-only images; lower --sizes")
    chosen = source.hand_labelled() + box_only[:n]
    name = f"bench{n}"
    folder = out_root / name
    for sub in ("images", "masks") + (("truth",) if source.truth_dir else ()):
        (folder / sub).mkdir(parents=True)
    rows = {}
    for s in chosen:
        link_or_copy(s.image, folder / "images" / s.image.name)
        link_or_copy(s.mask, folder / "masks" / s.mask.name)
        if source.truth_dir and (source.truth_dir / s.mask.name).exists():
            link_or_copy(source.truth_dir / s.mask.name, folder / "truth" / s.mask.name)
        rows[s.image.name] = [{"name": r.shape, **r.attrs} for r in source.labels.regions.get(s.image.name, [])]
    write_via_csv(folder / "labels.csv", rows)
    make_splits(name, out_root, progress=False)
    return name


# ------------------------------------------------------------------------------- child
def child(args) -> dict:
    import torch

    from bss.data.io import read_image
    from bss.data.layout import SourceDataset
    from bss.data.segmentation_dataset import resize_image, to_tensor
    from bss.hybrid import make_hybrid
    from bss.inference import default_workers
    from bss.training.checkpoint import load_model

    root, name = Path(args.data_root), args.dataset
    workers = default_workers() if args.workers is None else args.workers
    kwargs = dict(data_root=root, overwrite=True, batch_size=args.batch_size, num_workers=workers, progress=False)
    model, config = load_model(args.checkpoint)
    with torch.inference_mode():  # warm up the model (first calls allocate)
        model(torch.zeros(args.batch_size, 3, config.height, config.width))

    with PeakSampler() as mem:
        first = make_hybrid(name, args.checkpoint, number=1, **kwargs)
    n = first.manifest["counts"]["refined"]

    source = SourceDataset.open(name, root)
    refined = {row["image"] for row in first.manifest["images"] if row["origin"] == "refined"}
    images = [to_tensor(resize_image(read_image(s.image), config.height, config.width)) for s in source.samples if s.image.name in refined]
    batches = [torch.stack(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                torch.sigmoid(model(batch))

    def hybrid() -> None:
        make_hybrid(name, args.checkpoint, number=2, **kwargs)

    def timed(fn) -> tuple[float, float]:
        """(images/s, CPU ms per image, the process and its workers together)"""
        cpu, start = _cpu_seconds(), time.perf_counter()
        fn()
        return n / (time.perf_counter() - start), (_cpu_seconds() - cpu) * 1000 / n

    bare_runs, hybrid_runs = [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        bare_runs.append(timed(bare))
        hybrid_runs.append(timed(hybrid))
    bare_cpu, hybrid_cpu = min(c for _, c in bare_runs), min(c for _, c in hybrid_runs)
    bare_runs, hybrid_runs = [r for r, _ in bare_runs], [r for r, _ in hybrid_runs]
    return {
        "images": n,
        "bare_imgs_per_s": max(bare_runs),
        "hybrid_imgs_per_s": max(hybrid_runs),
        "ratio": max(hybrid_runs) / max(bare_runs),
        "bare_runs": bare_runs,
        "hybrid_runs": hybrid_runs,
        "peak_pss_mib": mem.peak / 1024,
        "pss_rise_mib": (mem.peak - mem.start) / 1024,
        "model": f"{config.model.name}/{config.model.args.get('encoder_name')} at {config.height}x{config.width}",
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "bare_cpu_ms_per_img": bare_cpu,
        "hybrid_cpu_ms_per_img": hybrid_cpu,
    }


# ------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400], help="numbers of box-only images")
    parser.add_argument("--checkpoint", help="model to refine with (default: a random UNetAttention/--encoder at --image-size)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--data-root", help="where --dataset lives (default: generate a synthetic one)")
    parser.add_argument("--dataset", default="obstacle")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, help="DataLoader workers of make_hybrid (default: bss.inference.default_workers())")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best is reported")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bss-bench-hybrid-") as tmp:
        tmp = Path(tmp)
        if args.data_root is None:
            from bss.data.synthetic import SynthConfig, generate_dataset

            count = max(args.sizes) + 40
            print(f"generating a synthetic obstacle dataset of {count} images (256x192) ...", flush=True)
            generate_dataset(SynthConfig("obstacle", "obstacle", count, 30, 256, 192, 0), tmp / "src", workers=2)
            source_root, dataset = tmp / "src", "obstacle"
        else:
            source_root, dataset = Path(args.data_root), args.dataset
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(tmp / "model.pt", args.image_size, args.encoder)
        results = []
        for n in args.sizes:
            name = make_subset(source_root, dataset, n, tmp / "sets")
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--data-root",
                str(tmp / "sets"),
                "--dataset",
                name,
                "--checkpoint",
                str(checkpoint),
                "--batch-size",
                str(args.batch_size),
                "--repeats",
                str(args.repeats),
            ] + (["--workers", str(args.workers)] if args.workers is not None else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                print(run.stderr, file=sys.stderr)
                return run.returncode
            row = json.loads(run.stdout.strip().splitlines()[-1])
            results.append(row)
            print(
                f"{row['images']:5d} images  bare loop {row['bare_imgs_per_s']:6.1f} img/s   make_hybrid {row['hybrid_imgs_per_s']:6.1f} img/s   "
                f"ratio {row['ratio']:.2f}   CPU ms/img {row['bare_cpu_ms_per_img']:.1f} vs {row['hybrid_cpu_ms_per_img']:.1f}   "
                f"peak PSS {row['peak_pss_mib']:.0f} MiB (+{row['pss_rise_mib']:.0f} during the call)   "
                f"[{row['model']}, batch {args.batch_size}, workers {row['workers']}, torch threads {row['torch_threads']}]",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
