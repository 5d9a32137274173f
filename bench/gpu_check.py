"""GPU readiness check: training images/s of UNetAttention on synthetic tensors, one GPU.

Needs torch, segmentation_models_pytorch and this repo's ``bss`` package (no dataset files, no
albumentations, no Ray). Prints a compact table and, when ``$OUT`` is set, writes it to
``$OUT/gpu_check.json``. Everything is time-boxed by ``--budget`` (default 400 s).

Single process (batch ``--batch`` at ``--size``, a full Adam training step each):

- ``fp32 (cudnn.benchmark off)``, ``fp32`` : plain float32 (cuDNN convolutions use TF32, torch's default)
- ``amp``                    : autocast bf16 (fp16 + GradScaler where bf16 is not native)
- ``amp+channels_last``      : and NHWC memory format
- ``amp+channels_last+fused Adam`` : the trainer's optimizer on CUDA (one fused kernel)
- ``bss path``               : as ``amp+channels_last+fused Adam`` through ``bss.training.runtime.Runtime`` fed as
  the trainer feeds it: uint8 NHWC batches from pinned host memory, non-blocking copies,
  normalised on the GPU; ``bss path, blocking copy`` the same with pageable memory, blocking copies
- ``fp16+scaler+channels_last`` : the path of GPUs without bf16
- ``amp+channels_last+compile`` : with ``--compile``, in a subprocess killed after ``--compile-timeout``

bss Trainer against a bare loop (``--trainer-images``): the real ``Trainer.fit()`` (cache,
DataLoader with 0 and 4 workers, device normalisation, evaluation, checkpoint) on synthetic
JPEGs written to a temp folder, against the bare loop of ``bench/train_throughput.py``.

A part that raises is recorded with its error and the others still run, but the check then
exits with status 1 naming every failed part (skipped for the time budget is not a failure).

Concurrent trials (Ray's ``gpu: 0.25`` puts 4 trials on one GPU): ``--concurrent 1,4`` starts
that many training processes (amp+channels_last) on the same GPU, releases them together and
sums their images/s.

    python bench/gpu_check.py                      # the full check, < ~7 min on an H100
    python bench/gpu_check.py --quick              # fewer steps
    python bench/gpu_check.py --device cpu --size 64x64 --steps 2 --quick --concurrent 1,2 --threads 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repo's bss package
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def build(args, device, channels_last: bool, fused: bool = False):
    from bss.config import NamedArgs
    from bss.losses import build_loss
    from bss.models import build_model

    torch.manual_seed(0)
    model = build_model(NamedArgs("UNetAttention", {"encoder_name": args.encoder, "encoder_weights": None})).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    loss_fn = build_loss(NamedArgs("TverskyLoss", {"alpha": 0.3, "beta": 0.7}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    return model, loss_fn, opt


def synthetic(args, device, n_batches: int = 2):
    """uint8 NHWC images and uint8 masks on the host (as the trainer's raw loader yields them)."""
    h, w = parse_size(args.size)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_batches, args.batch, h, w, 3), dtype=torch.uint8, generator=g)
    masks = (torch.rand((n_batches, args.batch, h, w), generator=g) > 0.8).to(torch.uint8)
    return images, masks


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(device) -> torch.dtype:
    from bss.training.runtime import amp_dtype_for

    return amp_dtype_for(device)


def run_variant(
    args,
    device,
    name: str,
    amp: torch.dtype | None,
    channels_last: bool,
    bss_path: bool = False,
    pinned: bool = True,
    cudnn_benchmark: bool = True,
    compile_model: bool = False,
    fused: bool = False,
    steps: int | None = None,
    warmup: int | None = None,
) -> dict:
    """Time ``steps`` training steps after ``warmup``; returns images/s and peak memory."""
    from bss.training.runtime import Runtime

    steps = steps or args.steps
    warmup = args.warmup if warmup is None else warmup
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, loss_fn, opt = build(args, device, channels_last, fused)
    if compile_model:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    runtime = Runtime(device, amp, channels_last, False, scaler, cudnn_benchmark=cudnn_benchmark, non_blocking=pinned, pin_memory=pinned)
    host_images, host_masks = synthetic(args, device)
    if bss_path:  # fed as the trainer's DataLoader feeds it
        if device.type == "cuda" and pinned:
            host_images, host_masks = host_images.pin_memory(), host_masks.pin_memory()
        batches = [(host_images[i], host_masks[i]) for i in range(len(host_images))]
    else:  # bare: normalised float tensors already on the device
        batches = [runtime.prepare_batch(host_images[i], host_masks[i]) for i in range(len(host_images))]

    def step(i: int) -> torch.Tensor:
        images, masks = batches[i % len(batches)]
        if bss_path:
            images, masks = runtime.prepare_batch(images, masks)
        opt.zero_grad(set_to_none=True)
        with runtime.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), masks)
        runtime.backward_step(loss, opt)
        return loss.detach()

    t = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    total = torch.zeros((), device=device)
    for i in range(steps):
        total += step(i)
    sync(device)
    seconds = time.perf_counter() - t
    finite = bool(torch.isfinite(total))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = {
        "name": name,
        "images_per_s": steps * args.batch / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "warmup_s": warm_s,
        "peak_gib": peak,
        "loss_finite": finite,
        "amp": str(amp).replace("torch.", "") if amp else None,
        "channels_last": channels_last,
        "cudnn_benchmark": cudnn_benchmark,
    }
    model = opt = batches = None  # free the GPU memory before the next case
    return row


