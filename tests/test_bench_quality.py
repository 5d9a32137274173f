"""bench/self_training_quality.py: the headroom datasets it builds (hand-label counts, the
held-out images kept out of the loop's data, truth kept, the ceiling's BASELINE, the source left
untouched) and the figures it reports (recovered fraction, the final iteration, medians)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_source_dataset

from bss.data.io import read_mask
from bss.data.layout import SourceDataset

spec = importlib.util.spec_from_file_location("self_training_quality", REPO / "bench" / "self_training_quality.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up while the class is made
spec.loader.exec_module(bench)


def _snapshot(folder: Path) -> dict[str, tuple[str, float]]:
    """Every file's content hash and mtime."""
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in sorted(folder.rglob("*")) if p.is_file()}


def _stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.iterdir()}


@pytest.fixture
def photos(tmp_path) -> Path:
    """A read-only photo source like ../shared/data/neu_seg: 30 images, 20 with polygons, truth of all."""
    root = tmp_path / "shared"
    folder = make_source_dataset(root, "toy", n=30, labelled=20)
    for path in sorted(folder.rglob("*"), reverse=True):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield root
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_photo_headroom_dataset(photos, tmp_path):
    before = _snapshot(photos)
    setting = bench.Setting("toy", seed=3, images=None, hand_labels=7, holdout=8)
    p = bench.prepare(setting, tmp_path / "work", photos=photos)
    assert _snapshot(photos) == before  # the source is read, never written

    source = SourceDataset.open("toy", p.headroom_root)
    loop_stems = {s.stem for s in source.samples}
    held = _stems(p.holdout / "images")
    assert len(held) == p.holdout_images == 8 and len(loop_stems) == p.source_images == 22
    assert not held & loop_stems and held | loop_stems == _stems(photos / "toy" / "images")
    # the held-out TEST is scored against the exact masks
    for stem in held:
        assert np.array_equal(read_mask(p.holdout / "masks" / f"{stem}.png"), read_mask(photos / "toy" / "truth" / f"{stem}.png"))
    # the loop sees 7 hand labels, their polygons unchanged, and the truth of every image it sees
    kept = source.hand_labelled()
    assert len(kept) == p.hand_labels == 7
    original = SourceDataset.open("toy", photos).labels.regions
    assert all([r.attrs for r in source.labels.regions[s.image.name]] == [r.attrs for r in original[s.image.name]] for s in kept)
    assert _stems(source.truth_dir) == loop_stems
    assert (p.baseline, p.eval, p.test) == (5, 1, 1)  # the loop's 60/20/20 of 7
    # no held-out image in any split the loop trains or decides on, nor in the ceiling
    for root in (p.headroom_root, p.ceiling_root):
        for split in ("BASELINE", "EVAL", "TEST"):
            assert not _stems(root / f"toy_{split}" / "images") & held


def test_ceiling_dataset_is_every_training_image_with_its_truth(photos, tmp_path):
    p = bench.prepare(bench.Setting("toy", seed=0, images=None, hand_labels=10, holdout=6), tmp_path / "work", photos=photos)
    head, ceil = p.headroom_root, p.ceiling_root
    for split in ("EVAL", "TEST"):  # the same decisions and the same loop TEST
        assert _stems(ceil / f"toy_{split}" / "images") == _stems(head / f"toy_{split}" / "images")
    held_out = _stems(head / "toy_EVAL" / "images") | _stems(head / "toy_TEST" / "images")
    baseline = ceil / "toy_BASELINE"
    assert _stems(baseline / "images") == _stems(head / "toy" / "images") - held_out
    assert p.ceiling_baseline == len(_stems(baseline / "images")) == 24 - len(held_out)
    assert _stems(head / "toy_BASELINE" / "images") < _stems(baseline / "images")
    for stem in _stems(baseline / "images"):
        assert np.array_equal(read_mask(baseline / "masks" / f"{stem}.png"), read_mask(head / "toy" / "truth" / f"{stem}.png"))


