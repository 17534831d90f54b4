"""The one registry of backends: each backend module registers its declaration here, next to its code.

:data:`BACKENDS` is kept in the order of the declared
:attr:`~tilecl.backends.base.Backend.preference` (``backend="auto"``'s order,
and every listing's), whatever the order the modules are imported in.
Nothing outside a backend's own module names a backend: dispatch, the
registered ops, :func:`tilecl.explain_backend` and the test matrix read the
declarations.
"""

from __future__ import annotations

from typing import Any

from .base import Backend

__all__ = ["BACKENDS", "register_backend"]


class Registry(dict[str, Backend]):
    """The registered backends, counting their changes (:attr:`version`): a call's resolution
    (:func:`tilecl.backends.resolve_backend`) is remembered until the registry changes."""

    version: int = 0

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, name: str, backend: Backend) -> None:
        super().__setitem__(name, backend)
        self._changed()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Backend]:
        self._changed()
        return super().popitem()

    def setdefault(self, name: str, backend: Backend) -> Backend:
        self._changed()
        return super().setdefault(name, backend)

    def __ior__(self, other: Any) -> Registry:  # type: ignore[override, misc]
        self.update(other)
        return self


#: every registered backend, by ``backend=`` name, in ascending ``preference``
BACKENDS = Registry()


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS` (Liger's ``register_impl``); returns it."""
    if backend.name in BACKENDS or backend.name == "auto":
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    ordered = sorted([*BACKENDS.values(), backend], key=lambda b: b.preference)
    BACKENDS.clear()
    BACKENDS.update((b.name, b) for b in ordered)
    return backend
