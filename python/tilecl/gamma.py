"""The gamma-augmented decomposable contrastive loss (Chen et al., NeurIPS 2022) with a per-sample memory.

Minibatch InfoNCE estimates ``log D_i`` (``D_i`` = mean exp-similarity of
anchor ``i`` to all negatives) by ``log D̂_i`` from the batch; ``E[log D̂] ≠
log D`` biases the gradient unless batches are huge. The gamma identity
``D^-α = Γ(α)^-1 ∫ u^(α-1) e^(-u·D) du`` introduces ``u_i ~ Gamma(α, rate D_i)``
and makes the loss *linear* in ``D_i``: ``−S⁺_i + u_i·D_i``, whose minibatch
estimate ``u_i·D̂_i`` is unbiased. Stochastic EM alternates:

* **E-step** — ``log D̄_i ← log((1−γ)·D̄_i + γ·D̂_i)`` in a per-sample memory
  indexed by the dataset index (first visit: ``log D̂_i``; an index seen twice
  in a batch gets the mean of its estimates) **[reconstructed: the paper's
  estimator of D_i is not public; this moving average is SogCLR's]**; then
  ``u_i ~ Gamma(α, rate D̄_i)`` (``estimator="sample"``) or ``u_i = α/D̄_i``
  (``"mean"``).
* **M-step** — backpropagate the surrogate ``mean_i(−S⁺_i + u_i·D̂_i)`` with
  ``u`` fixed (:func:`tilecl.gamma_contrastive_loss`).

Everything is kept in log space; the batch statistics come from the same
single streaming pass as the loss (the E-step reads them, the M-step reuses
them), and the backward is the shared offset backward with
``c_i = log M − log u_i``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import validation as v
from ._compat import compile_disabled, standard_gamma
from .backends import LseStats, check_backend_name
from .contrastive import check_call
from .distributed import DIST_IMPLS, resolve_group
from .driver import Signature, begin
from .function import apply_loss, batch_stats, log_count, targets_of
from .validation import Scale

__all__ = ["GammaContrastiveLoss", "em_update", "gamma_log_weights"]

ESTIMATORS = ("sample", "mean")
#: the per-sample log-memory buffers: float64 whatever the module is cast to
MEMORY_BUFFERS = ("log_memory_rows", "log_memory_cols")


def em_update(
    log_memory: torch.Tensor,
    visited: torch.Tensor,
    index: torch.Tensor,
    log_d_hat: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """The E-step's memory update for one batch, without touching the memory.

    Args:
        log_memory: ``(num_samples,)`` ``log D̄``; visited: ``(num_samples,)`` bool.
        index: ``(N,)`` dataset indices of the batch; log_d_hat: ``(N,)`` ``log D̂``.
        gamma: the moving-average rate ``γ ∈ (0, 1]`` (1: plain minibatch estimate).

    Returns:
        ``(N,)`` the updated ``log D̄`` at each row's index. Rows sharing an index
        get the same value (from the mean of their estimates), so the caller
        commits ``log_memory[index] = result`` when it chooses, duplicates and all.

    Every shape is ``N`` (no ``unique``: the duplicates are grouped by sorting),
    so the update traces under ``torch.compile`` without a data-dependent shape.
    """
    n = index.shape[0]
    sorted_index, order = torch.sort(index)
    starts = torch.ones_like(sorted_index, dtype=torch.bool)
    starts[1:] = sorted_index[1:] != sorted_index[:-1]
    # group k: the k-th distinct index; each row's group, in the batch's order
    group = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    acc = log_d_hat.dtype
    peak = torch.full((n,), -math.inf, dtype=acc, device=index.device)
    peak.scatter_reduce_(0, group, log_d_hat, "amax")
    at_peak = peak[group]
    total = torch.zeros_like(peak).index_add_(0, group, torch.exp(log_d_hat - at_peak))
    count = torch.zeros_like(peak).index_add_(0, group, torch.ones_like(log_d_hat))
    estimate = at_peak + torch.log(total[group] / count[group])
    old = log_memory[index].to(acc)
    mixed = torch.logaddexp(
        math.log1p(-gamma) + old if gamma < 1 else torch.full_like(old, -math.inf), math.log(gamma) + estimate
    )
    return torch.where(visited[index], mixed, estimate)


def gamma_log_weights(
    log_memory_at_batch: torch.Tensor,
    alpha: float,
    estimator: str,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``log u`` for each row: ``log(g) − log D̄`` with ``g ~ Gamma(α, 1)``, or ``log α − log D̄``.

    Sampling uses ``generator`` when given (reproducible under its seed),
    otherwise torch's global RNG.
    """
    if estimator == "mean":
        return math.log(alpha) - log_memory_at_batch
    if generator is None:
        concentration = torch.full_like(log_memory_at_batch, alpha, dtype=torch.float64)
        draws = standard_gamma(concentration, None)
    else:
        draws = _draw_from(generator, log_memory_at_batch.shape, alpha).to(log_memory_at_batch.device)
    return torch.log(draws).to(log_memory_at_batch.dtype) - log_memory_at_batch


