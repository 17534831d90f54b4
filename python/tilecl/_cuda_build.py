"""Builds of the ``csrc/`` kernels: for ``setup.py``, ``backend="cuda"`` on first use, the ``cuda-emu``
backend and the kernel report.

* :func:`build_extension_jit` — ``tilecl._cuda`` for the local GPU's architecture, compiled where
  ``backend="cuda"`` is first used (the wheel is pure Python and carries ``csrc/`` as
  ``tilecl/csrc``), cached under ``build/`` in a checkout or ``~/.cache/tilecl`` otherwise.
* :func:`build_extension` — the real ``tilecl._cuda``: each ``instantiate_*.cu`` compiled by nvcc
  for every architecture in ``TILECL_CUDA_ARCHS`` (default ``80;90``), ``bindings.cpp`` by the host
  compiler, linked by nvcc (static cudart), all through one ``build.ninja`` so the translation
  units compile in parallel.
* :func:`load_emulation` — the same kernel source compiled by g++ against ``csrc/cuda_emu.h`` into
  the pybind11 module ``tilecl_cuda_emu``, built on first use under ``build/cuda-emu/<hash>/``.
* :func:`nvcc_report` — compile-only nvcc runs with warnings as errors and ``ptxas -v``, parsed
  per kernel (registers, spill bytes, shared memory, tensor-core instructions), cached under
  ``build/cuda-inspect/<hash>/``.

Caches are keyed by a hash of the sources, flags and tools; concurrent builds (several pytest
processes) serialize on a lock file. This module imports only the standard library (and pybind11
when building), so ``setup.py`` loads it by path before tilecl is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]
#: the kernels' sources: ``tilecl/csrc`` in a wheel, the checkout's ``csrc/`` otherwise
_PACKAGED = Path(__file__).resolve().parent / "csrc"
CSRC = _PACKAGED if (_PACKAGED / "cuda_emu.h").is_file() else ROOT / "csrc"
_IN_A_CHECKOUT = (ROOT / "csrc" / "cuda_emu.h").is_file()


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilecl"


#: where the cached builds live: ``TILECL_BUILD_DIR``, else the checkout's ``build/`` (git-ignored),
#: else (an installed wheel) the user's cache, ``~/.cache/tilecl``
BUILD_ROOT = Path(os.environ.get("TILECL_BUILD_DIR") or (ROOT / "build" if _IN_A_CHECKOUT else _user_cache()))
EMU_MODULE = "tilecl_cuda_emu"
INSTANTIATIONS = {
    "float32": "instantiate_float.cu",
    "float16": "instantiate_half.cu",
    "bfloat16": "instantiate_bf16.cu",
}
DEFAULT_ARCHS = "80;90"

#: flags of every nvcc compile (the inspect build adds warnings-as-errors and ptxas -v)
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall"]
NVCC_STRICT = ["-Werror", "all-warnings", "-Xcompiler", "-Werror", "-Xptxas", "-v"]
HOST_FLAGS = ["-O2", "-std=c++17", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]


def sources() -> list[Path]:
    """Every file of ``csrc/`` a build reads."""
    if not CSRC.is_dir():
        return []
    return sorted(p for p in CSRC.iterdir() if p.suffix in {".cu", ".cuh", ".h", ".cpp"})


def source_hash(*extra: str) -> str:
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


def find_nvcc() -> Optional[str]:
    """nvcc from ``CUDA_HOME``/``CUDA_PATH``, ``PATH`` or ``/usr/local/cuda``; None when absent."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary

        path = Path(ninja.BIN_DIR) / "ninja"
        return str(path) if path.is_file() else None
    except ImportError:
        return None


def host_compiler() -> str:
    return os.environ.get("CXX") or shutil.which("g++") or "c++"


