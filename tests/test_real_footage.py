"""Real sewer CCTV footage end to end: YOLO import -> labels -> split -> tiny training -> predict.

Uses the 92 Co-UDlabs frames in ../shared (Kazemi & Tait, CC attribution: see README), read in
place. The "hand labels" here are the YOLO boxes written as VIA rect regions, which is enough to
exercise the whole path on real images.
"""

from __future__ import annotations

import pytest
from conftest import SHARED, recompute_iou, tiny_config_dict

from bss.config import from_dict
from bss.data.io import image_size, read_mask
from bss.data.splits import make_splits
from bss.data.via import read_via_csv, write_via_csv
from bss.data.yolo_import import import_yolo
from bss.predict import predict_folder
from bss.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real sewer data not found at {SHARED} (the shared/ folder beside the repo)")


def boxes_as_rects(mask):
    """The filled boxes of a coarse mask, as VIA rect regions (one per connected component)."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype("uint8"))
    return [{"name": "rect", "x": int(x), "y": int(y), "width": int(w), "height": int(h)} for x, y, w, h, _ in stats[1:n]]


def test_import_train_predict_on_real_footage(tmp_path):
    root = tmp_path / "datasets"
    manifest = import_yolo(SHARED, "obstacle", "sewer", data_root=root, log=lambda m: None)
    folder = root / "sewer"
    images = sorted((folder / "images").iterdir())
    with_class = [p for p in SHARED.glob("labels/*/*.txt") if any(line.split()[:1] == ["1"] for line in p.read_text().splitlines())]
    assert len(images) == manifest["counts"]["images_with_class"] == len(with_class)
    # label 24 images by hand (here: their boxes as rects); the rest stay box-only
    rows = {}
    for i, path in enumerate(images):
        mask = read_mask(folder / "masks" / f"{path.stem}.png")
        rows[path.name] = boxes_as_rects(mask) if i < 24 else []
    write_via_csv(folder / "labels.csv", rows)
    assert len(read_via_csv(folder / "labels.csv").labelled) == 24
    counts = make_splits("sewer", root, (0.5, 0.25, 0.25), progress=False)
    assert counts == {"BASELINE": 12, "EVAL": 6, "TEST": 6}

    cfg = tiny_config_dict(root, tmp_path, train_dataset="sewer_BASELINE", evaluation_dataset="sewer_EVAL", epochs=1, visualization_samples=1)
    result = Trainer(from_dict(cfg), progress=False).fit()
    # the EVAL IoU recomputed from the checkpoint and the real frames (352x288 -> 64x64) without the
    # trainer (abs 1e-3: a logit near 0 may round the other way; a wrong figure is off by far more)
    assert result.best_metrics["iou"] == pytest.approx(recompute_iou(result.checkpoint, root, "sewer_EVAL"), abs=1e-3)

    test_images = SHARED / "images" / "test"
    out = tmp_path / "pred"
    predicted = predict_folder(result.checkpoint, test_images, out, probabilities=True, progress=False)
    assert predicted.count == len(list(test_images.glob("*.png")))
    for path in test_images.glob("*.png"):
        mask_path = out / "masks" / f"{path.stem}.png"
        assert image_size(mask_path) == image_size(path) == (288, 352)
