"""The ``@triton.jit`` kernels of ``backend="triton"`` (installed as ``tilecl.kernels``).

The source only: the adapter that prepares arguments, picks block sizes and
launches them is :mod:`tilecl.backends.triton`.
"""
