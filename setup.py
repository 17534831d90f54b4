"""Build script: maps the source folders into one ``tilecl`` package.

``python/tilecl`` becomes ``tilecl`` and ``kernels/`` becomes ``tilecl.kernels``, a namespace package:
``kernels/`` has no ``__init__.py``, so from the checkout's root (``python -m ...``, pytest) it is only
a namespace portion of the top-level name ``kernels``, and the index's ``kernels`` package (which
transformers imports) wins over it. In a wheel it is ``tilecl/kernels/``; an editable install adds a
finder for it (:class:`EditableWheel`).

The wheel is pure Python (``py3-none-any``: an index takes it, one wheel for every platform and
CUDA version): it carries ``csrc/`` as ``tilecl/csrc``, and the CUDA C++ extension ``tilecl._cuda``
is compiled where ``backend="cuda"`` is first used, for that GPU's architecture only, and cached
(``tilecl._cuda_build.build_extension_jit``), as ``torch.utils.cpp_extension.load`` does. For
clusters without a compiler on the nodes it is built ahead of time (nvcc through ninja;
``TILECL_CUDA_ARCHS``, default ``80;90``; ``MAX_JOBS`` caps the parallel compiles):

* ``TILECL_FORCE_CUDA_BUILD=1`` builds it into the wheel (a platform wheel), and fails loudly if
  it cannot be built;
* ``TILECL_SKIP_CUDA_BUILD=1`` (the default now) never builds it here.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

SKIP_CUDA_BUILD = os.environ.get("TILECL_SKIP_CUDA_BUILD", "0") == "1"
FORCE_CUDA_BUILD = os.environ.get("TILECL_FORCE_CUDA_BUILD", "0") == "1"
HERE = Path(__file__).resolve().parent


def _cuda_build():
    """python/tilecl/_cuda_build.py, loaded by path: tilecl itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("_tilecl_cuda_build", HERE / "python/tilecl/_cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NinjaBuildExt(build_ext):
    """Builds tilecl._cuda with nvcc through ninja (TILECL_CUDA_ARCHS, default "80;90")."""

    def build_extension(self, ext):
        if ext.name != "tilecl._cuda":
            return super().build_extension(ext)
        output = Path(self.get_ext_fullpath(ext.name))
        _cuda_build().build_extension(output, Path(self.build_temp).resolve() / "tilecl-cuda")


#: why this build leaves tilecl._cuda out (None: it builds it); said once, by build_py
SKIPPED: list = []


def _skipped(why: str) -> None:
    SKIPPED.append(why)


class BuildPyThatSaysWhatItSkips(build_py):
    """build_py runs once per build (setup.py itself runs several times under pip): say it there."""

    def run(self):
        for why in SKIPPED[:1]:
            print(f"tilecl: building without the CUDA C++ extension tilecl._cuda ({why})", file=sys.stderr)
        super().run()


#: the editable install's finder for tilecl.kernels (:class:`EditableWheel`)
KERNELS_FINDER = '''"""tilecl's editable install: ``tilecl.kernels`` is {path!r} (tilecl's setup.py)."""

import sys
from importlib.machinery import ModuleSpec


class KernelsFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "tilecl.kernels":
            return None
        spec = ModuleSpec(fullname, None, is_package=True)  # no loader: a namespace package
        spec.submodule_search_locations = [{path!r}]
        return spec


sys.meta_path.append(KernelsFinder)
'''


class _WithKernelsFinder:
    """An editable strategy of setuptools, plus :data:`KERNELS_FINDER` and the ``.pth`` that loads it."""

    def __init__(self, strategy, name: str):
        self.strategy, self.name = strategy, name

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        module = "__editable___tilecl_kernels_finder"
        wheel.writestr(f"{module}.py", KERNELS_FINDER.format(path=str(HERE / "kernels")))
        wheel.writestr(f"__editable__.{self.name}.kernels.pth", f"import {module}\n")


class EditableWheel(editable_wheel):
    """``pip install -e``: setuptools' finder maps ``tilecl.kernels`` to ``kernels/`` but takes a folder
    for a package only by its ``__init__.py`` (pypa/setuptools#4943), so a second finder, installed
    beside it, answers for ``tilecl.kernels`` with ``kernels/``: a namespace package, as in a wheel.
    ``_select_strategy`` is setuptools' own (private) hook; tests/test_packaging.py's
    test_the_editable_install_finds_the_kernels fails if a setuptools release stops calling it."""

    def _select_strategy(self, name, tag, build_lib):
        return _WithKernelsFinder(super()._select_strategy(name, tag, build_lib), name)


def cuda_extensions() -> list:
    """The CUDA C++ extension, ahead of time: only with TILECL_FORCE_CUDA_BUILD=1 (else the wheel is
    pure Python and the extension compiles where it is first used)."""
    if SKIP_CUDA_BUILD or not FORCE_CUDA_BUILD:
        _skipped("it compiles where backend='cuda' is first used; TILECL_FORCE_CUDA_BUILD=1 builds it now")
        return []
    sources = (
        sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cu"))
        if (HERE / "csrc").is_dir()
        else []
    )
    if not sources:
        if FORCE_CUDA_BUILD:
            raise RuntimeError("TILECL_FORCE_CUDA_BUILD=1 but csrc/ has no CUDA sources")
        _skipped("csrc/ is not in this source tree")
        return []
    build = _cuda_build()
    if build.find_nvcc() is None:
        if FORCE_CUDA_BUILD:
            raise RuntimeError("TILECL_FORCE_CUDA_BUILD=1 but nvcc was not found (set CUDA_HOME or PATH)")
        _skipped("nvcc was not found (set CUDA_HOME or PATH)")
        return []
    build.cuda_archs()  # a malformed TILECL_CUDA_ARCHS fails here, before any compile
    return [Extension("tilecl._cuda", sources=[*sources, "csrc/bindings.cpp"])]


def packages() -> list:
    """Every package under python/ (found, not listed: a new subpackage cannot be left out of a
    wheel), plus kernels/ installed as tilecl.kernels (a namespace package: no __init__.py) and
    csrc/ as tilecl/csrc (the sources the extension compiles from where it is first used)."""
    found = find_packages(str(HERE / "python"), include=["tilecl", "tilecl.*"])
    for name in ("tilecl.kernels", "tilecl.csrc"):
        if name in found:
            raise RuntimeError(f"python/{name.replace('.', '/')} would shadow the folder installed as {name}")
    return [*found, "tilecl.kernels", "tilecl.csrc"]


setup(
    package_dir={"": "python", "tilecl.kernels": "kernels", "tilecl.csrc": "csrc"},
    packages=packages(),
    package_data={"tilecl": ["py.typed"], "tilecl.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "README.md"]},
    ext_modules=cuda_extensions(),
    cmdclass={
        "build_ext": NinjaBuildExt,
        "build_py": BuildPyThatSaysWhatItSkips,
        "editable_wheel": EditableWheel,
    },
)
