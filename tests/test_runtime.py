"""Runtime switches (AMP, channels_last, compile, cudnn benchmark, copies) reach the Runtime, and
each path still computes and trains correctly on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import recompute_iou, tiny_config_dict

from bss.config import NamedArgs, from_dict
from bss.data.segmentation_dataset import MEAN, STD, to_tensor
from bss.losses import build_loss
from bss.models import build_model
from bss.training import runtime as runtime_mod
from bss.training.runtime import Runtime, amp_dtype_for

TINY = NamedArgs("UNetAttention", {"encoder_name": "resnet18", "encoder_weights": None, "encoder_depth": 3, "decoder_channels": [32, 16, 8]})


def _config(**over):
    base = dict(device="cpu", amp=False, channels_last=False, compile=False)
    base.update(over)
    return SimpleNamespace(**base)


def _batch(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.stack([((yy - 20 - 4 * i) ** 2 + (xx - 30) ** 2 < 150).to(torch.uint8) for i in range(n)])
    images[masks.bool()] = 230  # a bright blob to learn
    return images, masks


def test_config_flags_reach_the_runtime(tmp_path):
    cfg = from_dict(tiny_config_dict(tmp_path, tmp_path, device="cpu", amp=True, channels_last=True, compile=True))
    rt = Runtime.from_config(cfg)
    assert rt.device == torch.device("cpu") and rt.amp_dtype == torch.bfloat16 and rt.channels_last and rt.compile
    assert rt.scaler is None  # bf16 needs no gradient scaler
    assert rt.cudnn_benchmark and rt.non_blocking and rt.pin_memory  # defaults when the config has no such keys
    assert not rt.uses_pinned_memory  # pinning is for CUDA copies only
    off = Runtime.from_config(from_dict(tiny_config_dict(tmp_path, tmp_path, device="cpu")))
    assert off.amp_dtype is None and not off.channels_last and not off.compile
    # keys a config may add later are read when present
    rt = Runtime.from_config(_config(cudnn_benchmark=False, non_blocking=False, pin_memory=False))
    assert not rt.cudnn_benchmark and not rt.non_blocking and not rt.pin_memory


def test_trainer_builds_its_runtime_from_the_config(data_root, tmp_path):
    from bss.data.splits import make_splits
    from bss.training.trainer import Trainer

    make_splits("toy", data_root, progress=False)
    trainer = Trainer(from_dict(tiny_config_dict(data_root, tmp_path, device="cpu", amp=True, channels_last=True)), progress=False)
    assert trainer.runtime.amp_dtype == torch.bfloat16 and trainer.runtime.channels_last
    weight = next(p for p in trainer.model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_amp_dtype_choice(monkeypatch):
    assert amp_dtype_for(torch.device("cpu")) == torch.bfloat16
    # a GPU that only emulates bf16 (before Ampere) gets fp16: the check asks for native support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype_for(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype_for(torch.device("cuda")) == torch.bfloat16


def test_fp16_config_gets_a_grad_scaler(monkeypatch):
    monkeypatch.setattr(runtime_mod, "amp_dtype_for", lambda device: torch.float16)
    rt = Runtime.from_config(_config(amp=True))
    assert rt.amp_dtype == torch.float16 and isinstance(rt.scaler, torch.amp.GradScaler)


def test_prepare_batch_normalises_like_the_dataset():
    images, masks = _batch()
    assert np.allclose(runtime_mod._MEAN, MEAN) and np.allclose(runtime_mod._STD, STD)
    expected = torch.stack([to_tensor(img.numpy()) for img in images])
    for channels_last in (False, True):
        x, y = Runtime(torch.device("cpu"), channels_last=channels_last).prepare_batch(images, masks)
        assert torch.equal(x, expected)
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert y.shape == (4, 1, 64, 64) and y.dtype == torch.float32 and torch.equal(y[:, 0], masks.float())
    # float batches (a custom dataset) pass through, in the model's memory format
    x, y = Runtime(torch.device("cpu"), channels_last=True).prepare_batch(expected, masks[:, None].float())
    assert torch.equal(x, expected) and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (4, 1, 64, 64)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    plain = Runtime(torch.device("cpu")).prepare_model(build_model(TINY)).eval()
    nhwc = Runtime(torch.device("cpu"), channels_last=True).prepare_model(build_model(TINY)).eval()
    nhwc.load_state_dict(plain.state_dict())
    images, masks = _batch()
    with torch.no_grad():
        a = plain(Runtime(torch.device("cpu")).prepare_batch(images, masks)[0])
        b = nhwc(Runtime(torch.device("cpu"), channels_last=True).prepare_batch(images, masks)[0])
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def _train(rt: Runtime, steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    model = rt.prepare_model(build_model(TINY)).train()
    loss_fn = build_loss(NamedArgs("DiceLoss", {}))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, masks = rt.prepare_batch(*_batch())
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), masks)
        rt.backward_step(loss, opt)
        losses.append(float(loss.detach()))
    return losses


def test_amp_bf16_on_cpu_trains():
    rt = Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16)
    with rt.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    losses = _train(rt)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


def test_amp_bf16_and_channels_last_train_like_fp32():
    fp32 = _train(Runtime(torch.device("cpu")))
    both = _train(Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=True))
    assert all(np.isfinite(both)) and both[-1] < both[0] - 0.05
    assert abs(both[-1] - fp32[-1]) < 0.15, (fp32, both)


def test_grad_scaler_path_trains():
    rt = Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16, scaler=torch.amp.GradScaler("cpu"))
    losses = _train(rt)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_compiled_model_computes_like_the_eager_one():
    """The compile path runs: torch.compile's wrapper (checkpoints unwrap it) gives the eager
    model's outputs. (Inductor compiles C++ here: tens of seconds on a small CPU.)"""
    torch.manual_seed(0)
    eager = build_model(TINY).eval()
    model = Runtime(torch.device("cpu"), compile=True).prepare_model(build_model(TINY))
    assert hasattr(model, "_orig_mod")
    model._orig_mod.load_state_dict(eager.state_dict())
    images, masks = Runtime(torch.device("cpu")).prepare_batch(*_batch(n=2))
    with torch.no_grad():
        expected, got = eager(images), model.eval()(images)
    assert got.shape == expected.shape == (2, 1, 64, 64)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_amp_training_run_end_to_end(data_root, tmp_path):
    """A whole Trainer.fit with amp (bf16) and channels_last on the CPU: finite losses, metrics."""
    from bss.data.splits import make_splits
    from bss.training.trainer import Trainer

    make_splits("toy", data_root, progress=False)
    cfg = from_dict(tiny_config_dict(data_root, tmp_path, device="cpu", amp=True, channels_last=True, epochs=2, visualization_samples=1))
    result = Trainer(cfg, progress=False).fit()
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    # the bf16 run's EVAL IoU, recomputed in fp32 from its checkpoint and the files (abs 1e-3: a
    # logit near 0 may round the other way in bf16; a wrong figure is off by far more)
    assert result.best_metrics["iou"] == pytest.approx(recompute_iou(result.checkpoint, data_root, "toy_EVAL"), abs=1e-3)
    assert result.checkpoint is not None and result.checkpoint.is_file()


def test_cuda_switches_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.py measures these")
    from bss.errors import ConfigError

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Runtime.from_config(_config(device="cuda"))
