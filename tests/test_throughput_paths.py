"""The fast paths give the same tensors as the plain ones: the decoded-once cache, the raw uint8
view normalised on the device, per-item augmentation seeds; the cache stays within its bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import REPO, make_source_dataset, tiny_config_dict
from torch.utils.data import default_collate

from bss.data import cache as cache_mod
from bss.data.cache import ResizedCache, prune
from bss.data.segmentation_dataset import SegmentationDataset, train_augmentation
from bss.training.runtime import Runtime

SIZE = (64, 96)  # != the 64x64 sources: the cache holds resized arrays


@pytest.fixture
def folder(tmp_path):
    return make_source_dataset(tmp_path / "datasets", n=10, size=(80, 72))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_cached_equals_uncached_without_augmentation(folder, tmp_path):
    cached = SegmentationDataset(folder, SIZE, cache=True, cache_dir=tmp_path / "c")
    plain = SegmentationDataset(folder, SIZE, cache=False)
    for i in range(len(plain)):
        img, mask = cached[i]
        assert img.shape == (3, *SIZE) and img.dtype == torch.float32 and mask.shape == (1, *SIZE)
        assert _same(cached[i], plain[i])
    assert cached.resident_bytes == 0  # default: nothing held in the process, all from the cache file


def test_cached_equals_uncached_with_augmentation_same_seed(folder, tmp_path):
    cached = SegmentationDataset(folder, SIZE, augment=True, seed=5, cache=True, cache_dir=tmp_path / "c")
    plain = SegmentationDataset(folder, SIZE, augment=True, seed=5, cache=False)
    for _ in range(2):
        for i in range(len(plain)):
            assert _same(cached[i], plain[i])
    # per-item seeds: the same (index, seed) gives the same sample whatever was read before
    assert _same(cached[(3, 11)], plain[(3, 11)])
    first = cached[(3, 11)]
    cached[(4, 12)]
    assert _same(cached[(3, 11)], first)
    assert any(not _same(cached[(3, s)], first) for s in range(12, 20))


def test_raw_view_normalised_on_device_equals_item(folder, tmp_path):
    ds = SegmentationDataset(folder, SIZE, augment=True, seed=1, cache_dir=tmp_path / "c")
    raw = ds.as_raw()
    keys = [(i, 100 + i) for i in range(4)]
    images, masks = default_collate([raw[k] for k in keys])
    assert images.dtype == torch.uint8 and images.shape == (4, *SIZE, 3) and masks.shape == (4, *SIZE)
    expected = default_collate([ds[k] for k in keys])
    for channels_last in (False, True):
        got = Runtime(torch.device("cpu"), channels_last=channels_last).prepare_batch(images, masks)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_augmentation_transforms_fire_independently():
    """albumentations' Compose(seed=...) alone makes transforms with the same p fire together."""
    aug = train_augmentation(seed=0)
    aug.save_applied_params = True
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    combos = set()
    for _ in range(200):
        names = {n for n, _ in aug(image=img, mask=mask)["applied_transforms"]}
        combos.add(("HorizontalFlip" in names, "Affine" in names))
    assert combos == {(False, False), (False, True), (True, False), (True, True)}


def test_cache_is_reused_and_keyed_by_file_content(folder, tmp_path, monkeypatch):
    root = tmp_path / "c"
    SegmentationDataset(folder, SIZE, cache_dir=root).prepare()
    entries = [p for p in root.iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "images.npy").is_file()
    assert np.load(entries[0] / "images.npy", mmap_mode="r").shape == (10, *SIZE, 3)

    def no_decoding(self, index):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(SegmentationDataset, "decode", no_decoding)
        ds = SegmentationDataset(folder, SIZE, cache_dir=root)
        ds[0]  # read from the cache entry
    # another size, or an edited image, is another entry
    SegmentationDataset(folder, (32, 32), cache_dir=root).prepare()
    image = folder / "images" / "img_000.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    SegmentationDataset(folder, SIZE, cache_dir=root).prepare()
    assert len([p for p in root.iterdir() if p.is_dir()]) == 3


