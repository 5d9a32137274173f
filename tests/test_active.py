"""Which images to hand-label next (issue 14): scores, near-duplicate suppression, polygons, the
VIA project file, the merge of a VIA export into labels.csv and into NAME_BASELINE.

Real components throughout: a tiny UNet trained for a few epochs on 64 px toy images, real PNG
files, the real VIA CSV reader.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, make_source_dataset, train_oracle_teacher

from bss.active.baseline import add_to_baseline, unsplit_labelled
from bss.active.merge import merge_labels
from bss.active.polygons import draw_polygons, mask_to_polygons
from bss.active.scores import image_scores, percentile_ranks, score_table
from bss.active.select import choose, distance, signature
from bss.active.suggest import rank, score_pool, suggest
from bss.active.via_project import image_id, read_project
from bss.data.io import read_image, read_mask
from bss.data.layout import SourceDataset, list_samples
from bss.data.splits import make_splits
from bss.data.via import rasterize, read_via_csv, write_via_csv
from bss.errors import BSSError, DatasetError
from bss.hybrid import RefineRule, make_hybrid, refine


def _iou(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


# ------------------------------------------------------------------------------ polygons
def test_polygons_redraw_the_mask_they_came_from():
    mask = np.zeros((96, 128), np.uint8)
    cv2.ellipse(mask, (50, 40), (30, 15), 20, 0, 360, 1, -1)
    cv2.circle(mask, (110, 80), 8, 1, -1)
    mask[5, 5] = 1  # a speck: dropped
    simple = mask_to_polygons(mask)
    assert len(simple) == 2 and all(3 <= len(s["all_points_x"]) <= 40 for s in simple)
    assert len(simple[0]["all_points_x"]) < 30  # simplified, not every contour pixel
    assert _iou(draw_polygons(simple, 96, 128), mask) > 0.95
    exact = mask_to_polygons(mask, epsilon=0, max_points=0)
    assert len(exact[0]["all_points_x"]) > 60 and _iou(draw_polygons(exact, 96, 128), mask) > 0.998
    capped = mask_to_polygons(mask, max_points=8)
    assert all(len(s["all_points_x"]) <= 8 for s in capped) and _iou(draw_polygons(capped, 96, 128), mask) > 0.85
    line = np.zeros((20, 20), np.uint8)
    line[3:15, 7] = 1  # one pixel wide: still a polygon of >= 3 points covering it
    (shape,) = mask_to_polygons(line)
    assert len(shape["all_points_x"]) >= 3 and _iou(draw_polygons([shape], 20, 20), line) == 1.0
    assert mask_to_polygons(np.zeros((10, 10), np.uint8)) == []


# ------------------------------------------------------------------------------ scores
def test_scores_on_a_crafted_image():
    box = np.zeros((20, 40), np.uint8)
    box[2:12, 2:12] = 1  # region A: 100 px
    box[2:12, 20:30] = 1  # region B: 100 px
    prob = np.zeros((20, 40), np.float32)
    prob[2:12, 2:7] = 0.9  # A: fill 0.5
    prob[2:4, 20:30] = 0.6  # B: fill 0.2 -> falls back at min_fill 0.3
    refined = refine(prob, box, RefineRule(min_fill=0.3))
    s = image_scores("a.png", prob, box, refined, 0.3)
    assert s.values["expected_errors"] == pytest.approx(50 * 0.1 + 20 * 0.4)
    assert s.values["uncertainty"] == pytest.approx((50 * 0.2 + 20 * 0.8 + 130 * 0.0) / 200)
    assert s.values["fallback"] == pytest.approx(0.5)
    assert s.values["fill_margin"] == pytest.approx(1 - 2 * 0.1)  # B: fill 0.2, 0.1 from the threshold
    assert s.boxes == 2 and s.fallbacks == 1 and s.box_pixels == 200
    empty = image_scores("b.png", prob, np.zeros_like(box), refine(prob, np.zeros_like(box)), 0.3)
    table = score_table([s, empty], seed=1)
    assert table["combined"][0] > 0 and table["combined"][1] == 0.0 and table["expected_errors"][1] == 0.0
    assert percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_near_duplicates_are_skipped_but_not_different_frames():
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.integers(0, 255, (60, 80, 3)).astype(np.uint8), (9, 9), 3)
    brighter = np.clip(a.astype(int) * 1.2 + 10, 0, 255).astype(np.uint8)  # same view, other exposure
    other = cv2.GaussianBlur(rng.integers(0, 255, (60, 80, 3)).astype(np.uint8), (9, 9), 3)
    sigs = [signature(x) for x in (a, brighter, other)]
    assert distance(sigs[0], sigs[1]) < 0.1 < 0.5 < distance(sigs[0], sigs[2])
    picks, skipped = choose(np.array([0.9, 0.8, 0.1]), 2, sigs, near=0.12)
    assert [p.index for p in picks] == [0, 2] and skipped[0][:2] == (1, 0)
    picks, _ = choose(np.array([0.9, 0.8, 0.1]), 2, sigs, near=0)  # off: plain top-2
    assert [p.index for p in picks] == [0, 1]
    picks, _ = choose(np.array([0.9, 0.8, 0.1]), 3, sigs, near=0, eligible=np.array([True, False, True]))
    assert [p.index for p in picks] == [0, 2]


# ------------------------------------------------------------------------------ a teacher
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy dataset (24 images, 10 hand-labelled, split 6/2/2) plus one box-only image that is a
    copy of another (a near-duplicate frame), and a teacher trained briefly on the exact masks."""
    tmp = tmp_path_factory.mktemp("active")
    root = tmp / "datasets"
    source = make_source_dataset(root, n=24, labelled=10)
    for sub in ("images", "masks", "truth"):  # img_023 seen again: a duplicate frame
        shutil.copy(source / sub / "img_023.png", source / sub / "img_dup.png")
    labels = read_via_csv(source / "labels.csv")
    rows = {n: [{"name": r.shape, **r.attrs} for r in regs] for n, regs in labels.regions.items()}
    rows["img_dup.png"] = []
    write_via_csv(source / "labels.csv", rows, {n: (source / "images" / n).stat().st_size for n in rows})
    make_splits("toy", root, progress=False)
    checkpoint = train_oracle_teacher(root, source, tmp / "teacher", epochs=4)
    return root, checkpoint


