"""Triton kernels for ``backend="triton"`` (installed as ``tilecl.kernels``).

Not written yet. They will implement the same two primitives as
``tilecl._blockwise`` — ``lse_stats`` and ``offset_backward`` — and register
themselves in ``tilecl.backends``; every loss then runs on them unchanged.
"""
