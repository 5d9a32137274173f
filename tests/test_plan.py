"""The plan from the dataset's fingerprint (issue 19): crafted fingerprints, masks drawn on disk,
the state file, trial configs and the --resolution flag; no training."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bss.config import from_dict, load_config  # noqa: E402
from bss.data.io import write_mask  # noqa: E402
from bss.errors import BSSError  # noqa: E402
from bss.search.fingerprint import Fingerprint, fingerprint, input_size  # noqa: E402
from bss.search.plan import Plan, make_plan, not_applied  # noqa: E402
from bss.search.record import DataRecord, LoopRecord, load_record  # noqa: E402
from bss.search.settings import LoopSettings  # noqa: E402
from bss.search.space import parse_space  # noqa: E402
from bss.search.stages import LoopContext, trial_base  # noqa: E402

BASE = load_config(REPO / "config.yaml").to_dict()
SYNTHETIC = Fingerprint([192, 256], input_size((192, 256)), thickness=59.1, box_size=56.0, defects=90, boxes=182)  # obstacle, measured
CCTV = Fingerprint([512, 704], input_size((512, 704)), thickness=3.0, box_size=40.0, defects=50, boxes=80)  # hairline cracks
PHOTOS = Fingerprint([960, 1280], input_size((960, 1280)), thickness=None, box_size=20.0, defects=None, boxes=60)  # small objects


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_the_synthetic_default_keeps_todays_whole_frame(device):
    plan = make_plan(SYNTHETIC, device)
    assert (plan.image_size, plan.frame_size, plan.patches, plan.batch_size) == ([128, 160], [128, 160], False, None)
    assert plan.image_size == input_size((192, 256)) and plan.scale == 0.625 and len(plan.reasons) == 3
    old = Fingerprint([192, 256], [128, 160])  # a fingerprint from before the measurements
    assert make_plan(old, device).image_size == [128, 160] and not make_plan(old, device).patches
    small = Fingerprint([64, 64], [160, 160], thickness=1.0, box_size=3.0)  # frames under the input: never patched
    assert make_plan(small, device).image_size == [160, 160] and not make_plan(small, device).patches


def test_thin_defects_in_big_frames_get_patches_at_native_scale():
    plan = make_plan(CCTV, "cpu")
    assert (plan.scale, plan.frame_size, plan.image_size, plan.patches) == (1.0, [512, 704], [128, 128], True)
    assert "thickness 3 px would be 0.7 px" in plan.reasons[0] and plan.reasons[1].startswith("patches:")
    assert make_plan(CCTV, "gpu").image_size == [256, 256] and make_plan(CCTV, "cpu", patch_side=64).image_size == [64, 64]
    lines = plan.describe()
    assert lines[0].startswith("plan: frames resized to 704x512 (WxH, scale 1)") and len(lines) == 1 + len(plan.reasons)


def test_small_boxes_in_large_frames_get_patches_at_a_scale_that_keeps_them():
    plan = make_plan(PHOTOS, "cpu")
    assert (plan.scale, plan.frame_size, plan.image_size, plan.patches) == (0.8, [768, 1024], [128, 128], True)
    assert "size 20 px would be 2.5 px" in plan.reasons[0] and "boxes 16.0 px" in plan.reasons[0]


def test_a_scaled_frame_that_fits_one_patch_is_seen_whole():
    neu = Fingerprint([200, 200], [160, 160], thickness=4.0, box_size=30.0)  # 3.2 px at the whole frame's 0.8
    assert (make_plan(neu, "gpu").image_size, make_plan(neu, "gpu").patches) == ([192, 192], False)
    assert (make_plan(neu, "cpu").image_size, make_plan(neu, "cpu").frame_size, make_plan(neu, "cpu").patches) == ([128, 128], [192, 192], True)
    wide = Fingerprint([600, 1500], input_size((600, 1500)), thickness=3.0)
    assert make_plan(wide, "gpu", patch_side=1024).image_size == [608, 1024]  # the patch is capped by the frame


def test_resolution_whole_is_todays_plan_and_bad_values_are_refused():
    plan = make_plan(CCTV, "cpu", resolution="whole")
    assert (plan.image_size, plan.patches) == (input_size((512, 704)), False) and "--resolution whole" in plan.reasons[0]
    with pytest.raises(BSSError, match=r"--resolution must be one of auto, whole, got 'native'"):
        make_plan(CCTV, "cpu", resolution="native")
    with pytest.raises(BSSError, match=r"--resolution must be one of auto, whole, got 'big'"):
        LoopSettings.resolve({"dataset": "toy", "resolution": "big"}, None, gpus=0)
    with pytest.raises(BSSError, match=r"--patch-size must be a multiple of 32"):
        LoopSettings.resolve({"dataset": "toy", "patch_size": 100}, None, gpus=0)
    stored = LoopSettings.resolve({"dataset": "toy"}, None, gpus=0).to_dict()
    assert stored["resolution"] == "auto" and stored["patch_size"] is None
    with pytest.raises(BSSError, match="--resolution was 'auto', now 'whole'"):  # frozen on --resume
        LoopSettings.resolve({"dataset": "toy", "resolution": "whole"}, stored, gpus=0)


# --------------------------------------------------------------------------- the measurement


def crack_mask(shape: tuple[int, int], angle: float, width: float) -> np.ndarray:
    """A straight crack of ``width`` px across the frame at ``angle`` degrees: every pixel whose
    centre lies within width/2 of the line (cv2.line's thickness draws wider)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    slope = math.tan(math.radians(angle))
    near = np.abs(slope * (xx - 40) - (yy - 60)) / math.hypot(slope, 1) <= width / 2
    return (near & (xx >= 40) & (xx <= 400)).astype(np.uint8)


def test_the_measurement_finds_a_drawn_lines_thickness_and_the_boxes_size(tmp_path):
    for folder in ("images", "hand", "boxes"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        Image.new("RGB", (704, 512)).save(tmp_path / "images" / f"f{i}.jpg")
        crack = crack_mask((512, 704), angle=(10, 23, 45)[i], width=3)  # a slanted 3-px crack
        crack[450:453, 100:500] = 1  # a straight one
        write_mask(tmp_path / "hand" / f"f{i}.png", crack)
        boxes = np.zeros((512, 704), np.uint8)
        boxes[10:30, 10:30] = 1  # 20 px squares
        boxes[200:220, 300:380] = 1  # 20 x 80: size 40 (the square root of the area)
        write_mask(tmp_path / "boxes" / f"f{i}.png", boxes)
    fp = fingerprint(tmp_path, tmp_path / "hand", sorted((tmp_path / "boxes").iterdir()))
    assert fp.median_shape == [512, 704] and fp.input_size == input_size((512, 704))
    assert fp.thickness == 3.0 and fp.defects == 6
    assert fp.box_size == 30.0 and fp.boxes == 6  # the median of 20, 20, 20, 40, 40, 40
    assert make_plan(fp, "cpu").patches and "thickness" in fp.describe(False)
    none = fingerprint(tmp_path, tmp_path / "missing")  # no hand masks, no boxes: nothing measured
    assert (none.thickness, none.box_size, none.defects, none.boxes) == (None, None, None, None)


# --------------------------------------------------------------------------- the state file


def test_the_plan_is_kept_in_the_state_and_a_state_without_it_loads():
    plan = make_plan(CCTV, "cpu")
    record = LoopRecord(settings={"dataset": "toy"}, data=DataRecord(counts={"BASELINE": 4}, fingerprint=CCTV, box_only=3, plan=plan))
    again = load_record(record.to_json())
    assert again.data.plan == plan and isinstance(again.data.plan, Plan) and again.data.fingerprint == CCTV
    old = {"version": 1, "settings": {}, "data": {"counts": {}, "fingerprint": {"median_shape": [64, 64], "input_size": [64, 64]}}}
    loaded = load_record(old)
    assert loaded.data.plan is None and loaded.data.fingerprint.thickness is None
    assert loaded.to_json()["data"]["fingerprint"] == old["data"]["fingerprint"]  # nothing added on the way back


# --------------------------------------------------------------------------- the trials


def test_trial_base_applies_the_plan_and_the_config_is_valid():
    settings = LoopSettings(dataset="toy")
    base = dict(BASE, patches={"frame_size": None, "foreground": 0.5, "overlap": 0.25})
    cfg = trial_base(base, settings, "toy_BASELINE", make_plan(CCTV, "cpu"))
    assert cfg["image_size"] == [128, 128] and cfg["patches"] == {"frame_size": [512, 704], "foreground": 0.5, "overlap": 0.25}
    assert from_dict(cfg).frame_size == (512, 704)
    whole = trial_base(base, settings, "toy_BASELINE", make_plan(SYNTHETIC, "cpu"))
    assert whole["image_size"] == [128, 160] and whole["patches"]["frame_size"] is None and whole["batch_size"] == BASE["batch_size"]
    untouched = trial_base(base, settings, "toy_BASELINE", None)
    assert untouched["image_size"] == BASE["image_size"] and untouched["patches"] == base["patches"]


def test_the_plan_is_not_applied_where_the_user_sized_the_input():
    searched = parse_space({"params": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})
    assert not_applied(searched, BASE) is None
    fixed = parse_space({"fixed": {"image_size": [256, 256]}, "params": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})
    assert not_applied(fixed, BASE) == "the search space sets image_size"
    sized = parse_space({"params": {"image_size": {"choice": [[128, 128], [256, 256]]}}})
    assert not_applied(sized, BASE) == "the search space sets image_size"
    assert not_applied(searched, dict(BASE, patches={"frame_size": [512, 512]})) == "the base config sets patches.frame_size"


def test_the_loop_context_gives_trials_the_recorded_plan_or_none():
    plan = make_plan(CCTV, "cpu")
    searched = parse_space({"params": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})
    fixed = parse_space({"fixed": {"image_size": [256, 256]}, "params": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})

    def ctx(space, data):
        return SimpleNamespace(record=LoopRecord(settings={}, data=data), space=space, base=BASE)

    assert LoopContext.plan.fget(ctx(searched, DataRecord(fingerprint=CCTV, plan=plan))) == plan
    assert LoopContext.plan.fget(ctx(fixed, DataRecord(fingerprint=CCTV, plan=plan))) is None
    before = LoopContext.plan.fget(ctx(searched, DataRecord(fingerprint=Fingerprint([64, 64], [160, 160]))))  # a run from before the plan
    assert (before.image_size, before.patches) == ([160, 160], False)
    assert LoopContext.plan.fget(ctx(searched, None)) is None
