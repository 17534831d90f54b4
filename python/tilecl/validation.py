"""Argument checks shared by every public entry point: one exception type per kind of mistake.

Every check runs before any kernel does, and each message names the argument
and what was expected, so a wrong call fails fast and says why.

==================  ===========================================================
``TypeError``       wrong type or dtype (a list for a tensor, integer features,
                    float labels, a string for a number, mismatched dtypes,
                    a dtype the chosen backend does not take)
``ValueError``      wrong value or shape (mismatched sizes or devices, empty
                    batches, labels out of range, non-finite scales, unknown
                    option strings, ranks that disagree on the call)
``RuntimeError``    a backend that cannot run here (not installed or built,
                    tensors on a device it does not run on)
==================  ===========================================================

The table is ``docs/design.md``'s too.

Checks of tensor *values* (a scale's sign, labels in range) read the data on
the host in eager mode. Under ``torch.compile`` that read would be a graph
break and, on a GPU, a synchronization, so there they become asynchronous
device assertions (:func:`check_values`): the same condition, raising
``RuntimeError`` with the same message when the compiled step runs. On meta
or fake tensors (no data) they are skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import sys
import warnings
from types import FrameType
from typing import Iterator, Optional, Union

import numpy as np
import torch

from ._compat import is_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

#: a scale, temperature or bias argument: a Python number or a 0-d (one-element) floating tensor,
#: which may require grad (public as ``tilecl.Scale``)
Scale = Union[float, torch.Tensor]


def reads_values(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values on the host now: eager mode and real data."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    # a plain eager tensor (every call's hot path) is not fake: is_fake's own first test, inlined
    return (type(x) is torch.Tensor and not torch._is_functional_tensor(x)) or not is_fake(x)


def check_values(condition: torch.Tensor, message: str) -> None:
    """Under ``torch.compile``: assert ``condition`` (a bool tensor) on the device, without a sync."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition.all(), message)


#: whether a batch may hold no rows: on one rank of a distributed call only (the others hold the batch)
_EMPTY_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("tilecl_empty_allowed", default=False)


@contextlib.contextmanager
def empty_batches_allowed(allowed: bool) -> Iterator[None]:
    """Inside: :func:`check_features` accepts zero rows when ``allowed`` (a rank of a distributed call;
    the call itself refuses a global batch with no rows)."""
    token = _EMPTY_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _EMPTY_ALLOWED.reset(token)


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_features(x: object, name: str, may_be_empty: bool = False) -> torch.Tensor:
    """A 2-D floating tensor of shape ``(rows, D)``, non-empty unless ``may_be_empty`` (or on a rank
    of a distributed call)."""
    if not isinstance(x, torch.Tensor):
        check_tensor(x, name)  # raises
    assert isinstance(x, torch.Tensor)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch x dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 and not may_be_empty and not _EMPTY_ALLOWED.get():
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); need at least 1 row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(x.shape)})")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_pair(
    a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b"), b_may_be_empty: bool = False
) -> None:
    """Two feature matrices that can be multiplied: same D, dtype and device (``b_may_be_empty``:
    ``b`` may have no rows, e.g. extra negatives from a memory queue at its first step)."""
    na, nb = names
    check_features(a, na)
    check_features(b, nb, b_may_be_empty)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{na} and {nb} must have the same feature dimension D, "
            f"got {na}: {tuple(a.shape)} and {nb}: {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"{na} and {nb} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{na} and {nb} must be on the same device, got {a.device} and {b.device}")


def check_like(x: object, name: str, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Features of exactly ``like``'s shape, dtype and device."""
    x = check_features(x, name)
    if x.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}"
        )
    if x.dtype != like.dtype:
        raise TypeError(f"{name} and {like_name} must have the same dtype, got {x.dtype} and {like.dtype}")
    if x.device != like.device:
        raise ValueError(
            f"{name} and {like_name} must be on the same device, got {x.device} and {like.device}"
        )
    return x


