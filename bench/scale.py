"""The loop at the seed's scale (issue 22): its stages at 300, 3,000 and 10,000 box-only images,
and make_hybrid in the driver against make_hybrid on a Ray cluster of local worker nodes.

    python bench/scale.py stages [--sizes 300 3000 10000] [--steps 40] [--json out.json]
    python bench/scale.py budget [--size 3000] [--steps 120] [--labelled 200] [--json out.json]
    python bench/scale.py ray [--sizes 300 3000] [--nodes 2] [--json out.json]

``stages``: for each size N, in a fresh process (so its peak memory is its own): a synthetic
obstacle dataset of N box-only 64x48 frames plus ``--labelled`` hand-labelled ones (fixed, so
BASELINE/EVAL/TEST do not grow; the seed has ~200 hand labels whatever its box count), then the
loop's stages, each timed with the process's peak RSS during it (``VmHWM``, reset before each
stage through ``/proc/self/clear_refs``):

* data check and splits: ``prepare_data`` (splits, every image and box decoded once, fingerprint,
  plan) and the EVAL boxes' own scores (``measure_boxes``), as the loop's first stage;
* teacher measurement: ``measure_teacher`` on EVAL (every rule of the default grid) with the toy teacher;
* H<n> refinement: ``make_hybrid`` with the default rule, in the driver; then the disk H1 takes
  beyond the source (``du`` of both in one call: hard-linked images are counted once) and how
  many of its images are hard links (``st_nlink``);
* decode cache: H1's decoded-once cache entry at the training size (``SegmentationDataset.prepare``);
* one trial: ``Trainer.fit`` on H1, the code a Ray trial runs, with the budget fixed in steps
  (``epochs: 1``, ``max_steps_per_epoch: --steps``, one EVAL evaluation), in this process, so
  its peak RSS is the trial's;
* TEST: ``evaluate_checkpoint`` of the trial's model on TEST;
* report: ``write_report`` (report.md/json/csv, metrics.png) of a two-iteration table;
* MLflow logging: what the loop logs of an H<n> (manifest, label quality, metrics, tag) and of a
  trial (params, its metrics) into a SQLite store.

The teacher is a randomly initialised toy UNet (resnet18, depth 3, 64x64): a forward pass costs the
same whatever the weights. torch runs ``--threads`` threads (default 1: the machine is shared).
The table gives each stage's time and peak RSS per size, and its growth factor: time at the
largest size / time at the smallest, divided by the ratio of the sizes (1: linear; about
``small/large``: constant).

``budget``: at ``--size`` box-only images, three trials of one model, data and seed that differ
only in their budget: ``--steps`` steps, one pass, and the CPU space's 8 passes (``train_steps:
120, epochs: 8``), trained on the box-only images with their exact masks (``truth/``: an H<n> of
perfect labels, so only the budget differs) plus BASELINE; EVAL and TEST IoU of each.

``ray``: make_hybrid in this process (``local``) and ``make_hybrid(address=...)`` on one cluster
(``ray start`` head with 0 CPUs + ``--nodes`` 1-CPU worker nodes, one token file, as
tests/cluster.py): one actor per worker node. Times are end to end (a Ray run includes joining
the cluster, starting the actors and loading the checkpoint on each). Both write the same masks
(checked). On a shared 2-core machine the worker nodes share the local path's cores: this
measures the overhead of the distribution, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
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


STAGES = ["data check and splits", "teacher measurement", "H<n> refinement", "decode cache", "one trial", "TEST", "report", "MLflow logging"]


def reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def status_mib(key: str) -> float:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Each stage's wall time and the process's peak RSS during it."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def __call__(self, name: str, fn):
        reset_peak()
        before = status_mib("VmRSS")
        cpu = cpu_seconds()
        start = time.perf_counter()
        out = fn()
        row = self.rows[name] = {
            "seconds": round(time.perf_counter() - start, 3),
            "cpu_seconds": round(cpu_seconds() - cpu, 3),  # this process's user + system time: less sensitive to a shared machine's load than wall time
            "peak_rss_mib": round(status_mib("VmHWM"), 1),
            "rss_before_mib": round(before, 1),
        }
        print(
            f"  {name:<22} {row['seconds']:8.2f} s (CPU {row['cpu_seconds']:7.2f} s)  peak RSS {row['peak_rss_mib']:7.1f} MiB (RSS {row['rss_before_mib']:7.1f} MiB before)",
            flush=True,
        )
        return out


def disk(source: Path, hybrid: Path) -> dict:
    """Disk ``hybrid`` takes beyond ``source`` (``du`` counts a hard-linked file once per call), its
    masks' own bytes, and how many of its images are hard links."""
    out = subprocess.run(["du", "-s", "-B1", str(source), str(hybrid)], capture_output=True, text=True, check=True).stdout.split()
    images = list((hybrid / "images").iterdir())
    masks = sum(p.stat().st_size for p in (hybrid / "masks").iterdir())
    linked = sum(1 for p in images if p.stat().st_nlink > 1)
    image_bytes = sum(p.stat().st_size for p in images)
    own = sum(p.stat().st_blocks * 512 for p in hybrid.rglob("*") if p.is_file() and p.parent.name != "images")  # masks (4 KiB blocks each), manifest
    return {
        "du_beyond_source_bytes": int(out[2]),
        "mask_bytes": masks,
        "allocated_not_images_bytes": own,
        "image_bytes": image_bytes,
        "images": len(images),
        "images_hard_linked": linked,
    }


