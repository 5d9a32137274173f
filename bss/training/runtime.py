"""Where and how tensors run: device, mixed precision, memory format, compilation, seeding."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from bss.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {name!r} but no CUDA GPU is available; use device: auto or cpu.")
    return torch.device(name)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None  # bf16 or fp16 under autocast; None = fp32
    channels_last: bool = False
    compile: bool = False
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def from_config(cls, config) -> "Runtime":
        device = pick_device(config.device)
        amp_dtype = None
        if config.amp:
            bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
            amp_dtype = torch.bfloat16 if bf16 else torch.float16
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return cls(device, amp_dtype, config.channels_last, config.compile, scaler)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model)
        return model

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        non_blocking = self.device.type == "cuda"
        out = []
        for t in tensors:
            t = t.to(self.device, non_blocking=non_blocking)
            if self.channels_last and t.dim() == 4 and t.shape[1] == 3:
                t = t.contiguous(memory_format=torch.channels_last)
            out.append(t)
        return tuple(out)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
