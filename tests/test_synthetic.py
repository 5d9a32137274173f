"""The procedural sewer dataset: format, labels vs truth, determinism, argument checks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bss.data.io import read_image, read_mask
from bss.data.layout import SourceDataset
from bss.data.synthetic import DEFECTS, SynthConfig, generate_dataset, parse_size, render_frame
from bss.data.via import rasterize
from bss.errors import BSSError

REPO = Path(__file__).resolve().parents[1]
W, H = 96, 64
COUNT, LABELLED = 12, 4


def _make(root: Path, defect="obstacle", seed=0, name=None, count=COUNT, labelled=LABELLED, workers=1, overwrite=False):
    cfg = SynthConfig(name or defect, defect, count, labelled, W, H, seed)
    return generate_dataset(cfg, root, overwrite=overwrite, workers=workers)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One small dataset of every defect class (one of them rendered by two worker processes)."""
    root = tmp_path_factory.mktemp("synthetic")
    for defect in DEFECTS:
        _make(root, defect, workers=2 if defect == "obstacle" else 1)
    return root


def _truth(ds: SourceDataset, stem: str) -> np.ndarray:
    return read_mask(ds.truth_dir / f"{stem}.png")


def _boxes_of(truth_instances: list[np.ndarray], shape) -> np.ndarray:
    boxes = np.zeros(shape, np.uint8)
    for inst in truth_instances:
        x, y, w, h = cv2.boundingRect(inst)
        boxes[y : y + h, x : x + w] = 1
    return boxes


@pytest.mark.parametrize("defect", DEFECTS)
def test_dataset_format(datasets, defect):
    ds = SourceDataset.open(defect, datasets)
    assert len(ds.samples) == COUNT
    assert len(ds.hand_labelled()) == LABELLED
    assert len(ds.box_only()) == COUNT - LABELLED
    assert ds.truth_dir is not None
    params = json.loads((ds.root / "generator.json").read_text())
    assert params["defect"] == defect and params["count"] == COUNT and params["size"] == [W, H]
    assert params["seed"] == 0 and params["hand_labelled"] == LABELLED and "version" in params
    with_defect = 0
    for sample in ds.samples:
        image = read_image(sample.image)
        box = read_mask(sample.mask)
        truth = _truth(ds, sample.stem)
        assert image.shape == (H, W, 3) and box.shape == truth.shape == (H, W)
        assert image.std() > 10, "a frame should not be flat"
        with_defect += bool(truth.any())
        assert truth.any() == box.any()
    assert with_defect >= COUNT - 3  # a few frames (~7%) show no defect
    # every frame has a row in labels.csv; defect-free frames never carry a label
    assert len(ds.labels.regions) == COUNT
    for sample in ds.hand_labelled():
        assert _truth(ds, sample.stem).any()
    assert not [p for p in ds.root.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("defect", DEFECTS)
def test_box_mask_is_union_of_instance_boxes(datasets, defect):
    ds = SourceDataset.open(defect, datasets)
    labelled = set(s.stem for s in ds.hand_labelled())
    for sample in ds.samples:
        truth = _truth(ds, sample.stem)
        box = read_mask(sample.mask)
        assert not (truth & (1 - box)).any(), "truth must lie inside the boxes"
        # every box pixel lies in the bounding box of a truth blob (touching instances merge into one blob)
        n, blobs = cv2.connectedComponents(truth)
        assert not (box & (1 - _boxes_of([(blobs == i).astype(np.uint8) for i in range(1, n)], (H, W)))).any()
        if sample.stem in labelled:
            # with the instance polygons known, the mask is exactly the union of their boxes
            instances = [rasterize([r], H, W) for r in ds.labels.regions[sample.image.name]]
            np.testing.assert_array_equal(box, _boxes_of(instances, (H, W)))


@pytest.mark.parametrize("defect", DEFECTS)
def test_frame_boxes_match_instances(defect):
    for index in range(6):
        frame = render_frame(defect, W, H, 3, index)
        instances = []
        for poly in frame.polygons:
            inst = np.zeros((H, W), np.uint8)
            cv2.fillPoly(inst, [np.asarray(poly, np.int32)], 1)
            instances.append(inst)
        np.testing.assert_array_equal(frame.boxes, _boxes_of(instances, (H, W)))
        union = np.zeros((H, W), np.uint8)
        for inst in instances:
            union |= inst
        np.testing.assert_array_equal(frame.truth, union)


@pytest.mark.parametrize("defect", DEFECTS)
def test_polygons_agree_with_truth(datasets, defect):
    ds = SourceDataset.open(defect, datasets)
    for sample in ds.hand_labelled():
        regions = ds.labels.regions[sample.image.name]
        assert all(r.shape == "polygon" for r in regions)
        drawn = rasterize(regions, H, W, sample.image.name)
        truth = _truth(ds, sample.stem)
        iou = (drawn & truth).sum() / max((drawn | truth).sum(), 1)
        assert iou > 0.9, f"{sample.stem}: polygon IoU {iou:.3f}"


def test_defects_vary_in_size_and_boxes_are_coarse():
    areas, fills = [], []
    for index in range(40):
        frame = render_frame("obstacle", 128, 96, 0, index)
        if frame.truth.any():
            areas.append(frame.truth.mean())
            fills.append(frame.truth.sum() / frame.boxes.sum())
    assert min(areas) < 0.06 and max(areas) > 0.12
    assert np.median(fills) < 0.85


def test_deterministic(tmp_path, datasets):
    _make(tmp_path, "obstacle", seed=0, workers=1)  # the fixture's copy was rendered by two workers
    a, b = datasets / "obstacle", tmp_path / "obstacle"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between two runs"
    # a frame depends on (seed, index), not on how many frames are made
    np.testing.assert_array_equal(read_image(a / "images/syn_00003.png"), render_frame("obstacle", W, H, 0, 3).image)
    _make(tmp_path, "obstacle", seed=1, name="other")
    c = tmp_path / "other"
    assert (a / "images/syn_00000.png").read_bytes() != (c / "images/syn_00000.png").read_bytes()
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()


def test_refuses_to_overwrite(tmp_path):
    _make(tmp_path, "obstacle", count=3, labelled=1, name="ds")
    before = (tmp_path / "ds/images/syn_00000.png").read_bytes()
    with pytest.raises(BSSError, match="already exists"):
        _make(tmp_path, "deformation", count=3, labelled=1, name="ds")
    assert (tmp_path / "ds/images/syn_00000.png").read_bytes() == before
    _make(tmp_path, "deformation", count=5, labelled=1, name="ds", overwrite=True)
    assert json.loads((tmp_path / "ds/generator.json").read_text())["defect"] == "deformation"
    assert len(list((tmp_path / "ds/images").iterdir())) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folder left behind


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"count": 0}, "--count"),
        ({"hand_labelled": 13}, "exceeds --count"),
        ({"hand_labelled": -1}, "--hand-labelled"),
        ({"width": 0}, "positive"),
        ({"height": -64}, "positive"),
        ({"width": 8}, "too small"),
        ({"defect": "crack"}, "unknown defect"),
        ({"name": "a/b"}, "plain folder name"),
        ({"area_scale": 0.0}, "--area-scale 0 must be above 0"),
        ({"area_scale": 3.0}, "--area-scale 3 must be above 0 and at most 2"),
    ],
)
def test_bad_arguments(tmp_path, changes, message):
    cfg = SynthConfig(**{"name": "x", "defect": "obstacle", "count": COUNT, "hand_labelled": 4, "width": W, "height": H, "seed": 0, **changes})
    with pytest.raises(BSSError, match=message):
        generate_dataset(cfg, tmp_path, workers=1)
    assert not list(tmp_path.iterdir()), "a refused run writes nothing"