def trial_config(name: str, root: Path, work: Path, steps: int, seed: int = 0) -> dict:
    model = {"name": "UNetAttention", "args": {"encoder_name": "resnet18", "encoder_weights": None, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}}
    return {
        "seed": seed,
        "epochs": 1,
        "max_steps_per_epoch": steps,
        "evaluations": 1,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "image_size": [64, 64],
        "model": model,
        "train_dataset": f"{name}_H1",
        "evaluation_dataset": f"{name}_EVAL",
        "data_root": str(root),
        "output_dir": str(work / "trial"),
        "visualization_samples": 0,
        "device": "cpu",
        "tracking": {"enabled": False},
    }


def mlflow_logging(work: Path, hybrid: Path, trial: dict) -> None:
    """What the loop logs of an H<n> (``log_hybrid``: manifest, label quality, metrics, tag) and of a trial (params, metrics per evaluation)."""
    from bss.tracking import Tracker

    tracker = Tracker.open(f"sqlite:///{work / 'mlflow.db'}", "scale", say=print)
    parent = tracker.create("iteration 0", None, {"bss.kind": "iteration"})
    tracker.artifact(parent, hybrid / "manifest.json", "hybrid")
    tracker.artifact(parent, hybrid / "label_quality.json", "hybrid")
    quality = json.loads((hybrid / "label_quality.json").read_text()) if (hybrid / "label_quality.json").is_file() else {}
    tracker.metrics(parent, {f"hybrid_{k}": v for k, v in quality.items()})  # the loop has them in its record; the manifest is never parsed
    tracker.tag(parent, "bss.hybrid", hybrid.name)
    child = tracker.create("trial 1", parent, {"bss.kind": "trial"})
    tracker.params(child, trial["config"])
    for step, row in enumerate(trial["history"]):
        tracker.metrics(child, {k: v for k, v in row.items() if isinstance(v, (int, float))}, step)
    tracker.end(child, "FINISHED")
    tracker.end(parent, "FINISHED")


def one_size(n: int, work: Path, labelled: int, frame: tuple[int, int], steps: int, threads: int) -> dict:
    """Every stage at one size, in this process."""
    import torch

    from bss.config import from_dict
    from bss.data.segmentation_dataset import SegmentationDataset
    from bss.data.synthetic import SynthConfig, generate_dataset
    from bss.hybrid import make_hybrid
    from bss.hybrid.teacher_quality import measure_teacher
    from bss.search.data_stage import measure_boxes, prepare_data
    from bss.search.evaluate import evaluate_checkpoint
    from bss.search.report import write_report
    from bss.search.settings import LoopSettings
    from bss.training.trainer import Trainer

    torch.set_num_threads(threads)
    os.environ["BSS_CACHE_DIR"] = str(work / "cache")
    root, name = work / "datasets", f"scale{n}"
    checkpoint = make_checkpoint(work / "teacher.pt")
    start = time.perf_counter()
    generate_dataset(SynthConfig(name=name, count=n + labelled, hand_labelled=labelled, width=frame[0], height=frame[1], seed=0), root, workers=1)
    generated = time.perf_counter() - start
    print(f"{n} box-only images: generated in {generated:.1f} s (setup, not a stage)", flush=True)
    settings = LoopSettings(dataset=name, data_root=str(root))
    stage = Stages()
    data = stage("data check and splits", lambda: (prepare_data(settings, 1, False, lambda line: None), measure_boxes(settings))[0])
    stage("teacher measurement", lambda: measure_teacher(checkpoint, name, root, threads=threads))
    hybrid = stage("H<n> refinement", lambda: make_hybrid(name, checkpoint, root, number=1, progress=False, threads=threads))
    space = disk(root / name, hybrid.path)
    cfg = from_dict(trial_config(name, root, work, steps))
    stage("decode cache", lambda: SegmentationDataset(hybrid.path, cfg.frame_size, augment=True, cache=True, seed=cfg.seed, student=cfg.student).prepare())
    fit = stage("one trial", lambda: Trainer(cfg, progress=False).fit())
    test = stage("TEST", lambda: evaluate_checkpoint(fit.checkpoint, f"{name}_TEST", root))
    rows = [
        {"iteration": i, "train_dataset": ds, "trials": 1, "trials_ok": 1, **{f"test_{k}": v for k, v in test.items()}}
        for i, ds in enumerate([f"{name}_BASELINE", hybrid.path.name])
    ]
    stage("report", lambda: write_report(rows, work / "report", f"scale {n}", ["bench/scale.py"]))
    trial = {"config": cfg.to_dict(), "history": getattr(fit, "history", None) or []}
    stage("MLflow logging", lambda: mlflow_logging(work, hybrid.path, trial))
    return {
        "box_only": data.box_only,
        "splits": data.counts,
        "generate_seconds": round(generated, 2),
        "stages": stage.rows,
        "disk": space,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_reset": reset_peak(),
        "trial_steps": steps,
        "threads": threads,
    }


