"""Splitting the hand-labelled subset: counts, determinism, exact masks, no overlap."""

from __future__ import annotations

import json

import pytest
from conftest import make_source_dataset

from bss.data.io import read_mask
from bss.data.splits import make_splits, split_counts
from bss.errors import BSSError, DatasetError


def members(root, split):
    return json.loads((root / f"toy_{split}" / "manifest.json").read_text())["images"]


def test_counts_and_disjoint(data_root):
    counts = make_splits("toy", data_root, (0.6, 0.2, 0.2), seed=1, progress=False)
    assert counts == {"BASELINE": 5, "EVAL": 2, "TEST": 2}  # 9 labelled images
    sets = [set(members(data_root, s)) for s in ("BASELINE", "EVAL", "TEST")]
    assert sum(map(len, sets)) == 9 and len(set.union(*sets)) == 9
    labelled = {f"img_{i:03d}.png" for i in range(9)}
    assert set.union(*sets) == labelled  # only hand-labelled images, never box-only ones
    for split, names in zip(("BASELINE", "EVAL", "TEST"), sets):
        assert {p.name for p in (data_root / f"toy_{split}" / "images").iterdir()} == names


def test_masks_are_drawn_from_polygons_not_boxes(data_root):
    make_splits("toy", data_root, progress=False)
    for name in members(data_root, "EVAL"):
        stem = name[:-4]
        drawn = read_mask(data_root / "toy_EVAL" / "masks" / f"{stem}.png")
        truth = read_mask(data_root / "toy" / "truth" / f"{stem}.png")
        box = read_mask(data_root / "toy" / "masks" / f"{stem}.png")
        iou = (drawn & truth).sum() / (drawn | truth).sum()
        assert iou > 0.9 and drawn.sum() < box.sum()


def test_deterministic_by_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        make_source_dataset(root, n=30, labelled=30)
        make_splits("toy", root, seed=7, progress=False)
    assert members(a, "TEST") == members(b, "TEST")
    make_splits("toy", b, seed=8, overwrite=True, progress=False)
    assert members(a, "TEST") != members(b, "TEST")


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_bad_fractions(fractions):
    with pytest.raises(BSSError, match="fractions"):
        split_counts(100, fractions)


def test_too_few_labels():
    with pytest.raises(DatasetError, match="at least 3"):
        split_counts(2, (0.6, 0.2, 0.2))
    assert split_counts(3, (0.6, 0.2, 0.2)) == (1, 1, 1)
    assert split_counts(200, (0.7, 0.15, 0.15)) == (140, 30, 30)
