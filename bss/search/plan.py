"""The loop's plan: at which scale the network sees the frames, and whether it sees them whole or
in patches (as nnU-Net plans a configuration from the dataset's fingerprint).

Squeezing every frame to one input (the longer side ``WHOLE_SIDE``: 160 on a CPU, 256 on a GPU)
is right for small frames with large objects (the synthetic default), and fatal for real ones: a
704x512 CCTV frame squeezed to 160x128 turns a 3-px crack into a 0.7-px one, and a 20-px object
in a 1280x960 photo into 2.5 px, gone after the encoder's first strides. So the plan keeps the whole frame only where the thin defects and small
boxes survive its scale; otherwise it picks the smallest scale that keeps them, and where the
frame at that scale is larger than one network input, the network trains on random patches of it
and predicts with overlapping sliding windows (``Config.patches``).

A patch plan's frame keeps the median shape's aspect ratio (each side a whole pixel: patches are
cut from inside it and windows slide over it, so it need not be a multiple of 32); the patch, a
network input, is a multiple of 32. A whole frame is one network input, its sides multiples of
32: at ``WHOLE_SIDE`` the nearest (:func:`~bss.search.fingerprint.input_size`, as before); at a
planned scale (a frame that fits one patch) rounded up, so the planned minimums hold.

The batch size: the config's on a CPU (the time budget limits a trial there); on a GPU, where
memory limits it, one planned from the network input's area (:func:`plan_batch`).

The trial budget (:func:`trial_budget`, printed at each search's start) is not planned: trials
train ``max(train_steps, epochs passes)`` optimizer steps (the CPU space: 120 steps / 8 passes),
so past ``train_steps x batch_size / epochs`` training images (120 on the CPU space) a trial's cost
grows with the data: 8 passes over 10,000 images are 10,000 steps of 8, 83 times the 120 of a
small set. A fixed number of steps whatever the size (as nnU-Net's 250 x 1000) is the space's
``fixed: {epochs: 1, max_steps_per_epoch: S}``; ``--budget`` bounds the whole loop's time instead.

The plan is made once, by the data stage, and kept in ``state.json`` (a resumed run keeps its
plan); every trial's config records it, so ``predict.py`` needs no flag. It is not applied where
the search space fixes or searches ``image_size`` (or the base config or space sets
``patches.frame_size``): the user planned it. A space that sets ``batch_size`` keeps its batch
(:func:`for_space`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from bss.errors import BSSError
from bss.search.fingerprint import LONG_SIDE, Fingerprint, input_size

# Thinnest defect (median thickness, px) and smallest object (boxes' median size, the square root of the area, px) the
# network should see: an encoder halves the resolution 5 times; below ~4 px a crack is one
# blurred pixel after the first two strides, and below ~16 px an object is one cell at stride 16.
MIN_THICKNESS = 4.0
MIN_OBJECT = 16.0
# Patch (and sliding window) side: 128 keeps a CPU trial at today's cost (a 128x160 input); a
# GPU affords 256, more context per patch for the same number of steps. Multiples of 32: the
# UNet halves the input 5 times (a frame, cut into patches or windows, need not be).
PATCH_SIDE = {"cpu": 128, "gpu": 256}
# A whole frame's longer side: today's 160 on a CPU; a GPU's input side, 256 (its patch side; the
# GPU space used to search 256x192 and 384x288 inputs), so a frame up to 256 px is seen whole.
WHOLE_SIDE = {"cpu": LONG_SIDE, "gpu": 256}
UNIT = 32
SCALE_STEP = 0.1  # a planned scale below 1 is rounded up to a multiple of this (then the minimums hold)
# Batch: on a CPU the time budget, not memory, limits a trial, so the config's (the CPU space
# fixes it). On a GPU memory does: the batch keeps batch x input pixels near GPU_BATCH_PIXELS
# (8 inputs of 704x512: a resnet34 UNetAttention step peaks at 2.6 GiB with AMP, 4.7 GiB in fp32
# in BENCHMARKS.md's H200 table: room for larger encoders and two trials a GPU), a power of two
# from GPU_BATCH_MIN to GPU_BATCH_MAX (the largest the GPU space used to search; more would
# leave a small training set few steps per epoch).
GPU_BATCH_PIXELS = 8 * 512 * 704
GPU_BATCH_MIN, GPU_BATCH_MAX = 2, 32
CONFIG_BATCH = "batch size: the config's (on a CPU the time budget, not memory, limits a trial)"
SPACE_BATCH = "batch size: the search space's (it sets batch_size; the plan's is not used)"
RESOLUTIONS = ("auto", "whole")  # --resolution: plan from the fingerprint | the whole frame at WHOLE_SIDE


@dataclass
class Plan:
    """How trials see the frames: every frame resized to ``frame_size`` (``scale`` x the median
    shape, 1 = native), the network input ``image_size``: the whole frame, or (``patches``)
    random patches in training and sliding windows in inference. ``batch_size`` None: the config's
    (a CPU's), else the GPU's planned batch."""

    scale: float
    frame_size: list  # [height, width]: a patch plan's keeps the aspect ratio; a whole frame's is image_size
    image_size: list  # [height, width], multiples of 32: the network input (patch / window)
    patches: bool
    batch_size: int | None = None
    reasons: list[str] = field(default_factory=list)  # one line each: the scale, patches or whole, the patch size, the batch

    def describe(self) -> list[str]:
        """The plan in one headline and its reasons, one line each (printed at the loop's start)."""
        fh, fw = self.frame_size
        ih, iw = self.image_size
        if self.patches:
            head = f"plan: frames resized to {fw}x{fh} (WxH, scale {self.scale:g}), the network trains on {iw}x{ih} patches and predicts with sliding windows"
        else:
            head = f"plan: whole frames, the network input {iw}x{ih} (WxH, scale {self.scale:g})"
        return [head] + [f"  - {r}" for r in self.reasons]

    def apply(self, cfg: dict) -> dict:
        """``cfg`` (a config dict) with the plan's ``image_size``, and for a patch plan its
        ``patches.frame_size`` (the base config's other patch settings kept)."""
        cfg["image_size"] = list(self.image_size)
        if self.patches:
            cfg["patches"] = dict(cfg.get("patches") or {}, frame_size=list(self.frame_size))
        if self.batch_size is not None:
            cfg["batch_size"] = int(self.batch_size)
        return cfg


def trial_budget(cfg: dict, train_images: int) -> str:
    """One line: the optimizer steps a trial of config ``cfg`` (the space's fixed keys applied)
    trains on ``train_images`` images, and whether that grows with the data."""
    from bss.config import from_dict

    c = from_dict(cfg)
    per_epoch, epochs = c.steps_per_epoch(train_images), c.planned_epochs(train_images)
    steps = per_epoch * epochs
    head = f"trial budget: {steps:,} optimizer steps of {c.batch_size} images ({epochs} pass{'es' if epochs != 1 else ''} over {train_images:,} images"
    if c.max_steps_per_epoch and per_epoch < max(1, train_images // c.batch_size):
        return head + f", at most {c.max_steps_per_epoch} steps a pass): fixed, whatever the size of the training set"
    if not c.train_steps:
        return head + f"): epochs {c.epochs} decides, so the budget grows with the training set"
    if steps <= c.train_steps + per_epoch:
        return head + f"): train_steps {c.train_steps} decides"
    return (
        head + f"): epochs {c.epochs} decides (train_steps {c.train_steps} would be {steps / c.train_steps:.0f}x fewer), so it grows with the training set; "
        "to fix it, set the space's fixed epochs: 1 and max_steps_per_epoch, or bound the loop with --budget"
    )


def check_resolution(resolution: str, patch_size: int | None) -> None:
    """``--resolution`` and ``--patch-size``, refused in one line naming the flag and what is valid."""
    if resolution not in RESOLUTIONS:
        raise BSSError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}.")
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 32 or patch_size % 32):
        raise BSSError(f"--patch-size must be a multiple of 32 (32, 64, ..., the patch's side in pixels), got {patch_size!r}.")


def not_applied(space, base: dict) -> str | None:
    """Why the plan is not applied (None: it is): the user sized the input themselves."""
    if space is not None and space.sets("image_size"):
        return "the search space sets image_size"
    if space is not None and space.sets("patches.frame_size"):
        return "the search space sets patches.frame_size"
    if (base.get("patches") or {}).get("frame_size") is not None:
        return "the base config sets patches.frame_size"
    return None


def for_space(plan: Plan, space) -> Plan:
    """``plan`` as the trials get it under ``space``: where the space fixes or searches
    ``batch_size``, the batch is the space's (its reason line says so)."""
    if plan.batch_size is None or space is None or not space.sets("batch_size"):
        return plan
    return replace(plan, batch_size=None, reasons=[SPACE_BATCH if r.startswith("batch size") else r for r in plan.reasons])


def whole_frame(fp: Fingerprint, why: str, long_side: int = LONG_SIDE) -> Plan:
    """The whole frame, its longer side ``long_side`` (at LONG_SIDE: ``fp.input_size``, today's
    plan), the aspect ratio kept, multiples of 32; no batch (the config's; :func:`make_plan`
    plans it)."""
    scale = round(min(1.0, long_side / max(fp.median_shape)), 3)
    size = list(fp.input_size) if long_side == LONG_SIDE else input_size(tuple(fp.median_shape), long_side)
    return Plan(scale, size, list(size), False, None, [why, "whole frames: each frame is one network input (no patches)"])


def shortfalls(fp: Fingerprint, scale: float) -> list[tuple[str, float]]:
    """(what is lost at ``scale``, the scale that keeps it) for the thin defects and the small boxes."""
    lost = []
    for name, value, least in (("the defects' median thickness", fp.thickness, MIN_THICKNESS), ("the boxes' median size", fp.box_size, MIN_OBJECT)):
        if value and value * scale < least:
            lost.append((f"{name} {value:g} px would be {value * scale:.1f} px (under {least:g})", least / value))
    return lost


def planned_scale(needed: float) -> float:
    """The smallest multiple of SCALE_STEP at least ``needed``, at most 1 (native: never upsampled)."""
    return min(1.0, round(math.ceil(needed / SCALE_STEP - 1e-9) * SCALE_STEP, 3))


def scaled_frame(shape: list, scale: float) -> list[int]:
    """The median shape at ``scale``, each side rounded to a whole pixel, so the aspect ratio is
    kept (sliding windows cover a frame of any size); at least UNIT, the smallest patch a frame
    must hold (a training patch is cut from inside the frame, never padded)."""
    return [max(UNIT, math.floor(side * scale + 0.5)) for side in shape]


def network_input(frame: list) -> list[int]:
    """A whole frame as one network input: each side rounded UP to a multiple of UNIT, so the
    planned scale's minimums still hold (at most UNIT - 1 px stretched)."""
    return [UNIT * math.ceil(side / UNIT) for side in frame]


def patch_size(frame: list, side: int) -> list[int]:
    """The patch (and window) cut from ``frame``: ``side`` on each axis, or less where the frame
    is smaller, rounded DOWN to a multiple of UNIT so the patch lies inside the frame."""
    return [min(side, UNIT * (length // UNIT)) for length in frame]


def plan_batch(plan: Plan, device_kind: str) -> Plan:
    """``plan`` with its batch size and that reason line: the config's on a CPU; on a GPU from
    the network input's area (see GPU_BATCH_PIXELS)."""
    if device_kind != "gpu":
        return replace(plan, batch_size=None, reasons=[*plan.reasons, CONFIG_BATCH])
    h, w = plan.image_size
    fits = GPU_BATCH_PIXELS // (h * w)
    batch = min(GPU_BATCH_MAX, max(GPU_BATCH_MIN, 1 << (max(1, fits).bit_length() - 1)))  # the largest power of two <= fits, bounded
    why = (
        f"batch size {batch}: on a GPU, batch x input pixels near 8 x 704x512 ({fits} inputs of {w}x{h}), "
        f"a power of two from {GPU_BATCH_MIN} to {GPU_BATCH_MAX} (batch_size in the search space overrides)"
    )
    return replace(plan, batch_size=batch, reasons=[*plan.reasons, why])


def make_plan(fp: Fingerprint, device_kind: str = "cpu", resolution: str = "auto", patch_side: int | None = None) -> Plan:
    """The plan for a dataset of fingerprint ``fp`` on ``device_kind`` (cpu | gpu); see the module."""
    check_resolution(resolution, patch_side)
    return plan_batch(plan_input(fp, device_kind, resolution, patch_side), device_kind)


def plan_input(fp: Fingerprint, device_kind: str, resolution: str, patch_side: int | None) -> Plan:
    """The plan's scale, frame and network input (its batch left to :func:`plan_batch`)."""
    h, w = fp.median_shape
    side = WHOLE_SIDE.get(device_kind, LONG_SIDE)
    on = f"{side} px ({device_kind.upper()})"
    whole = min(1.0, side / max(h, w))
    if resolution == "whole":
        return whole_frame(fp, f"scale {whole:.3g}: --resolution whole, the longer side squeezed to {on} whatever the defects", side)
    if whole >= 1.0:
        return whole_frame(fp, f"scale 1: the {w}x{h} frames are no larger than the whole-frame input, {on}, so the whole frame loses nothing", side)
    lost = shortfalls(fp, whole)
    if not lost:
        return whole_frame(fp, f"scale {whole:.3g}: the longer side squeezed to {on} keeps {kept(fp, whole)}", side)
    scale = planned_scale(max(need for _, need in lost))
    why = f"scale {scale:g}" + (" (native)" if scale == 1 else "") + f": at the whole frame's scale {whole:.3g}, " + "; ".join(what for what, _ in lost)
    why += f"; at {scale:g} it keeps {kept(fp, scale)}" if scale < 1 else "; native scale keeps every pixel there is (never upsampled)"
    return patch_plan(fp, scale, why, device_kind, patch_side)


def kept(fp: Fingerprint, scale: float) -> str:
    """What survives at ``scale``: the thickness and box side there, against the minimums."""
    parts = [f"defects {fp.thickness * scale:.1f} px thick (>= {MIN_THICKNESS:g})"] if fp.thickness else []
    parts += [f"boxes {fp.box_size * scale:.1f} px in size (>= {MIN_OBJECT:g})"] if fp.box_size else []
    return ", ".join(parts) or "everything (no defect or box measured)"


def patch_plan(fp: Fingerprint, scale: float, why: str, device_kind: str, patch_side: int | None) -> Plan:
    """The frame at ``scale``: whole where it fits one patch, else patches of the device's side."""
    frame = scaled_frame(fp.median_shape, scale)
    side = patch_side or PATCH_SIDE.get(device_kind, PATCH_SIDE["cpu"])
    source = f"--patch-size {side}" if patch_side else f"{side} px by default on {device_kind.upper()} (--patch-size overrides)"
    whole = network_input(frame)
    if whole[0] <= side and whole[1] <= side:
        fits = f"whole frames: the {frame[1]}x{frame[0]} frame at this scale fits one {side}-px input ({source}): no patches"
        fits += f", the input {whole[1]}x{whole[0]} (rounded up to multiples of {UNIT})" if whole != frame else ""
        return Plan(scale, whole, whole, False, None, [why, fits])
    patch = patch_size(frame, side)
    reasons = [
        why,
        f"patches: the {frame[1]}x{frame[0]} frame at this scale (aspect kept) is larger than one {side}-px input; training cuts random patches, inference slides overlapping windows",
        f"patch {patch[1]}x{patch[0]}: {source}, capped by the frame; multiples of {UNIT}",
    ]
    return Plan(scale, frame, patch, True, None, reasons)