def budget(args, work: Path) -> list[dict]:
    """At ``--size`` box-only images: a trial's budget capped in steps against full passes (the CPU
    space's 8), same model, data and seed; EVAL and TEST IoU of each."""
    import torch

    from bss.config import from_dict
    from bss.data.io import link_or_copy, parse_size
    from bss.data.layout import list_samples
    from bss.search.evaluate import evaluate_checkpoint
    from bss.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    os.environ["BSS_CACHE_DIR"] = str(work / "cache")
    root = work / "datasets"
    name = make_data(root, args.size, args.labelled, parse_size(args.frame, "--frame"))
    oracle = root / f"{name}_ORACLE"  # the box-only images with their exact masks (an H<n> of perfect labels) + BASELINE
    for sub in ("images", "masks"):
        (oracle / sub).mkdir(parents=True)
    held_out = {s.stem for split in ("EVAL", "TEST") for s in list_samples(root / f"{name}_{split}")}
    for sample in list_samples(root / name):
        if sample.stem not in held_out:
            link_or_copy(sample.image, oracle / "images" / sample.image.name)
            link_or_copy(root / name / "truth" / f"{sample.stem}.png", oracle / "masks" / f"{sample.stem}.png")
    images = len(list((oracle / "images").iterdir()))
    rows = []
    for i, (label, over) in enumerate(
        (
            (f"capped: {args.steps} steps", {"epochs": 1, "max_steps_per_epoch": args.steps}),
            ("capped: 1 pass", {"epochs": 1}),
            ("full: 8 passes (cpu.yaml)", {"epochs": 8, "train_steps": 120}),
        )
    ):
        cfg = dict(trial_config(name, root, work / f"run{i}", 0), evaluations=4, train_dataset=oracle.name, **over)  # steps 0: whole passes unless capped
        config = from_dict(cfg)
        start = time.perf_counter()
        fit = Trainer(config, progress=False).fit()
        seconds = time.perf_counter() - start
        test = evaluate_checkpoint(fit.checkpoint, f"{name}_TEST", root)
        steps = config.planned_epochs(images) * config.steps_per_epoch(images)
        row = {
            "budget": label,
            "images": images,
            "steps": steps,
            "seconds": round(seconds, 1),
            "eval_iou": round(fit.best_metrics["iou"], 4),
            "test_iou": round(test["iou"], 4),
        }
        rows.append(row)
        print(f"  {label:<28} {steps:6d} steps {seconds:7.1f} s   EVAL IoU {row['eval_iou']:.3f}   TEST IoU {row['test_iou']:.3f}", flush=True)
    return rows