@compile_disabled
def _draw_from(generator: torch.Generator, shape: torch.Size, alpha: float) -> torch.Tensor:
    """``Gamma(α, 1)`` draws from ``generator``, on its device.

    torch.compile cannot trace an op given an explicit generator, so under
    compilation this is a graph break (the only one of the module): pass no
    generator to compile a step with ``fullgraph=True``.
    """
    concentration = torch.full(shape, alpha, dtype=torch.float64, device=generator.device)
    return standard_gamma(concentration, generator)


class GammaContrastiveLoss(nn.Module):
    """Gamma-EM contrastive loss with a per-sample memory of ``log D̄`` (one per direction).

    ``forward(a, b, index, logit_scale)`` runs the E-step (memory update, draw
    of ``u``) and returns the M-step surrogate to backpropagate. The memory is
    updated only in training mode and only after every check passed and the
    loss was computed, so a call that raises leaves it unchanged. A batch with
    non-finite statistics (NaN or inf features) writes nothing: a
    ``RuntimeWarning`` names its dataset indices and the loss is NaN, so an AMP
    scaler can skip the step. The memory stays float64 whatever the module is
    cast to (``.half()``, ``.to(dtype)``…), and ``state_dict`` saves the
    sampling generator's state with it (draws from torch's global RNG, without
    a ``generator``, resume only as the global RNG does).

    Args:
        num_samples: dataset size; ``index`` values lie in ``[0, num_samples)``.
        alpha: Gamma shape ``α > 0`` (``α = 1``: the original InfoNCE objective).
        gamma: memory rate ``γ ∈ (0, 1]`` (``γ = 1``: plain minibatch estimate).
        estimator: ``"sample"`` (``u ~ Gamma(α, rate D̄)``) or ``"mean"`` (``u = α/D̄``).
        symmetric: both directions (CLIP) with a memory each.
        backend: as :func:`tilecl.contrastive_loss`.
        generator: ``torch.Generator`` for the draws of ``u``.
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``):
            the loss is then the global one over all ranks' pairs (gradient
            convention of :mod:`tilecl.distributed`), and the E-step runs on the
            gathered per-sample statistics, so every rank holds the same memory
            after each step, each sample updated once.
        device_mesh, mesh_dim: instead of ``process_group``, as in
            :func:`tilecl.contrastive_loss`.
        dist_impl: ``"gather"`` or ``"ring"`` (see :mod:`tilecl.distributed`).

    Attributes (after a forward): ``last_infonce`` — the batch's InfoNCE value
    (for logging, from the same pass); ``last_log_u`` — ``(log u rows, log u cols)``.
    """

    def __init__(
        self,
        num_samples: int,
        alpha: float = 1.0,
        gamma: float = 0.9,
        estimator: str = "sample",
        symmetric: bool = True,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        process_group: Optional[object] = None,
        device_mesh: Optional[Any] = None,
        mesh_dim: Union[int, str, None] = None,
        dist_impl: str = "gather",
    ) -> None:
        super().__init__()
        self.num_samples = v.check_count(num_samples, "num_samples")
        self.alpha = v.check_positive(alpha, "alpha")
        self.gamma = v.check_in_interval(gamma, "gamma", 0.0, 1.0, open_low=True)
        self.estimator = v.check_choice(estimator, "estimator", ESTIMATORS)
        v.check_choice(dist_impl, "dist_impl", DIST_IMPLS)
        self.symmetric, self.backend = v.check_flag(symmetric, "symmetric"), check_backend_name(backend)
        self.generator, self.dist_impl = generator, dist_impl
        self.process_group = resolve_group(process_group, device_mesh, mesh_dim)
        for direction in ("rows", "cols"):
            self.register_buffer(f"log_memory_{direction}", torch.zeros(num_samples, dtype=torch.float64))
            self.register_buffer(f"visited_{direction}", torch.zeros(num_samples, dtype=torch.bool))
        # steps whose memory update was skipped for non-finite statistics (not saved in checkpoints)
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.int64), persistent=False)
        self.last_infonce: Optional[torch.Tensor] = None
        self.last_log_u: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, alpha={self.alpha}, gamma={self.gamma}, "
            f"estimator={self.estimator!r}, symmetric={self.symmetric}"
        )

    def _commit_finite(
        self, updates: dict[str, torch.Tensor], finite: torch.Tensor, index: torch.Tensor
    ) -> None:
        """Write the step's memory update, or nothing if any sample's statistics were not finite.

        Branch-free (``where`` on the device), so it compiles; a skipped step
        counts in ``skipped_updates`` and, in eager mode, warns with the indices.
        """
        commit = finite.all()
        for direction, new in updates.items():
            memory, visited = getattr(self, f"log_memory_{direction}"), getattr(self, f"visited_{direction}")
            memory[index] = torch.where(commit, new.to(torch.float64), memory[index])
            visited[index] = visited[index] | commit
        skipped = self.get_buffer("skipped_updates")
        skipped += (~commit).to(skipped.dtype)
        if v.reads_values(finite) and not bool(commit):
            bad = sorted(set(index[~finite].tolist()))
            warnings.warn(
                f"GammaContrastiveLoss: non-finite statistics (NaN or inf features) for dataset indices "
                f"{bad}; this step's memory update was skipped for the whole batch",
                RuntimeWarning,
                stacklevel=3,
            )

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> GammaContrastiveLoss:
        """``.to()``, ``.cuda()``, ``.float()``, ``.half()``…: the memory moves but stays float64.

        A cast of the whole model must neither round the stored ``log D̄`` nor change the dtype
        the E-step writes into.
        """
        memory: dict[str, torch.Tensor] = {}
        for name in MEMORY_BUFFERS:
            buffer = self._buffers.pop(name)
            assert buffer is not None  # registered in __init__
            memory[name] = buffer
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buffer in memory.items():
                moved = fn(buffer)  # to(device), to_empty(), share_memory_() … as for any buffer
                if moved.dtype != torch.float64:  # a cast: move the original, keep its dtype
                    moved = buffer.to(moved.device)
                self._buffers[name] = moved
        return self

    def get_extra_state(self) -> torch.Tensor:
        """The sampling generator's state (empty without a generator), saved by ``state_dict``."""
        if self.generator is None:
            return torch.empty(0, dtype=torch.uint8)
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        if self.generator is not None and state.numel():
            self.generator.set_state(state)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # checkpoints written before the generator's state was saved have no extra state: load them
        key = prefix + "_extra_state"
        if key not in state_dict:
            state_dict = {**state_dict, key: torch.empty(0, dtype=torch.uint8)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        index: torch.Tensor,
        logit_scale: Scale = 1.0,
        *,
        labels: Optional[torch.Tensor] = None,
        positives: Optional[torch.Tensor] = None,
        row_groups: Optional[torch.Tensor] = None,
        col_groups: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Surrogate loss for ``a (N, D)``, ``b (M, D)`` and the batch's dataset ``index (N,)``.

        ``labels``, ``positives`` and the false-negative masking ``row_groups``
        / ``col_groups`` as in :func:`tilecl.contrastive_loss` (``positives``
        keeps the positive out of ``D̂``, as in the paper; masked entries
        leave ``D̂``'s sum and so the memory's estimates too).
        """
        n, m = a.shape[0], b.shape[0]

        def check() -> tuple[torch.Tensor, Signature]:
            scale, signature = check_call(
                a, b, logit_scale, labels, positives, self.symmetric, "mean", ("a", "b"),
                (row_groups, col_groups),
            )  # fmt: skip
            if self.process_group is not None and (labels is not None or positives is not None):
                raise ValueError("labels and positives are not supported with process_group")
            v.check_index(index, "index", n, self.num_samples, a)
            if self.log_memory_rows.device != a.device:
                raise ValueError(
                    f"the module's memory is on {self.log_memory_rows.device}; move it with .to()"
                )
            # the dataset indices are gathered: their dtype must match too
            return scale, {**signature, "index_dtype": index.dtype}

        run = begin(
            check, like=a, backend=self.backend, process_group=self.process_group, dist_impl=self.dist_impl
        )
        scale, ranks = run.checked, run.ranks
        groups = None if row_groups is None or col_groups is None else (row_groups, col_groups)
        spec = run.spec(symmetric=self.symmetric, exclude_diagonal=False)
        # the E-step runs on every rank's per-sample statistics (O(N) scalars), so every rank
        # updates the same samples the same way and the memories stay identical
        every_index, mine = ranks.gather(index), ranks.own(n)
        for direction in ("rows", "cols") if self.symmetric else ("rows",):
            # the memory only ever holds finite values; a corrupted checkpoint is refused before any
            # kernel runs, on the whole gathered batch so that every rank raises together
            memory, visited = getattr(self, f"log_memory_{direction}"), getattr(self, f"visited_{direction}")
            seen = torch.where(visited[every_index], memory[every_index], 0.0)
            v.check_log_weights(
                seen, f"log_memory_{direction} at the batch's indices", every_index.shape[0], a
            )
        stats = batch_stats(a, b, scale, labels, positives, spec, groups)

        log_d_hat = {"rows": ranks.gather(stats.row_lse - log_count(spec.global_cols or m, stats.row_lse))}
        if self.symmetric:
            col_at_pair = stats.col_lse[targets_of(labels, n, a.device)]
            log_d_hat["cols"] = ranks.gather(col_at_pair - log_count(spec.global_rows or n, col_at_pair))
        # NaN or inf features give non-finite statistics; those must never reach the memory, where
        # the γ-mixing would keep them forever
        finite = torch.stack([torch.isfinite(x) for x in log_d_hat.values()]).all(dim=0)
        updates, log_u = {}, {}
        for direction, estimate in log_d_hat.items():
            memory, visited = getattr(self, f"log_memory_{direction}"), getattr(self, f"visited_{direction}")
            at_batch = em_update(memory, visited, every_index, estimate, self.gamma)
            updates[direction] = at_batch
            log_u[direction] = gamma_log_weights(at_batch[mine], self.alpha, self.estimator, self.generator)
        log_u_rows, log_u_cols = log_u["rows"], log_u.get("cols")
        loss = apply_loss(
            a,
            b,
            scale,
            spec,
            labels=labels,
            positives=positives,
            log_u_rows=log_u_rows,
            log_u_cols=log_u_cols,
            groups=groups,
            stats=stats,
        )
        loss = run.global_loss(loss, n)
        if self.training:
            self._commit_finite(updates, finite, every_index)
        # the mean over every rank's pairs: each rank's mean weighted by its share of the rows
        share = n / ranks.total_rows(n)
        self.last_infonce = ranks.sum_(_infonce_from_stats(stats, labels, self.symmetric) * share)
        self.last_log_u = (log_u_rows, log_u_cols)
        return loss


def _infonce_from_stats(stats: LseStats, labels: Optional[torch.Tensor], symmetric: bool) -> torch.Tensor:
    """The batch's plain InfoNCE value, read off the stats the loss already computed."""
    per_pair = stats.row_lse - stats.positive
    if symmetric:
        targets = targets_of(labels, stats.row_lse.shape[0], stats.row_lse.device)
        per_pair = (per_pair + stats.col_lse[targets] - stats.positive) / 2
    return per_pair.mean().detach()
