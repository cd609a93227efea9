"""Device selection shared by the torch-backed tokenizers."""

from __future__ import annotations

import numpy as np
import torch


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` if given ('cpu', 'cuda', 'cuda:1', 'mps'), else the best available."""
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """numpy -> tensor on `device`; pinned + non_blocking so H2D copies overlap compute on GPU."""
    if any(stride < 0 for stride in array.strides):
        array = array.copy()  # torch cannot wrap negative strides (e.g. a reversed view)
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
