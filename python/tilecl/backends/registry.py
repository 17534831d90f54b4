"""The one registry of backends: each backend module registers its declaration here, next to its code.

:data:`BACKENDS` is filled in registration order, which is the preference
order of ``backend="auto"`` (see :attr:`~tilecl.backends.base.Backend.auto_devices`).
Nothing outside a backend's own module names a backend: dispatch, the
registered ops, :func:`tilecl.explain_backend` and the test matrix read the
declarations.
"""

from __future__ import annotations

from .base import Backend

__all__ = ["BACKENDS", "register_backend"]

#: every registered backend, by ``backend=`` name, in registration (= ``auto``'s preference) order
BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS` (Liger's ``register_impl``); returns it."""
    if backend.name in BACKENDS or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend
