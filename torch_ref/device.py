"""Device choice: cuda, then mps, then cpu, unless overridden (argument or TORCH_REF_DEVICE)."""

from __future__ import annotations

import os

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    device = device or os.environ.get("TORCH_REF_DEVICE")
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device '{device}' was asked for but CUDA is not available")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device '{device}' was asked for but MPS is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
