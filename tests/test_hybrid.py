"""Hybrid datasets: the refinement rule on hand-made masks, and make_hybrid end to end
(no EVAL/TEST leakage, atomic write, manifest, label quality, bad input)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_source_dataset, train_oracle_teacher
from PIL import Image

from bss.data.io import read_mask, write_mask
from bss.data.splits import make_splits
from bss.data.via import write_via_csv
from bss.errors import BSSError, ConfigError, DatasetError
from bss.hybrid import RefineRule, make_hybrid, measure_folder, next_number, refine
from bss.hybrid.refine import REFINE_MODES, Param, Refined, RefineMode, describe, ellipse_in, rule_parameters
from bss.training.checkpoint import read_checkpoint


# ---------------------------------------------------------------------------------- the rule
def _box(shape, *rects):
    m = np.zeros(shape, np.uint8)
    for x0, y0, x1, y1 in rects:
        m[y0:y1, x0:x1] = 1
    return m


def test_prediction_is_kept_only_inside_the_boxes():
    box = _box((40, 60), (10, 10, 30, 30))
    prob = np.zeros((40, 60), np.float32)
    prob[15:25, 12:40] = 0.9  # half inside the box, half outside
    prob[0:5, 50:60] = 0.95  # a blob far from every box
    out = refine(prob, box, RefineRule(min_fill=0.1))
    expected = np.zeros_like(box)
    expected[15:25, 12:30] = 1
    assert np.array_equal(out.mask, expected)
    (stat,) = out.boxes
    assert stat.bbox == [10, 10, 30, 30] and stat.area == 400
    assert stat.fill == pytest.approx(180 / 400) and not stat.fallback


def test_low_fill_falls_back_to_the_box_or_the_ellipse():
    box = _box((40, 40), (5, 5, 35, 25))  # 30 wide, 20 high
    prob = np.zeros((40, 40), np.float32)
    prob[10:14, 10:20] = 0.8  # 40 of 600 pixels: fill 0.0667
    kept = refine(prob, box, RefineRule(min_fill=0.05))
    assert kept.mask.sum() == 40 and not kept.boxes[0].fallback
    as_box = refine(prob, box, RefineRule(min_fill=0.3, fallback="box"))
    assert np.array_equal(as_box.mask, box) and as_box.boxes[0].fallback and as_box.fallbacks == 1
    as_ellipse = refine(prob, box, RefineRule(min_fill=0.3, fallback="ellipse"))
    assert as_ellipse.mask[box == 0].sum() == 0
    assert abs(as_ellipse.mask.sum() - np.pi / 4 * 600) < 12  # the inscribed ellipse's area
    assert as_ellipse.mask[15, 20] == 1 and as_ellipse.mask[5, 5] == 0  # centre in, corner out


def test_threshold_decides_what_counts_as_foreground():
    box = _box((20, 20), (0, 0, 20, 20))
    prob = np.full((20, 20), 0.1, np.float32)
    prob[:, :10] = 0.6
    assert refine(prob, box, RefineRule(threshold=0.5, min_fill=0.3)).mask.sum() == 200
    low = refine(prob, box, RefineRule(threshold=0.05, min_fill=0.3))
    assert low.mask.sum() == 400 and low.boxes[0].fill == 1.0
    high = refine(prob, box, RefineRule(threshold=0.7, min_fill=0.3))  # nothing predicted -> the box
    assert high.boxes[0].fill == 0.0 and high.boxes[0].fallback and high.mask.sum() == 400


def test_several_boxes_are_judged_one_by_one():
    box = _box((50, 80), (5, 5, 25, 25), (40, 10, 70, 40), (60, 42, 75, 48), (75, 48, 80, 50))
    prob = np.zeros((50, 80), np.float32)
    prob[8:22, 8:22] = 0.9  # box 1 well predicted: kept as predicted
    prob[12:14, 42:45] = 0.9  # box 2 barely seen (6 of 900): falls back
    prob[42:48, 60:75] = 0.9  # box 3 fully predicted
    out = refine(prob, box, RefineRule(min_fill=0.4))
    stats = {tuple(s.bbox): s for s in out.boxes}
    # the last two boxes touch only at a corner: separate regions under 4-connectivity
    assert set(stats) == {(5, 5, 25, 25), (40, 10, 70, 40), (60, 42, 75, 48), (75, 48, 80, 50)}
    assert stats[(5, 5, 25, 25)].fill == pytest.approx(196 / 400) and not stats[(5, 5, 25, 25)].fallback
    assert stats[(40, 10, 70, 40)].fallback and stats[(75, 48, 80, 50)].fallback
    assert not stats[(60, 42, 75, 48)].fallback
    assert out.mask[5:25, 5:25].sum() == 196 and out.mask[10:40, 40:70].sum() == 900
    assert out.fallbacks == 2 and out.mask[box == 0].sum() == 0


def test_overlapping_boxes_form_one_region():
    box = _box((30, 30), (2, 2, 15, 15), (10, 10, 25, 25))
    out = refine(np.zeros((30, 30), np.float32), box, RefineRule())
    (stat,) = out.boxes
    assert stat.bbox == [2, 2, 25, 25] and stat.area == int(box.sum()) and stat.fallback
    ellipse = refine(np.zeros((30, 30), np.float32), box, RefineRule(fallback="ellipse")).mask
    assert ellipse[box == 0].sum() == 0 and 0 < ellipse.sum() < box.sum()


def test_no_box_means_an_empty_mask():
    out = refine(np.full((10, 10), 0.99, np.float32), np.zeros((10, 10), np.uint8), RefineRule())
    assert out.mask.sum() == 0 and out.boxes == []


def test_fill_holes_closes_a_ring_prediction():
    box = _box((30, 30), (5, 5, 25, 25))
    prob = np.zeros((30, 30), np.float32)
    prob[8:22, 8:22] = 0.9
    prob[12:18, 12:18] = 0.0
    assert refine(prob, box, RefineRule()).mask.sum() == 196 - 36
    assert refine(prob, box, RefineRule(fill_holes=True)).mask.sum() == 196


def test_blend_mode_is_the_seeds_rule():
    box = _box((10, 10), (0, 0, 5, 10))
    prob = np.zeros((10, 10), np.float32)
    prob[:, 3:8] = 0.5
    prob[:, 8:] = 0.8
    # alpha 0.5, threshold 0.5: every box pixel with p > 0 -> the box, outside needs p > 1
    seed = refine(prob, box, RefineRule(mode="blend", blend_alpha=0.5))
    assert np.array_equal(seed.mask[:, 3:], np.pad(np.ones((10, 2), np.uint8), ((0, 0), (0, 5))))
    # alpha 0.3: inside needs p > 2/7, outside p > 5/7
    mixed = refine(prob, box, RefineRule(mode="blend", blend_alpha=0.3, soft=True))
    assert mixed.mask[:, :3].sum() == 0 and mixed.mask[:, 3:5].all() and mixed.mask[:, 5:8].sum() == 0 and mixed.mask[:, 8:].all()
    assert mixed.soft[0, 4] == pytest.approx(0.3 + 0.7 * 0.5) and mixed.soft[0, 9] == pytest.approx(0.56)


def test_soft_label_of_inside_box_mode():
    box = _box((10, 20), (0, 0, 10, 10), (12, 0, 20, 10))
    prob = np.zeros((10, 20), np.float32)
    prob[:, :8] = 0.7
    prob[:, 10:12] = 0.9  # outside the boxes
    out = refine(prob, box, RefineRule(soft=True, min_fill=0.5))
    assert out.soft[0, 0] == pytest.approx(0.7) and out.soft[0, 9] == 0.0 and out.soft[0, 10] == 0.0
    assert (out.soft[:, 12:] == 1.0).all()  # the empty second box fell back: certain foreground


def test_rule_parameters_are_validated_and_serialise():
    with pytest.raises(ConfigError, match="mode"):
        RefineRule(mode="crf")
    with pytest.raises(ConfigError, match="threshold"):
        RefineRule(threshold=1.5)
    with pytest.raises(ConfigError, match="min_fill"):
        RefineRule(min_fill=-0.1)
    with pytest.raises(ConfigError, match="fallback"):
        RefineRule(fallback="circle")
    rule = RefineRule(min_fill=0.3, fallback="ellipse")
    assert RefineRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    with pytest.raises(ConfigError, match="unknown refine rule key"):
        RefineRule.from_dict({"min_fil": 0.3})


def test_rule_dicts_of_earlier_runs_load_and_describe_themselves():
    stored = {  # a rule as state.json and hybrid manifests hold it (written before the mode registry)
        "mode": "grabcut",
        "threshold": 0.3,
        "min_fill": 0.2,
        "fallback": "box",
        "fill_holes": False,
        "blend_alpha": 0.5,
        "sure": 0.95,
        "grabcut_iterations": 4,
        "soft": False,
    }
    rule = RefineRule.from_dict(stored)
    # the same keys in the same order; 'background' (added later) takes its default 0: no background seed, as the rule then did
    written = {**{k: v for k, v in stored.items() if k not in ("grabcut_iterations", "soft")}, "background": 0.0, "grabcut_iterations": 4, "soft": False}
    assert json.dumps(rule.to_dict()) == json.dumps(written)
    assert RefineRule.from_dict({**stored, "description": "GrabCut inside the boxes ..."}) == rule  # a manifest's rule
    assert RefineRule.from_dict({"mode": "inside_box", "min_fill": 0.1}) == RefineRule(min_fill=0.1)
    assert describe(stored) == rule.describe() == "grabcut, threshold 0.3, min_fill 0.2, fallback box, sure 0.95, background 0, grabcut_iterations 4"
    assert RefineRule(fill_holes=True, soft=True).describe() == "inside_box, threshold 0.5, min_fill 0.4, fallback box, fill_holes, soft"
    assert RefineRule(mode="blend", blend_alpha=0.25).describe() == "blend, threshold 0.5, blend_alpha 0.25"
    assert RefineRule(mode="blend", blend_alpha=0.25).explain() == "mask = 0.25 * box + 0.75 * probability > 0.5"
    with pytest.raises(ConfigError, match=r"'mode' must be one of inside_box, grabcut, blend, got 'crf'"):
        RefineRule.from_dict({**stored, "mode": "crf"})
    with pytest.raises(ConfigError, match=r"'grabcut_iterations' must be a whole number, got 2.5"):
        RefineRule(mode="grabcut", grabcut_iterations=2.5)
    assert RefineRule(threshold=0.95).sure == 0.9  # 'sure' is checked against the threshold only where it is read (grabcut)
    assert rule.replace(sure=0.99).sure == 0.99 and rule.sure == 0.95 and len({rule, RefineRule.from_dict(stored)}) == 1
    with pytest.raises(AttributeError, match="immutable"):
        rule.threshold = 0.1


class ShrunkBox(RefineMode):
    """A mode made for the test: every box shrunk by ``margin`` pixels (the prediction is not used)."""

    name = "shrunk_box"
    help = "every box shrunk by margin pixels"
    params = {"margin": Param(1, "pixels taken off each side of a box", low=0)}
    search = {"margin": (1, 2)}

    @classmethod
    def apply(cls, rule, prob, box, image):
        import cv2

        size = 2 * rule.margin + 1
        return Refined(cv2.erode(box.astype(np.uint8), np.ones((size, size), np.uint8), borderValue=0), None, [])

    @classmethod
    def explain(cls, rule):
        return f"every box shrunk by {rule.margin} pixels"


def test_a_new_mode_is_one_registered_class(monkeypatch):
    from bss.hybrid.teacher_quality import choose_rule, default_grid

    monkeypatch.setitem(REFINE_MODES, ShrunkBox.name, ShrunkBox)
    box = _box((20, 20), (2, 2, 12, 12))
    rule = RefineRule(mode="shrunk_box", margin=2)
    assert np.array_equal(refine(np.zeros((20, 20), np.float32), box, rule).mask, _box((20, 20), (4, 4, 10, 10)))
    assert rule.describe() == "shrunk_box, threshold 0.5, margin 2" and rule.explain() == "every box shrunk by 2 pixels"
    assert RefineRule.from_dict(rule.to_dict()) == rule and list(rule.to_dict())[-1] == "margin"
    assert RefineRule.from_dict({"mode": "inside_box", "min_fill": 0.3}).margin == 1  # an older dict: the default
    with pytest.raises(ConfigError, match="'margin' must be at least 0, got -1"):
        RefineRule(mode="shrunk_box", margin=-1)
    param, users = rule_parameters()["margin"]
    assert users == ["shrunk_box"] and param.argparse("margin", users, len(REFINE_MODES))["help"].startswith("shrunk_box: pixels")
    grid = default_grid()
    assert len(grid) == 158 and [r.margin for r in grid[-2:]] == [1, 2] and grid[-1].mode == "shrunk_box"
    truth = _box((20, 20), (3, 3, 11, 11))  # the box less one pixel each side: only shrunk_box margin 1 gets it exactly
    quality = choose_rule([np.full((20, 20), 0.2, np.float32)], [box], [truth], images=[np.zeros((20, 20, 3), np.uint8)])
    assert quality.best.rule == RefineRule(mode="shrunk_box", margin=1) and quality.label_iou == 1.0


def test_grabcut_gives_the_same_mask_whatever_opencvs_generator_did_before():
    """GrabCut draws its first colour models from OpenCV's generator; refine seeds it, so the
    state left by earlier calls (another image, another rule) does not change a mask."""
    import cv2

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3)).astype(np.uint8)  # colours with no clear clusters: the start matters
    prob = rng.uniform(0, 1, (48, 48)).astype(np.float32)
    box = _box((48, 48), (4, 4, 44, 44))
    rule = RefineRule(mode="grabcut", threshold=0.5, min_fill=0.0, grabcut_iterations=2)

    def unseeded(state):  # OpenCV's own call, after the generator was left at ``state``
        seeds = np.where(box > 0, np.where(prob > 0.9, cv2.GC_FGD, np.where(prob > 0.5, cv2.GC_PR_FGD, cv2.GC_PR_BGD)), cv2.GC_BGD).astype(np.uint8)
        cv2.setRNGSeed(state)
        cv2.grabCut(image, seeds, None, np.zeros((1, 65)), np.zeros((1, 65)), 2, cv2.GC_INIT_WITH_MASK)
        return int(np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).sum())

    assert len({unseeded(state) for state in range(6)}) > 1  # without a seed, the result depends on the generator
    masks = []
    for state in range(6):
        cv2.setRNGSeed(state)
        masks.append(refine(prob, box, rule, image=image).mask)
    assert all(np.array_equal(masks[0], m) for m in masks[1:])


def test_one_iou_for_label_quality_overlays_and_metrics():
    from bss.hybrid.label_quality import iou
    from bss.metrics import mask_counts, scores_from_counts
    from bss.visualization import mask_iou

    label, truth = _box((10, 10), (0, 0, 6, 5)), _box((10, 10), (3, 0, 9, 5))  # 30 and 30 pixels, 15 shared
    row = mask_counts(label, truth)
    assert row == [15, 15, 15, 55]
    assert iou(row) == mask_iou(label, truth) == float(scores_from_counts(torch.tensor(row))["iou"]) == pytest.approx(1 / 3)
    empty = np.zeros((4, 4), np.uint8)
    assert iou(mask_counts(empty, empty)) == mask_iou(empty, empty) == 1.0  # nothing to find, nothing found
    assert mask_iou(label, np.zeros_like(label)) == 0.0


def test_ellipse_in_is_symmetric_and_inscribed():
    e = ellipse_in(9, 15)
    assert e[4].all() and e[:, 7].all() and not e[0, 0] and np.array_equal(e, e[::-1, ::-1])


# ------------------------------------------------------------------------------ make_hybrid
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy dataset (24 images, 10 hand-labelled) split into BASELINE/EVAL/TEST, and a teacher.

    The teacher learns from the exact masks of every image (a stand-in for a good model), so
    its refined labels must come much closer to the truth than the boxes.
    """
    tmp = tmp_path_factory.mktemp("hybrid")
    root = tmp / "datasets"
    source = make_source_dataset(root, n=24, labelled=10)
    make_splits("toy", root, progress=False)
    checkpoint = train_oracle_teacher(root, source, tmp / "teacher", epochs=6)
    result = make_hybrid("toy", checkpoint, root, progress=False)
    return root, checkpoint, result