@pytest.fixture
def copy_world(world, tmp_path):
    """A private copy of the world's datasets (the merge tests change them)."""
    root, checkpoint = world
    shutil.copytree(root, tmp_path / "datasets")
    return tmp_path / "datasets", checkpoint


def test_pool_is_the_box_only_images_ranked_by_score(world):
    root, checkpoint = world
    pool = score_pool("toy", checkpoint, root)
    assert sorted(pool.names) == sorted([f"img_{i:03d}.png" for i in range(10, 24)] + ["img_dup.png"])
    assert pool.rule_source.startswith("chosen on toy_EVAL")
    result = rank(pool, 5, "expected_errors", near=0)
    values = [pool.table()["expected_errors"][i] for i in result.chosen]
    assert values == sorted(values, reverse=True) and len(result.chosen) == 5
    assert max(pool.table()["expected_errors"]) == values[0]
    # the duplicate frame has the very same scores as its original; suppression keeps one
    dup, orig = pool.names.index("img_dup.png"), pool.names.index("img_023.png")
    assert pool.scores[dup].values == pytest.approx(pool.scores[orig].values)
    all_of_them = rank(pool, len(pool.names), "expected_errors")
    chosen = {pool.names[i] for i in all_of_them.chosen}
    assert len({"img_dup.png", "img_023.png"} & chosen) == 1 and len(all_of_them.skipped) == 1
    assert len(rank(pool, len(pool.names), "expected_errors", near=0).chosen) == len(pool.names)
    # random is seeded: the same seed, the same pick
    assert rank(pool, 4, "random", seed=3).chosen == rank(pool, 4, "random", seed=3).chosen
    with pytest.raises(BSSError, match="unknown score"):
        rank(pool, 3, "entropy")