def test_box_label_iou_over_the_box_only_images(photos, tmp_path):
    p = bench.prepare(bench.Setting("toy", seed=1, images=None, hand_labels=5, holdout=6), tmp_path / "work", photos=photos)
    source = SourceDataset.open("toy", p.headroom_root)
    box_only = source.box_only()
    assert len(box_only) == 24 - 5
    # each toy box contains its blob, so IoU = truth pixels / box pixels
    truth = sum(int(read_mask(source.truth_dir / f"{s.stem}.png").sum()) for s in box_only)
    boxes = sum(int(read_mask(s.mask).sum()) for s in box_only)
    assert p.box_label_iou == pytest.approx(truth / boxes)
    assert 0.2 < p.box_label_iou < 0.9


def test_synthetic_setting_at_its_own_frame_and_defect_area(tmp_path):
    """A synthetic setting of another class name, frame size and defect area (issue 19's
    large-frame settings): the loop's data and the held-out TEST are generated as asked."""
    setting = bench.Setting("thin_gaps", 0, 16, 10, 5, defect="disconnect", frame=(128, 96), area_scale=0.3)
    assert setting.synthetic and not bench.Setting("thin_gaps", 0, 16, 10, 5).synthetic
    p = bench.prepare(setting, tmp_path / "work")
    params = json.loads((p.headroom_root / "thin_gaps" / "generator.json").read_text())
    assert (params["defect"], params["size"], params["area_scale"], params["seed"]) == ("disconnect", [128, 96], 0.3, 0)
    assert (p.source_images, p.hand_labels, p.holdout_images) == (16, 10, 5)
    held = sorted((p.holdout / "images").iterdir())
    assert {read_mask(m).shape for m in (p.holdout / "masks").iterdir()} == {(96, 128)} and len(held) == 5
    # the held-out frames are another seed's: none equals a frame the loop sees
    seen = {hashlib.sha1(f.read_bytes()).hexdigest() for f in (p.headroom_root / "thin_gaps" / "images").iterdir()}
    assert not seen & {hashlib.sha1(f.read_bytes()).hexdigest() for f in held}


def test_too_many_hand_labels_for_the_source_is_refused(photos, tmp_path):
    with pytest.raises(SystemExit, match="hand-labelled images outside the hold-out"):
        bench.prepare(bench.Setting("toy", seed=0, images=None, hand_labels=21, holdout=6), tmp_path / "work", photos=photos)


@pytest.mark.parametrize(
    "iter0, final, ceiling, expected",
    [
        (0.70, 0.78, 0.80, 0.8),
        (0.70, 0.70, 0.80, 0.0),
        (0.70, 0.65, 0.80, -0.5),  # the loop made it worse
        (0.70, 0.85, 0.80, 1.5),  # above the ceiling
        (0.80, 0.82, 0.80, None),  # no headroom: undefined
        (0.80, 0.82, 0.75, None),
        (None, 0.82, 0.90, None),
        (0.70, None, 0.90, None),
    ],
)
def test_recovered_fraction(iter0, final, ceiling, expected):
    got = bench.recovered_fraction(iter0, final, ceiling)
    assert got == (None if expected is None else pytest.approx(expected))


def _prepared(box_label_iou: float) -> bench.Prepared:
    return bench.Prepared(Path("h"), Path("c"), Path("t"), 300, 30, 18, 6, 6, 288, 60, box_label_iou)


def _loop(tests: list[float], final: int, labels: list[float | None], seconds: float = 100.0) -> bench.LoopOutcome:
    its = [bench.IterationScore(k, f"x_H{k}" if k else "x_BASELINE", 0.5, 0.9 - k / 10, t, None, lab) for k, (t, lab) in enumerate(zip(tests, labels))]
    return bench.LoopOutcome(seconds, its, final)


def test_figures_take_the_final_iteration_and_the_best_labels():
    setting = bench.Setting("obstacle", 0, 300, 30, 60)
    # iteration 2 is the final model (by EVAL) although iteration 1 scores higher on the held-out TEST
    loop = _loop([0.60, 0.75, 0.70], final=2, labels=[0.81, 0.86, None])
    ceiling = _loop([0.80], final=0, labels=[None], seconds=40.0)
    f = bench.RunResult(setting, _prepared(0.55), loop, ceiling).figures()
    assert (f.iter0, f.final, f.final_iteration, f.ceiling) == (0.60, 0.70, 2, 0.80)
    assert f.headroom == pytest.approx(0.20) and f.recovered == pytest.approx(0.5)
    assert (f.box_label_iou, f.best_h_label_iou) == (0.55, 0.86)
    assert (f.loop_test_iter0, f.loop_test_final) == (0.9, pytest.approx(0.7))
    assert (f.loop_seconds, f.ceiling_seconds) == (100.0, 40.0)