def _stems(folder):
    return {p.stem for p in folder.iterdir()}


def test_hybrid_holds_box_only_and_baseline_never_eval_or_test(world):
    root, _, result = world
    assert result.path == root / "toy_H1" and result.number == 1
    images, masks = _stems(result.path / "images"), _stems(result.path / "masks")
    box_only = {f"img_{i:03d}" for i in range(10, 24)}
    baseline = _stems(root / "toy_BASELINE" / "images")
    held_out = _stems(root / "toy_EVAL" / "images") | _stems(root / "toy_TEST" / "images")
    assert len(baseline) == 6 and len(held_out) == 4
    assert images == masks == box_only | baseline
    assert not images & held_out
    leakage = result.manifest["leakage"]
    assert set(leakage["excluded_images"]) == held_out and leakage["eval_or_test_images_included"] == 0
    assert set(leakage["excluded_splits"]) == {"toy_EVAL", "toy_TEST"}
    for stem in baseline:  # BASELINE keeps its exact masks
        assert np.array_equal(read_mask(result.path / "masks" / f"{stem}.png"), read_mask(root / "toy_BASELINE" / "masks" / f"{stem}.png"))
    for stem in box_only:  # refined masks never leave the boxes
        assert read_mask(result.path / "masks" / f"{stem}.png")[read_mask(root / "toy" / "masks" / f"{stem}.png") == 0].sum() == 0


