"""The ``triton`` backend: the primitives as launches of the ``@triton.jit`` kernels of ``kernels/``.

Argument preparation, block configurations and grids live here; the kernel
source is ``tilecl.kernels`` (the top-level ``kernels/`` folder), one module
per pass as ``csrc/``: :func:`lse_stats` launches ``kernels/stats.py``,
:func:`offset_backward` and :func:`sigmoid_sweep` the gradient sweep of
``kernels/sweep.py`` with an epilogue of ``kernels/forms.py``; both passes
form their tiles of ``S`` in ``kernels/scores.py``. The kernels run on
CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) — which is how the test
suite executes every kernel line without a GPU. Importing this module does
not import triton (about a second, and absent on a machine without the
``gpu`` extra): :func:`_kernels` does, on the first launch.

Both gradient primitives run one sweep (:func:`_sweep`); what tells them
apart is the elementwise form, which is an argument type here
(:class:`OffsetFormArgs`, :class:`SigmoidFormArgs`: the form's kernel
arguments and which epilogue of :mod:`tilecl.kernels.forms` reads them).

``torch.use_deterministic_algorithms(True)`` selects the backward without
floating-point atomics (bitwise reproducible, one more N·M·D pass).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple, Optional, Protocol

import torch

from . import torch as torch_primitives
from .base import (
    KERNEL_DTYPES,
    Backend,
    Gradients,
    LseStats,
    OffsetTerms,
    Scores,
    SigmoidSweep,
    SigmoidTerms,
    cuda_visible,
    module_loader,
    sweep_of,
)
from .registry import register_backend

__all__ = [
    "BACKEND",
    "GPU_CONFIGS",
    "SIGMOID_GPU_CONFIGS",
    "KernelConfig",
    "MAX_BLOCK_DOUT",
    "OffsetFormArgs",
    "SigmoidFormArgs",
    "lse_stats",
    "offset_backward",
    "pass_count",
    "sigmoid_pass_count",
    "sigmoid_sweep",
    "sweep",
]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: float32 inputs use full-precision dot products unless this is set (TILECL_ALLOW_TF32=1)
ALLOW_TF32 = os.environ.get("TILECL_ALLOW_TF32", "0") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes of one launch (``BLOCK_DOUT``: feature columns per gradient accumulator)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DOUT: int
    num_warps: int = 4
    num_stages: int = 2


#: small blocks under the interpreter: several tiles and feature chunks even for tiny test shapes
INTERPRETER_CONFIG = KernelConfig(16, 16, 16, 16, num_warps=1, num_stages=1)


#: the configurations compiled and checked by ``python -m tools.inspect_kernels`` (per input dtype);
#: :func:`gpu_config` picks among them by the feature dimension
GPU_CONFIGS = {
    # 16-bit D <= 128: 32 columns, not 64, since the backward also sums G∘S in fp32 (sm_80 spilled)
    "float16": [
        KernelConfig(32, 32, 32, 128, 8),
        KernelConfig(32, 32, 32, 256, 8),
        KernelConfig(16, 16, 32, 512, 8),
    ],
    "bfloat16": [
        KernelConfig(32, 32, 32, 128, 8),
        KernelConfig(32, 32, 32, 256, 8),
        KernelConfig(16, 16, 32, 512, 8),
    ],
    # float32: the 64-bit address products cost registers; these are the largest spill-free tiles
    # (at D <= 256, 16 x 32: 16 x 16 spilled on sm_80 once the group mask was compiled in)
    "float32": [
        KernelConfig(32, 16, 16, 128, 8),
        KernelConfig(16, 32, 16, 256, 8),
        KernelConfig(16, 16, 16, 512, 8),
    ],
}
#: widest gradient accumulator: larger D adds a program (and an S recompute) per chunk
MAX_BLOCK_DOUT = 512
#: below this |scale|, 1/scale overflows float32: the 16-bit d(scale) comes from the torch backend
TINY_SCALE = 2.0**-100
#: largest block side: tile indices ``program_id · BLOCK + arange`` are int32 and must not wrap
MAX_BLOCK = 512
#: largest N, M or D the kernels take (address products are int64; the indices themselves int32)
MAX_DIM = 2**31 - MAX_BLOCK
# chosen by `python -m tools.inspect_kernels`: the largest tiles with zero register spills on sm_80 and sm_90


#: the sigmoid form keeps more fp32 temporaries live per tile entry (the loss, σ's pieces), so the
#: 16-bit tiles of the softmax configurations spill there: these are the largest spill-free ones
#: for each feature width (python -m tools.inspect_kernels)
_SIGMOID_16_BIT = [
    KernelConfig(32, 16, 32, 128, 4),
    KernelConfig(16, 32, 32, 256, 8),
    KernelConfig(16, 16, 32, 512, 8),
]
SIGMOID_GPU_CONFIGS = {
    "float16": _SIGMOID_16_BIT,
    "bfloat16": _SIGMOID_16_BIT,
    # the softmax form's 16 x 32 tile at D <= 256 spills in the sigmoid form on sm_80
    "float32": [
        KernelConfig(32, 16, 16, 128, 8),
        KernelConfig(16, 16, 16, 256, 8),
        KernelConfig(16, 16, 16, 512, 8),
    ],
}


def gpu_config(dim: int, dtype: torch.dtype, form: str = "softmax") -> KernelConfig:
    """The smallest configuration whose gradient accumulator holds all ``dim`` features (≤ 512)."""
    table = SIGMOID_GPU_CONFIGS if form == "sigmoid" else GPU_CONFIGS
    configs = table[str(dtype).removeprefix("torch.")]
    return next((c for c in configs if c.BLOCK_DOUT >= dim), configs[-1])


def config_for(a: torch.Tensor, form: str = "softmax") -> KernelConfig:
    return INTERPRETER_CONFIG if INTERPRETED else gpu_config(a.shape[1], a.dtype, form)


def pass_count(dim: int, block_dout: int, deterministic: bool) -> int:
    """N·M·D matmul passes of a symmetric fwd+bwd.

    Forward: the row and column statistics from one computation of ``S`` (1;
    the partials' merge reads no features). Backward: each feature chunk
    recomputes ``S`` (1 per chunk), ``G·b`` and ``Gᵀ·a`` add one pass each;
    the deterministic backward recomputes ``S`` once more per chunk in its
    column-block kernel. 4 (5 deterministic) at ``D ≤ BLOCK_DOUT``.
    """
    chunks = -(-dim // block_dout)
    return 1 + chunks * (2 if deterministic else 1) + 2


def sigmoid_pass_count(dim: int, block_dout: int, deterministic: bool) -> int:
    """N·M·D matmul passes of a sigmoid fwd+bwd: the whole of it is one gradient sweep.

    Each feature chunk computes ``S`` (1 per chunk), then ``G·b`` and ``Gᵀ·a``
    one pass each; the deterministic sweep recomputes ``S`` once more per
    chunk in its column-block kernel. 3 (4 deterministic) at ``D ≤ BLOCK_DOUT``.
    """
    chunks = -(-dim // block_dout)
    return chunks * (2 if deterministic else 1) + 2


def _dot_options(dtype: torch.dtype) -> dict:
    precision = "tf32" if dtype == torch.float32 and ALLOW_TF32 else "ieee"
    return dict(PRECISION=precision, UPCAST=INTERPRETED and dtype == torch.bfloat16)


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the registry refuses these before a loss runs; a direct call of the primitive is checked here
    for name, x in (("a", a), ("b", b)):
        if max(x.shape) > MAX_DIM:
            raise ValueError(
                f"backend='triton': {name} has shape {tuple(x.shape)}; the kernels take at most "
                f"2^31 - {MAX_BLOCK} = {MAX_DIM} rows and features (their tile indices are 32-bit)"
            )
    if a.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 and float32 inputs, got {a.dtype}")
    if a.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    # rows may be strided, features must be contiguous
    return (a if a.stride(1) == 1 else a.contiguous()), (b if b.stride(1) == 1 else b.contiguous())


def _group_mask(scores: Scores) -> dict:
    """The kernels' group-mask arguments: the id and kept-column pointers (``None`` without masking,
    which compiles the mask out)."""
    if not scores.masked:
        return dict(row_group_ptr=None, col_group_ptr=None, kept_ptr=None)
    row_groups, col_groups, kept_cols = scores.group_mask()
    # the kernels compare int32 ids (int64 ones cost registers the tiles need): each id becomes its
    # rank among all ids, which keeps equality; a kept column index is < MAX_DIM already
    every = torch.sort(torch.cat([row_groups.long(), col_groups.long()])).values
    rank = (
        torch.searchsorted(every, x.long()).to(torch.int32).contiguous() for x in (row_groups, col_groups)
    )
    return dict(
        row_group_ptr=next(rank),
        col_group_ptr=next(rank),
        kept_ptr=kept_cols.clamp(-1, MAX_DIM).to(torch.int32).contiguous(),
    )


def _launch_options(cfg: KernelConfig) -> dict:
    opts = asdict(cfg)
    if INTERPRETED:
        opts.pop("num_warps")
        opts.pop("num_stages")
    return opts


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernel modules, imported on the first launch (importing triton costs about a second)."""
    from tilecl.kernels import forms, stats, sweep

    return SimpleNamespace(stats=stats, sweep=sweep, forms=forms)


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