def test_too_many_hand_labels_for_defect_frames(tmp_path):
    # every frame is a candidate, but defect-free ones cannot carry a label: ask for all of them
    frames = [render_frame("obstacle", W, H, 0, i) for i in range(40)]
    count = next(i for i, f in enumerate(frames) if not f.polygons) + 1
    with pytest.raises(BSSError, match="have a defect"):
        generate_dataset(SynthConfig("x", "obstacle", count, count, W, H, 0), tmp_path, workers=1)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["256", "256x", "x192", "256*192", "axb", ""])
def test_parse_size_rejects(text):
    with pytest.raises(BSSError, match="WIDTHxHEIGHT"):
        parse_size(text)


def test_parse_size():
    assert parse_size("256x192") == (256, 192)
    assert parse_size("352X288") == (352, 288)


def _best_threshold_iou(values: np.ndarray, truth: np.ndarray) -> float:
    """Best IoU of 'value >= t' or 'value <= t' over every threshold t."""
    best = 0.0
    total = truth.sum()
    for v in (values, -values):
        hits = truth[np.argsort(-v, kind="stable")].astype(np.int64)
        tp = np.cumsum(hits)
        best = max(best, float((tp / (np.arange(1, len(hits) + 1) + total - tp)).max()))
    return best


def _best_colour_table_iou(images: np.ndarray, truths: np.ndarray, bins: int = 8) -> float:
    """Best IoU of any classifier that looks only at a pixel's (quantised) RGB colour."""
    q = images.astype(np.int64) // (256 // bins)
    cell = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).ravel()
    pos = np.bincount(cell[truths.ravel() > 0], minlength=bins**3)
    tot = np.bincount(cell, minlength=bins**3)
    order = np.argsort(-(pos / np.maximum(tot, 1)))  # the purest colours first
    tp, k = np.cumsum(pos[order]), np.cumsum(tot[order])
    return float((tp / (k + pos.sum() - tp)).max())


@pytest.mark.parametrize("defect", DEFECTS)
def test_not_findable_by_colour_alone(defect):
    frames = [render_frame(defect, 128, 96, 0, i) for i in range(16)]
    images = np.stack([f.image for f in frames])
    truths = np.stack([f.truth for f in frames])
    assert truths.any()
    # one colour lookup table for the whole set: the best any per-pixel colour rule can do
    assert _best_colour_table_iou(images, truths) < 0.5
    # even an oracle that picks the best brightness/channel threshold for each frame separately
    per_frame = []
    for f in frames:
        if f.truth.any():
            channels = [f.image[..., c].astype(np.float32).ravel() for c in range(3)] + [f.image.mean(-1).ravel()]
            per_frame.append(max(_best_threshold_iou(v, f.truth.ravel()) for v in channels))
    assert np.mean(per_frame) < 0.5


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "drivers/make_synthetic.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli(tmp_path):
    run = _cli("--name", "deposition", "--count", "10", "--hand-labelled", "3", "--size", f"{W}x{H}", "--data-root", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and " s" in run.stdout
    ds = SourceDataset.open("deposition", tmp_path)
    assert len(ds.samples) == 10 and len(ds.hand_labelled()) == 3
    assert json.loads((ds.root / "generator.json").read_text())["defect"] == "deposition"
    # the name picks the defect only when it is one; otherwise the default is obstacle
    run = _cli("--name", "mine", "--count", "2", "--hand-labelled", "1", "--size", f"{W}x{H}", "--data-root", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "mine/generator.json").read_text())["defect"] == "obstacle"


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "256by192"],
        ["--count", "0"],
        ["--count", "5", "--hand-labelled", "6"],
        ["--size", "0x100"],
    ],
)
def test_cli_bad_args_exit_2(tmp_path, args):
    run = _cli("--data-root", str(tmp_path), *args, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "Traceback" not in run.stderr
    assert not list(tmp_path.iterdir())


def test_cli_refuses_existing(tmp_path):
    args = ["--count", "2", "--hand-labelled", "1", "--size", f"{W}x{H}", "--data-root", str(tmp_path)]
    assert _cli(*args, cwd=tmp_path).returncode == 0
    run = _cli(*args, cwd=tmp_path)
    assert run.returncode == 2 and "already exists" in run.stderr and "--overwrite" in run.stderr
    assert _cli(*args, "--overwrite", cwd=tmp_path).returncode == 0


def test_area_scale_shrinks_the_defects_of_the_same_scenes(tmp_path):
    """--area-scale keeps the scenes (the same frames have a defect) and shrinks the defects'
    area about in proportion; 1 is the default, byte for byte."""
    frames = {scale: [render_frame("obstacle", 256, 192, 0, i, area_scale=scale) for i in range(8)] for scale in (1.0, 0.2)}
    default = [render_frame("obstacle", 256, 192, 0, i) for i in range(8)]
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.truth, b.truth) for a, b in zip(default, frames[1.0]))
    big, small = (np.array([f.truth.sum() for f in frames[s]], float) for s in (1.0, 0.2))
    has = big > 0
    assert np.array_equal(has, small > 0), "the same frames have a defect"
    ratio = float(np.median(small[has] / big[has]))
    assert 0.1 < ratio < 0.35, ratio  # area x0.2 (the fitted shapes land near, not on, their targets)
    small_set = generate_dataset(SynthConfig("s", "obstacle", 4, 2, W, H, 0, area_scale=0.2), tmp_path, workers=1)
    default_set = generate_dataset(SynthConfig("d", "obstacle", 4, 2, W, H, 0), tmp_path, workers=1)
    assert json.loads((small_set.folder / "generator.json").read_text())["area_scale"] == 0.2
    assert "area_scale" not in json.loads((default_set.folder / "generator.json").read_text())


def test_make_synthetic_area_scale_flag(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "drivers/make_synthetic.py",
            "--name",
            "tiny",
            "--count",
            "3",
            "--hand-labelled",
            "1",
            "--size",
            "96x64",
            "--area-scale",
            "0.3",
            "--workers",
            "1",
            "--data-root",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "defect area x0.3" in out.stdout
    assert json.loads((tmp_path / "tiny" / "generator.json").read_text())["area_scale"] == 0.3
    bad = subprocess.run(
        [
            sys.executable,
            "drivers/make_synthetic.py",
            "--name",
            "bad",
            "--count",
            "3",
            "--hand-labelled",
            "1",
            "--area-scale",
            "-1",
            "--data-root",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--area-scale -1 must be above 0" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