def worker(args) -> None:
    """One process of the concurrency test (or the compile variant): build, warm up, report
    ready, wait for the go file, train, print a JSON line."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    amp = amp_dtype(device)
    if args.worker == "compile":
        row = run_variant(args, device, "amp+channels_last+compile", amp, True, compile_model=True, fused=device.type == "cuda", warmup=max(args.warmup, 3))
        print("RESULT " + json.dumps(row), flush=True)
        return
    from bss.training.runtime import Runtime

    torch.backends.cudnn.benchmark = True
    model, loss_fn, opt = build(args, device, True)
    runtime = Runtime(device, amp, True, False, torch.amp.GradScaler(device.type) if amp == torch.float16 else None)
    host_images, host_masks = synthetic(args, device)
    batches = [runtime.prepare_batch(host_images[i], host_masks[i]) for i in range(len(host_images))]

    def step(i):
        images, masks = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = loss_fn(model(images).float(), masks)
        runtime.backward_step(loss, opt)

    for i in range(args.warmup):
        step(i)
    sync(device)
    Path(args.ready).touch()
    go = Path(args.go)
    deadline = time.time() + 300
    while not go.exists() and time.time() < deadline:
        time.sleep(0.005)
    start = time.time()
    for i in range(args.steps):
        step(i)
    sync(device)
    end = time.time()
    print(
        "RESULT " + json.dumps({"start": start, "end": end, "images": args.steps * args.batch, "images_per_s": args.steps * args.batch / (end - start)}),
        flush=True,
    )


def worker_cmd(args, kind: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--device",
        args.device,
        "--size",
        args.size,
        "--batch",
        str(args.batch),
        "--encoder",
        args.encoder,
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ] + extra


def concurrent(args, n: int, steps: int, timeout: float) -> dict:
    """``n`` training processes on one device, released together; aggregate images/s."""
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    go = tmp / "go"
    procs = []
    for k in range(n):
        cmd = worker_cmd(args, "train", ["--steps", str(steps), "--ready", str(tmp / f"ready{k}"), "--go", str(go)])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.perf_counter() + timeout
    while not all((tmp / f"ready{k}").exists() for k in range(n)):
        if time.perf_counter() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            errs = [p.communicate()[1][-800:] for p in procs]
            raise RuntimeError(f"{n} concurrent workers did not all get ready: {errs}")
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=max(10.0, deadline - time.perf_counter()))
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"worker failed: {err[-1500:]}")
        results.append(json.loads(lines[-1][7:]))
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    images = sum(r["images"] for r in results)
    return {"processes": n, "images_per_s": images / (end - start), "per_process": [round(r["images_per_s"], 2) for r in results], "seconds": end - start}


def trainer_section(args, device) -> dict:
    """The bss Trainer (amp, channels_last, augment off: albumentations need not be installed)
    against the bare loop of bench/train_throughput.py, on a synthetic JPEG dataset at ``--size``,
    interleaved; train-phase and whole-trial images/s and their ratios."""
    import statistics
    from types import SimpleNamespace

    import train_throughput as tt

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-data-"))
    os.environ["BSS_CACHE_DIR"] = str(tmp / "cache")
    h, w = parse_size(args.size)
    t = time.perf_counter()
    tt.make_dataset(tmp / "data" / "bench_BASELINE", args.trainer_images, h, w, seed=1)
    tt.make_dataset(tmp / "data" / "bench_EVAL", 32, h, w, seed=2)
    log(f"trainer section: {args.trainer_images} + 32 JPEGs written in {time.perf_counter() - t:.1f} s")
    ns = SimpleNamespace(
        size=args.size,
        encoder=args.encoder,
        tiny=False,
        epochs=2,
        batch=args.batch,
        overlays=0,
        no_augment=True,
        device=args.device,
        amp=True,
        channels_last=True,
    )
    sides = {f"bss w={n}": tt.bench_config(ns, tmp / "data", tmp / f"run{n}", n) for n in args.trainer_workers}
    train_b, eval_b = tt.bare_batches(next(iter(sides.values())), device)
    names = list(sides) + ["bare"]
    runs: dict[str, list[dict]] = {n: [] for n in names}

    def one(name):
        return tt.run_bss(sides[name]) if name != "bare" else tt.run_bare(next(iter(sides.values())), train_b, eval_b, device)

    for name in names:  # warm-up (cache build, cudnn autotune)
        one(name)
    for rep in range(args.trainer_repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            runs[name].append(one(name))
    out = {}
    bare_train = statistics.median(r["images"] / r["train_seconds"] for r in runs["bare"])
    bare_trial = statistics.median(r["images"] / r["trial_seconds"] for r in runs["bare"])
    for name in names:
        train = statistics.median(r["images"] / r["train_seconds"] for r in runs[name])
        trial = statistics.median(r["images"] / r["trial_seconds"] for r in runs[name])
        out[name] = {"train_images_per_s": train, "train_ratio": train / bare_train, "trial_images_per_s": trial, "trial_ratio": trial / bare_trial}
    train_b = eval_b = None  # free the GPU memory
    return {"images": args.trainer_images, "epochs": 2, "repeats": args.trainer_repeats, "sides": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="512x704", help="HxW (default 512x704, the seed's size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--steps", type=int, default=0, help="timed steps per variant (default 30, --quick 12)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 8, --quick 4)")
    p.add_argument("--concurrent", default="1,4", help="process counts for the aggregate test ('' skips it)")
    p.add_argument("--concurrent-steps", type=int, default=0, help="steps per process (default 40, --quick 15)")
    p.add_argument("--trainer-images", type=int, default=256, help="bss Trainer vs bare loop on this many synthetic JPEGs (0 skips it)")
    p.add_argument("--trainer-workers", default="0,4", help="DataLoader workers of the Trainer runs")
    p.add_argument("--trainer-repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (in a subprocess, time-boxed)")
    p.add_argument("--compile-timeout", type=float, default=240)
    p.add_argument("--budget", type=float, default=400, help="seconds; later sections are skipped past it")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--ready", default="", help=argparse.SUPPRESS)
    p.add_argument("--go", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.trainer_workers = [int(v) for v in str(args.trainer_workers).split(",") if v.strip()]
    if args.quick:
        args.trainer_images, args.trainer_repeats = min(args.trainer_images, 64), min(args.trainer_repeats, 1)
    args.steps = args.steps or (12 if args.quick else 30)
    args.warmup = args.warmup or (4 if args.quick else 8)
    args.concurrent_steps = args.concurrent_steps or (min(args.steps, 15) if args.quick else 40)
    if args.worker:
        return worker(args)

    device = torch.device(args.device)
    report: dict = {
        "device": args.device,
        "size": args.size,
        "batch": args.batch,
        "encoder": args.encoder,
        "torch": torch.__version__,
        "single": [],
        "concurrent": {},
        "skipped": [],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_native=amp_dtype(device) == torch.bfloat16,
            tf32_conv=torch.backends.cudnn.allow_tf32,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    try:
        import segmentation_models_pytorch as smp

        report["smp"] = smp.__version__
    except ImportError:
        raise SystemExit("segmentation_models_pytorch is not installed: pip install segmentation-models-pytorch")
    log(f"device {report.get('gpu', args.device)}, torch {torch.__version__}, size {args.size}, batch {args.batch}, UNetAttention/{args.encoder}")
    amp = amp_dtype(device)
    variants = [
        ("fp32 (cudnn.benchmark off)", dict(amp=None, channels_last=False, cudnn_benchmark=False)),
        ("fp32", dict(amp=None, channels_last=False)),
        ("fp32+channels_last", dict(amp=None, channels_last=True)),
        ("amp", dict(amp=amp, channels_last=False)),
        ("amp+channels_last", dict(amp=amp, channels_last=True)),
        ("amp+channels_last+fused Adam", dict(amp=amp, channels_last=True, fused=True)),
        ("bss path", dict(amp=amp, channels_last=True, bss_path=True, fused=True)),
        ("bss path, blocking copy", dict(amp=amp, channels_last=True, bss_path=True, pinned=False, fused=True)),
        ("fp16+scaler+channels_last", dict(amp=torch.float16, channels_last=True)),
    ]
    if device.type != "cuda":  # no cuDNN, no pinned memory, fp16 autocast is slow emulation on CPU, fused Adam is CUDA's
        variants = [v for v in variants if v[0] in ("fp32", "amp", "amp+channels_last", "bss path")]
    for name, kw in variants:
        if time.perf_counter() - T_START > args.budget * 0.5:
            report["skipped"].append(name)
            continue
        try:
            row = run_variant(args, device, name, **kw)
        except Exception as exc:  # noqa: BLE001 - record and go on (one broken variant must not cost the others); the exit status says it
            row = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        report["single"].append(row)
        log(json.dumps(row))

    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the concurrent processes
    counts = [int(c) for c in args.concurrent.split(",") if c.strip()]
    for n in counts:
        left = args.budget - (time.perf_counter() - T_START)
        if left < 30:
            report["skipped"].append(f"concurrent {n}")
            continue
        try:
            report["concurrent"][str(n)] = concurrent(args, n, args.concurrent_steps, timeout=min(left, 240))
        except Exception as exc:  # noqa: BLE001
            report["concurrent"][str(n)] = {"processes": n, "error": str(exc)[-600:]}
        log(f"concurrent {n}: {json.dumps(report['concurrent'][str(n)])}")

    if args.trainer_images:
        if args.budget - (time.perf_counter() - T_START) < 90:
            report["skipped"].append("trainer")
        else:
            try:
                report["trainer"] = trainer_section(args, device)
            except Exception as exc:  # noqa: BLE001
                import traceback

                report["trainer"] = {"error": f"{type(exc).__name__}: {exc}"[:600], "trace": traceback.format_exc()[-1500:]}
            log(f"trainer: {json.dumps(report['trainer'])}")

    if args.compile:
        left = args.budget - (time.perf_counter() - T_START)
        if left < 60:
            report["skipped"].append("compile")
        else:
            cmd = worker_cmd(args, "compile", ["--steps", str(args.steps)])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.compile_timeout, left - 10))
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {"name": "amp+channels_last+compile", "error": proc.stderr[-600:]}
            except subprocess.TimeoutExpired:
                row = {"name": "amp+channels_last+compile", "error": f"timed out after {min(args.compile_timeout, left - 10):.0f} s"}
            report["single"].append(row)
            log(json.dumps(row))

    report["wall_s"] = round(time.perf_counter() - T_START, 1)
    print_table(report)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'gpu_check.json'}")
    failed = failures(report)
    if failed:  # every part was tried and recorded; the run still fails, so no broken part passes unseen
        raise SystemExit(f"gpu_check: {len(failed)} part(s) failed: " + "; ".join(failed))


def failures(report: dict) -> list[str]:
    """The parts of a report that raised (a variant, a concurrent count, the Trainer section):
    ``name: error``. Parts skipped for the time budget are not failures."""
    out = [f"{r['name']}: {r['error'][:200]}" for r in report["single"] if "error" in r]
    out += [f"concurrent {n}: {r['error'][-200:]}" for n, r in report["concurrent"].items() if "error" in r]
    if "error" in report.get("trainer", {}):
        out.append(f"trainer: {report['trainer']['error'][:200]}")
    return out


def print_table(report: dict) -> None:
    print()
    print(f"## {report.get('gpu', report['device'])}: UNetAttention/{report['encoder']}, {report['size']}, batch {report['batch']}, torch {report['torch']}")
    print(f"{'variant':<30} {'img/s':>9} {'ms/step':>9} {'peak GiB':>9}")
    base = next((r["images_per_s"] for r in report["single"] if r.get("name") == "fp32" and "images_per_s" in r), None)
    for r in report["single"]:
        if "error" in r:
            print(f"{r['name']:<30} error: {r['error'][:200]}")
            continue
        rel = f"  x{r['images_per_s'] / base:.2f} vs fp32" if base else ""
        print(f"{r['name']:<30} {r['images_per_s']:9.1f} {r['ms_per_step']:9.1f} {r['peak_gib']:9.2f}{rel}")
    one = report["concurrent"].get("1", {}).get("images_per_s")
    for n, r in report["concurrent"].items():
        if "error" in r:
            print(f"{n} concurrent trial(s): error: {r['error'][:300]}")
            continue
        rel = f"  x{r['images_per_s'] / one:.2f} vs 1" if one else ""
        print(f"{n} concurrent trial(s) (amp+channels_last): aggregate {r['images_per_s']:.1f} img/s, per process {r['per_process']}{rel}")
    tr = report.get("trainer")
    if tr and "sides" in tr:
        print(f"bss Trainer vs bare loop ({tr['images']} images x {tr['epochs']} epochs, amp+channels_last, augment off; median of {tr['repeats']}):")
        for name, r in tr["sides"].items():
            print(
                f"  {name:<10} train {r['train_images_per_s']:8.1f} img/s (x{r['train_ratio']:.3f})   whole trial {r['trial_images_per_s']:8.1f} img/s (x{r['trial_ratio']:.3f})"
            )
    elif tr:
        print(f"bss Trainer: error: {tr['error']}")
    if report["skipped"]:
        print(f"skipped (time budget): {', '.join(report['skipped'])}")
    print(f"wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
