"""Peak extra memory of one fwd+bwd, in a fresh subprocess (CPU) or from the allocator (CUDA).

Protocol (docs/design.md): on CPU, a new Python process allocates the inputs,
resets its peak RSS to the current RSS (``/proc/self/clear_refs``), runs the
loss forward and backward once, and reports the peak RSS (``VmHWM``) minus
that baseline (Linux only). A fresh process per configuration keeps earlier
runs' freed-but-cached pages out of the figure. On CUDA the figure is
``torch.cuda.max_memory_allocated`` minus the allocation after the inputs.

The child is this module: ``python -m experiments.memory PROVIDER N D [DTYPE] [THREADS]``
prints the measurement as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

#: CLIP (symmetric InfoNCE) tiled and full-matrix; SigLIP (sigmoid) tiled and open_clip's formula;
#: SupCon tiled and pytorch-metric-learning's (100 classes); open_clip's DistillClipLoss (CLIP +
#: distillation from a teacher of the same width) tiled and as open_clip computes it
PROVIDERS = (
    "tilecl",
    "naive",
    "tilecl-sigmoid",
    "naive-sigmoid",
    "tilecl-supcon",
    "pml-supcon",
    "tilecl-distill",
    "naive-distill",
    "tilecl-xbm",
    "pml-xbm",
)
#: the cross-batch memory's entries for the ``*-xbm`` providers (SupCon over a batch of ``N`` against
#: a full memory of this many ``D``-dim entries, PML's ``CrossBatchMemory``, 100 classes)
XBM_ENTRIES = 65536

#: the folder that holds the ``experiments`` package: the child imports it from there, whatever its cwd
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def peak_extra_memory_cpu(
    provider: str,
    n: int,
    d: int,
    dtype: str = "float32",
    threads: int = 0,
    timeout: Optional[float] = None,
) -> dict:
    """Peak extra RSS (bytes) of one fwd+bwd of ``provider`` at ``N = n``, ``D = d`` in a fresh process.

    Returns ``{"peak_extra_bytes": int, "seconds": float, "loss": float}``; ``seconds``
    is the wall time of that single (cold) fwd+bwd.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    path = os.pathsep.join(p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.memory", provider, str(n), str(d), dtype, str(threads)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} N={n} D={d} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field + " not in /proc/self/status")


def _cross_batch_memory(provider: str, d: int) -> Callable:
    """A ``CrossBatchMemory`` around SupCon whose memory is already full (allocated before the
    measurement, as in training); the call enqueues the batch and computes the loss."""
    import torch

    if provider == "pml-xbm":
        from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss
    else:
        from tilecl.integrations.pytorch_metric_learning import CrossBatchMemory, SupConLoss
    memory = CrossBatchMemory(SupConLoss(temperature=0.1), d, memory_size=XBM_ENTRIES)
    gen = torch.Generator().manual_seed(1)
    memory.embedding_memory.copy_(
        torch.nn.functional.normalize(torch.randn(XBM_ENTRIES, d, generator=gen), dim=1)
    )
    memory.label_memory.copy_(torch.arange(XBM_ENTRIES) % 100)
    memory.has_been_filled = True
    return lambda a, b, s: memory(a, torch.arange(a.shape[0]) % 100)


def _loss(provider: str) -> Callable:
    import torch

    import tilecl
    from tilecl.testing.naive import naive_contrastive_loss, naive_distill_clip_loss, naive_sigmoid_loss

    bias = torch.tensor(-10.0, requires_grad=True)
    if provider == "pml-supcon":
        from pytorch_metric_learning.losses import SupConLoss

        pml_supcon = SupConLoss(temperature=0.1)
        return lambda a, b, s: pml_supcon(a, torch.arange(a.shape[0]) % 100)
    if provider.endswith("-distill"):
        distill = tilecl.distill_clip_loss if provider == "tilecl-distill" else naive_distill_clip_loss

        def both(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            # the teacher: the same features swapped (no allocation), a sharper scale
            contrastive, distilled = distill(a, b, s, b.detach(), a.detach(), 2 * s.detach())
            return contrastive + distilled

        return both
    return {
        "tilecl": lambda a, b, s: tilecl.contrastive_loss(a, b, s),
        "naive": naive_contrastive_loss,
        "tilecl-sigmoid": lambda a, b, s: tilecl.sigmoid_loss(a, b, s, bias),
        "naive-sigmoid": lambda a, b, s: naive_sigmoid_loss(a, b, s, bias),
        "tilecl-supcon": lambda a, b, s: tilecl.supcon_loss(a, torch.arange(a.shape[0]) % 100, 0.1),
    }[provider]


def measure(provider: str, n: int, d: int, dtype_name: str = "float32", threads: int = 0) -> dict:
    """One measurement in this process: meaningful only in a process that has run nothing else."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    fn = _cross_batch_memory(provider, d) if provider.endswith("-xbm") else _loss(provider)
    gen = torch.Generator().manual_seed(0)

    def features() -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
        return x.to(dtype).requires_grad_()

    a, b = features(), features()
    scale = torch.tensor(14.3, requires_grad=True)
    # one tiny call first: thread pools and BLAS workspaces are set up once per process, not per loss
    small = (a[:64].detach().clone().requires_grad_(), b[:64].detach().clone().requires_grad_())
    fn(*small, scale).backward()
    scale.grad = None
    # the input set-up's temporaries already raised the peak: reset it to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    loss = fn(a, b, scale)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM") - before
    return {"peak_extra_bytes": peak, "seconds": seconds, "loss": float(loss.detach())}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.memory",
        description="One fwd+bwd in this (fresh) process; prints its peak extra RSS as one JSON line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("provider", choices=PROVIDERS, help="the loss to measure")
    parser.add_argument("n", type=int, help="batch size N")
    parser.add_argument("d", type=int, help="feature dimension D")
    parser.add_argument("dtype", nargs="?", default="float32", help="input dtype (a torch dtype name)")
    parser.add_argument("threads", nargs="?", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.provider, args.n, args.d, args.dtype, args.threads)))


if __name__ == "__main__":
    main()
