"""``tilecl`` / ``python -m tilecl``: the version, and which backends can run here and why not.

The demo and the article's experiments are not part of the package: from a source
checkout, ``python -m experiments --help`` (and ``python -m tools.inspect_kernels``
for the static kernel report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import tilecl
from tilecl.backends import BACKENDS, explain_backend


def checks() -> list[tuple[torch.device, torch.dtype]]:
    """What each backend is asked about: CPU float32, and CUDA float16 where a CUDA device is."""
    found = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        found.append((torch.device("cuda"), torch.float16))
    return found


def report() -> str:
    where = Path(tilecl.__file__).parent
    lines = [f"tilecl {tilecl.__version__} ({where}; torch {torch.__version__})"]
    cases = checks()
    if len(cases) == 1:
        lines.append("no CUDA device: the backends are asked about cpu float32 only")
    lines.append("backends (can it run here? for each device and dtype):")
    width = max(len(name) for name in BACKENDS)
    for name, backend in BACKENDS.items():
        for k, (device, dtype) in enumerate(cases):
            reasons = backend.not_supported_reasons(device, dtype)
            verdict = "yes" if not reasons else "no: " + "; ".join(reasons)
            label = name if k == 0 else ""
            lines.append(f"  {label:<{width}}  {device.type} {str(dtype).removeprefix('torch.')}: {verdict}")
    for device, dtype in cases:
        choice = explain_backend(torch.empty(1, 1, device=device, dtype=dtype))
        lines.append(
            f"backend='auto' takes {choice.chosen!r} for {device.type} {str(dtype).removeprefix('torch.')}"
        )
    lines.append("tilecl.explain_backend(a, b) says which backend a call takes and why not the others")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "tilecl") -> None:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print tilecl's version and, for each backend, whether it can run on this machine "
        "(CPU float32 and, with a CUDA device, CUDA float16) and why not.",
        epilog="The demo and the article's experiments run from a source checkout: "
        "python -m experiments --help",
    )
    parser.add_argument("--version", action="version", version=f"tilecl {tilecl.__version__}")
    parser.parse_args(argv)
    print(report())


if __name__ == "__main__":
    main(sys.argv[1:], prog="python -m tilecl")
