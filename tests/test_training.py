"""One training run end to end on tiny real images: metrics, checkpoint, overlays, MLflow, seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, recompute_iou, tiny_config_dict
from PIL import Image

from bss.config import from_dict
from bss.data.splits import make_splits
from bss.training.checkpoint import load_model
from bss.training.run import tracked_training
from bss.training.trainer import Trainer, TrainingDiverged


@pytest.fixture
def split_root(data_root):
    make_splits("toy", data_root, progress=False)
    return data_root


def test_two_runs_same_seed_same_metrics(split_root, tmp_path):
    a = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "a")), progress=False).fit()
    b = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "b")), progress=False).fit()
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.best_metrics == b.best_metrics
    c = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "c", seed=1)), progress=False).fit()
    assert [r["train_loss"] for r in a.history] != [r["train_loss"] for r in c.history]


def test_val_per_epoch_and_callbacks(split_root, tmp_path):
    rows = []
    cfg = from_dict(tiny_config_dict(split_root, tmp_path, epochs=2, val_per_epoch=2, batch_size=2))
    result = Trainer(cfg, callbacks=[rows.append], progress=False).fit()
    assert [round(r["epoch"], 2) for r in rows] == [0.5, 1.0, 1.5, 2.0]  # 5 images, batch 2, partial batch dropped: 2 steps
    assert all("checkpoint" in r for r in rows) and len(result.history) == 4
    best = max(result.history, key=lambda r: r["eval_iou"])
    assert result.best_metrics["iou"] == best["eval_iou"]
    # the figure itself, recomputed from the best checkpoint and the EVAL files without the trainer
    # (abs 1e-3: a logit within rounding of 0 may flip one of the ~12 000 pixels; a wrong count,
    # a per-image mean or the wrong checkpoint is off by far more)
    assert best["eval_iou"] == pytest.approx(recompute_iou(result.checkpoint, split_root, "toy_EVAL"), abs=1e-3)


def test_step_budget_and_spread_evaluations(split_root, tmp_path):
    """train_steps: at least that many steps and at least `epochs` passes; evaluations: spread evenly."""
    rows = []
    cfg = from_dict(tiny_config_dict(split_root, tmp_path, epochs=1, batch_size=2, train_steps=7, evaluations=3))
    trainer = Trainer(cfg, callbacks=[rows.append], progress=False)
    assert trainer.epochs == 4  # 5 images, batch 2: 2 steps an epoch, 7 steps -> 4 epochs (8 steps)
    trainer.fit()
    assert [round(r["epoch"], 2) for r in rows] == [1.5, 3.0, 4.0]  # after steps 3, 6 and 8
    assert cfg.planned_evaluations(5) == 3 and cfg.planned_epochs(500) == 1  # 250 steps an epoch: one pass
    assert from_dict(tiny_config_dict(split_root, tmp_path, epochs=6, batch_size=2, train_steps=7)).planned_epochs(5) == 6


def test_input_size_from_the_images_shape(tmp_path):
    from bss.search.fingerprint import input_size, median_shape

    assert input_size((192, 256)) == [128, 160] and input_size((200, 200)) == [160, 160]
    assert input_size((288, 352), long_side=128) == [96, 128] and input_size((20, 1000)) == [32, 160]
    for i, (h, w) in enumerate([(100, 200), (120, 160), (300, 400)]):
        Image.new("RGB", (w, h)).save(tmp_path / f"{i}.png")
    assert median_shape(tmp_path) == (120, 200)


def test_checkpoint_is_weights_only_and_reloads(split_root, tmp_path):
    cfg = from_dict(tiny_config_dict(split_root, tmp_path))
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    payload = torch.load(result.checkpoint, weights_only=True)
    assert set(payload) >= {"state_dict", "config", "metrics", "epoch"}
    assert payload["config"]["image_size"] == [64, 64]
    model, loaded_cfg = load_model(result.checkpoint)
    assert loaded_cfg.model.name == "UNetAttention" and not model.training
    # the reloaded model reproduces the checkpoint's EVAL metrics
    trainer.model.load_state_dict(model.state_dict())
    assert trainer.evaluate()["iou"] == pytest.approx(payload["metrics"]["iou"], abs=1e-6)


def test_bad_checkpoints_are_one_line_naming_the_file(split_root, tmp_path):
    from bss.errors import BSSError

    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "config": {}, "model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module
    with pytest.raises(BSSError) as err:
        load_model(pickled)
    text = str(err.value)
    assert text.startswith(f"{pickled}: not a readable BSS checkpoint: it holds pickled Python objects") and "\n" not in text
    assert "weights_only=False" not in text
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(BSSError, match=r"garbage.pt: not a readable BSS checkpoint"):
        load_model(garbage)
    cfg = from_dict(tiny_config_dict(split_root, tmp_path, epochs=1))
    result = Trainer(cfg, progress=False).fit()
    payload = torch.load(result.checkpoint, weights_only=True)
    payload["config"]["image_size"] = [65, 64]
    torch.save(payload, tmp_path / "badcfg.pt")
    with pytest.raises(BSSError, match=r"badcfg.pt: its config is not valid \(config key 'image_size'"):
        load_model(tmp_path / "badcfg.pt")


def test_overlay_png_has_three_panels_per_sample(split_root, tmp_path):
    cfg = from_dict(tiny_config_dict(split_root, tmp_path, visualization_samples=2))
    Trainer(cfg, progress=False).fit()
    png = np.asarray(Image.open(tmp_path / "run" / "overlays.png"))
    bar = 18  # the column headers above, the caption below
    assert png.shape[0] == bar + 2 * (64 + 4) + bar and png.shape[1] == 3 * 64 + 2 * 4
    left = png[bar + 20 : bar + 64, :64].astype(int)  # below the corner label
    truth = png[bar + 20 : bar + 64, 68:132].astype(int)
    assert (truth[..., 1] - left[..., 1]).max() > 50  # truth panel is tinted green somewhere
    assert (png[:bar] < 128).any() and (png[-bar:] < 128).any()  # header and caption text


def test_nan_loss_is_reported(split_root, tmp_path):
    cfg = from_dict(tiny_config_dict(split_root, tmp_path, learning_rate=1e30, epochs=3))
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        Trainer(cfg, progress=False).fit()


def test_learns_the_toy_task(tmp_path):
    from conftest import make_source_dataset

    root = tmp_path / "datasets"
    make_source_dataset(root, n=30, labelled=30)
    make_splits("toy", root, progress=False)
    cfg = from_dict(tiny_config_dict(root, tmp_path, epochs=12, batch_size=4))
    result = Trainer(cfg, progress=False).fit()
    assert result.best_metrics["iou"] > 0.5, result.best_metrics


def test_mlflow_records_params_metrics_artifacts(split_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = from_dict(tiny_config_dict(split_root, tmp_path, tracking={"uri": uri, "experiment": "unit", "enabled": True}))
    tracked_training(cfg, run_name="unit-run")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unit")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-run"
    assert run.data.params["model.args.encoder_name"] == "resnet18" and run.data.params["criterion.name"] == "TverskyLoss"
    assert len(client.get_metric_history(run.info.run_id, "eval_iou")) == 2  # one per epoch
    assert {"best_eval_iou", "best_eval_recall", "train_seconds"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "overlays.png"} <= names


def test_train_driver(split_root, tmp_path):
    cfg = tiny_config_dict(split_root, tmp_path, epochs=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, str(REPO / "drivers" / "train.py"), "--config", str(path), "--no-mlflow", "--set", "visualization_samples=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best EVAL" in proc.stdout and (tmp_path / "run" / "best.pt").is_file()
    bad = subprocess.run(
        [sys.executable, str(REPO / "drivers" / "train.py"), "--config", str(path), "--set", "epoch=1"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: {path}: unknown config key 'epoch'. Did you mean 'epochs'?"]


# ---- students on a hybrid dataset (config key `student`) -----------------------------------


def fake_hybrid(root, n_hand: int = 2, n_refined: int = 4, size: int = 64, soft: bool = True):
    """An H<n>-like folder: hand-labelled images (no soft label) and refined ones whose teacher
    probability (soft/) is 0 outside the box (rows 16-47, cols 8-39), 0.5 on its left third (unsure)
    and 0.9 on the rest (sure foreground); masks/ is the probability > 0.5 inside the box."""
    from bss.data.io import write_image, write_mask

    folder = root / "toy_H1"
    for sub in ("images", "masks") + (("soft",) if soft else ()):
        (folder / sub).mkdir(parents=True)
    prob = np.zeros((size, size), np.float32)
    prob[16:48, 8:40] = 0.9
    prob[16:48, 8:18] = 0.5
    entries = []
    rng = np.random.default_rng(0)
    for i in range(n_hand + n_refined):
        stem = f"img_{i:02d}"
        write_image(folder / "images" / f"{stem}.png", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        if i < n_hand:
            hand = np.zeros((size, size), np.uint8)
            hand[5:20, 30:60] = 1
            write_mask(folder / "masks" / f"{stem}.png", hand)
            entries.append({"image": f"{stem}.png", "origin": "baseline"})
        else:
            write_mask(folder / "masks" / f"{stem}.png", (prob > 0.5).astype(np.uint8))
            if soft:
                Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(folder / "soft" / f"{stem}.png")
            entries.append({"image": f"{stem}.png", "origin": "refined"})
    (folder / "manifest.json").write_text(json.dumps({"images": entries}))
    return folder, prob


def student_dataset(folder, augmented=False, seed=None, **student):
    from bss.config import StudentConfig
    from bss.data.segmentation_dataset import SegmentationDataset

    return SegmentationDataset(folder, (64, 64), augment=augmented, cache=False, seed=seed, student=StudentConfig(**student)).as_raw()


def test_student_targets_ignore_the_unsure_band_and_keep_the_rest(tmp_path):
    from bss.losses.masked import IGNORE

    folder, prob = fake_hybrid(tmp_path)
    plain = student_dataset(folder)
    assert plain.refined == [False, False, True, True, True, True]
    _, mask = plain[2]
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) == {0, 1}  # no option: the masks as before

    ignoring = student_dataset(folder, ignore_band=[0.3, 0.7])
    _, target = ignoring[2]
    assert target.dtype == torch.float32
    expected = np.where((prob >= 0.3) & (prob <= 0.7), IGNORE, (prob > 0.5).astype(np.float32))
    assert np.array_equal(target.numpy(), expected)  # unsure band ignored, the box's sure part 1, outside the box 0
    assert (target == IGNORE).sum() == 32 * 10 and (target == 1).sum() == 32 * 22 and (target == 0).sum() == 64 * 64 - 32 * 32
    _, hand = ignoring[0]
    assert np.array_equal(hand.numpy(), plain[0][1].numpy().astype(np.float32))  # a hand label is never ignored nor softened

    _, soft = student_dataset(folder, soft_targets=True)[3]
    assert np.allclose(soft.numpy(), prob, atol=1 / 255)  # the teacher's probability as the target
    _, both = student_dataset(folder, soft_targets=True, ignore_band=[0.4, 0.6])[3]
    assert np.allclose(both.numpy(), np.where(prob == 0.5, IGNORE, prob), atol=1 / 255)


def test_student_ignore_edge_leaves_the_mask_edge_inside_the_boxes_out(tmp_path):
    """``ignore_edge: 2``: pixels within 2 px of a refined mask's edge are IGNORE, but only inside
    the image's boxes (the manifest's rectangles); outside them every pixel stays known background.
    The refined mask of fake_hybrid is rows 16-47, cols 18-39 of its box rows 16-47, cols 8-39:
    its top, right and bottom edges lie on the box's, its left edge inside it."""
    from bss.config import StudentConfig
    from bss.data.segmentation_dataset import SegmentationDataset
    from bss.losses.masked import IGNORE

    folder, prob = fake_hybrid(tmp_path, soft=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["images"]:
        if entry["origin"] == "refined":
            entry["boxes"] = [{"bbox": [8, 16, 40, 48], "area": 1024, "fill": 0.69, "fallback": False}]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    data = student_dataset(folder, ignore_edge=2)  # no soft/ folder needed
    _, target = data[2]
    t = target.numpy()
    mask = (prob > 0.5).astype(np.float32)
    assert set(np.unique(t[t != IGNORE])) == {0.0, 1.0}
    assert np.array_equal(t[t != IGNORE], mask[t != IGNORE])  # what is kept is the refined mask
    row = t[32]
    assert row[15] == 0 and (row[16:20] == IGNORE).all() and row[20] == 1  # the left edge (between cols 17 and 18), 2 px each side
    assert (t[14:16, 18:40] == 0).all()  # above the box: known background although 1-2 px from the mask's top edge
    assert (t[16:18, 20:38] == IGNORE).all() and t[18, 28] == 1  # inside the box along that edge: 2 px
    assert t[32, 28] == 1 and (t[:, 41:] == 0).all() and (t[50:] == 0).all()
    assert 150 < (t == IGNORE).sum() < 300  # a band, not the box
    _, hand = data[0]
    assert not (hand.numpy() == IGNORE).any()  # hand labels are never ignored

    small = SegmentationDataset(folder, (32, 32), cache=False, student=StudentConfig(ignore_edge=1)).as_raw()
    _, t = small[2]
    t = t.numpy()  # the box is rows 8-23, cols 4-19 at 32x32
    assert (t[:8] != IGNORE).all() and (t[:, 20:] != IGNORE).all() and (t[:, :4] != IGNORE).all()
    assert (t[8:24, 4:20] == IGNORE).any()

    from bss.errors import ConfigError

    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="config key 'student.ignore_edge' must be"):
            from_dict({"student": {"ignore_edge": bad}})