def test_refined_labels_are_closer_to_the_truth_than_the_boxes(world):
    root, _, result = world
    q = result.label_quality
    assert q["images"] == 14
    assert q["hybrid_iou_per_image"] > q["box_iou_per_image"] + 0.1
    assert q["hybrid_iou_pixels"] > q["box_iou_pixels"] + 0.1
    # the same numbers recomputed from the files on disk
    again = measure_folder(result.path, root / "toy")
    for key in ("box_iou_per_image", "box_iou_pixels", "hybrid_iou_per_image", "hybrid_iou_pixels"):
        assert again[key] == pytest.approx(q[key])
    saved = json.loads((result.path / "label_quality.json").read_text())
    assert saved["hybrid_iou_pixels"] == pytest.approx(q["hybrid_iou_pixels"])


def test_manifest_records_source_checkpoint_rule_counts_and_per_image_stats(world):
    root, checkpoint, result = world
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["source"] == str((root / "toy").resolve())
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert manifest["checkpoint"]["path"] == str(checkpoint.resolve())
    assert manifest["rule"]["mode"] == "inside_box" and manifest["rule"]["min_fill"] == RefineRule().min_fill
    counts = manifest["counts"]
    assert (counts["images"], counts["refined"], counts["baseline"], counts["excluded_eval"], counts["excluded_test"]) == (20, 14, 6, 2, 2)
    refined = [row for row in manifest["images"] if row["origin"] == "refined"]
    assert counts["boxes"] == sum(len(r["boxes"]) for r in refined) == 14
    assert counts["fallback_boxes"] == sum(b["fallback"] for r in refined for b in r["boxes"])
    for row in refined:
        stem = row["image"][:-4]
        box = read_mask(root / "toy" / "masks" / f"{stem}.png")
        hybrid = read_mask(result.path / "masks" / f"{stem}.png")
        assert row["changed_fraction"] == pytest.approx((box != hybrid).mean(), abs=1e-5)
        (b,) = row["boxes"]
        x0, y0, x1, y1 = b["bbox"]
        assert b["area"] == box.sum() == (x1 - x0) * (y1 - y0)
        if not b["fallback"]:
            assert b["fill"] == pytest.approx(hybrid.sum() / box.sum(), abs=1e-4)