#: registers per thread the statistics kernel may use: left to itself, ptxas holds it to 64-96
#: and spills a few bytes on sm_80/sm_90 (python -m tools.inspect_kernels)
STATS_MAX_REGISTERS = 128
#: most row groups (and column splits) of the statistics kernel: its partials take
#: ``STATS_PARTS · (3·N + 2·col_count)`` floats (42 MB at N = M = 65,536) and it runs up to
#: ``STATS_PARTS²`` programs; the interpreter's few parts still give a group several blocks
STATS_PARTS = 3 if INTERPRETED else 32


class StatsGrid(NamedTuple):
    """How :func:`lse_stats` cuts ``S``: ``groups`` × ``splits`` programs, each walking
    ``blocks_per_group`` blocks of rows × ``tiles_per_split`` tiles of columns."""

    groups: int
    blocks_per_group: int
    splits: int
    tiles_per_split: int

    @classmethod
    def of(cls, n: int, m: int, cfg: KernelConfig, parts: int = 0) -> StatsGrid:
        parts = parts or STATS_PARTS
        row_blocks, col_tiles = _cdiv(n, cfg.BLOCK_M), _cdiv(m, cfg.BLOCK_N)
        blocks_per_group = _cdiv(row_blocks, min(row_blocks, parts))
        tiles_per_split = _cdiv(col_tiles, min(col_tiles, parts))
        return cls(
            _cdiv(row_blocks, blocks_per_group),
            blocks_per_group,
            _cdiv(col_tiles, tiles_per_split),
            tiles_per_split,
        )


