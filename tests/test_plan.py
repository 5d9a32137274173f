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
from bss.search.plan import SPACE_BATCH, Plan, make_plan, not_applied  # noqa: E402
from bss.search.record import DataRecord, LoopRecord, load_record  # noqa: E402
from bss.search.settings import LoopSettings  # noqa: E402
from bss.search.space import load_space, parse_space  # noqa: E402
from bss.search.stages import LoopContext, trial_base  # noqa: E402

BASE = load_config(REPO / "config.yaml").to_dict()
SYNTHETIC = Fingerprint([192, 256], input_size((192, 256)), thickness=59.1, box_size=56.0, defects=90, boxes=182)  # obstacle, measured
CCTV = Fingerprint([512, 704], input_size((512, 704)), thickness=3.0, box_size=40.0, defects=50, boxes=80)  # hairline cracks
PHOTOS = Fingerprint([960, 1280], input_size((960, 1280)), thickness=None, box_size=20.0, defects=None, boxes=60)  # small objects


# --------------------------------------------------------------------------- the rules


def test_the_synthetic_default_keeps_todays_whole_frame():
    plan = make_plan(SYNTHETIC, "cpu")
    assert (plan.image_size, plan.frame_size, plan.patches, plan.batch_size) == ([128, 160], [128, 160], False, None)
    assert plan.image_size == input_size((192, 256)) and plan.scale == 0.625 and len(plan.reasons) == 3
    old = Fingerprint([192, 256], [128, 160])  # a fingerprint from before the measurements
    assert make_plan(old, "cpu").image_size == [128, 160] and not make_plan(old, "cpu").patches
    small = Fingerprint([64, 64], [160, 160], thickness=1.0, box_size=3.0)  # frames under the input: never patched
    assert make_plan(small, "cpu").image_size == [160, 160] and not make_plan(small, "cpu").patches


def test_a_gpu_sees_frames_up_to_256_px_whole():
    """A GPU's whole-frame input has the longer side 256, its patch side (the GPU space used to
    search 256x192 and 384x288 inputs; at the CPU's 160 the synthetic frames would lose 0.4 of
    their side): the synthetic 256x192 frames are seen whole at native scale, with the batch
    planned from their area."""
    plan = make_plan(SYNTHETIC, "gpu")
    assert (plan.scale, plan.image_size, plan.frame_size, plan.patches, plan.batch_size) == (1.0, [192, 256], [192, 256], False, 32)
    assert "no larger than the whole-frame input, 256 px (GPU)" in plan.reasons[0] and len(plan.reasons) == 3
    neu = Fingerprint([200, 200], [160, 160], thickness=4.0, box_size=30.0)
    assert (make_plan(neu, "gpu").image_size, make_plan(neu, "gpu").patches) == ([256, 256], False)
    big = Fingerprint([960, 1280], [128, 160], box_size=80.0)  # 16 px at 256/1280: squeezed whole, nothing lost
    assert (make_plan(big, "gpu").scale, make_plan(big, "gpu").image_size, make_plan(big, "gpu").patches) == (0.2, [192, 256], False)
    assert (make_plan(big, "cpu").scale, make_plan(big, "cpu").patches) == (0.2, True)  # 10 px at 160: patches at 0.2
    whole = make_plan(CCTV, "gpu", resolution="whole")
    assert (whole.image_size, whole.patches) == (input_size((512, 704), 256), False) and "squeezed to 256 px (GPU)" in whole.reasons[0]


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
    neu = Fingerprint([200, 200], [160, 160], thickness=4.0, box_size=30.0)  # 3.2 px at the whole frame's 0.8: native
    # one network input: rounded UP to multiples of 32 (192 would be scale 0.96, the defects 3.84 px: under the 4 planned)
    big = make_plan(neu, "cpu", patch_side=256)
    assert (big.image_size, big.frame_size, big.patches) == ([224, 224], [224, 224], False)
    assert "the input 224x224 (rounded up to multiples of 32)" in big.reasons[1]
    # patches: the frame keeps its 200 px (no longer 192), the patch is 128
    assert (make_plan(neu, "cpu").image_size, make_plan(neu, "cpu").frame_size, make_plan(neu, "cpu").patches) == ([128, 128], [200, 200], True)
    wide = Fingerprint([600, 1500], input_size((600, 1500)), thickness=3.0)
    plan = make_plan(wide, "gpu", patch_side=1024)  # the patch is capped by the frame, down to a multiple of 32
    assert (plan.frame_size, plan.image_size) == ([600, 1500], [576, 1024])


def test_a_thin_wide_frame_keeps_its_aspect_ratio_and_its_patches_are_multiples_of_32():
    """48x1280 frames, 18-px boxes: scale 0.9. Each side rounded to a multiple of 32 gave a 32x1152
    frame (0.67 x the height, 0.9 x the width); the frame now keeps the aspect ratio, the patch
    (a network input) is cut inside it, a multiple of 32."""
    thin = Fingerprint([48, 1280], input_size((48, 1280)), thickness=None, box_size=18.0)
    plan = make_plan(thin, "cpu")
    assert (plan.scale, plan.frame_size, plan.image_size, plan.patches) == (0.9, [43, 1152], [32, 128], True)
    assert abs(plan.frame_size[0] / plan.frame_size[1] - 48 / 1280) < 0.001
    assert plan.describe()[0].startswith("plan: frames resized to 1152x43 (WxH, scale 0.9), the network trains on 128x32 patches")
    cfg = from_dict(trial_base(BASE, LoopSettings(dataset="toy"), "toy_BASELINE", plan))  # a valid config: frame >= patch
    assert (cfg.frame_size, cfg.window) == ((43, 1152), (32, 128))
    odd = make_plan(Fingerprint([701, 509], [160, 128], thickness=3.0), "cpu")  # odd sizes at native scale: kept to the pixel
    assert (odd.frame_size, odd.image_size) == ([701, 509], [128, 128])
    tiny = make_plan(Fingerprint([20, 2000], [32, 160], box_size=20.0), "cpu")  # under 32 px: raised to the smallest patch
    assert (tiny.scale, tiny.frame_size, tiny.image_size) == (0.8, [32, 1600], [32, 128])