def test_images_are_hard_linked_not_copied(world):
    root, _, result = world
    a, b = root / "toy" / "images" / "img_015.png", result.path / "images" / "img_015.png"
    assert os.stat(a).st_ino == os.stat(b).st_ino


def test_next_number_existing_number_and_overwrite(world):
    root, checkpoint, result = world
    assert next_number("toy", root) == 2
    before = (result.path / "manifest.json").read_text()
    with pytest.raises(BSSError, match="already exists"):
        make_hybrid("toy", checkpoint, root, number=1, progress=False)
    assert (result.path / "manifest.json").read_text() == before
    again = make_hybrid("toy", checkpoint, root, number=1, overwrite=True, rule=RefineRule(min_fill=1.0), progress=False)
    try:
        assert again.path == result.path and again.manifest["rule"]["min_fill"] == 1.0
        # min_fill 1: every box region not entirely predicted falls back -> (almost) the boxes
        assert again.label_quality["hybrid_iou_pixels"] < result.label_quality["hybrid_iou_pixels"]
    finally:
        make_hybrid("toy", checkpoint, root, number=1, overwrite=True, progress=False)
    with pytest.raises(BSSError, match="positive integer"):
        make_hybrid("toy", checkpoint, root, number=0, progress=False)


def _folder_bytes(folder):
    """Every file of a hybrid folder, by relative path; the manifest parsed, less its timing."""
    out = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(out.pop("manifest.json"))
    assert isinstance(manifest.pop("seconds"), float)
    return out, manifest