def test_a_failed_loop_reports_no_figures_and_the_error():
    setting = bench.Setting("neu_patches", 1, None, 36, 60)
    failed = bench.LoopOutcome(120.0, error="exit 2: error: none of the 4 trials reached EVAL IoU > 0.750")
    result = bench.RunResult(setting, _prepared(0.58), failed, _loop([0.8], final=0, labels=[None]))
    f = result.figures()
    assert f.iter0 is None and f.final is None and f.recovered is None and f.ceiling == 0.8
    assert "loop failed: exit 2" in bench.progress_line(result)
    assert "exit 2" in bench.run_row(result)
    json.dumps(result.to_json())  # serialisable as it is written


def test_medians_and_spread_over_seeds():
    runs = [
        bench.RunResult(bench.Setting("obstacle", s, 300, 30, 60), _prepared(0.6), _loop([i0, fin], 1, [None, lab]), _loop([ceil], 0, [None]))
        for s, (i0, fin, ceil, lab) in enumerate([(0.60, 0.70, 0.80, 0.85), (0.50, 0.60, 0.90, 0.80), (0.70, 0.72, 0.74, 0.90)])
    ]
    recovered = [r.figures().recovered for r in runs]
    assert recovered == [pytest.approx(0.5), pytest.approx(0.25), pytest.approx(0.5)]
    spread = bench.Spread.of(recovered)
    assert (spread.median, spread.low, spread.high) == (pytest.approx(0.5), pytest.approx(0.25), pytest.approx(0.5))
    assert str(spread) == "0.500 (0.250-0.500)"
    assert str(bench.Spread.of([None, None])) == "-"
    row = bench.median_row("obstacle", runs)
    assert row.startswith("| obstacle | 3 | 0.600 (0.500-0.700) | 0.700 (0.600-0.720) | 0.800 (0.740-0.900) |")
    assert "0.850 (0.800-0.900)" in row  # the best H label IoU
    table = bench.tables(runs)
    assert table.count("| obstacle |") == 4 and "(no headroom)" in table  # seed 2: ceiling - iter 0 = 0.04


def test_knobs_reach_the_loop_and_the_ceiling_gets_one_search_share():
    knobs = bench.Knobs(trials=2, iterations=2, budget=300.0)
    assert knobs.loop_args() == ["--trials", "2", "--iterations", "2", "--budget", "300"]
    assert knobs.ceiling_args() == ["--iterations", "1", "--trials", "2", "--budget", "150"]
    assert bench.Knobs().loop_args() == [] and bench.Knobs().ceiling_args() == ["--iterations", "1"]


def test_seeds_must_stay_clear_of_the_holdout_seed():
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", str(bench.HOLDOUT_SEED)])
    args = bench.parse_args(["--datasets", "obstacle", "neu_patches", "--seeds", "0", "1"])
    todo = bench.settings(args)
    assert [(s.dataset, s.seed, s.images, s.hand_labels) for s in todo] == [
        ("obstacle", 0, 300, 30),
        ("obstacle", 1, 300, 30),
        ("neu_patches", 0, None, 36),
        ("neu_patches", 1, None, 36),
    ]


def test_shared_neu_data_is_not_written_by_the_builder(tmp_path):
    """The real ../shared source, where present: building a setting leaves it as it was."""
    if not (bench.NEU_ROOT / "neu_patches").is_dir():
        pytest.skip("../shared/data/neu_seg is not beside the repository")
    before = _snapshot(bench.NEU_ROOT / "neu_patches")
    p = bench.prepare(bench.Setting("neu_patches", 0, None, 36, 60), tmp_path / "work")
    assert (p.source_images, p.hand_labels, p.holdout_images) == (240, 36, 60)
    assert _snapshot(bench.NEU_ROOT / "neu_patches") == before
    assert not any(os.path.samefile(f, bench.NEU_ROOT / "neu_patches" / "images" / f.name) for f in (p.headroom_root / "neu_patches" / "images").iterdir())