def test_augmentation_moves_the_ignored_pixels_with_the_mask(tmp_path):
    """The image paints the target's classes (red: ignored, green: foreground); after any seed's
    augmentation the target still lies under its paint (flips, shifts, rotations move both alike)."""
    from bss.data.io import write_image
    from bss.losses.masked import IGNORE

    folder, prob = fake_hybrid(tmp_path, n_hand=1, n_refined=1)
    paint = np.zeros((64, 64, 3), np.uint8)
    paint[..., 0] = np.where((prob >= 0.3) & (prob <= 0.7), 255, 0)
    paint[..., 1] = np.where(prob > 0.7, 255, 0)
    write_image(folder / "images" / "img_01.png", paint)
    for strength in ("default", "strong"):
        data = student_dataset(folder, augmented=True, seed=0, ignore_band=[0.3, 0.7], augment=strength)
        moved = 0
        for seed in range(12):
            rgb, target = data[(1, seed)]
            rgb, target = rgb.numpy().astype(int), target.numpy()
            red, green = rgb[..., 0] > 128, (rgb[..., 1] > 128) & (rgb[..., 0] < 128)
            ignored, foreground = target == IGNORE, target == 1
            assert (red == ignored).mean() > 0.97 and (green == foreground).mean() > 0.97, (strength, seed)
            moved += not np.array_equal(ignored, (prob >= 0.3) & (prob <= 0.7))
        assert moved >= 6, strength  # most seeds did move the pixels


