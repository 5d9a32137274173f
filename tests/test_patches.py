"""Patch training (config key ``patches``): random patches cut from frames cached at ``frame_size``.

The frames are real PNGs whose red channel is the column and green channel the row, so the first
pixel of a patch names where it was cut; each has one small square of foreground (or none).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_source_dataset, tiny_config_dict
from PIL import Image
from torch.utils.data import DataLoader

from bss.config import StudentConfig, from_dict
from bss.data.io import write_image, write_mask
from bss.data.segmentation_dataset import SegmentationDataset, to_tensor
from bss.data.splits import make_splits
from bss.losses.masked import IGNORE
from bss.training.trainer import Trainer

H, W, P, S = 96, 160, 32, 4  # frame, patch and foreground square sides
SQUARES = {"img_00": (60, 120), "img_01": (0, W - S), "img_02": None}  # top-left of each frame's square; a frame without foreground


def coordinate_image() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)


def square_mask(corner) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    if corner is not None:
        mask[corner[0] : corner[0] + S, corner[1] : corner[1] + S] = 1
    return mask


@pytest.fixture
def frames(tmp_path):
    folder = tmp_path / "frames"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for stem, corner in SQUARES.items():
        write_image(folder / "images" / f"{stem}.png", coordinate_image())
        write_mask(folder / "masks" / f"{stem}.png", square_mask(corner))
    return folder


def patches(folder, foreground: float = 1 / 3, **kw) -> SegmentationDataset:
    return SegmentationDataset(folder, (H, W), cache=False, patch=(P, P), foreground=foreground, **kw).as_raw()


def origin(rgb: torch.Tensor) -> tuple[int, int]:
    """(top, left) of a raw, unaugmented patch of a coordinate image."""
    return int(rgb[0, 0, 1]), int(rgb[0, 0, 0])


def test_items_are_patches_cut_alike_from_image_and_mask(frames):
    data = patches(frames)
    normalised = SegmentationDataset(frames, (H, W), cache=False, patch=(P, P))
    for index, stem in enumerate(SQUARES):
        rgb, mask = data[(index, 3)]
        assert rgb.shape == (P, P, 3) and rgb.dtype == torch.uint8 and mask.shape == (P, P) and mask.dtype == torch.uint8
        top, left = origin(rgb)
        assert np.array_equal(rgb.numpy(), coordinate_image()[top : top + P, left : left + P])
        assert np.array_equal(mask.numpy(), square_mask(SQUARES[stem])[top : top + P, left : left + P])
        image, target = normalised[(index, 3)]
        assert image.shape == (3, P, P) and target.shape == (1, P, P)
        assert torch.equal(image, to_tensor(rgb.numpy())) and torch.equal(target[0], mask.float())
    # a patch as large as the frame is the frame: the same items as without patches, augmented alike
    whole = SegmentationDataset(frames, (H, W), augment=True, seed=0, cache=False).as_raw()
    same = SegmentationDataset(frames, (H, W), augment=True, seed=0, cache=False, patch=(H, W)).as_raw()
    assert all(torch.equal(a, b) for seed in range(3) for a, b in zip(whole[(0, seed)], same[(0, seed)]))
    with pytest.raises(ValueError, match=r"patch \[128, 32\] is larger than the frame \[96, 160\]"):
        SegmentationDataset(frames, (H, W), cache=False, patch=(128, 32))


def test_foreground_patches_hold_their_square(frames):
    data = patches(frames, foreground=1.0)
    for seed in range(50):
        assert data[(0, seed)][1].sum() == S * S  # centred on a pixel of the square: all of it inside
        rgb, mask = data[(1, seed)]
        assert origin(rgb) == (0, W - P) and mask.sum() == S * S  # the corner's square: shifted into the frame
    assert len({origin(patches(frames, foreground=1.0)[(2, seed)][0]) for seed in range(50)}) > 25  # no foreground: anywhere


def expected_share(corner) -> float:
    """The share of all patch positions that overlap the square at ``corner``."""
    tops, lefts = np.arange(H - P + 1), np.arange(W - P + 1)
    rows = ((tops + P > corner[0]) & (tops < corner[0] + S)).mean()
    cols = ((lefts + P > corner[1]) & (lefts < corner[1] + S)).mean()
    return float(rows * cols)


def test_random_patches_spread_over_the_frame(frames):
    seeds = range(200)
    anywhere = patches(frames, foreground=0.0)
    origins = [origin(anywhere[(0, seed)][0]) for seed in seeds]
    tops, lefts = [t for t, _ in origins], [left for _, left in origins]
    assert min(lefts) + P <= W // 2 and max(lefts) >= W // 2 and min(tops) + P <= H // 2 and max(tops) >= H // 2  # both halves, both ways
    share = np.mean([anywhere[(0, seed)][1].any().item() for seed in seeds])
    p = expected_share(SQUARES["img_00"])  # 0.146; 200 draws: standard deviation 0.025
    assert abs(share - p) < 0.08, (share, p)
    mixed = patches(frames)  # a third centred on the square, the rest anywhere
    share = np.mean([mixed[(0, seed)][1].any().item() for seed in seeds])
    assert abs(share - (1 / 3 + 2 / 3 * p)) < 0.1, share


def test_the_patch_follows_the_seed_and_without_one_the_index(frames):
    data = patches(frames, foreground=0.0)
    assert all(torch.equal(a, b) for a, b in zip(data[(0, 11)], data[(0, 11)]))
    assert len({origin(data[(0, seed)][0]) for seed in range(20)}) >= 18
    assert origin(data[0][0]) == origin(data[0][0]) == origin(patches(frames, foreground=0.0)[0][0])  # no seed: fixed by the index
    assert len({origin(data[i][0]) for i in range(3)}) == 3


def test_batches_do_not_depend_on_the_number_of_workers(frames):
    data = patches(frames, augment=True, seed=0)
    keys = [(i % 3, 1000 + i) for i in range(8)]
    runs = [[b for b in DataLoader(data, batch_size=4, sampler=keys, num_workers=workers)] for workers in (0, 2)]
    assert all(torch.equal(a, b) for x, y in zip(*runs) for a, b in zip(x, y))


def student_frames(root):
    """An H<n>-like folder of two refined frames: teacher probability 0.6 (mask 1, but unsure:
    ignored) on rows 40-59, cols 0-19 and 0.9 (sure foreground) on rows 40-59, cols 130-149."""
    folder = root / "toy_H1"
    for sub in ("images", "masks", "soft"):
        (folder / sub).mkdir(parents=True)
    prob = np.zeros((H, W), np.float32)
    prob[40:60, 0:20], prob[40:60, 130:150] = 0.6, 0.9
    for stem in ("img_00", "img_01"):
        write_image(folder / "images" / f"{stem}.png", coordinate_image())
        write_mask(folder / "masks" / f"{stem}.png", (prob > 0.5).astype(np.uint8))
        Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(folder / "soft" / f"{stem}.png")
    (folder / "manifest.json").write_text(json.dumps({"images": [{"image": f"img_0{i}.png", "origin": "refined"} for i in range(2)]}))
    return folder


def test_a_students_target_is_cut_with_the_image(tmp_path):
    folder = student_frames(tmp_path)
    student = StudentConfig(ignore_band=[0.3, 0.7])
    full = SegmentationDataset(folder, (H, W), cache=False, student=student).as_raw()[1][1].numpy()
    assert (full == IGNORE).sum() == 20 * 20 and (full == 1).sum() == 20 * 20
    data = patches(folder, foreground=1.0, student=student)
    for seed in range(30):
        rgb, target = data[(1, seed)]
        top, left = origin(rgb)
        assert target.dtype == torch.float32 and np.array_equal(target.numpy(), full[top : top + P, left : left + P])
        assert (target == 1).any() and left >= 130 - P // 2  # centred on the sure part, never on the ignored one


def test_patch_training_shares_the_frame_cache_with_evaluation(frames, tmp_path):
    cache = tmp_path / "cache"
    train = SegmentationDataset(frames, (H, W), augment=True, seed=0, cache_dir=cache, patch=(P, P)).prepare()
    evaluation = SegmentationDataset(frames, (H, W), cache_dir=cache).prepare()
    assert train._store.entry == evaluation._store.entry and [p.name for p in cache.iterdir() if p.is_dir()] == [train._store.entry.name]
    assert all(torch.equal(a, b) for a, b in zip(train.as_raw()[(1, 5)], patches(frames, augment=True, seed=0)[(1, 5)]))  # cached = decoded


def test_patches_are_cut_from_a_frame_of_any_size(tmp_path):
    """The plan keeps a frame's aspect ratio (e.g. 43x1152 for 48x1280 frames at scale 0.9), so a
    frame's sides need not be multiples of 32: patches of 32x64 from a cached 43x150 frame lie
    inside it, at every position, cut alike from image and mask."""
    frame = (43, 150)
    folder = tmp_path / "odd"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    yy, xx = np.mgrid[0 : frame[0], 0 : frame[1]]
    image = np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)
    mask = ((yy + xx) % 5 == 0).astype(np.uint8)
    write_image(folder / "images" / "a.png", image)
    write_mask(folder / "masks" / "a.png", mask)
    data = SegmentationDataset(folder, frame, cache_dir=tmp_path / "cache", patch=(32, 64), foreground=0.0).as_raw()
    origins = set()
    for seed in range(200):
        rgb, cut = data[(0, seed)]
        top, left = origin(rgb)
        assert rgb.shape == (32, 64, 3) and np.array_equal(rgb.numpy(), image[top : top + 32, left : left + 64])
        assert np.array_equal(cut.numpy(), mask[top : top + 32, left : left + 64])
        origins.add((top, left))
    assert {t for t, _ in origins} == set(range(frame[0] - 32 + 1)) and max(left for _, left in origins) <= frame[1] - 64


class ShapeRecordingTrainer(Trainer):
    def __init__(self, *args, **kw):
        self.shapes = []
        super().__init__(*args, **kw)

    def train_step(self, images, masks):
        self.shapes.append((tuple(images.shape), tuple(masks.shape)))
        return super().train_step(images, masks)


def test_trainer_trains_on_patches_of_frames(tmp_path):
    root = tmp_path / "datasets"
    make_source_dataset(root, size=(H, W))
    make_splits("toy", root, progress=False)
    over = {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2, "visualization_samples": 0, "patches": {"frame_size": [H, W], "foreground": 0.5}}
    trainer = ShapeRecordingTrainer(from_dict(tiny_config_dict(root, tmp_path, **over)), progress=False)
    assert (trainer.train_set.height, trainer.train_set.width, trainer.train_set.patch, trainer.train_set.foreground) == (H, W, (64, 64), 0.5)
    result = trainer.fit()
    assert trainer.shapes == [((2, 64, 64, 3), (2, 64, 64))] * 2 and all(math.isfinite(r["train_loss"]) for r in result.history)
    still = Trainer(from_dict(tiny_config_dict(root, tmp_path / "b", **over, augment=False)), progress=False)
    assert still._loader(still.train_set, True).sampler.with_seeds  # unaugmented, the patches still move from epoch to epoch