def growth(rows: list[dict]) -> None:
    """The table: per stage, wall time, CPU time and peak RSS at each size, and the growth factors:
    wall and CPU time at the largest size / at the smallest, over the ratio of the sizes (1:
    linear, about small/large: constant), and CPU time between the two largest sizes (above 1:
    faster than linear where the fixed costs no longer hide it)."""
    a, b = rows[0], rows[-1]
    ratio = b["box_only"] / a["box_only"]
    sizes = [r["box_only"] for r in rows]
    print()
    head = f"{'stage':<22} " + " ".join(f"{f'{n} s':>9}" for n in sizes) + " " + " ".join(f"{f'{n} cpu':>9}" for n in sizes)
    print(head + " " + " ".join(f"{f'{n} MiB':>9}" for n in sizes) + f" {'growth':>7} {'cpu':>6} {'last2':>6}")
    for name in STAGES:
        wall = [r["stages"][name]["seconds"] for r in rows]
        cpu = [r["stages"][name].get("cpu_seconds", float("nan")) for r in rows]
        rss = [r["stages"][name]["peak_rss_mib"] for r in rows]
        last2 = cpu[-1] / max(cpu[-2], 1e-9) / (sizes[-1] / sizes[-2]) if len(rows) > 2 else float("nan")
        print(
            f"{name:<22} "
            + " ".join(f"{t:9.2f}" for t in wall + cpu)
            + " "
            + " ".join(f"{m:9.1f}" for m in rss)
            + f" {wall[-1] / max(wall[0], 1e-9) / ratio:7.3f} {cpu[-1] / max(cpu[0], 1e-9) / ratio:6.3f} {last2:6.3f}"
        )
    print(f"{'whole process':<22} " + " " * (20 * len(rows)) + " ".join(f"{r['peak_rss_mib']:9.1f}" for r in rows))
    for r in rows:
        d = r["disk"]
        print(
            f"H1 of {r['box_only']} box-only images: {d['du_beyond_source_bytes'] / 2**20:.2f} MiB on disk beyond the source "
            f"(masks and manifest: {d['allocated_not_images_bytes'] / 2**20:.2f} MiB allocated, masks {d['mask_bytes'] / 2**20:.2f} MiB of bytes; "
            f"images {d['image_bytes'] / 2**20:.2f} MiB, {d['images_hard_linked']}/{d['images']} hard-linked)"
        )


def stages(args) -> list[dict]:
    from bss.data.io import parse_size

    frame = parse_size(args.frame, "--frame")
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"bss-scale-{n}-") as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, __file__, "_one", str(n), "--work", tmp, "--out", str(out), "--labelled", str(args.labelled)]
            cmd += ["--frame", f"{frame[0]}x{frame[1]}", "--steps", str(args.steps), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(out.read_text()))
    if len(rows) >= 2:
        growth(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{stages,budget,ray}")
    st = sub.add_parser("stages", help="the loop's stages at each size")
    st.add_argument("--sizes", type=int, nargs="+", default=[300, 3000, 10000], help="box-only images per run")
    st.add_argument("--steps", type=int, default=40, help="optimizer steps of the trial (batch 8), whatever the size")
    st.add_argument("--threads", type=int, default=1, help="torch threads")
    one = sub.add_parser("_one")  # one size of `stages`, in its own process
    one.add_argument("size", type=int)
    one.add_argument("--work", required=True)
    one.add_argument("--out", required=True)
    one.add_argument("--steps", type=int, default=40)
    one.add_argument("--threads", type=int, default=1)
    bud = sub.add_parser("budget", help="a trial's budget capped in steps vs full passes, at one size")
    bud.add_argument("--size", type=int, default=3000, help="box-only images")
    bud.add_argument("--steps", type=int, default=120, help="the capped budget's optimizer steps (batch 8)")
    bud.add_argument("--threads", type=int, default=1, help="torch threads")
    ray = sub.add_parser("ray", help="make_hybrid in the driver vs on a local Ray cluster")
    ray.add_argument("--sizes", type=int, nargs="+", default=[300, 3000], help="box-only images per run")
    ray.add_argument("--nodes", type=int, default=2, help="1-CPU worker nodes of the local cluster")
    ray.add_argument("--batch-size", type=int, default=8)
    ray.add_argument("--threads", type=int, default=1, help="torch threads of the local path and of each Ray actor")
    for p in (st, one, bud, ray):
        p.add_argument("--frame", default="64x48", help="synthetic frame size WIDTHxHEIGHT")
        p.add_argument("--labelled", type=int, default=60 if p is not ray else 20, help="hand-labelled frames (BASELINE/EVAL/TEST), fixed")
        if p is not one:
            p.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.command == "_one":
        from bss.data.io import parse_size

        row = one_size(args.size, Path(args.work), args.labelled, parse_size(args.frame, "--frame"), args.steps, args.threads)
        Path(args.out).write_text(json.dumps(row))
        return
    print(
        f"{args.command}: {args.frame} frames, toy UNet at 64x64, {args.threads} torch thread(s); {os.cpu_count()} CPUs here; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.command == "stages":
        rows = stages(args)
    elif args.command == "budget":
        with tempfile.TemporaryDirectory(prefix="bss-budget-") as tmp:
            rows = budget(args, Path(tmp))
    else:
        with tempfile.TemporaryDirectory(prefix="bss-scale-") as tmp:
            rows = run(args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