def test_student_options_need_the_soft_labels(tmp_path):
    from bss.errors import DatasetError

    folder, _ = fake_hybrid(tmp_path)
    (folder / "soft" / "img_03.png").unlink()
    with pytest.raises(DatasetError, match=r"soft/img_03.png not found: config key student.ignore_band needs the teacher's probability .* --soft"):
        student_dataset(folder, ignore_band=[0.3, 0.7])
    assert student_dataset(folder, hand_fraction=0.5, augment="strong").refined.count(True) == 4  # these need no soft label


def test_hand_fraction_sampler_mixes_each_epoch():
    from bss.training.trainer import _MixedSampler

    refined = [False, False] + [True] * 8  # 2 hand-labelled, 8 refined images
    sampler = _MixedSampler(refined, 0.5, seed=0)
    epochs = [list(sampler) for _ in range(2)]
    for draws in epochs:
        indices = [i for i, _ in draws]
        assert len(draws) == 10 and sum(not refined[i] for i in indices) == 5  # half hand-labelled, epoch length kept
        assert len({s for _, s in draws}) == 10  # every draw its own augmentation seed
    seen = Counter(i for draws in epochs for i, _ in draws if refined[i])
    assert sorted(seen) == list(range(2, 10)) and set(seen.values()) == {1, 2}  # 10 refined draws: one full pass over the 8, then 2 more
    assert [list(_MixedSampler(refined, 0.5, seed=0)) for _ in range(1)][0] == epochs[0]  # reproducible by seed