def _stop_at(monkeypatch, calls: int, action):
    """make.refine runs ``action`` at its ``calls``-th call (a kill point); returns the call counter."""
    import bss.hybrid.make as make

    seen = {"n": 0, "stop": calls}
    real = make.refine

    def refine(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == seen["stop"]:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(make, "refine", refine)
    return seen


def _interrupt():
    raise KeyboardInterrupt


def test_an_interrupted_refinement_resumes_and_writes_the_same_hybrid(world, monkeypatch):
    """Interrupted (Ctrl-C) at the 5th of 14 box-only images: no toy_H7 and no temporary folder,
    4 images kept in the work folder; the same call again refines only the other 10 and writes
    toy_H7 byte for byte as an uninterrupted run (soft labels, label quality and manifest too, but
    its seconds), then removes the work folder."""
    import bss.hybrid.make as make

    root, checkpoint, _ = world
    monkeypatch.setattr(make, "WRITER_THREADS", 0)  # the kill point is exact: nothing refines beside the main thread
    rule = RefineRule(soft=True)
    partial = root / ".toy_H7.partial"
    whole = make_hybrid("toy", checkpoint, root, number=7, rule=rule, progress=False)
    assert (whole.refined, whole.resumed, whole.discarded, whole.nodes) == (14, 0, 0, None)
    expected = _folder_bytes(whole.path)
    assert len(expected[0]) == 20 + 20 + 14 + 1  # images, masks, soft labels, label_quality.json
    shutil.rmtree(whole.path)
    assert not partial.exists()  # removed once toy_H7 was in place

    before = sorted(p.name for p in root.iterdir())
    calls = _stop_at(monkeypatch, 5, _interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_hybrid("toy", checkpoint, root, number=7, rule=rule, batch_size=3, progress=False)
    assert sorted(p.name for p in root.iterdir()) == sorted(before + [partial.name])  # no toy_H7, no temporary folder
    done = sorted(p.stem for p in (partial / "rows").iterdir())
    assert len(done) == 4 and sorted(p.stem for p in (partial / "masks").iterdir()) == done == sorted(p.stem for p in (partial / "soft").iterdir())

    calls["n"], calls["stop"] = 0, None
    resumed = make_hybrid("toy", checkpoint, root, number=7, rule=rule, batch_size=5, progress=False)
    assert calls["n"] == 10 and (resumed.refined, resumed.resumed, resumed.discarded) == (10, 4, 0)
    assert _folder_bytes(resumed.path) == expected
    assert not partial.exists()
    shutil.rmtree(resumed.path)


_KILL_AT = """
import os, signal, sys
import bss.hybrid.make as make
from bss.hybrid import RefineRule, make_hybrid
make.WRITER_THREADS = 0
real, seen = make.refine, [0]
def refine(*args, **kwargs):
    seen[0] += 1
    if seen[0] == int(sys.argv[5]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
make.refine = refine
make_hybrid("toy", sys.argv[2], sys.argv[3], number=8, rule=RefineRule.from_dict({"min_fill": float(sys.argv[4])}), progress=False)
"""


def test_a_killed_refinement_resumes_and_another_rule_starts_over(world, monkeypatch):
    """SIGKILL at the 7th image (no cleanup runs at all): the 6 images before are kept and the
    rerun refines the other 8, with the same result as an uninterrupted run; a rerun with another
    rule cannot use them (they are not its masks): it deletes them and refines all 14."""
    root, checkpoint, _ = world
    whole = make_hybrid("toy", checkpoint, root, number=8, rule=RefineRule(min_fill=0.3), progress=False)
    expected = _folder_bytes(whole.path)
    shutil.rmtree(whole.path)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(REPO))
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT, str(REPO), str(checkpoint), str(root), "0.3", "7"], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = root / ".toy_H8.partial"
    assert not (root / "toy_H8").exists() and len(list((partial / "rows").iterdir())) == 6
    again = make_hybrid("toy", checkpoint, root, number=8, rule=RefineRule(min_fill=0.3), progress=False)
    assert (again.refined, again.resumed) == (8, 6) and _folder_bytes(again.path) == expected
    shutil.rmtree(again.path)

    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT, str(REPO), str(checkpoint), str(root), "0.3", "4"], env=env, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9 and len(list((partial / "rows").iterdir())) == 3
    other = make_hybrid("toy", checkpoint, root, number=8, rule=RefineRule(min_fill=0.6), progress=False)
    assert (other.refined, other.resumed, other.discarded) == (14, 0, 3) and other.manifest["rule"]["min_fill"] == 0.6
    assert not partial.exists()
    shutil.rmtree(other.path)


