"""Device selection shared by the torch-backed tokenizers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def full_fp32(enabled: bool = True) -> Iterator[None]:
    """float32 that is float32: TF32 off for cuBLAS and cuDNN while the block runs.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissas) by default, and a training
    script's `torch.set_float32_matmul_precision("high")` does the same for matmuls; codes
    computed that way differ from the CPU's (taming's VQGAN: 99.98% of tokens equal with
    TF32, 100% without, on an H200). A tokenizer whose precision says fp32 runs under this.
    The switches are process-wide, so they are restored on the way out.
    """
    if not enabled:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