def test_memory_tier_respects_its_bound(folder, tmp_path):
    item = SIZE[0] * SIZE[1] * 4  # 3 image bytes + 1 mask byte per pixel
    for budget, held in ((0, 0), (3 * item + 5, 3), (10**9, 10)):
        ds = SegmentationDataset(folder, SIZE, cache_dir=tmp_path / "c", memory_bytes=budget)
        for i in range(len(ds)):
            ds[i]
        assert ds.resident_bytes == held * item <= budget
    # the memory-only cache (no disk) holds at most its bound and decodes the rest
    ds = SegmentationDataset(folder, SIZE, cache="memory", memory_bytes=4 * item)
    plain = SegmentationDataset(folder, SIZE, cache=False)
    for _ in range(2):
        for i in range(len(ds)):
            assert _same(ds[i], plain[i])
    assert ds.resident_bytes == 4 * item


def test_unwritable_cache_folder_falls_back_to_bounded_memory(folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="caching in memory only"):
        ds = SegmentationDataset(folder, SIZE, cache_dir=blocker / "cache", memory_bytes=0).prepare()
    assert _same(ds[2], SegmentationDataset(folder, SIZE, cache=False)[2]) and ds.resident_bytes == 0


def test_disk_budget_prunes_least_recently_used(folder, tmp_path):
    root = tmp_path / "c"
    for size in ((32, 32), (64, 64), (96, 96)):
        SegmentationDataset(folder, size, cache_dir=root).prepare()
    SegmentationDataset(folder, (32, 32), cache_dir=root).prepare()  # used again: now the most recent
    entries = {p.name.split("-")[0]: p for p in root.iterdir() if p.is_dir()}
    sizes = {k: sum(f.stat().st_size for f in p.iterdir()) for k, p in entries.items()}
    prune(root, sizes["32x32"] + sizes["96x96"])
    assert sorted(p.name.split("-")[0] for p in root.iterdir() if p.is_dir()) == ["32x32", "96x96"]


def test_entries_of_deleted_datasets_are_removed(tmp_path):
    import shutil

    root = tmp_path / "c"
    gone = make_source_dataset(tmp_path / "a", n=3)
    kept = make_source_dataset(tmp_path / "b", n=3)
    SegmentationDataset(gone, SIZE, cache_dir=root).prepare()
    SegmentationDataset(kept, SIZE, cache_dir=root).prepare()
    shutil.rmtree(gone)
    SegmentationDataset(kept, (32, 32), cache_dir=root).prepare()  # a build tidies the folder
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2


def test_concurrent_builders_share_one_entry(folder, tmp_path, monkeypatch):
    calls = []
    original = SegmentationDataset.decode
    monkeypatch.setattr(SegmentationDataset, "decode", lambda self, i: calls.append(i) or original(self, i))
    datasets = [SegmentationDataset(folder, SIZE, cache_dir=tmp_path / "c") for _ in range(3)]
    threads = [threading.Thread(target=ds.prepare) for ds in datasets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 10  # built once; the others waited on the lock and opened it
    assert all(_same(ds[7], datasets[0][7]) for ds in datasets)


def test_cache_survives_pickling_and_fork(folder, tmp_path):
    import pickle

    ds = SegmentationDataset(folder, SIZE, cache_dir=tmp_path / "c").prepare()
    clone = pickle.loads(pickle.dumps(ds))
    assert _same(clone[5], ds[5])
    assert isinstance(ds._store, ResizedCache)


def test_failed_build_leaves_no_entry(folder, tmp_path):
    (folder / "images" / "img_004.png").write_bytes(b"broken")
    ds = SegmentationDataset(folder, SIZE, cache_dir=tmp_path / "c")
    from bss.errors import DatasetError

    with pytest.raises(DatasetError, match="img_004.png"):
        ds[0]
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]


# ---- through the trainer ---------------------------------------------------------------------
@pytest.fixture
def split_root(data_root):
    from bss.data.splits import make_splits

    make_splits("toy", data_root, progress=False)
    return data_root


