"""Shared fixtures: tiny real datasets written to tmp folders (64 px images, real PNG files)."""

from __future__ import annotations

import os
import tempfile

# the decode-once image cache of every test run goes to a throw-away folder, not ~/.cache
if "BSS_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    os.environ["BSS_CACHE_DIR"] = tempfile.mkdtemp(prefix="bss-test-cache-")
    atexit.register(shutil.rmtree, os.environ["BSS_CACHE_DIR"], ignore_errors=True)
from bss.environment import quiet  # noqa: E402

quiet(offline=True, bars=False)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bss.data.io import write_image, write_mask  # noqa: E402
from bss.data.via import write_via_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "coudlabs_sewer"


def make_source_dataset(root: Path, name: str = "toy", n: int = 12, labelled: int = 9, size=(64, 64), seed: int = 0) -> Path:
    """A learnable toy dataset: dark noisy background, one bright irregular blob per image.

    masks/ holds the blob's filled bounding box, labels.csv exact polygons for ``labelled``
    images, truth/ the exact masks of all.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    folder = root / name
    for sub in ("images", "masks", "truth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = {}
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        cx, cy = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h)
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = rng.uniform(0.12, 0.22, size=10) * min(h, w)
        px = np.clip(cx + radii * np.cos(angles), 0, w - 1).round(1)
        py = np.clip(cy + radii * np.sin(angles), 0, h - 1).round(1)
        import cv2

        truth = np.zeros((h, w), np.uint8)
        cv2.fillPoly(truth, [np.round(np.stack([px, py], 1)).astype(np.int32)], 1)
        img = rng.normal(60, 12, size=(h, w, 3)) + 20 * np.sin(xx / 7.0)[..., None]
        img[truth > 0] += 110
        write_image(folder / "images" / f"img_{i:03d}.png", np.clip(img, 0, 255).astype(np.uint8))
        box = np.zeros_like(truth)
        ys, xs = np.nonzero(truth)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
        write_mask(folder / "masks" / f"img_{i:03d}.png", box)
        write_mask(folder / "truth" / f"img_{i:03d}.png", truth)
        shape = {"name": "polygon", "all_points_x": px.tolist(), "all_points_y": py.tolist()}
        rows[f"img_{i:03d}.png"] = [shape] if i < labelled else []
    write_via_csv(folder / "labels.csv", rows)
    return folder


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "datasets"
    make_source_dataset(root)
    return root


def tiny_config_dict(data_root: Path, tmp_path: Path, **over) -> dict:
    cfg = {
        "seed": 0,
        "epochs": 2,
        "learning_rate": 0.01,
        "batch_size": 4,
        "criterion": {"name": "TverskyLoss", "args": {"alpha": 0.5, "beta": 0.5}},
        "train_dataset": "toy_BASELINE",
        "evaluation_dataset": "toy_EVAL",
        "image_size": [64, 64],
        "model": {"name": "UNetAttention", "args": {"encoder_name": "resnet18", "encoder_weights": None, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        "val_per_epoch": 1,
        "visualization_samples": 2,
        "data_root": str(data_root),
        "output_dir": str(tmp_path / "run"),
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test", "enabled": False},
    }
    cfg.update(over)
    return cfg


def train_toy_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A tiny checkpoint (1 epoch on the toy frames, written under ``folder``) and the dataset root
    it was trained on."""
    from bss.config import from_dict
    from bss.data.splits import make_splits
    from bss.training.trainer import Trainer

    root = folder / "datasets"
    make_source_dataset(root)
    make_splits("toy", root, progress=False)
    cfg = from_dict(tiny_config_dict(root, folder, epochs=1, visualization_samples=0))
    return Trainer(cfg, progress=False).fit().checkpoint, root


def run_driver(name: str, *args, env: dict | None = None, cwd=None):
    """``python drivers/<name> args`` as a user runs it (no progress bars), output captured."""
    import subprocess
    import sys

    full_env = dict(os.environ, TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.run([sys.executable, str(REPO / "drivers" / name), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


def train_oracle_teacher(root: Path, source: Path, folder: Path, epochs: int) -> Path:
    """A teacher trained on the *truth* masks of every image of ``source`` (a temporary
    ``toy_TRUTH`` dataset, removed afterwards): a model that refines boxes well. Its checkpoint."""
    import shutil

    from bss.config import from_dict
    from bss.data.io import link_or_copy
    from bss.training.trainer import Trainer

    oracle = root / "toy_TRUTH"
    for sub in ("images", "masks"):
        (oracle / sub).mkdir(parents=True)
    for path in sorted((source / "images").iterdir()):
        link_or_copy(path, oracle / "images" / path.name)
        link_or_copy(source / "truth" / path.name, oracle / "masks" / path.name)
    cfg = from_dict(tiny_config_dict(root, folder, epochs=epochs, train_dataset="toy_TRUTH", visualization_samples=0))
    checkpoint = Trainer(cfg, progress=False).fit().checkpoint
    shutil.rmtree(oracle)
    return checkpoint


def recompute_iou(checkpoint: Path, data_root: Path, dataset: str) -> float:
    """The micro IoU of a (whole-frame) checkpoint on ``dataset``, computed here without the
    trainer, at each image's native size as EVAL counts it: files read with PIL, resized with cv2
    (area down, linear up), normalised with ImageNet's figures, one fp32 forward of every image at
    once, the sigmoid resized back (cv2, linear) to the image's size and thresholded at 0.5,
    counted in numpy against the mask as it is on disk. A recorded ``eval_iou`` must agree with it."""
    import cv2
    import torch
    from PIL import Image

    from bss.training.checkpoint import load_model

    model, cfg = load_model(checkpoint)
    assert not cfg.patches.enabled, "recompute_iou predicts whole frames"
    height, width = cfg.image_size
    folder = Path(data_root) / dataset
    images, masks = [], []
    for path in sorted((folder / "images").iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        masks.append(np.asarray(Image.open(folder / "masks" / f"{path.stem}.png").convert("L")) > 0)
        area = cv2.INTER_AREA if rgb.shape[0] > height else cv2.INTER_LINEAR
        images.append(cv2.resize(rgb, (width, height), interpolation=area).astype(np.float32) / 255.0)
    x = (np.stack(images) - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    with torch.no_grad():
        probs = torch.sigmoid(model.float().eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))).numpy()[:, 0]
    tp = fp = fn = 0
    for prob, truth in zip(probs, masks):
        pred = cv2.resize(prob, truth.shape[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
        tp, fp, fn = tp + int((pred & truth).sum()), fp + int((pred & ~truth).sum()), fn + int((~pred & truth).sum())
    return tp / (tp + fp + fn) if tp + fp + fn else 1.0
