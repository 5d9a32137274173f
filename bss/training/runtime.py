"""Where and how tensors run: device, mixed precision, memory format, compilation, seeding.

Each switch comes from the config and can be turned off on its own:

- ``amp``: autocast to bf16 where the device supports it (CPU, Ampere and later GPUs), else fp16
  with a gradient scaler;
- ``channels_last``: model and input batches in NHWC (tensor cores and oneDNN prefer it);
- ``compile``: ``torch.compile`` the model;
- ``cudnn_benchmark`` (default on): let cuDNN time its kernels for the fixed input size;
- ``non_blocking`` (default on) and ``pin_memory`` (default on): asynchronous host-to-GPU
  copies from page-locked memory. Both only matter on CUDA.

A config without the last three keys gets their defaults.
"""

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


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (CPU, CUDA compute capability >= 8), else fp16."""
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16


# ImageNet mean/std, as bss.data.segmentation_dataset.MEAN/STD (kept here so that this module
# needs torch alone: bench/gpu_check.py runs where albumentations is not installed)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None = None  # bf16 or fp16 under autocast; None = fp32
    channels_last: bool = False
    compile: bool = False
    scaler: torch.amp.GradScaler | None = None
    cudnn_benchmark: bool = True
    non_blocking: bool = True
    pin_memory: bool = True

    @classmethod
    def from_config(cls, config) -> "Runtime":
        device = pick_device(config.device)
        amp_dtype = amp_dtype_for(device) if config.amp else None
        runtime = cls(
            device,
            amp_dtype,
            bool(config.channels_last),
            bool(config.compile),
            torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None,
            cudnn_benchmark=bool(getattr(config, "cudnn_benchmark", True)),
            non_blocking=bool(getattr(config, "non_blocking", True)),
            pin_memory=bool(getattr(config, "pin_memory", True)),
        )
        if device.type == "cuda":
            if device.index is not None:
                torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
        return runtime

    def __post_init__(self):
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageNet mean/std on the device, made once: ``torch.tensor(..., device="cuda")`` copies
        from pageable memory, which waits for the GPU; doing it every batch would stall each step."""
        if self._norm is None:
            mean = torch.tensor(_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
            std = torch.tensor(_STD, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
            self._norm = (mean, std)
        return self._norm

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def uses_pinned_memory(self) -> bool:
        """Whether DataLoaders should pin their batches (CUDA only)."""
        return self.is_cuda and self.pin_memory

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model)
        return model

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.non_blocking and self.is_cuda)

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Move float tensors; a (N, 3, H, W) batch gets the model's memory format."""
        out = []
        for t in tensors:
            t = self._copy(t)
            if self.channels_last and t.dim() == 4 and t.shape[1] == 3:
                t = t.contiguous(memory_format=torch.channels_last)
            out.append(t)
        return tuple(out)

    def prepare_batch(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch onto the device, ready for the model and the loss.

        ``images``: uint8 (N, H, W, 3) from a raw dataset view (normalised here, on the device,
        to the values :func:`bss.data.segmentation_dataset.to_tensor` gives) or already
        normalised float (N, 3, H, W). ``masks``: uint8 (N, H, W) or float (N, 1, H, W).
        Returns float (N, 3, H, W) images in the model's memory format and float (N, 1, H, W) masks.
        """
        images, masks = self._copy(images), self._copy(masks)
        if images.dtype == torch.uint8:
            if images.dim() == 4 and images.shape[-1] == 3:  # NHWC: a permute is a channels_last NCHW view
                images = images.permute(0, 3, 1, 2)
            mean, std = self._mean_std()
            images = images.float().div_(255.0).sub_(mean).div_(std)  # in place on the new float tensor
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=memory_format)
        if masks.dim() == 3:
            masks = masks.unsqueeze(1)
        if masks.dtype != torch.float32:
            masks = masks.float()
        return images, masks

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