def lse_stats(scores: Scores, targets: torch.Tensor, col_count: int, parts: int = 0) -> LseStats:
    """:class:`~tilecl.backends.base.LseStats` in float32, each tile of ``S`` computed once.

    ``parts`` overrides :data:`STATS_PARTS` (tests: one group, one split, many).
    """
    kernels = _kernels().stats
    a, b = _check(scores.a, scores.b)
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    cfg = config_for(a)
    opts = _launch_options(cfg)
    opts.pop("BLOCK_DOUT")
    grid = StatsGrid.of(n, m, cfg, parts)
    f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
    row_max, row_sum, row_positive = torch.empty(3, grid.splits, n, **f32)
    col_max, col_sum = torch.empty(2, grid.groups, col_count, **f32)
    kernels.stats_kernel[(grid.groups, grid.splits)](
        a, b, targets.contiguous(), row_max, row_sum, row_positive, col_max, col_sum, float(scores.scale),
        n, m, col_count, dim, a.stride(0), b.stride(0), grid.blocks_per_group, grid.tiles_per_split,
        EXCLUDE_DIAGONAL=scores.exclude_diagonal, **_group_mask(scores), **_dot_options(a.dtype),
        **opts, **({} if INTERPRETED else dict(maxnreg=STATS_MAX_REGISTERS)),
    )  # fmt: skip
    # separate allocations: a custom op's outputs must not alias one another
    row_lse, row_low, positive = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    col_lse, col_low = torch.empty(col_count, **f32), torch.empty(col_count, **f32)
    merge = kernels.merge_stats_kernel
    merge[(_cdiv(n, MERGE_BLOCK),)](
        row_max, row_sum, row_positive, row_lse, row_low, positive, grid.splits, n, BLOCK=MERGE_BLOCK
    )
    if col_count:
        # columns have no positive logit to merge
        merge[(_cdiv(col_count, MERGE_BLOCK),)](
            col_max, col_sum, None, col_lse, col_low, None, grid.groups, col_count, BLOCK=MERGE_BLOCK
        )
    return LseStats(row_lse, col_lse, positive, row_low, col_low)


#: lines per program of the partials' merge (a cheap, memory-bound kernel)
MERGE_BLOCK = 16 if INTERPRETED else 256


class FormArgs(Protocol):
    """An elementwise form's kernel arguments: what :func:`_sweep` needs of a form.

    A new form is one such type here and one epilogue in :mod:`tilecl.kernels.forms`.
    """

    def __iter__(self) -> Any:
        """The ``form`` tuple its epilogue unpacks, in that order."""
        ...

    def epilogue(self) -> dict:
        """Its epilogue's constexprs (``EPILOGUE``, ``REPORT``, ``TOTALS``)."""
        ...