# ---- bench/quality_bar.py: the bar's verdict over every results file ----------------------------

bar_spec = importlib.util.spec_from_file_location("quality_bar", REPO / "bench" / "quality_bar.py")
quality_bar = importlib.util.module_from_spec(bar_spec)
sys.modules[bar_spec.name] = quality_bar
bar_spec.loader.exec_module(quality_bar)


def _results_file(path: Path, started: str, runs: list[tuple[str, int, float, float, float]]) -> Path:
    """A results file of (dataset, seed, iteration 0, final, ceiling) runs, boxes 0.6 -> H 0.8."""
    rows = []
    for dataset, seed, iter0, final, ceiling in runs:
        figures = {
            "iter0": iter0,
            "final": final,
            "ceiling": ceiling,
            "headroom": ceiling - iter0,
            "recovered": bench.recovered_fraction(iter0, final, ceiling),
            "box_label_iou": 0.6,
            "best_h_label_iou": 0.8,
        }
        rows.append({"setting": {"dataset": dataset, "seed": seed}, "figures": figures})
    path.write_text(json.dumps({"benchmark": "self_training_quality", "code": {"describe": path.stem[-4:]}, "started": started, "runs": rows}))
    return path


def test_quality_bar_takes_the_newest_run_of_each_seed_and_judges_the_medians(tmp_path):
    old = _results_file(
        tmp_path / "old.json", "2026-12-01T00:00:00", [("obstacle", 0, 0.70, 0.80, 0.90), ("obstacle", 1, 0.70, 0.71, 0.90), ("obstacle", 2, 0.70, 0.72, 0.90)]
    )
    new = _results_file(tmp_path / "newr.json", "2026-12-02T00:00:00", [("obstacle", 1, 0.70, 0.85, 0.90), ("neu_patches", 0, 0.77, 0.76, 0.74)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmark": "native_resolution", "runs": [{"setting": {"dataset": "obstacle", "seed": 0}}]}))
    runs = quality_bar.read_runs([new, old, other])  # the order of the files does not matter, the start time does
    assert [(r.dataset, r.seed, r.source) for r in runs] == [
        ("neu_patches", 0, "newr.json"),
        ("obstacle", 0, "old.json"),
        ("obstacle", 1, "newr.json"),
        ("obstacle", 2, "old.json"),
    ]
    obstacle = [r for r in runs if r.dataset == "obstacle"]
    # recovered per seed 0.5, 0.75, 0.1: median 0.5 meets the synthetic bar; final 0.80 > 0.70
    assert quality_bar.verdict("obstacle", obstacle) == "met"
    # with the old seed 1 (recovered 0.05) the median is 0.1: not met, and it says why
    assert quality_bar.verdict("obstacle", quality_bar.read_runs([old])) == "not met: recovered 0.100 < 0.5"
    assert quality_bar.verdict("neu_patches", runs[:1]) == "no headroom (median ceiling - iteration 0 = -0.030 < 0.05) so far; 1 of 3 seeds"
    two = quality_bar.read_runs(
        [_results_file(tmp_path / "two.json", "2026-12-03", [("neu_scratches", 0, 0.6, 0.7, 0.7), ("neu_scratches", 1, 0.6, 0.6, 0.7)])]
    )
    assert quality_bar.verdict("neu_scratches", two) == "met so far; 2 of 3 seeds"  # medians: final 0.65 > 0.60, recovered 0.5 >= 0.3
    worse = quality_bar.read_runs([_results_file(tmp_path / "w.json", "2026-12-04", [("deposition", s, 0.7, 0.69, 0.8) for s in range(3)])])
    assert quality_bar.verdict("deposition", worse) == "not met: final 0.690 not above iteration 0 0.700; recovered -0.100 < 0.5"
    table = quality_bar.table(runs)
    assert "| obstacle | 0 1 2 | 0.700 | 0.800 (0.720-0.850) | 0.900 | 0.500 (0.100-0.750) (0.5) |" in table
    assert "s1: newr @newr" in table and "s2: old @old" in table
