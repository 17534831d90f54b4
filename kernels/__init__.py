"""Triton kernels for ``backend="triton"`` (installed as ``tilecl.kernels``).

:func:`lse_stats` and :func:`offset_backward` have the signatures of the torch
backend's primitives (``tilecl._blockwise``), so every loss runs on them
unchanged. They run on CUDA tensors, and on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported) — which
is how the test suite executes every kernel line without a GPU.

``torch.use_deterministic_algorithms(True)`` selects the backward without
floating-point atomics (bitwise reproducible, one more N·M·D pass).
"""

from .launch import KernelConfig, lse_stats, offset_backward, pass_count

__all__ = ["KernelConfig", "lse_stats", "offset_backward", "pass_count"]
