"""bss.predict / drivers/predict.py: masks, overlays and probabilities for new images of any size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, train_toy_checkpoint
from PIL import Image

from bss.data.io import read_image, write_image
from bss.errors import BSSError, DatasetError
from bss.inference import Predictor
from bss.predict import predict_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_toy_checkpoint(tmp_path_factory.mktemp("predict"))[0]


@pytest.fixture
def new_images(tmp_path):
    """Three new images of different sizes and formats (a grey jpg among them)."""
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a.png": (64, 64), "b.png": (75, 120), "c.jpg": (100, 50)}.items():
        img = rng.integers(20, 80, size=(h, w, 3)).astype(np.uint8)
        img[h // 3 : 2 * h // 3, w // 4 : w // 2] = 230
        write_image(folder / name, img)
    Image.open(folder / "c.jpg").convert("L").save(folder / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_masks_overlays_and_probabilities_at_each_images_size(checkpoint, new_images, tmp_path):
    out = tmp_path / "out"
    result = predict_folder(checkpoint, new_images, out, probabilities=True, batch_size=2, progress=False)
    assert result.count == 3
    assert sorted(p.name for p in out.iterdir()) == ["masks", "overlays", "predictions.json", "probabilities"]
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for name in ("a.png", "b.png", "c.jpg"):
        stem = name.split(".")[0]
        rgb = read_image(new_images / name)
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        prob8 = np.asarray(Image.open(out / "probabilities" / f"{stem}.png"))
        overlay = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        assert mask.shape == prob8.shape == rgb.shape[:2] and overlay.shape == rgb.shape
        assert set(np.unique(mask)) <= {0, 255}
        expected = predictor.predict_image(rgb)
        assert np.array_equal(mask == 255, expected > predictor.config.threshold)
        assert np.abs(prob8.astype(float) - expected * 255).max() <= 1.0
        tinted = mask == 255
        if tinted.any():  # the overlay is the image, reddened where the mask is
            assert overlay[tinted][:, 0].mean() > rgb[tinted][:, 0].mean()
        assert np.array_equal(overlay[~tinted], rgb[~tinted])  # and untouched elsewhere
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["count"] == 3 and [r["image"] for r in summary["images"]] == ["a.png", "b.png", "c.jpg"]
    assert summary["images"][1]["height"] == 75 and summary["images"][1]["width"] == 120


def test_without_overlays_or_probabilities(checkpoint, new_images, tmp_path):
    out = tmp_path / "out"
    predict_folder(checkpoint, new_images, out, overlays=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["masks", "predictions.json"]


def test_non_empty_out_needs_overwrite(checkpoint, new_images, tmp_path):
    out = tmp_path / "out"
    predict_folder(checkpoint, new_images, out, progress=False)
    first = (out / "masks" / "b.png").read_bytes()
    with pytest.raises(BSSError, match="not empty"):
        predict_folder(checkpoint, new_images, out, progress=False)
    # every mask is rewritten: one replaced by a checkerboard (no prediction looks like that) comes
    # back as the very mask a run into an empty folder writes
    Image.fromarray((np.indices((75, 120)).sum(0) % 2 * 255).astype(np.uint8)).save(out / "masks" / "b.png")
    assert (out / "masks" / "b.png").read_bytes() != first
    predict_folder(checkpoint, new_images, out, overwrite=True, threshold=0.999, progress=False)
    fresh = predict_folder(checkpoint, new_images, tmp_path / "fresh", threshold=0.999, progress=False).out
    for name in ("a.png", "b.png", "c.png"):
        assert (out / "masks" / name).read_bytes() == (fresh / "masks" / name).read_bytes(), name
    assert json.loads((out / "predictions.json").read_text())["threshold"] == 0.999
    # a folder holding something predict did not write is never replaced
    (out / "thesis.docx").write_text("precious")
    with pytest.raises(BSSError, match="did not write"):
        predict_folder(checkpoint, new_images, out, overwrite=True, progress=False)
    assert (out / "thesis.docx").exists()
    (out / "thesis.docx").unlink()
    # nor a user's own masks/ beside a prediction, nor a masks/ folder with no prediction at all
    write_png = lambda path: Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)  # noqa: E731
    write_png(out / "masks" / "my_hand_mask.png")
    with pytest.raises(BSSError, match=r"holds 'masks/my_hand_mask.png', which predict did not write"):
        predict_folder(checkpoint, new_images, out, overwrite=True, progress=False)
    mine = tmp_path / "mine"
    (mine / "masks").mkdir(parents=True)
    write_png(mine / "masks" / "a.png")
    with pytest.raises(BSSError, match="no readable predictions.json"):
        predict_folder(checkpoint, new_images, mine, overwrite=True, progress=False)
    assert (mine / "masks" / "a.png").is_file() and (out / "masks" / "my_hand_mask.png").is_file()
    # an existing empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_folder(checkpoint, new_images, empty, progress=False).count == 3


def test_corrupt_image_is_named_and_nothing_is_written(checkpoint, new_images, tmp_path):
    (new_images / "b.png").write_bytes((new_images / "b.png").read_bytes()[:100])
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="b.png"):
        predict_folder(checkpoint, new_images, out, num_workers=1, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    empty = tmp_path / "empty_out"
    empty.mkdir()
    with pytest.raises(DatasetError, match="b.png"):
        predict_folder(checkpoint, new_images, empty, progress=False)
    assert empty.is_dir() and not any(empty.iterdir())


def test_missing_or_empty_images_folder(checkpoint, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        predict_folder(checkpoint, tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        predict_folder(checkpoint, tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_checkpoint(new_images, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(BSSError, match="bad.pt"):
        predict_folder(tmp_path / "bad.pt", new_images, tmp_path / "out", progress=False)
    with pytest.raises(BSSError, match="not found"):
        predict_folder(tmp_path / "missing.pt", new_images, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_out_inside_images_is_refused(checkpoint, new_images):
    with pytest.raises(BSSError, match="outside"):
        predict_folder(checkpoint, new_images, new_images, progress=False)


def test_driver(checkpoint, new_images, tmp_path):
    env = dict(os.environ, TQDM_DISABLE="1")
    cmd = [
        sys.executable,
        str(REPO / "drivers" / "predict.py"),
        "--model",
        str(checkpoint),
        "--images",
        str(new_images),
        "--out",
        str(tmp_path / "out"),
        "--probabilities",
        "--workers",
        "0",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "3 images" in run.stdout and len(list((tmp_path / "out" / "probabilities").iterdir())) == 3
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and again.stderr.strip().count("\n") == 0
