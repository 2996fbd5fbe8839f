"""The torch device for kNN and k-means, and arrays onto it."""

from __future__ import annotations

import numpy as np
import torch

from lmmixup_hf.data.schema import LmmixupError


def resolve_device(device: str | None) -> str:
    """The torch device for kNN and k-means: ``None`` means cuda when available, else cpu (mps is
    left out: its float32 matmul and topk are not faster here). A device torch cannot use is an error."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise LmmixupError(f"device {device!r} is not available here ({str(e).splitlines()[0]})") from None
    return device


def _as_tensor(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