class OffsetFormArgs(NamedTuple):
    """The offset form's kernel arguments: contiguous float32 terms and the column-term count.

    An offset of ``-inf`` (a fully excluded row or column) carries no term: its
    multiplier becomes 0 and the offset 0. ``+inf`` and NaN stay, so NaN or inf
    inputs reach the gradients as in the full-matrix loss.
    """

    row_offset: torch.Tensor
    row_mult: torch.Tensor
    col_offset: torch.Tensor
    col_mult: torch.Tensor
    col_count: int
    #: int32 (-1: none) and float32, each row's positive column and its weight (``OffsetTerms``);
    #: ``None`` (both): no positive term, compiled out
    positive_cols: Optional[torch.Tensor]
    positive_mult: Optional[torch.Tensor]

    @classmethod
    def of(cls, terms: OffsetTerms, device: torch.device) -> OffsetFormArgs:
        f32: dict[str, Any] = dict(dtype=torch.float32, device=device)
        row_live, col_live = ~torch.isneginf(terms.row_offset), ~torch.isneginf(terms.col_offset)
        positive_cols = positive_mult = None
        if terms.positive_cols is not None and terms.positive_mult is not None:
            positive_cols = terms.positive_cols.to(device=device, dtype=torch.int32).contiguous()
            positive_mult = terms.positive_mult.to(**f32).contiguous()
        return cls(
            torch.where(row_live, terms.row_offset, 0.0).to(**f32).contiguous(),
            torch.where(row_live, terms.row_mult, 0.0).to(**f32).contiguous(),
            torch.where(col_live, terms.col_offset, 0.0).to(**f32).contiguous(),
            torch.where(col_live, terms.col_mult, 0.0).to(**f32).contiguous(),
            terms.col_offset.shape[0],
            positive_cols,
            positive_mult,
        )

    def epilogue(self) -> dict:
        return _kernels().forms.OFFSET


class SigmoidFormArgs(NamedTuple):
    """The sigmoid form's kernel arguments, its two outputs among them.

    ``row_loss``: ``(N,)``; ``bias_partials``: one ``Σ G`` per row-kernel program.
    """

    row_weights: torch.Tensor
    row_keys: torch.Tensor
    col_keys: torch.Tensor
    bias: float
    row_loss: torch.Tensor
    bias_partials: torch.Tensor

    @classmethod
    def of(cls, terms: SigmoidTerms, n: int, programs: int, device: torch.device) -> SigmoidFormArgs:
        f32: dict[str, Any] = dict(dtype=torch.float32, device=device)
        # keys made non-negative (both sides shifted alike, on the device): the kernel's padding
        # rows and columns then get keys no pair has, -1 and -2 (tilecl.kernels.forms)
        base = torch.cat([terms.row_keys, terms.col_keys]).min()
        return cls(
            terms.row_weights.to(**f32).contiguous(),
            (terms.row_keys - base).contiguous(),
            (terms.col_keys - base).contiguous(),
            float(terms.bias),
            torch.empty(n, **f32),
            torch.empty(programs, **f32),
        )

    def epilogue(self) -> dict:
        return _kernels().forms.SIGMOID


def _sweep_grid(a: torch.Tensor, cfg: KernelConfig, with_grads: bool) -> tuple[int, int]:
    """The row kernel's programs: row blocks × feature chunks (one chunk when only the form's results
    are wanted: they come from the first)."""
    return _cdiv(a.shape[0], cfg.BLOCK_M), _cdiv(a.shape[1], cfg.BLOCK_DOUT) if with_grads else 1


