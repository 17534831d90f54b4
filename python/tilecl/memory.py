"""Peak extra memory of one fwd+bwd, in a fresh subprocess (CPU) or from the allocator (CUDA).

Protocol (docs/design.md): on CPU, a new Python process allocates the inputs,
resets its peak RSS to the current RSS (``/proc/self/clear_refs``), runs the
loss forward and backward once, and reports the peak RSS (``VmHWM``) minus
that baseline (Linux only). A fresh process per configuration keeps earlier
runs' freed-but-cached pages out of the figure. On CUDA the figure is
``torch.cuda.max_memory_allocated`` minus the allocation after the inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Optional

#: CLIP (symmetric InfoNCE) tiled and full-matrix; SigLIP (sigmoid) tiled and open_clip's formula;
#: SupCon tiled and pytorch-metric-learning's (100 classes)
PROVIDERS = ("tilecl", "naive", "tilecl-sigmoid", "naive-sigmoid", "tilecl-supcon", "pml-supcon")

_CHILD = r"""
import json, sys, torch
provider, dtype = sys.argv[1], sys.argv[4]
n, d, threads = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
if threads > 0:
    torch.set_num_threads(threads)
import tilecl
from tilecl.testing.naive import naive_contrastive_loss, naive_sigmoid_loss
dtype = getattr(torch, dtype)
if provider == "pml-supcon":
    from pytorch_metric_learning.losses import SupConLoss
    pml_supcon = SupConLoss(temperature=0.1)
gen = torch.Generator().manual_seed(0)
def features():
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    return x.to(dtype).requires_grad_()
a, b = features(), features()
scale = torch.tensor(14.3, requires_grad=True)
bias = torch.tensor(-10.0, requires_grad=True)
fn = {
    "tilecl": lambda a, b, s: tilecl.contrastive_loss(a, b, s),
    "naive": naive_contrastive_loss,
    "tilecl-sigmoid": lambda a, b, s: tilecl.sigmoid_loss(a, b, s, bias),
    "naive-sigmoid": lambda a, b, s: naive_sigmoid_loss(a, b, s, bias),
    "tilecl-supcon": lambda a, b, s: tilecl.supcon_loss(a, torch.arange(a.shape[0]) % 100, 0.1),
    "pml-supcon": lambda a, b, s: pml_supcon(a, torch.arange(a.shape[0]) % 100),
}[provider]
def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field + " not in /proc/self/status")
# one tiny call first: thread pools and BLAS workspaces are set up once per process, not per loss
fn(a[:64].detach().clone().requires_grad_(), b[:64].detach().clone().requires_grad_(), scale).backward()
scale.grad = None
# the input set-up's temporaries already raised the peak: reset it to the current RSS
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
import time
before = status_bytes("VmRSS")
start = time.perf_counter()
loss = fn(a, b, scale)
loss.backward()
seconds = time.perf_counter() - start
peak = status_bytes("VmHWM") - before
print(json.dumps({"peak_extra_bytes": peak, "seconds": seconds, "loss": float(loss)}))
"""


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
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, provider, str(n), str(d), dtype, str(threads)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} N={n} D={d} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