def test_via_project_is_vias_format_and_redraws_the_refined_masks(world, tmp_path):
    root, checkpoint = world
    result = suggest("toy", checkpoint, 4, data_root=root, out=tmp_path / "sugg", progress=False)
    project = json.loads((tmp_path / "sugg" / "via_project.json").read_text())
    assert set(project) == {"_via_settings", "_via_img_metadata", "_via_attributes", "_via_data_format_version", "_via_image_id_list"}
    assert project["_via_data_format_version"] == "2.0.10"
    assert set(project["_via_settings"]) == {"ui", "core", "project"} and project["_via_settings"]["core"]["default_filepath"].endswith("/images/")
    assert project["_via_attributes"] == {"region": {}, "file": {}}
    names = [result.pool.names[i] for i in result.chosen]
    assert project["_via_image_id_list"] == [image_id(n, (root / "toy" / "images" / n).stat().st_size) for n in names]
    for key, meta in project["_via_img_metadata"].items():
        assert set(meta) == {"filename", "size", "regions", "file_attributes"}
        assert key == meta["filename"] + str(meta["size"]) and meta["size"] == (root / "toy" / "images" / meta["filename"]).stat().st_size
        for region in meta["regions"]:
            assert set(region) == {"shape_attributes", "region_attributes"}
            assert region["shape_attributes"]["name"] == "polygon"
            assert all(isinstance(v, int) for v in region["shape_attributes"]["all_points_x"])
    # parsed back by the VIA rules and redrawn: the mask the polygons came from
    back = read_project(tmp_path / "sugg" / "via_project.json")
    assert list(back) == names
    for i in result.chosen:
        size, regions = back[result.pool.names[i]]
        refined = result.pool.refined_mask(i)
        assert refined.any() and regions
        assert _iou(rasterize(regions, 64, 64), refined) > 0.9
    with open(tmp_path / "sugg" / "ranking.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.pool.names) and [r["rank"] for r in rows[:4]] == ["1", "2", "3", "4"]
    assert rows[0]["filename"] == names[0] and "expected_errors" in rows[0]["reason"] and rows[5]["reason"].startswith("not chosen")
    manifest = json.loads((tmp_path / "sugg" / "suggestions.json").read_text())
    assert manifest["counts"]["chosen"] == 4 and manifest["score"] == "expected_errors"
    with pytest.raises(BSSError, match="already exists"):
        suggest("toy", checkpoint, 4, data_root=root, out=tmp_path / "sugg", progress=False)


# ------------------------------------------------------------------------------ merge
def _truth_export(root, names, path, sizes=None):
    """The VIA export a perfect annotator would make: exact outlines of the truth masks."""
    folder = root / "toy"
    rows = {n: mask_to_polygons(read_mask(folder / "truth" / n), epsilon=0, max_points=0) for n in names}
    write_via_csv(path, rows, sizes or {n: (folder / "images" / n).stat().st_size for n in names})
    return path


def test_merge_round_trip_into_labels_and_baseline(copy_world, tmp_path):
    root, checkpoint = copy_world
    folder = root / "toy"
    before = (folder / "labels.csv").read_bytes()
    names = ["img_015.png", "img_012.png"]
    export = _truth_export(root, names, tmp_path / "export.csv")
    result = merge_labels("toy", export, root)
    assert result.merged == names and result.regions == 2
    assert (folder / "labels.csv.bak").read_bytes() == before
    labels = read_via_csv(folder / "labels.csv")
    assert set(labels.labelled) == {f"img_{i:03d}.png" for i in range(10)} | set(names)
    for name in names:
        drawn = rasterize(labels.regions[name], 64, 64)
        assert _iou(drawn, read_mask(folder / "truth" / name)) > 0.99
    # every other line is the old file's, byte for byte, in the same order
    old_lines = before.decode().splitlines(keepends=True)
    new_lines = (folder / "labels.csv").read_bytes().decode().splitlines(keepends=True)
    assert [x for x in new_lines if not x.startswith(tuple(names))] == [x for x in old_lines if not x.startswith(tuple(names))]
    assert len(new_lines) == len(old_lines)  # one polygon each replaced one empty row each
    # the new images join BASELINE; EVAL and TEST are unchanged
    eval_before = sorted(p.name for p in (root / "toy_EVAL" / "images").iterdir())
    assert [s.image.name for s in unsplit_labelled("toy", root)[1]] == sorted(names)
    added = add_to_baseline("toy", root)
    assert added == sorted(names) and add_to_baseline("toy", root) == []
    baseline = {s.stem: s for s in list_samples(root / "toy_BASELINE")}
    assert len(baseline) == 8 and {"img_012", "img_015"} <= set(baseline)
    assert _iou(read_mask(baseline["img_015"].mask), read_mask(folder / "truth" / "img_015.png")) > 0.99
    assert sorted(p.name for p in (root / "toy_EVAL" / "images").iterdir()) == eval_before
    manifest = json.loads((root / "toy_BASELINE" / "manifest.json").read_text())
    assert manifest["added"][0]["images"] == sorted(names) and "img_015.png" in manifest["images"]
    # the next hybrid holds them with their exact masks, and no longer refines their boxes
    hybrid = make_hybrid("toy", checkpoint, root, progress=False)
    entries = {e["image"]: e for e in hybrid.manifest["images"]}
    assert entries["img_015.png"]["origin"] == "baseline" and entries["img_012.png"]["origin"] == "baseline"
    assert hybrid.manifest["counts"]["refined"] == 13  # 15 box-only before, 2 now hand-labelled
    # and the next suggestion no longer offers them
    assert not set(names) & set(score_pool("toy", checkpoint, root).names)


def _corrupt(tmp_path, root, kind):
    export = _truth_export(root, ["img_014.png", "img_016.png"], tmp_path / f"{kind}.csv")
    lines = export.read_text().splitlines(keepends=True)
    if kind == "size":
        row = next(csv.reader([lines[2]]))
        row[1] = str(int(row[1]) + 7)
        lines[2] = _csv_line(row)
        return export, lines, "line 3: 'img_016.png' has file_size"
    if kind == "unknown":
        row = next(csv.reader([lines[2]]))
        row[0] = "img_999.png"
        lines[2] = _csv_line(row)
        return export, lines, "line 3: 'img_999.png' is not an image of"
    if kind == "polygon":
        row = next(csv.reader([lines[2]]))
        row[5] = json.dumps({"name": "polygon", "all_points_x": [1, 5], "all_points_y": [1, 5]})
        lines[2] = _csv_line(row)
        return export, lines, "line 3: polygon has 2 points"
    if kind == "already_labelled":
        row = next(csv.reader([lines[2]]))
        row[0], row[1] = "img_003.png", str((root / "toy" / "images" / "img_003.png").stat().st_size)
        lines[2] = _csv_line(row)
        return export, lines, "line 3: duplicate: 'img_003.png' already has hand-drawn regions"
    if kind == "twice":
        return export, lines + [lines[1]], "line 4: duplicate"  # the first region's line again
    if kind == "outside":
        row = next(csv.reader([lines[1]]))
        row[5] = json.dumps({"name": "polygon", "all_points_x": [1, 90, 5], "all_points_y": [1, 5, 9]})
        lines[1] = _csv_line(row)
        return export, lines, "line 2: polygon of img_014.png reaches"
    raise AssertionError(kind)


def _csv_line(row):
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["size", "unknown", "polygon", "already_labelled", "twice", "outside"])
def test_a_bad_export_is_one_error_naming_the_line_and_nothing_is_written(copy_world, tmp_path, kind):
    root, _ = copy_world
    export, lines, message = _corrupt(tmp_path, root, kind)
    export.write_text("".join(lines))
    before = (root / "toy" / "labels.csv").read_bytes()
    baseline_before = sorted(p.name for p in (root / "toy_BASELINE" / "images").iterdir())
    with pytest.raises(DatasetError) as info:
        merge_labels("toy", export, root)
    assert message in str(info.value) and str(export) in str(info.value)
    # the driver: one error line, exit status 2
    driver = subprocess.run(
        [sys.executable, str(REPO / "drivers" / "merge_labels.py"), "--dataset", "toy", "--data-root", str(root), "--export", str(export)],
        capture_output=True,
        text=True,
    )
    assert driver.returncode == 2 and driver.stderr.startswith("error: ") and driver.stderr.count("\n") == 1 and message in driver.stderr
    assert driver.stdout == ""
    assert (root / "toy" / "labels.csv").read_bytes() == before
    assert not (root / "toy" / "labels.csv.bak").exists()
    assert sorted(p.name for p in (root / "toy").iterdir()) == ["images", "labels.csv", "masks", "truth"]
    assert sorted(p.name for p in (root / "toy_BASELINE" / "images").iterdir()) == baseline_before


