"""The one registry of backends: each backend module registers its declaration here, next to its code.

:data:`BACKENDS` is kept in the order of the declared
:attr:`~tilecl.backends.base.Backend.preference` (``backend="auto"``'s order,
and every listing's), whatever the order the modules are imported in.
Nothing outside a backend's own module names a backend: dispatch, the
registered ops, :func:`tilecl.explain_backend` and the test matrix read the
declarations.
"""

from __future__ import annotations

from .base import Backend

__all__ = ["BACKENDS", "register_backend"]

#: every registered backend, by ``backend=`` name, in ascending ``preference``
BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS` (Liger's ``register_impl``); returns it."""
    if backend.name in BACKENDS or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    ordered = sorted([*BACKENDS.values(), backend], key=lambda b: b.preference)
    BACKENDS.clear()
    BACKENDS.update((b.name, b) for b in ordered)
    return backend
