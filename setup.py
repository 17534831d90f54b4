"""Build script: maps the source folders into one ``tilecl`` package.

``python/tilecl`` becomes ``tilecl`` and ``kernels/`` becomes ``tilecl.kernels``.
The optional CUDA C++ extension ``tilecl._cuda`` (from ``csrc/``) is built here
too once it exists; the switches follow flash-attention's conventions:

* ``TILECL_SKIP_CUDA_BUILD=1`` never builds it (pure-Python install);
* ``TILECL_FORCE_CUDA_BUILD=1`` fails loudly if it cannot be built.

Without either switch the extension is built only when ``nvcc`` is found.
"""

import os

from setuptools import setup

SKIP_CUDA_BUILD = os.environ.get("TILECL_SKIP_CUDA_BUILD", "0") == "1"
FORCE_CUDA_BUILD = os.environ.get("TILECL_FORCE_CUDA_BUILD", "0") == "1"


def cuda_extensions() -> list:
    """The CUDA C++ extension modules to build (none until csrc/ has kernels)."""
    if SKIP_CUDA_BUILD:
        return []
    sources = (
        [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith(".cu")]
        if os.path.isdir("csrc")
        else []
    )
    if not sources:
        if FORCE_CUDA_BUILD:
            raise RuntimeError("TILECL_FORCE_CUDA_BUILD=1 but csrc/ has no CUDA sources yet")
        return []
    raise NotImplementedError("the CUDA extension build is added with the CUDA backend")


setup(
    package_dir={"tilecl": "python/tilecl", "tilecl.kernels": "kernels"},
    packages=["tilecl", "tilecl.kernels"],
    package_data={"tilecl": ["py.typed"]},
    ext_modules=cuda_extensions(),
)