def _is_number(value: object) -> bool:
    """A real number: int, float or a NumPy scalar, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _scalar(value: object, name: str, like: torch.Tensor) -> tuple[torch.Tensor, Optional[float]]:
    """A number or one-element floating tensor as a 0-d tensor on ``like``'s device, and its value
    (``None`` where it cannot be read now: under compilation, on meta or fake tensors)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        tensor = (value if value.dim() == 0 else value.reshape(())).to(like.device)
        return tensor, value.item() if reads_values(value) else None
    if _is_number(value):
        number = float(value)  # type: ignore[arg-type]
        return torch.tensor(number, dtype=torch.float64, device=like.device), number
    raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(value).__name__}")


def check_scale(value: Scale, name: str, like: torch.Tensor) -> torch.Tensor:
    """A finite positive scalar (number or one-element tensor) as a 0-d tensor on ``like``'s device.

    It is the exponentiated inverse temperature: 0 or less almost always means
    the log-scale was passed, so that is refused with a pointer to ``.exp()``.
    """
    tensor, number = _scalar(value, name, like)
    if number is None:
        check_values(torch.isfinite(tensor) & (tensor > 0), f"{name} must be finite and > 0")
        return tensor
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if number <= 0:
        raise ValueError(
            f"{name} must be > 0, got {number}: it is the exponentiated inverse temperature "
            f"(open_clip passes model.logit_scale.exp()); did you pass the log-scale?"
        )
    # a learned scale below 5: open_clip's log-scale parameter (clamped at log 100 = 4.6) passed as
    # it is; a learned scale of 10 or more (exponentiated, or a parameter that is the scale itself)
    # is taken as meant (cheapest test first: this runs on every call)
    if (
        number < _LOG_SCALE_BELOW
        and isinstance(value, torch.Tensor)
        and value.requires_grad
        and name.endswith("logit_scale")
    ):
        warnings.warn(
            f"{name} is {'a leaf parameter' if getattr(value, 'is_leaf', False) else 'a learned tensor'} "
            f"of value {number:.4g}: it is the exponentiated scale (open_clip passes "
            f"model.logit_scale.exp(), e.g. exp(2.66) = 14.3, not model.logit_scale itself); the loss "
            "runs at the scale given",
            UserWarning,
            stacklevel=_stacklevel_of_the_caller(),
        )
    return tensor


#: below it a learned logit scale is more likely a log-scale (open_clip's starts at log(1/0.07) = 2.66,
#: SigLIP's at log 10 = 2.30) than an exponentiated one (14.3, 10)
_LOG_SCALE_BELOW = 5.0


def check_bias(value: Optional[Scale], name: str, like: torch.Tensor) -> torch.Tensor:
    """A finite scalar of any sign (number or one-element tensor) as a 0-d tensor; ``None`` is 0."""
    if value is None:
        return torch.zeros((), dtype=torch.float64, device=like.device)
    tensor, number = _scalar(value, name, like)
    if number is None:
        check_values(torch.isfinite(tensor), f"{name} must be finite")
    elif not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return tensor


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
    if not reads_values(labels):
        # no sizes in the message: they are symbolic under compilation, and printing one specializes
        check_values((labels >= 0) & (labels < cols), "labels must lie in [0, M) (the columns of b)")
        return
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= cols:
        raise ValueError(f"labels must lie in [0, {cols}) (the columns of b), got values in [{low}, {high}]")


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """One of a fixed set of option strings."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_flag(value: object, name: str) -> bool:
    """A boolean option: ``True`` or ``False`` (NumPy's too). Anything else is refused, not read
    for its truth: ``symmetric="False"`` is a non-empty string, which Python takes for true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_reduction(reduction: object) -> str:
    return check_choice(reduction, "reduction", REDUCTIONS)


def check_symmetric(symmetric: bool, rows: int, cols: int) -> None:
    if symmetric and cols < rows:
        raise ValueError(
            f"symmetric=True needs b to have at least as many rows as a (M >= N), "
            f"got N={rows}, M={cols}; use symmetric=False for M < N"
        )


def check_number(value: object, name: str) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def check_positive(value: object, name: str) -> float:
    number = check_number(value, name)
    if not number > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return number


def check_nonnegative(value: object, name: str) -> float:
    number = check_number(value, name)
    if not number >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value}")
    return number


