"""The ``@triton.jit`` kernels of ``backend="triton"`` (installed as ``tilecl.kernels``).

The source only: the adapter that prepares arguments, picks block sizes and
launches them is :mod:`tilecl.backends.triton`.
"""

import sys as _sys

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m ...``
    # from a checkout) and this folder shadows the index's ``kernels`` package, which transformers
    # (so sentence-transformers) imports. Hand the name over to the installed package, if any.
    import importlib.machinery as _machinery
    import importlib.util as _util
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parents[1]
    _elsewhere = [p for p in _sys.path if _Path(p or ".").resolve() != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _installed = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _installed
        _spec.loader.exec_module(_installed)
