"""Training throughput: a bss trial against a bare PyTorch loop, and peak memory against dataset size.

Throughput (default): a synthetic dataset (JPEG images and PNG masks, ``--source`` pixels) is
written to a temp folder; then, in this one process, one after the other and ``--repeats``
times (alternating which goes first), it runs

- **bss**: ``Trainer(config).fit()`` (cache, augmentation, DataLoader, device normalisation,
  loss, Adam, evaluation, checkpoint, overlays), timed by hooks;
- **bare**: the same model (same seed, same weights), loss, optimizer, batch size and device
  over the same images at training resolution, already normalised and batched in memory:
  ``zero_grad / forward / loss / backward / step``, then a forward pass over the EVAL images.

It prints the median images/s of the training phase (the epochs' training steps; the target is
bss/bare >= 0.95) and of the whole trial (Trainer construction + fit, against model build +
train + eval), the ratio of the medians and the median of the per-repeat ratios ("paired": each
bss run against the bare run next to it in time, which is what to read on a shared, noisy
machine). On a machine shared with other jobs, ``--threads 1`` keeps OpenMP from stalling on
descheduled threads (every parallel op waits for its slowest thread).

``--memory 200,2000``: for each size, a fresh process trains one epoch (tiny model) over that
many images and reports its peak RSS (VmHWM) and its anonymous RSS at the end.

    python bench/train_throughput.py                        # throughput, CPU, defaults below
    python bench/train_throughput.py --workers 0,1,2        # DataLoader workers, interleaved
    python bench/train_throughput.py --memory 200,2000      # peak memory vs dataset size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repo, after PYTHONPATH (to bench another tree)
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

import numpy as np  # noqa: E402
import torch  # noqa: E402


# ---- synthetic data --------------------------------------------------------------------------
def make_dataset(folder: Path, n: int, height: int, width: int, seed: int = 0) -> Path:
    """``folder/images/*.jpg`` + ``folder/masks/*.png``: noisy frames, one bright ellipse each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.08, 0.2) * height, rng.uniform(0.08, 0.2) * width
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1
        img = rng.normal(70, 15, size=(height, width, 3)) + 25 * np.sin(xx / 9.0)[..., None]
        img[mask] += 100
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / "images" / f"f{i:05d}.jpg", quality=90)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"f{i:05d}.png")
    return folder


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def bench_config(args, data_root: Path, out: Path, workers: int, **over):
    from bss.config import from_dict

    size = list(parse_size(args.size))
    model_args = {"encoder_name": args.encoder, "encoder_weights": None}
    if args.tiny:
        model_args.update({"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
    cfg = {
        "seed": 0,
        "epochs": args.epochs,
        "learning_rate": 1e-3,
        "batch_size": args.batch,
        "criterion": {"name": "TverskyLoss", "args": {"alpha": 0.3, "beta": 0.7}},
        "train_dataset": str(data_root / "bench_BASELINE"),
        "evaluation_dataset": str(data_root / "bench_EVAL"),
        "image_size": size,
        "model": {"name": "UNetAttention", "args": model_args},
        "val_per_epoch": 1,
        "visualization_samples": args.overlays,
        "data_root": str(data_root),
        "output_dir": str(out),
        "augment": not args.no_augment,
        "num_workers": workers,
        "device": args.device,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "tracking": {"enabled": False},
    }
    cfg.update(over)
    return from_dict(cfg)


# ---- the two sides ---------------------------------------------------------------------------
def run_bss(cfg) -> dict:
    """Trainer construction + fit; the training phase is fit's time outside evaluations,
    checkpoints, logging and overlays (timed through the evaluate hook and a callback)."""
    from bss.training.trainer import Trainer

    marks: dict[str, list[float]] = {"eval_start": [], "row": []}

    class TimedTrainer(Trainer):
        def evaluate(self, loader=None):
            marks["eval_start"].append(time.perf_counter())
            return super().evaluate(loader)

    t0 = time.perf_counter()
    trainer = TimedTrainer(cfg, output_dir=cfg.output_dir, callbacks=[lambda row: marks["row"].append(time.perf_counter())], progress=False)
    t_fit = time.perf_counter()
    result = trainer.fit()
    t_end = time.perf_counter()
    # training phase: fit start -> first evaluation, then each callback -> next evaluation
    train_seconds = marks["eval_start"][0] - t_fit + sum(b - a for a, b in zip(marks["row"], marks["eval_start"][1:]))
    steps_images = len(trainer.train_set) // cfg.batch_size * cfg.batch_size * cfg.epochs
    return {"train_seconds": train_seconds, "trial_seconds": t_end - t0, "images": steps_images, "final_loss": result.history[-1]["train_loss"]}


def bare_batches(cfg, device: torch.device):
    """The training and EVAL images at training resolution, normalised and batched on ``device``
    (decoded here once; no augmentation), as the bare loop sees them."""
    from bss.data.layout import list_samples
    from bss.data.segmentation_dataset import SegmentationDataset, to_tensor

    def batches(folder: str, drop_last: bool):
        ds = SegmentationDataset(folder, (cfg.height, cfg.width), augment=False, cache=False)
        pairs = [ds.load(i) for i in range(len(list_samples(folder)))]
        out = []
        for start in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[start : start + cfg.batch_size]
            if drop_last and len(chunk) < cfg.batch_size:
                break
            x = torch.stack([to_tensor(rgb) for rgb, _ in chunk]).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.stack([torch.from_numpy(m[None].astype(np.float32)) for _, m in chunk]).to(device)
            out.append((x, y))
        return out

    return batches(cfg.train_dataset, True), batches(cfg.evaluation_dataset, False)


def run_bare(cfg, train_batches, eval_batches, device: torch.device) -> dict:
    from bss.losses import build_loss
    from bss.models import build_model
    from bss.training.runtime import seed_everything

    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.criterion)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model.train()
    train_seconds = 0.0
    for _ in range(cfg.epochs):
        t = time.perf_counter()
        for x, y in train_batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            loss.backward()
            opt.step()
        loss = loss.detach()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t
        model.eval()
        with torch.inference_mode():
            for x, _ in eval_batches:
                model(x)
        model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "train_seconds": train_seconds,
        "trial_seconds": time.perf_counter() - t0,
        "images": len(train_batches) * cfg.batch_size * cfg.epochs,
        "final_loss": float(loss),
    }


# ---- throughput mode -------------------------------------------------------------------------
def throughput(args) -> dict:
    from bss.training.runtime import pick_device

    tmp = Path(tempfile.mkdtemp(prefix="bss-bench-"))
    os.environ["BSS_CACHE_DIR"] = str(tmp / "cache")
    src = parse_size(args.source)
    make_dataset(tmp / "data" / "bench_BASELINE", args.images, *src, seed=1)
    make_dataset(tmp / "data" / "bench_EVAL", args.eval_images, *src, seed=2)
    device = pick_device(args.device)
    workers_list = [int(w) for w in str(args.workers).split(",")]
    cfgs = {f"bss w={w}": bench_config(args, tmp / "data", tmp / f"run-w{w}", w) for w in workers_list}
    train_b, eval_b = bare_batches(next(iter(cfgs.values())), device)
    sides = list(cfgs) + ["bare"]
    results: dict[str, list[dict]] = {name: [] for name in sides}
    print(
        f"# {args.images} train + {args.eval_images} EVAL images {args.source} -> {args.size}, UNetAttention/{args.encoder}{' (tiny)' if args.tiny else ''}, batch {args.batch}, "
        f"{args.epochs} epoch(s), augment {not args.no_augment}, amp {args.amp}, channels_last {args.channels_last}, device {device}, torch threads {torch.get_num_threads()}"
    )
    for name in sides:  # warm-up: caches built, kernels chosen, allocator warm
        run_bss(cfgs[name]) if name != "bare" else run_bare(cfgs[next(iter(cfgs))], train_b, eval_b, device)
    for rep in range(args.repeats):
        order = sides if rep % 2 == 0 else sides[::-1]
        for name in order:
            r = run_bss(cfgs[name]) if name != "bare" else run_bare(cfgs[next(iter(cfgs))], train_b, eval_b, device)
            results[name].append(r)
    summary = {}
    bare_train = statistics.median(r["images"] / r["train_seconds"] for r in results["bare"])
    bare_trial = statistics.median(r["images"] / r["trial_seconds"] for r in results["bare"])
    print(
        f"{'side':<10} {'train img/s':>12} {'ratio':>6} {'paired':>7} {'trial img/s':>12} {'ratio':>6} {'paired':>7}   (medians of {args.repeats}; per-repeat train img/s)"
    )
    for name in sides:
        train = statistics.median(r["images"] / r["train_seconds"] for r in results[name])
        trial = statistics.median(r["images"] / r["trial_seconds"] for r in results[name])
        # paired: each repeat's bss against the bare run next to it in time (robust to drifting load)
        paired_train = statistics.median(
            (a["images"] / a["train_seconds"]) / (b["images"] / b["train_seconds"]) for a, b in zip(results[name], results["bare"])
        )
        paired_trial = statistics.median(
            (a["images"] / a["trial_seconds"]) / (b["images"] / b["trial_seconds"]) for a, b in zip(results[name], results["bare"])
        )
        summary[name] = {
            "train_images_per_s": train,
            "train_ratio": train / bare_train,
            "train_ratio_paired": paired_train,
            "trial_images_per_s": trial,
            "trial_ratio": trial / bare_trial,
            "trial_ratio_paired": paired_trial,
            "per_repeat_train": [r["images"] / r["train_seconds"] for r in results[name]],
        }
        reps = " ".join(f"{v:.1f}" for v in summary[name]["per_repeat_train"])
        print(f"{name:<10} {train:12.2f} {train / bare_train:6.3f} {paired_train:7.3f} {trial:12.2f} {trial / bare_trial:6.3f} {paired_trial:7.3f}   [{reps}]")
    return summary


# ---- memory mode -----------------------------------------------------------------------------
def _proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args) -> None:
    """One epoch over the dataset in ``args.data``; prints a JSON line with peak and anonymous RSS."""
    from bss.training.trainer import Trainer

    data = Path(args.data)
    cfg = bench_config(args, data, data / "run", int(str(args.workers).split(",")[0]), epochs=1, visualization_samples=0)
    before = _proc_status_mb("VmHWM")
    t = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    built = time.perf_counter() - t
    t = time.perf_counter()
    trainer.fit()
    print(
        json.dumps(
            {
                "images": len(trainer.train_set),
                "peak_rss_mb": _proc_status_mb("VmHWM"),
                "rss_anon_mb": _proc_status_mb("RssAnon"),
                "peak_before_mb": before,
                "init_s": built,
                "fit_s": time.perf_counter() - t,
            }
        )
    )


def memory(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bss-mem-"))
    src = parse_size(args.source)
    rows = {}
    for n in [int(v) for v in args.memory.split(",")]:
        data = tmp / f"n{n}"
        make_dataset(data / "bench_BASELINE", n, *src, seed=1)
        make_dataset(data / "bench_EVAL", 16, *src, seed=2)
        env = dict(os.environ, BSS_CACHE_DIR=str(data / "cache"))
        cmd = (
            [
                sys.executable,
                __file__,
                "--memory-child",
                "--data",
                str(data),
                "--size",
                args.size,
                "--source",
                args.source,
                "--encoder",
                args.encoder,
                "--batch",
                str(args.batch),
                "--device",
                args.device,
                "--workers",
                str(args.workers),
                "--threads",
                str(args.threads or 1),
            ]
            + (["--tiny"] if args.tiny else [])
            + (["--no-augment"] if args.no_augment else [])
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rows[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rows[n]
        print(
            f"{n:6d} images: peak RSS {r['peak_rss_mb']:8.1f} MB, anon RSS at end {r['rss_anon_mb']:8.1f} MB, "
            f"(peak after imports {r['peak_before_mb']:.1f} MB), Trainer() {r['init_s']:.1f} s, fit {r['fit_s']:.1f} s"
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="training images (default 64)")
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--source", default="192x256", help="source image HxW (default 192x256)")
    p.add_argument("--size", default="128x128", help="training HxW (default 128x128)")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--tiny", action="store_true", help="encoder depth 3, decoder 32/16/8 (fast; overhead shows more)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", default="0", help="DataLoader workers for bss; a comma list compares several, interleaved")
    p.add_argument("--overlays", type=int, default=0, help="visualization_samples for the bss trial (default 0)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--memory", default="", help="comma list of dataset sizes: peak RSS mode")
    p.add_argument(
        "--json", default="", help="the raw JSON summary (default bench/results/train_throughput.json, or train_throughput_memory.json with --memory)"
    )
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    summary = memory(args) if args.memory else throughput(args)
    out = Path(args.json or Path(__file__).resolve().parent / "results" / f"train_throughput{'_memory' if args.memory else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"raw JSON in {out}")


if __name__ == "__main__":
    main()
