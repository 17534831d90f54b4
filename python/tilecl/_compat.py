"""The private PyTorch APIs tilecl uses, each behind one function with a public fallback.

If a future PyTorch drops one of them, only this file changes and the
fallback keeps the behaviour (with a less specific error message, or a draw
that ignores nothing but the speed of the private op).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["delayed_error", "is_fake", "softplus_into", "standard_gamma"]

_DelayedError: Any
try:
    from torch._C._functions import DelayedError as _DelayedError
except ImportError:  # pragma: no cover - depends on the installed torch
    _DelayedError = None


class _RefuseGradient(torch.autograd.Function):
    """Fallback of :func:`delayed_error`: identity forward, a backward that raises ``message``."""

    @staticmethod
    def forward(ctx, message: str, *xs: torch.Tensor):
        ctx.message = message
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        raise RuntimeError(ctx.message)


def compile_disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)`` without importing ``torch._dynamo`` now.

    ``torch.compiler.disable`` imports the compiler stack (dynamo, and Triton
    through it) when the decorator runs, doubling ``import tilecl``'s time;
    PyTorch's private ``torch._disable_dynamo`` defers that to the first call.
    """
    private = getattr(torch, "_disable_dynamo", None)
    if private is not None:
        return private(fn)
    return torch.compiler.disable(fn)  # pragma: no cover - depends on the installed torch


def functorch_transform_active() -> bool:
    """Whether this call runs under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``…).

    False while ``torch.compile`` traces (the query would break its graph;
    a compiled function is not called under a transform there).
    """
    if _TRANSFORMS_ACTIVE is None or torch.compiler.is_compiling():
        return False
    return bool(_TRANSFORMS_ACTIVE())


#: PyTorch's private query of the functorch transforms (``None`` on a torch without it)
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def is_fake(x: torch.Tensor) -> bool:
    """Whether ``x`` is a fake tensor (shapes without data: torch.compile's tracing, FSDP's meta init)."""
    if type(x) is torch.Tensor and not torch._is_functional_tensor(x):
        return False  # a plain eager tensor (every call's hot path): no subclass, no wrapper to look into
    try:
        from torch._subclasses.fake_tensor import is_fake as private
    except ImportError:  # pragma: no cover - depends on the installed torch
        return type(x).__name__ == "FakeTensor"
    return bool(private(x))


def softplus_into(x: torch.Tensor, out: torch.Tensor, threshold: float) -> torch.Tensor:
    """``softplus(x)`` written into ``out`` (the public function allocates a new tensor per call)."""
    private = getattr(torch._C._nn, "softplus", None)
    try:
        if private is not None:
            result: torch.Tensor = private(x, 1, threshold, out=out)
            return result
    except TypeError:  # pragma: no cover - depends on the installed torch
        pass
    return out.copy_(torch.nn.functional.softplus(x, threshold=threshold))  # pragma: no cover


def delayed_error(message: str, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``tensors`` unchanged, but differentiating through them raises ``RuntimeError(message)``."""
    if _DelayedError is not None:
        out = _DelayedError(message.encode(), len(tensors))(*tensors)
        return out if isinstance(out, tuple) else (out,)
    return _RefuseGradient.apply(message, *tensors)


def standard_gamma(concentration: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Draws of ``Gamma(concentration, 1)``, from ``generator`` when given.

    ``torch.distributions.Gamma`` draws through ``torch._standard_gamma`` too,
    but cannot take a generator; without the private op, the fallback draws
    with Marsaglia and Tsang's method from the generator's normals and uniforms.
    """
    private = getattr(torch, "_standard_gamma", None)
    if private is not None:
        return private(concentration, generator=generator)
    return _marsaglia_tsang(concentration, generator)  # pragma: no cover - depends on the installed torch


def _marsaglia_tsang(concentration: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Gamma(α, 1) draws by rejection (α < 1 via the boost ``U^(1/α)``)."""
    alpha = concentration.double()
    boosted = torch.where(alpha < 1, alpha + 1, alpha)
    d = boosted - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    pending = torch.ones_like(alpha, dtype=torch.bool)
    while bool(pending.any()):
        x = torch.randn(alpha.shape, generator=generator, dtype=alpha.dtype, device=alpha.device)
        u = torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype, device=alpha.device)
        v = (1 + c * x) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = pending & accept
        out = torch.where(take, d * v, out)
        pending = pending & ~accept
    boost = torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype, device=alpha.device)
    out = torch.where(alpha < 1, out * boost ** (1 / alpha), out)
    return out.to(concentration.dtype)


def fsdp_reduces_gradients(module: torch.nn.Module) -> bool:
    """Whether an FSDP2 module reduces gradients now (its owner may have turned it off to accumulate).

    FSDP2 has a setter (``set_requires_gradient_sync``) but no public getter: read its private
    state, and where that cannot be read assume the default, on.
    """
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
        return all(group.reduce_grads for group in groups)
    except Exception:
        return True