def check_in_interval(value: object, name: str, low: float, high: float, open_low: bool = False) -> float:
    """A number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    number = check_number(value, name)
    if number > high or number < low or (open_low and number == low):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return number


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_index(index: object, name: str, n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """Dataset indices: an int64/int32 ``(n,)`` tensor on ``like``'s device, in ``[0, size)``."""
    index = check_tensor(index, name)
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of dataset indices, got {index.dtype}")
    if index.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per row of a), got {tuple(index.shape)}")
    if index.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {index.device}")
    if not reads_values(index):
        check_values((index >= 0) & (index < size), f"{name} must lie in [0, num_samples={size})")
        return index
    if index.numel() == 0:
        return index
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, num_samples={size}), got values in [{low}, {high}]")
    return index


def check_log_weights(log_u: Optional[torch.Tensor], name: str, n: int, like: torch.Tensor) -> None:
    """Per-pair log weights ``log u``: a floating ``(n,)`` tensor on ``like``'s device, no NaN or +inf."""
    if log_u is None:
        raise ValueError(f"{name} is required")
    log_u = check_tensor(log_u, name)
    if not log_u.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {log_u.dtype}")
    if log_u.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(log_u.shape)}")
    if log_u.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {log_u.device}")
    if not reads_values(log_u):
        check_values(~torch.isnan(log_u) & ~torch.isposinf(log_u), f"{name} must not contain NaN or +inf")
        return
    if bool(torch.isnan(log_u).any() | torch.isposinf(log_u).any()):
        raise ValueError(f"{name} must not contain NaN or +inf (log u = -inf means u = 0)")


def check_groups(
    row_groups: Optional[torch.Tensor],
    col_groups: Optional[torch.Tensor],
    n: int,
    m: int,
    like: torch.Tensor,
    meaning: str = "an entry is masked where they are equal",
) -> None:
    """Group ids: both or neither, integer tensors of shapes ``(n,)`` and ``(m,)`` on ``like``'s device."""
    if (row_groups is None) != (col_groups is None):
        raise ValueError(f"pass both row_groups and col_groups ({meaning}) or neither")
    for name, groups, size in (("row_groups", row_groups, n), ("col_groups", col_groups, m)):
        if groups is not None:
            check_ids(groups, name, size, like, "group ids")


def check_ids(ids: object, name: str, size: int, like: torch.Tensor, what: str) -> torch.Tensor:
    """Integer ids of any values (groups, classes): an integer ``(size,)`` tensor on ``like``'s device."""
    ids = check_tensor(ids, name)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of {what}, got {ids.dtype}")
    if ids.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) (one per row), got {tuple(ids.shape)}")
    if ids.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {ids.device}")
    return ids


def check_weights(
    weights: Optional[torch.Tensor],
    n: int,
    like: torch.Tensor,
    name: str = "weights",
    warn_all_zero: bool = False,
) -> None:
    """Per-pair weights: a floating ``(n,)`` tensor on ``like``'s device, finite and ``>= 0``.

    ``warn_all_zero`` (a local ``"mean"``): weights that are all zero make the weighted mean
    ``Σ w·ℓ / Σ w`` a ``0/0``; the loss is then 0, and a ``RuntimeWarning`` says so (eager only:
    the one host read of the checks answers both questions).
    """
    if weights is None:
        return
    weights = check_tensor(weights, name)
    if not weights.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {weights.dtype}")
    if weights.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per pair), got {tuple(weights.shape)}")
    if weights.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {weights.device}")
    valid = torch.isfinite(weights) & (weights >= 0)
    if not reads_values(weights):
        check_values(valid, f"{name} must be finite and non-negative")
        return
    all_valid, any_nonzero = torch.stack([valid.all(), (weights != 0).any()]).tolist()
    if not all_valid:
        bad = weights[~valid][0].item()
        raise ValueError(f"{name} must be finite and non-negative, got {bad}")
    if warn_all_zero and n and not any_nonzero:
        warnings.warn(
            f"{name} are all zero: the weighted mean Σ w·ℓ / Σ w is undefined, and the loss is 0 "
            "with zero gradients",
            RuntimeWarning,
            stacklevel=_stacklevel_of_the_caller(),
        )


def _stacklevel_of_the_caller() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside tilecl and torch (the user's
    call, also through a module's ``__call__``)."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("tilecl.", "torch.")):
        frame, level = frame.f_back, level + 1
    return level