def test_student_init_from_a_checkpoint(split_root, tmp_path):
    from bss.errors import ConfigError

    teacher = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "t", epochs=1)), progress=False).fit().checkpoint
    student = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "s", student={"init_from": str(teacher)})), progress=False)
    state = torch.load(teacher, weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in student.model.state_dict().items())
    with pytest.raises(ConfigError, match=r"config key 'student.init_from': checkpoint .*nope.pt not found"):
        Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "x", student={"init_from": str(tmp_path / "nope.pt")})), progress=False)
    other = tiny_config_dict(split_root, tmp_path / "y", student={"init_from": str(teacher)})
    other["model"]["args"]["decoder_channels"] = [16, 8, 8]
    with pytest.raises(ConfigError, match=r"config key 'student.init_from': the weights of .* do not fit the model"):
        Trainer(from_dict(other), progress=False)


def test_a_student_trains_on_a_hybrid_made_with_soft_labels(split_root, tmp_path):
    """make_hybrid's soft/ and manifest feed the student options end to end."""
    from bss.config import StudentConfig
    from bss.data.io import read_mask
    from bss.data.segmentation_dataset import SegmentationDataset
    from bss.hybrid import RefineRule, make_hybrid
    from bss.losses.masked import IGNORE

    teacher = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "t", epochs=2)), progress=False).fit().checkpoint
    hybrid = make_hybrid("toy", teacher, data_root=split_root, rule=RefineRule(min_fill=0.0, soft=True), progress=False, device="cpu")
    data = SegmentationDataset(hybrid.path, (64, 64), cache=False, student=StudentConfig(ignore_band=[0.3, 0.7])).as_raw()
    assert sum(data.refined) == hybrid.manifest["counts"]["refined"] > 0 and not all(data.refined)
    for i, sample in enumerate(data.samples):  # the toy images are 64x64: no resizing
        mask = read_mask(sample.mask).astype(np.float32)
        if data.refined[i]:
            prob = np.asarray(Image.open(hybrid.path / "soft" / f"{sample.stem}.png")) / 255.0
            mask = np.where((prob >= 0.3) & (prob <= 0.7), IGNORE, mask)
        assert np.array_equal(data[i][1].numpy(), mask), sample.stem
    student = {"ignore_band": [0.3, 0.7], "hand_fraction": 0.5, "augment": "strong"}
    trainer = Trainer(from_dict(tiny_config_dict(split_root, tmp_path / "s", train_dataset=hybrid.path.name, student=student)), progress=False)
    result = trainer.fit()
    assert np.isfinite([r["train_loss"] for r in result.history]).all() and result.checkpoint.is_file()