def _sweep(
    scores: Scores,
    a: torch.Tensor,
    b: torch.Tensor,
    cfg: KernelConfig,
    form: FormArgs,
    with_grads: bool = True,
) -> Gradients:
    """One gradient sweep in the ``form``: float32 ``s·G·b``, ``s·Gᵀ·a`` and ``Σ G_ij a_i·b_j``.

    The form's own results land in its outputs. Without gradients only the
    row kernel's first feature chunk runs, and the returned tensors are empty.
    """
    kernels = _kernels().sweep
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    f32: dict[str, Any] = dict(dtype=torch.float32, device=a.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    s = float(scores.scale)
    grid = _sweep_grid(a, cfg, with_grads)
    grad_a = torch.empty(n, dim, **f32) if with_grads else torch.empty(0, **f32)
    grad_b = (
        (torch.empty(m, dim, **f32) if deterministic else torch.zeros(m, dim, **f32))
        if with_grads
        else torch.empty(0, **f32)
    )
    scale_partials = torch.empty(grid[0] * grid[1], **f32)
    args = tuple(form)
    epilogue = form.epilogue()
    common = dict(
        EPILOGUE=epilogue["EPILOGUE"], TOTALS=epilogue["TOTALS"], EXCLUDE_DIAGONAL=scores.exclude_diagonal,
        **_group_mask(scores), **_dot_options(a.dtype), **_launch_options(cfg),
    )  # fmt: skip
    inv_s = 1.0 / s if abs(s) >= TINY_SCALE else 0.0
    kernels.backward_kernel[grid](
        a, b, grad_a, grad_b, scale_partials, s, inv_s, n, m, dim, a.stride(0), b.stride(0), args,
        REPORT=epilogue["REPORT"], ATOMIC_GRAD_B=not deterministic,
        SCALE_FROM_FP32_G=a.dtype != torch.float32, WITH_GRADS=with_grads, **common,
    )  # fmt: skip
    if not with_grads:
        return Gradients(grad_a, grad_b, torch.empty(0, **f32))
    if deterministic:
        kernels.backward_cols_kernel[(_cdiv(m, cfg.BLOCK_N), grid[1])](
            a, b, grad_b, s, n, m, dim, a.stride(0), b.stride(0), args, **common,
        )  # fmt: skip
    return Gradients(grad_a, grad_b, scale_partials.sum())


def offset_backward(scores: Scores, terms: OffsetTerms, with_grads: bool = True) -> Gradients:
    """:class:`~tilecl.backends.base.Gradients` in float32: the sweep in the offset form."""
    a, b = _check(scores.a, scores.b)
    grad_a, grad_b, grad_scale = _sweep(scores, a, b, config_for(a), OffsetFormArgs.of(terms, a.device))
    if abs(float(scores.scale)) < TINY_SCALE and a.dtype != torch.float32:
        # 16-bit inputs: the kernel sums G·S / scale, and at scale ~0 (an infinite temperature) S
        # holds no a·b to divide (1/scale would overflow float32)
        grad_scale = torch_primitives.offset_backward(scores, terms).grad_scale.float()
    return Gradients(grad_a, grad_b, grad_scale)


def sigmoid_sweep(scores: Scores, terms: SigmoidTerms, with_grads: bool) -> SigmoidSweep:
    """:class:`~tilecl.backends.base.SigmoidSweep` in float32: the sweep in the sigmoid form.

    One sweep: without gradients one ``S`` pass; with them 3 passes (4 under
    ``torch.use_deterministic_algorithms``, no float atomics).
    """
    a, b = _check(scores.a, scores.b)
    cfg = config_for(a, "sigmoid")
    programs = _sweep_grid(a, cfg, with_grads)
    form = SigmoidFormArgs.of(terms, a.shape[0], programs[0] * programs[1], a.device)
    grad_a, grad_b, grad_scale = _sweep(scores, a, b, cfg, form, with_grads)
    if not with_grads:
        return SigmoidSweep(form.row_loss, grad_a, grad_b, grad_scale, torch.empty_like(grad_scale))
    if abs(float(scores.scale)) < TINY_SCALE and a.dtype != torch.float32:
        # as in offset_backward: S / scale holds no a·b at scale ~0
        grad_scale = torch_primitives.sigmoid_sweep(scores, terms, True).grad_scale.float()
    return SigmoidSweep(form.row_loss, grad_a, grad_b, grad_scale, form.bias_partials.sum())


#: the gradient sweep: one launch (:func:`_sweep`) per form, float16 terms rescaled around 1
sweep = sweep_of({"softmax": offset_backward, "sigmoid": sigmoid_sweep}, rescale_16bit=True)


# --------------------------------------------------------------------------- declaration


def _triton_missing() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install triton)"
    return None


def _triton_interpreter() -> Optional[str]:
    # read when triton is first imported, so it must be set before that
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return (
            "runs on CPU tensors only under Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    return None


BACKEND = register_backend(
    Backend(
        "triton",
        KERNEL_DTYPES,
        {"cuda": cuda_visible, "cpu": _triton_interpreter},
        _triton_missing,
        module_loader(__name__),
        max_extent=MAX_DIM,
        auto_devices=("cuda",),
        preference=10,
        tiles={"cpu": (INTERPRETER_CONFIG.BLOCK_M, INTERPRETER_CONFIG.BLOCK_N, INTERPRETER_CONFIG.BLOCK_D)},
        emulated_on=("cpu",),
    )
)