def test_merge_driver_merges_then_refuses_the_same_export(copy_world, tmp_path):
    root, _ = copy_world
    driver = [sys.executable, str(REPO / "drivers" / "merge_labels.py"), "--dataset", "toy", "--data-root", str(root)]
    good = subprocess.run(driver + ["--export", str(_truth_export(root, ["img_014.png"], tmp_path / "ok.csv"))], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "merged 1 image(s), 1 region(s)" in good.stdout and "toy_BASELINE: added 1 newly labelled" in good.stdout
    again = subprocess.run(driver + ["--export", str(tmp_path / "ok.csv")], capture_output=True, text=True)
    assert again.returncode == 2 and "already has hand-drawn regions" in again.stderr


def test_merge_keeps_a_utf16_bom_file_in_its_encoding(copy_world, tmp_path):
    root, _ = copy_world
    labels = root / "toy" / "labels.csv"
    text = labels.read_text()
    labels.write_bytes(text.replace("\n", "\r\n").encode("utf-16"))
    merge_labels("toy", _truth_export(root, ["img_020.png"], tmp_path / "e.csv"), root)
    data = labels.read_bytes()
    assert data[:2] in (b"\xff\xfe", b"\xfe\xff") and "\r\n" in data.decode("utf-16")
    assert "img_020.png" in read_via_csv(labels).labelled
    assert SourceDataset.open("toy", root).labels.regions["img_021.png"] == []


def test_suggest_driver_writes_and_refuses_cleanly(world, tmp_path):
    root, checkpoint = world
    driver = [
        sys.executable,
        str(REPO / "drivers" / "suggest_labels.py"),
        "--dataset",
        "toy",
        "--data-root",
        str(root),
        "--model",
        str(checkpoint),
        "--quiet",
        "--out",
        str(tmp_path / "s"),
    ]
    ok = subprocess.run(driver + ["--count", "3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "15 box-only images scored" in ok.stdout and "3 images" in ok.stdout and (tmp_path / "s" / "via_project.json").is_file()
    for extra, message in ((["--count", "3"], "already exists"), (["--count", "0", "--overwrite"], "--count must be a positive")):
        bad = subprocess.run(driver + extra, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr and bad.stderr.count("\n") == 1
    assert read_image(root / "toy" / "images" / "img_000.png").shape == (64, 64, 3)