def _trainer(split_root, tmp_path, **over):
    from bss.config import from_dict
    from bss.training.trainer import Trainer

    return Trainer(from_dict(tiny_config_dict(split_root, tmp_path, **over)), progress=False)


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_augmented_batches_do_not_depend_on_workers(split_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BSS_CACHE_DIR", str(tmp_path / "cache"))
    trainer = _trainer(split_root, tmp_path, batch_size=2)
    loader0 = trainer._loader(trainer.train_set, shuffle=True)
    trainer.config.num_workers = 2
    loader2 = trainer._loader(trainer.train_set, shuffle=True)
    a0, b0 = _epoch(loader0), _epoch(loader0)
    a2, b2 = _epoch(loader2), _epoch(loader2)
    assert a0[0][0].dtype == torch.uint8
    assert all(_same(x, y) for x, y in zip(a0, a2)) and all(_same(x, y) for x, y in zip(b0, b2))
    assert not all(_same(x, y) for x, y in zip(a0, b0))  # the next epoch: new order and augmentation


def test_trainer_sums_losses_on_device(split_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BSS_CACHE_DIR", str(tmp_path / "cache"))
    trainer = _trainer(split_root, tmp_path)
    images, masks = next(iter(trainer._loader(trainer.train_set, shuffle=True)))
    loss = trainer.train_step(images, masks)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad and np.isfinite(float(loss))


def test_evaluate_matches_plain_metrics(split_root, tmp_path, monkeypatch):
    """The trainer's EVAL (uint8 frames normalised on the device, counted at native size, here the
    64x64 input's) gives SegmentationMetrics' figures on the normalised-float path."""
    from torch.utils.data import DataLoader

    from bss.metrics import SegmentationMetrics

    monkeypatch.setenv("BSS_CACHE_DIR", str(tmp_path / "cache"))
    trainer = _trainer(split_root, tmp_path)
    metrics = SegmentationMetrics(trainer.config.threshold)
    trainer.model.eval()
    with torch.inference_mode():
        for images, masks in DataLoader(trainer.eval_set, batch_size=3):  # the float items, no raw view
            metrics.update(trainer.model(images), masks)
    assert trainer.evaluate() == pytest.approx(metrics.compute(), abs=1e-12)


def test_gpu_check_cpu_path_runs(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--size",
            "64x64",
            "--steps",
            "2",
            "--quick",
            "--batch",
            "2",
            "--encoder",
            "resnet18",
            "--concurrent",
            "1",
            "--threads",
            "1",
            "--budget",
            "500",
            "--trainer-images",
            "8",
            "--trainer-repeats",
            "1",
            "--trainer-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"fp32", "amp", "amp+channels_last"} <= {row["name"] for row in report["single"]}
    # exit 0 means no part raised (see the next test); the figures are there
    assert all(row["images_per_s"] > 0 for row in report["single"]) and report["concurrent"]["1"]["images_per_s"] > 0
    assert set(report["trainer"]["sides"]) == {"bss w=0", "bare"}


def test_gpu_check_fails_when_a_variant_raises(tmp_path, monkeypatch, capsys):
    """A deliberately broken variant: the check records it, still runs the others, writes the
    report, and exits with status 1 naming it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    real = gpu_check.run_variant

    def broken_amp(args, device, name, **kw):
        if name == "amp":
            raise RuntimeError("deliberately broken variant")
        return real(args, device, name, **kw)

    monkeypatch.setattr(gpu_check, "run_variant", broken_amp)
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--device", "cpu", "--size", "64x64", "--steps", "1", "--warmup", "1", "--batch", "2", "--encoder", "resnet18"]
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv + ["--concurrent", "", "--trainer-images", "0", "--budget", "500"])
    assert stop.value.code == "gpu_check: 1 part(s) failed: amp: RuntimeError: deliberately broken variant"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in report["single"]}
    assert rows["amp"] == {"name": "amp", "error": "RuntimeError: deliberately broken variant"}
    assert all(rows[n]["images_per_s"] > 0 for n in ("fp32", "amp+channels_last", "bss path"))  # the others ran
    assert "amp" in capsys.readouterr().out


def test_cache_module_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("BSS_CACHE_DIR", str(tmp_path / "x"))
    monkeypatch.setenv("BSS_CACHE_MEMORY_MB", "2")
    assert cache_mod.default_cache_dir() == tmp_path / "x" and cache_mod.default_memory_bytes() == 2 * 2**20
