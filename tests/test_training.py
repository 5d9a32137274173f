"""One training run end to end on tiny real images: metrics, checkpoint, overlays, MLflow, seeds."""

from __future__ import annotations

import subprocess
import sys

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
