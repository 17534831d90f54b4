"""Argument checks shared by every public entry point.

Every check runs before any kernel does, and each message names the argument
and what was expected, so a wrong call fails fast and says why.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

Scale = Union[float, torch.Tensor]


def check_features(x: object, name: str) -> torch.Tensor:
    """A 2-D, non-empty floating tensor of shape ``(rows, D)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch x dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least 1 row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(x.shape)})")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    """Two feature matrices that can be multiplied: same D, dtype and device."""
    na, nb = names
    check_features(a, na)
    check_features(b, nb)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{na} and {nb} must have the same feature dimension D, "
            f"got {na}: {tuple(a.shape)} and {nb}: {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{na} and {nb} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{na} and {nb} must be on the same device, got {a.device} and {b.device}")


def check_scale(value: Scale, name: str, like: torch.Tensor) -> torch.Tensor:
    """A finite scalar (float or one-element tensor) as a 0-d tensor on ``like``'s device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if not math.isfinite(float(value.detach())):
            raise ValueError(f"{name} must be finite, got {float(value.detach())}")
        return value.reshape(()).to(like.device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=torch.float64, device=like.device)


def check_labels(labels: Optional[torch.Tensor], rows: int, cols: int, like: torch.Tensor) -> None:
    """Row ``i``'s positive column: an integer tensor of shape ``(rows,)`` in ``[0, cols)``."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},) (one per row of a), got {tuple(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"labels must be on {like.device}, got {labels.device}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= cols:
        raise ValueError(f"labels must lie in [0, {cols}) (the columns of b), got values in [{low}, {high}]")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_symmetric(symmetric: bool, rows: int, cols: int) -> None:
    if symmetric and cols < rows:
        raise ValueError(
            f"symmetric=True needs b to have at least as many rows as a (M >= N), "
            f"got N={rows}, M={cols}; use symmetric=False for M < N"
        )


def check_positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_log_weights(log_u: Optional[torch.Tensor], name: str, n: int, like: torch.Tensor) -> None:
    """Per-pair log weights ``log u``: a floating ``(n,)`` tensor on ``like``'s device, no NaN or +inf."""
    if log_u is None:
        raise ValueError(f"{name} is required")
    if not isinstance(log_u, torch.Tensor) or not log_u.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.Tensor")
    if log_u.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(log_u.shape)}")
    if log_u.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {log_u.device}")
    if bool(torch.isnan(log_u).any() | torch.isposinf(log_u).any()):
        raise ValueError(f"{name} must not contain NaN or +inf (log u = -inf means u = 0)")