def cuda_archs(spec: Optional[str] = None) -> list[int]:
    """``TILECL_CUDA_ARCHS`` (``"80;90"``, ``"8.0 9.0"`` or ``"80,90"``) as compute capabilities."""
    spec = spec if spec is not None else os.environ.get("TILECL_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        digits = item.replace(".", "")
        if not digits.isdigit():
            raise ValueError(f"TILECL_CUDA_ARCHS: expected numbers like '80;90', got {spec!r}")
        archs.append(int(digits))
    if not archs:
        raise ValueError(f"TILECL_CUDA_ARCHS names no architecture: {spec!r}")
    return sorted(set(archs))


def gencode_flags(archs: list[int], ptx: bool) -> list[str]:
    """SASS for every arch; with ``ptx`` also the newest arch's PTX, so newer GPUs can JIT it."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if ptx:
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _python_includes() -> list[str]:
    import pybind11

    return [sysconfig.get_paths()["include"], pybind11.get_include()]


def _tool_version(tool: str) -> str:
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: one build at a time per cache directory, across processes."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _q(parts) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _run_ninja(directory: Path, what: str) -> None:
    ninja = find_ninja()
    if ninja is None:
        raise RuntimeError(f"building {what} needs ninja (pip install ninja, or apt-get install ninja-build)")
    jobs = os.environ.get("MAX_JOBS")
    command = [ninja, "-C", str(directory)] + (["-j", jobs] if jobs else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building {what} failed:\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}")


def _write_ninja(path: Path, rules: dict[str, str], edges: list[tuple[str, str, list[str]]]) -> None:
    """``rules``: name → command (``$in``/``$out``); ``edges``: (output, rule, inputs)."""
    lines = ["ninja_required_version = 1.3", ""]
    for name, command in rules.items():
        lines += [f"rule {name}", f"  command = {command}", f"  description = {name} $out", ""]
    for out, rule, inputs in edges:
        lines.append(f"build {out}: {rule} {' '.join(inputs)}")
    path.write_text("\n".join(lines) + "\n")


def _emu_module_name(tensor_cores: bool) -> str:
    return EMU_MODULE if tensor_cores else f"{EMU_MODULE}_fma"


def _emu_flags(tensor_cores: bool = True) -> list[str]:
    flags = HOST_FLAGS + ["-DTILECL_EMU", f"-DTILECL_MODULE_NAME={_emu_module_name(tensor_cores)}"]
    return flags if tensor_cores else flags + ["-DTILECL_EMU_NO_TENSOR_CORES"]


def build_emulation(tensor_cores: bool = True) -> Path:
    """The emulation module's shared library, built if its cache entry is missing.

    ``tensor_cores=False`` builds ``tilecl_cuda_emu_fma``: the pre-sm_80 code path, where the
    16-bit types multiply through the FMA loop instead of WMMA.
    """
    cxx = host_compiler()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    import pybind11

    flags = _emu_flags(tensor_cores)
    key = source_hash(cxx, _tool_version(cxx), " ".join(flags), suffix, pybind11.__version__)
    directory = BUILD_ROOT / "cuda-emu" / key
    library = directory / f"{_emu_module_name(tensor_cores)}{suffix}"
    if library.is_file():
        return library
    with _locked(BUILD_ROOT / "cuda-emu" / f"{key}.lock"):
        if library.is_file():  # another process built it while this one waited
            return library
        directory.mkdir(parents=True, exist_ok=True)
        includes = [f"-I{p}" for p in [CSRC, *_python_includes()]]
        compile_flags = _q([*flags, *includes])
        rules = {
            "cxx_cu": f"{_q([cxx])} -x c++ {compile_flags} -c $in -o $out",
            "cxx": f"{_q([cxx])} {compile_flags} -c $in -o $out",
            "link": f"{_q([cxx])} -shared $in -o $out",
        }
        objects, edges = [], []
        emu_only = [CSRC / "emu_selftest.cpp"]
        for src in [CSRC / name for name in INSTANTIATIONS.values()] + [CSRC / "bindings.cpp", *emu_only]:
            obj = f"{src.stem}.o"
            objects.append(obj)
            edges.append((obj, "cxx_cu" if src.suffix == ".cu" else "cxx", [str(src)]))
        temporary = f"{library.name}.tmp"
        edges.append((temporary, "link", objects))
        _write_ninja(directory / "build.ninja", rules, edges)
        started = time.perf_counter()
        _run_ninja(directory, f"the cuda-emu module {library.name}")
        os.replace(directory / temporary, library)  # atomic: a reader never sees half a library
        (directory / "build-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return library


_EMULATION: dict[bool, object] = {}


def load_emulation(tensor_cores: bool = True):
    """The ``tilecl_cuda_emu`` module (built on first use); ``tensor_cores=False``: its FMA-path variant."""
    if tensor_cores not in _EMULATION:
        _EMULATION[tensor_cores] = load_library(build_emulation(tensor_cores), _emu_module_name(tensor_cores))
    return _EMULATION[tensor_cores]


def emulation_buildable() -> Optional[str]:
    """None when the emulation module can be built here, else what is missing."""
    if not (CSRC / "cuda_emu.h").is_file():
        return "the csrc/ sources are not here (reinstall tilecl: its wheel carries them as tilecl/csrc)"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (pip install pybind11)"
    if find_ninja() is None:
        return "ninja is not installed (pip install ninja)"
    if shutil.which(host_compiler()) is None:
        return "no C++ compiler (g++) on PATH"
    return None


def build_extension(
    output: Path, temp_dir: Path, archs: Optional[list[int]] = None, strict: bool = False
) -> None:
    """The real ``tilecl._cuda`` at ``output`` (nvcc objects and link in ``temp_dir``).

    The module records the architectures it was built for (``tilecl._cuda.ARCHS``), which
    ``backend="cuda"`` checks against the device before a launch. ``strict``: warnings are errors,
    in nvcc and in the host compiler (``bindings.cpp``) alike (the tests build it so).
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("building tilecl._cuda needs nvcc (set CUDA_HOME or put nvcc on PATH)")
    archs = archs or cuda_archs()
    temp_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    cxx = host_compiler()
    arch_list = ",".join(map(str, archs))
    host = _q(
        [*HOST_FLAGS, *(["-Werror"] if strict else []), "-DTILECL_MODULE_NAME=_cuda",
         f'-DTILECL_BUILT_ARCHS="{arch_list}"', f"-I{CSRC}", *(f"-I{p}" for p in _python_includes())]
    )  # fmt: skip
    nvcc_flags = NVCC_FLAGS + (NVCC_STRICT[:4] if strict else [])  # -Werror all-warnings, host -Werror
    device = _q([*nvcc_flags, f"-I{CSRC}", "-ccbin", cxx, *gencode_flags(archs, ptx=True)])
    rules = {
        "nvcc": f"{_q([nvcc])} {device} -c $in -o $out",
        "cxx": f"{_q([cxx])} {host} -c $in -o $out",
        "link": f"{_q([nvcc])} -shared -ccbin {_q([cxx])} -cudart static $in -o $out",
    }
    objects, edges = [], []
    for src in [CSRC / name for name in INSTANTIATIONS.values()] + [CSRC / "bindings.cpp"]:
        obj = f"{src.stem}.o"
        objects.append(obj)
        edges.append((obj, "nvcc" if src.suffix == ".cu" else "cxx", [str(src)]))
    edges.append((str(output.resolve()), "link", objects))
    _write_ninja(temp_dir / "build.ninja", rules, edges)
    _run_ninja(temp_dir, "tilecl._cuda")


def build_extension_jit(arch: int) -> Path:
    """``tilecl._cuda`` for one architecture (the local GPU's), compiled on first use and cached under
    :data:`BUILD_ROOT` ``/cuda-jit/<hash>/`` by the sources, the tools and the architecture; says so
    on stderr, with the time it took (11 s for sm_90 on a 2-core machine: three dtypes' kernels)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("compiling tilecl._cuda needs nvcc (set CUDA_HOME or put nvcc on PATH)")
    cxx = host_compiler()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    key = source_hash(
        _tool_version(nvcc), _tool_version(cxx), " ".join(NVCC_FLAGS + HOST_FLAGS), str(arch), suffix, "jit"
    )
    directory = BUILD_ROOT / "cuda-jit" / key
    library = directory / f"_cuda{suffix}"
    if library.is_file():
        return library
    with _locked(BUILD_ROOT / "cuda-jit" / f"{key}.lock"):
        if not library.is_file():  # another process may have built it while this one waited
            print(
                f"tilecl: compiling the CUDA C++ kernels for sm_{arch} (the first use of backend='cuda' "
                f"here; seconds to a minute, once: cached in {directory})",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            temporary = directory / "tmp" / library.name
            build_extension(temporary, directory / "obj", [arch])
            os.replace(temporary, library)  # atomic: a reader never sees half a library
            seconds = time.perf_counter() - started
            (directory / "build-seconds.txt").write_text(f"{seconds:.1f}\n")
            print(
                f"tilecl: compiled tilecl._cuda for sm_{arch} in {seconds:.0f} s", file=sys.stderr, flush=True
            )
    return library


def load_library(library: Path, name: str):
    """The extension module in ``library`` (its init function is ``PyInit_<last part of name>``)."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {name} from {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_extension_cached(archs: Optional[list[int]] = None) -> Path:
    """``tilecl._cuda`` built strictly (warnings as errors) under ``build/cuda-ext/<hash>/``; its path.

    For the tests: the real build and link, cached by source hash like :func:`nvcc_report`.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = archs or cuda_archs(DEFAULT_ARCHS)
    cxx = host_compiler()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    key = source_hash(
        _tool_version(nvcc), _tool_version(cxx), " ".join(NVCC_FLAGS + HOST_FLAGS), ",".join(map(str, archs)),
        suffix, "strict",
    )  # fmt: skip
    directory = BUILD_ROOT / "cuda-ext" / key
    library = directory / f"_cuda{suffix}"
    with _locked(BUILD_ROOT / "cuda-ext" / f"{key}.lock"):
        if not library.is_file():
            started = time.perf_counter()
            temporary = directory / "tmp" / library.name
            build_extension(temporary, directory / "obj", archs, strict=True)
            os.replace(temporary, library)
            (directory / "build-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return library


# --------------------------------------------------------------------------- the nvcc report

#: short report names of the kernels (demangled name → name)
_KERNEL_NAMES = [
    ("merge_stats_kernel", "merge_stats"),
    ("stats_kernel", "stats"),
    ("grad_kernel<", "grad_rows"),  # refined below by the template flag, one per form
    ("sum_partials_kernel", "sum_partials"),
]


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _short_name(demangled: str) -> str:
    if "grad_kernel<" in demangled:
        return "grad_rows" if re.search(r"grad_kernel<[^>]*, true>", demangled) else "grad_cols"
    for needle, name in _KERNEL_NAMES:
        if needle in demangled:
            return name
    return demangled


#: the C++ form types (``csrc/tilecl_cuda.h``) by the names of ``tilecl.backends.base.FORMS``
_FORMS = {"OffsetForm": "softmax", "SigmoidForm": "sigmoid"}


def _form(demangled: str) -> Optional[str]:
    """The form a gradient kernel is instantiated for (``grad_kernel<T, Form, ROWS>``), else ``None``."""
    found = re.search(r"grad_kernel<[^,>]*, (?:tilecl::)?(\w+),", demangled)
    return _FORMS.get(found.group(1), found.group(1)) if found else None


def parse_ptxas(log: str) -> list[dict]:
    """One dict per (kernel, arch) from ``ptxas -v`` output: registers, spills, stack, shared memory."""
    rows: list[dict] = []
    current: Optional[dict] = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if entry:
            current = {"symbol": entry.group(1), "arch": entry.group(2)}
            rows.append(current)
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current["stack_bytes"] = int(frame.group(1))
            current["spill_store_bytes"] = int(frame.group(2))
            current["spill_load_bytes"] = int(frame.group(3))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    names = _demangle([r["symbol"] for r in rows])
    for row in rows:
        row["name"] = _short_name(names[row["symbol"]])
        form = _form(names[row["symbol"]])
        if form is not None:
            row["form"] = form
    return rows


def _tensor_core_counts(ptx: str) -> dict[str, int]:
    """``mma`` instructions per entry function of a PTX file."""
    counts: dict[str, int] = {}
    for block in re.split(r"^\.visible \.entry ", ptx, flags=re.M)[1:]:
        name = block.split("(", 1)[0].strip()
        counts[name] = len(re.findall(r"\b(?:wmma\.mma|mma)\.sync\b", block))
    return counts


def _compile_for_report(nvcc: str, dtype: str, archs: list[int], directory: Path) -> list[dict]:
    src = CSRC / INSTANTIATIONS[dtype]
    keep = directory / f"keep-{dtype}"
    keep.mkdir(parents=True, exist_ok=True)
    command = [
        nvcc, *NVCC_FLAGS, *NVCC_STRICT, f"-I{CSRC}", "-ccbin", host_compiler(),
        *gencode_flags(archs, ptx=False), "--keep", "--keep-dir", str(keep),
        "-c", str(src), "-o", str(directory / f"{src.stem}.o"),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name} (warnings are errors here):\n{done.stderr[-8000:]}")
    rows = parse_ptxas(done.stderr)
    for arch in archs:
        ptx = keep / f"{src.stem}.compute_{arch}.ptx"
        counts = _tensor_core_counts(ptx.read_text()) if ptx.is_file() else {}
        for row in rows:
            if row["arch"] == f"sm_{arch}":
                row["tensor_core_instructions"] = counts.get(row["symbol"], 0)
    for row in rows:
        row["dtype"] = dtype
    shutil.rmtree(keep, ignore_errors=True)
    return [{"compile_seconds": round(seconds, 1), **row} for row in rows]


def nvcc_report(archs: Optional[list[int]] = None) -> dict:
    """Compile every instantiation with nvcc (warnings as errors, ``ptxas -v``) and report per kernel.

    Cached by source hash; raises ``RuntimeError`` with nvcc's output if a compile fails or warns.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = archs or cuda_archs(DEFAULT_ARCHS)
    flags = " ".join(NVCC_FLAGS + NVCC_STRICT)
    key = source_hash(_tool_version(nvcc), flags, ",".join(map(str, archs)), host_compiler())
    directory = BUILD_ROOT / "cuda-inspect" / key
    report_path = directory / "report.json"
    with _locked(BUILD_ROOT / "cuda-inspect" / f"{key}.lock"):
        if report_path.is_file():
            return json.loads(report_path.read_text())
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(len(INSTANTIATIONS), os.cpu_count() or 1))) as pool:
            parts = list(pool.map(lambda dt: _compile_for_report(nvcc, dt, archs, directory), INSTANTIATIONS))
        kernels = [row for part in parts for row in part]
        nvcc_version = _tool_version(nvcc).strip().splitlines()
        report = {
            "nvcc": nvcc_version[-1] if nvcc_version else "",
            "archs": [f"sm_{a}" for a in archs],
            "flags": flags,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "kernels": kernels,
        }
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":  # python python/tilecl/_cuda_build.py: build the emulation module
    print(build_emulation(), file=sys.stderr)