def test_missing_split_is_a_clear_error(tmp_path, world):
    _, checkpoint, _ = world
    root = tmp_path / "datasets"
    make_source_dataset(root)
    with pytest.raises(DatasetError, match="run drivers/preprocess.py --dataset toy first"):
        make_hybrid("toy", checkpoint, root, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["toy"]


def test_dataset_without_box_masks_or_without_boxes(tmp_path, world):
    _, checkpoint, _ = world
    root = tmp_path / "datasets"
    source = make_source_dataset(root)
    make_splits("toy", root, progress=False)
    for mask in (source / "masks").iterdir():
        write_mask(mask, np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match="no box-only image has a box"):
        make_hybrid("toy", checkpoint, root, progress=False)
    shutil.rmtree(source / "masks")
    with pytest.raises(DatasetError, match="no masks/ folder"):
        make_hybrid("toy", checkpoint, root, progress=False)
    assert not list(root.glob("toy_H*")) and not list(root.glob(".toy_H*"))


def test_dataset_with_nothing_to_refine(tmp_path, world):
    _, checkpoint, _ = world
    root = tmp_path / "datasets"
    make_source_dataset(root, n=6, labelled=6)
    make_splits("toy", root, progress=False)
    with pytest.raises(DatasetError, match="no box-only image"):
        make_hybrid("toy", checkpoint, root, progress=False)
    for sub in ("images", "masks"):
        (root / "void" / sub).mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty"):
        make_hybrid("void", checkpoint, root, progress=False)
    assert not list(root.glob("*_H*"))


def test_bad_checkpoint_writes_nothing(world, tmp_path):
    root, checkpoint, _ = world
    payload = read_checkpoint(checkpoint)
    payload["config"]["model"]["args"]["encoder_name"] = "resnet34"
    torch.save(payload, tmp_path / "wrong_arch.pt")
    with pytest.raises(BSSError, match="do not fit"):
        make_hybrid("toy", tmp_path / "wrong_arch.pt", root, number=9, progress=False)
    payload = read_checkpoint(checkpoint)
    payload["config"]["train_dataset"] = "toy_TEST"
    torch.save(payload, tmp_path / "leaky.pt")
    with pytest.raises(BSSError, match="leak TEST"):
        make_hybrid("toy", tmp_path / "leaky.pt", root, number=9, progress=False)
    assert not (root / "toy_H9").exists() and not list(root.glob(".toy_H9*"))


def test_labels_added_after_the_split_do_not_leak(tmp_path, world):
    """An image labelled after preprocess is neither box-only nor in a split: left out; EVAL stays out."""
    _, checkpoint, _ = world
    root = tmp_path / "datasets"
    source = make_source_dataset(root, n=12, labelled=9)
    make_splits("toy", root, progress=False)
    eval_stems = _stems(root / "toy_EVAL" / "images")
    # relabel: drop the hand labels of the EVAL images (they now look box-only), label img_011
    from bss.data.via import read_via_csv

    labels = read_via_csv(source / "labels.csv")
    rows = {name: ([] if name[:-4] in eval_stems else [{"name": r.shape, **r.attrs} for r in labels.regions[name]]) for name in labels.regions}
    rows["img_011.png"] = [{"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5}]
    write_via_csv(source / "labels.csv", rows)
    result = make_hybrid("toy", checkpoint, root, progress=False)
    images = _stems(result.path / "images")
    assert not images & eval_stems and "img_011" not in images
    assert {"img_009", "img_010"} <= images


def test_driver_prints_label_quality_and_errors_cleanly(world, tmp_path):
    root, checkpoint, _ = world
    env = dict(os.environ, TQDM_DISABLE="1")
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "drivers" / "make_hybrid.py"),
            "--dataset",
            "toy",
            "--model",
            str(checkpoint),
            "--data-root",
            str(root),
            "--min-fill",
            "0.3",
            "--fallback",
            "ellipse",
            "--workers",
            "0",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    number = next_number("toy", root) - 1
    assert f"toy_H{number}" in run.stdout and "boxes :" in run.stdout and "hybrid:" in run.stdout
    manifest = json.loads((root / f"toy_H{number}" / "manifest.json").read_text())
    assert manifest["rule"]["fallback"] == "ellipse" and manifest["rule"]["min_fill"] == 0.3
    shutil.rmtree(root / f"toy_H{number}")
    bad = subprocess.run(
        [sys.executable, str(REPO / "drivers" / "make_hybrid.py"), "--dataset", "toy", "--model", str(checkpoint), "--data-root", str(root), "--number", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ") and "already exists" in bad.stderr


def test_writer_threads_and_inline_writing_build_the_same_dataset(world, monkeypatch):
    import bss.hybrid.make as make

    root, checkpoint, _ = world
    built = {}
    for threads in (0, 3):
        monkeypatch.setattr(make, "WRITER_THREADS", threads)
        result = make_hybrid("toy", checkpoint, root, number=20 + threads, batch_size=3, progress=False)
        masks = {p.name: read_mask(p) for p in (result.path / "masks").iterdir()}
        built[threads] = (masks, result.manifest["images"], result.label_quality)
        shutil.rmtree(result.path)
    (masks0, rows0, q0), (masks3, rows3, q3) = built[0], built[3]
    assert rows0 == rows3 and q0 == q3  # same order, same per-image stats
    assert masks0.keys() == masks3.keys() and all(np.array_equal(masks0[k], masks3[k]) for k in masks0)


def test_soft_labels_are_written_beside_the_binary_masks(world):
    root, checkpoint, _ = world
    result = make_hybrid("toy", checkpoint, root, number=30, rule=RefineRule(soft=True), progress=False)
    try:
        refined = [row["image"][:-4] for row in result.manifest["images"] if row["origin"] == "refined"]
        assert sorted(p.stem for p in (result.path / "soft").iterdir()) == sorted(refined)
        for stem in refined:
            soft = np.asarray(Image.open(result.path / "soft" / f"{stem}.png"))
            box = read_mask(root / "toy" / "masks" / f"{stem}.png")
            hard = read_mask(result.path / "masks" / f"{stem}.png")
            assert soft.dtype == np.uint8 and soft[box == 0].max(initial=0) == 0
            assert (soft[hard == 1] > 127).all()  # kept foreground: probability above 0.5
    finally:
        shutil.rmtree(result.path)


# ---------------------------------------------------------------------------------- choosing the rule on EVAL
def test_choose_rule_finds_the_fill_floor_a_thin_defect_needs():
    """A crack fills 5 % of its box: the default min_fill 0.4 falls back to the box; the grid must not."""
    from bss.hybrid.teacher_quality import choose_rule

    box = _box((40, 40), (0, 0, 40, 40))
    truth = np.zeros((40, 40), np.uint8)
    truth[:, 19:21] = 1  # a 2-pixel line down the box: 5 % of it
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    quality = choose_rule([prob, prob], [box, box], [truth, truth])
    assert quality.box_iou_pixels == pytest.approx(0.05)
    assert quality.default.iou_pixels == pytest.approx(0.05)  # the default rule gives the box back
    assert quality.best.rule.min_fill <= 0.05 and quality.label_iou == pytest.approx(1.0)
    assert quality.raw_iou_pixels == pytest.approx(1.0)


def test_choose_rule_keeps_the_default_on_ties_and_the_box_when_the_teacher_is_useless():
    from bss.hybrid.teacher_quality import choose_rule, default_grid

    box = _box((20, 20), (5, 5, 15, 15))
    truth = box.copy()  # the box is exact
    noise = np.random.default_rng(0).uniform(0, 1, (20, 20)).astype(np.float32)
    quality = choose_rule([noise], [box], [truth])
    assert quality.label_iou == pytest.approx(1.0)  # only a fallback to the box reaches it ...
    assert quality.best.rule.fallback == "box" and quality.best.rule.min_fill == 0.5  # ... the highest fill floor
    perfect = truth.astype(np.float32)
    tie = choose_rule([perfect], [box], [truth])
    assert tie.best.rule == RefineRule() and tie.best.rule == default_grid()[0]
    assert len(default_grid()) == len({json.dumps(r.to_dict(), sort_keys=True) for r in default_grid()}) == 156
    assert len(quality.table) == 140  # without the images, the grabcut rules are not scored


def test_teacher_quality_on_eval_matches_the_boxes_and_beats_them(world):
    from bss.hybrid.teacher_quality import box_quality, measure_teacher

    root, checkpoint, _ = world
    quality = measure_teacher(checkpoint, "toy", root, device="cpu")
    boxes = box_quality("toy", root)
    assert quality.images == 2 and quality.box_iou_pixels == pytest.approx(boxes["iou"])
    assert boxes["recall"] == 1.0 and boxes["precision"] == pytest.approx(boxes["iou"])  # a box covers its defect
    assert quality.label_iou >= quality.default.iou_pixels and quality.label_iou > quality.box_iou_pixels + 0.05
    assert quality.to_dict()["rules_tried"] == 156


def test_grabcut_follows_the_colour_edge_that_a_blurred_prediction_misses():
    """A bright disc in a box; the teacher's probability is the disc blurred (an upsampled
    prediction): thresholding gives a wrong-sized blob, GrabCut seeded by it recovers the disc."""
    import cv2

    yy, xx = np.mgrid[0:64, 0:64]
    truth = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 14**2).astype(np.uint8)
    rng = np.random.default_rng(0)
    image = np.where(truth[..., None] > 0, [200, 120, 60], [60, 70, 80]).astype(np.float64) + rng.normal(0, 8, (64, 64, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    box = _box((64, 64), (12, 14, 48, 50))
    prob = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 6) * 1.6
    prob = np.clip(cv2.resize(cv2.resize(prob, (8, 8)), (64, 64)), 0, 1)  # coarse, as from a low-resolution model

    def iou_of(mask):
        return (mask & truth).sum() / (mask | truth).sum()

    plain = refine(prob, box, RefineRule(threshold=0.5, min_fill=0.0)).mask
    cut = refine(prob, box, RefineRule(mode="grabcut", threshold=0.3, sure=0.9, min_fill=0.0), image=image).mask
    assert iou_of(cut) > iou_of(plain) + 0.05 and iou_of(cut) > 0.9
    assert cut[box == 0].sum() == 0  # never outside the boxes
    with pytest.raises(ConfigError, match="needs the image"):
        refine(prob, box, RefineRule(mode="grabcut"))
    with pytest.raises(ConfigError, match="'sure' must be at least 'threshold'"):
        RefineRule(mode="grabcut", threshold=0.7, sure=0.5)


def test_grabcut_background_seed_stops_a_flood_into_what_the_teacher_rules_out():
    """A thin dark gap (the defect) crosses a box that also holds a dark patch the teacher is
    sure is background (probability 0.001). Without a background seed GrabCut gives the patch to
    the foreground (its colour matches the gap's); with ``background`` 0.02 the patch stays
    background and the mask is the gap. Pixels between the two values stay GrabCut's to decide."""
    rng = np.random.default_rng(1)
    truth = np.zeros((64, 64), bool)
    truth[10:54, 20:23] = True  # a gap 3 px wide
    patch = np.zeros((64, 64), bool)
    patch[24:36, 38:50] = True  # dark, like the gap, but no defect
    image = np.where((truth | patch)[..., None], [30, 30, 35], [150, 140, 130]).astype(np.float64) + rng.normal(0, 6, (64, 64, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    box = _box((64, 64), (14, 6, 60, 58))
    prob = np.where(truth, 0.97, 0.001).astype(np.float32)

    def iou_of(mask):
        return (mask & truth).sum() / (mask | truth).sum()

    rule = RefineRule(mode="grabcut", threshold=0.5, sure=0.9, min_fill=0.0)
    flooded = refine(prob, box, rule, image=image).mask > 0
    seeded = refine(prob, box, rule.replace(background=0.02), image=image).mask > 0
    assert flooded[patch].all() and iou_of(flooded) < 0.6  # GrabCut alone takes the whole dark patch
    assert not seeded[patch].any() and iou_of(seeded) == 1.0
    prob[patch] = 0.01  # now between 0.005 and 0.02: sure background only for the higher seed
    assert refine(prob, box, rule.replace(background=0.005), image=image).mask[patch].all()
    assert not refine(prob, box, rule.replace(background=0.02), image=image).mask[patch].any()
    assert "< 0.02 sure background" in rule.replace(background=0.02).explain() and "background" not in rule.explain()
    with pytest.raises(ConfigError, match="'background' must be at most 'threshold'"):
        RefineRule(mode="grabcut", threshold=0.3, background=0.4)


def test_make_hybrid_with_the_grabcut_rule(world, tmp_path):
    root, checkpoint, _ = world
    result = make_hybrid("toy", checkpoint, root, number=7, rule=RefineRule(mode="grabcut", threshold=0.3, min_fill=0.0), progress=False)
    try:
        assert result.manifest["rule"]["mode"] == "grabcut" and "GrabCut" in result.manifest["rule"]["description"]
        q = result.label_quality
        assert q["hybrid_iou_pixels"] > q["box_iou_pixels"] + 0.1
        for stem in (p.stem for p in (result.path / "masks").iterdir()):
            if (root / "toy_BASELINE" / "masks" / f"{stem}.png").exists():
                continue
            assert read_mask(result.path / "masks" / f"{stem}.png")[read_mask(root / "toy" / "masks" / f"{stem}.png") == 0].sum() == 0
    finally:
        shutil.rmtree(result.path)


def test_grabcut_hybrids_are_byte_identical_run_after_run(world, tmp_path, monkeypatch):
    """Two builds with the grabcut rule, inline and with writer threads, after OpenCV's generator
    was left in different states, write the same mask files. The box-only images get strong
    colour noise, where GrabCut's result depends on how its colour models start."""
    import cv2

    import bss.hybrid.make as make
    from bss.data.io import read_image, write_image

    world_root, checkpoint, _ = world
    root = tmp_path / "datasets"
    for name in ("toy", "toy_BASELINE", "toy_EVAL", "toy_TEST"):
        shutil.copytree(world_root / name, root / name)
    rng = np.random.default_rng(0)
    for i in range(10, 24):  # the box-only images
        path = root / "toy" / "images" / f"img_{i:03d}.png"
        write_image(path, np.clip(read_image(path) + rng.normal(0, 60, (64, 64, 3)), 0, 255).astype(np.uint8))
    rule = RefineRule(mode="grabcut", threshold=0.3, min_fill=0.0, grabcut_iterations=2)
    built = []
    for threads, batch, state in ((0, 8, 1), (3, 3, 2)):
        monkeypatch.setattr(make, "WRITER_THREADS", threads)
        cv2.setRNGSeed(state)
        result = make_hybrid("toy", checkpoint, root, rule=rule, batch_size=batch, overwrite=True, progress=False)
        built.append({p.name: p.read_bytes() for p in sorted((result.path / "masks").iterdir())})
        built[-1]["manifest rows"] = json.dumps(result.manifest["images"]).encode()
    assert len(built[0]) == 21 and built[0] == built[1]


def test_hybrids_are_byte_identical_whatever_the_callers_threads_workers_and_batches(world, tmp_path, monkeypatch):
    """make_hybrid fixes torch's thread count for its forward passes itself (``threads``): two
    builds write the same mask bytes although the caller left torch on 1 or 2 threads, OpenCV on
    1 thread or its default, and they use other batch sizes, DataLoader workers and writer
    threads. A float sum split over another number of threads moves a probability in its sixth
    decimal; the rule's threshold is put exactly between the two values of the pixel that moves
    most, so the caller's thread count, if it reached the masks, would flip that pixel. The
    caller's settings are given back, and the manifest records the count."""
    import cv2
    import torch

    import bss.hybrid.make as make
    from bss.inference import Predictor

    root, checkpoint, _ = world
    box_only = [root / "toy" / "images" / f"img_{i:03d}.png" for i in range(10, 24)]
    probs = {}
    torch_before, cv2_before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            probs[threads] = np.stack([p for _, p in Predictor.from_checkpoint(checkpoint, device="cpu").predict_paths(box_only, progress=False)])
        moved = np.abs(probs[1] - probs[2])
        where = np.unravel_index(np.argmax(moved), moved.shape)
        threshold = float((probs[1][where] + probs[2][where]) / 2) if moved[where] > 0 else 0.5  # this CPU: a split sum moves nothing
        rule = RefineRule(threshold=threshold, min_fill=0.0)
        built = []
        for caller_threads, cv2_threads, writers, workers, batch in ((1, 1, 0, 0, 8), (2, cv2_before, 3, 2, 3)):
            torch.set_num_threads(caller_threads)
            cv2.setNumThreads(cv2_threads)  # in this process only; never in forked workers (bss/inference.py)
            monkeypatch.setattr(make, "WRITER_THREADS", writers)
            result = make_hybrid(
                "toy", checkpoint, root, number=30, rule=rule, batch_size=batch, num_workers=workers, overwrite=True, progress=False, threads=2
            )
            assert torch.get_num_threads() == caller_threads  # given back
            assert result.manifest["inference"]["torch_threads"] == 2
            built.append({p.name: p.read_bytes() for p in sorted((result.path / "masks").iterdir())})
            built[-1]["manifest rows"] = json.dumps(result.manifest["images"]).encode()
            built[-1]["label quality"] = json.dumps(result.label_quality).encode()
        shutil.rmtree(result.path)
    finally:
        torch.set_num_threads(torch_before)
        cv2.setNumThreads(cv2_before)
    assert len(built[0]) == 22 and built[0] == built[1]