@pytest.mark.parametrize(
    ("fp", "side", "patch", "batch"),
    [
        (CCTV, None, [256, 256], 32),  # 704x512 x 8 / 256x256 = 44 inputs: 32, the cap
        (CCTV, 512, [512, 512], 8),  # 11 inputs: 8
        (Fingerprint([600, 1500], [64, 160], thickness=3.0), 1024, [576, 1024], 4),  # 4.9 inputs: 4
        (Fingerprint([3000, 4000], [128, 160], thickness=3.0), 2048, [2048, 2048], 2),  # under one input: the floor, 2
    ],
)
def test_a_gpu_plans_its_batch_from_the_input_area_and_a_cpu_keeps_the_configs(fp, side, patch, batch):
    gpu = make_plan(fp, "gpu", patch_side=side)
    assert (gpu.image_size, gpu.batch_size) == (patch, batch) and gpu.reasons[-1].startswith(f"batch size {batch}: on a GPU")
    assert gpu.describe()[-1] == "  - " + gpu.reasons[-1]
    assert gpu.apply(dict(BASE))["batch_size"] == batch
    cpu = make_plan(fp, "cpu", patch_side=side)
    assert cpu.batch_size is None and cpu.reasons[-1].startswith("batch size: the config's") and cpu.apply(dict(BASE))["batch_size"] == BASE["batch_size"]


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
    assert fp.describe(False).endswith("; whole-frame network input [128, 160] (from the images' shape)")
    assert fp.describe(False, planned=True).endswith("(6 boxes)")  # the plan's lines follow, with the input
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


def applied_plan(space, plan: Plan, fp: Fingerprint = CCTV) -> Plan | None:
    """The plan the loop gives its trials (LoopContext.plan) under ``space``."""
    return LoopContext.plan.fget(SimpleNamespace(record=LoopRecord(settings={}, data=DataRecord(fingerprint=fp, plan=plan)), space=space, base=BASE))


def test_the_gpu_space_leaves_the_resolution_and_the_batch_to_the_plan():
    """search_spaces/default.yaml (GPU) searched image_size (and batch_size), so on a GPU the plan was
    never applied; it now sets neither, and large frames get the GPU's patch plan."""
    space = load_space(REPO / "search_spaces" / "default.yaml", BASE)
    assert not_applied(space, BASE) is None and not space.sets("batch_size")
    plan = make_plan(PHOTOS, "gpu")
    assert (plan.scale, plan.frame_size, plan.image_size, plan.patches, plan.batch_size) == (0.8, [768, 1024], [256, 256], True, 32)
    assert applied_plan(space, plan, PHOTOS) == plan
    cfg = from_dict(space.apply(trial_base(BASE, LoopSettings(dataset="toy"), "toy_BASELINE", applied_plan(space, plan, PHOTOS)), {"learning_rate": 1e-3}))
    assert (cfg.frame_size, cfg.window, cfg.batch_size, cfg.amp, cfg.learning_rate) == ((768, 1024), (256, 256), 32, True, 1e-3)


def test_a_space_that_sets_batch_size_keeps_its_batch_and_the_plan_says_so():
    plan = make_plan(CCTV, "gpu")
    batched = parse_space({"params": {"batch_size": {"choice": [8, 16]}}})
    kept = applied_plan(batched, plan)
    assert (kept.image_size, kept.frame_size, kept.batch_size) == (plan.image_size, plan.frame_size, None)
    assert kept.reasons[:-1] == plan.reasons[:-1] and kept.reasons[-1] == SPACE_BATCH and kept.describe()[-1] == "  - " + SPACE_BATCH
    assert batched.apply(trial_base(BASE, LoopSettings(dataset="toy"), "toy_BASELINE", kept), {"batch_size": 16})["batch_size"] == 16
    searched = parse_space({"params": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}})
    assert applied_plan(searched, plan) == plan
    cpu = make_plan(CCTV, "cpu")
    assert applied_plan(batched, cpu) == cpu  # a CPU plan has no batch to give up


def test_the_trial_budget_line_says_how_a_trials_steps_grow_with_the_training_set():
    """cpu.yaml's 120 steps / 8 passes: train_steps decides for 72 BASELINE images, 8 passes for
    10,036 (10,032 steps, 84x the train_steps); epochs 1 with max_steps_per_epoch fixes the budget."""
    from bss.search.plan import trial_budget

    cfg = load_space(REPO / "search_spaces" / "cpu.yaml", BASE).apply(BASE, {})
    assert trial_budget(cfg, 72).startswith("trial budget: 126 optimizer steps of 8 images (14 passes over 72 images): train_steps 120 decides")
    big = trial_budget(cfg, 10_036)
    assert big.startswith(
        "trial budget: 10,032 optimizer steps of 8 images (8 passes over 10,036 images): epochs 8 decides (train_steps 120 would be 84x fewer)"
    )
    assert "max_steps_per_epoch" in big and "--budget" in big
    capped = trial_budget(dict(cfg, epochs=1, train_steps=0, max_steps_per_epoch=120), 10_036)
    assert (
        capped
        == "trial budget: 120 optimizer steps of 8 images (1 pass over 10,036 images, at most 120 steps a pass): fixed, whatever the size of the training set"
    )
