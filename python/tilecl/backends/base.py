"""The backend contract: three primitives, their result types, and what a backend declares it supports.

Every loss in tilecl is written once over two primitives of ``S = scale · a bᵀ``
(``a``: ``N x D``, ``b``: ``M x D``; ``S`` is never stored), each taking the
operands of ``S`` as one :class:`Scores`: the statistics pass and one gradient
sweep, whose elementwise *form* is chosen by its terms' type.

Masked entries (the diagonal, or same-group false negatives: :class:`Scores`)
are ``-inf`` in ``S`` and so drop out of every sum and gradient.

* ``lse_stats`` — one streaming pass: the row log-sum-exp over all ``M``
  columns, the column log-sum-exp of the first ``col_count`` columns and the
  positive logits ``S_{i, y_i}`` (:class:`LseStats`);
* ``sweep(scores, terms, with_grads)`` — recomputes ``S`` tile by tile and
  applies the form of ``terms`` (:data:`FORMS`, one :class:`Form` each):

  - ``"softmax"`` (:class:`OffsetTerms` → :class:`Gradients`), every softmax
    loss's backward:
    ``G_ij = g_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j) − p_i·[j = t_i]``,
    returning ``s·G·b``, ``s·Gᵀ·a`` and ``Σ G_ij (a_i·b_j)``;
  - ``"sigmoid"`` (:class:`SigmoidTerms` → :class:`SigmoidSweep`), SigLIP:
    ``G_ij = w_i·(σ(S_ij + β) − [k_i = κ_j])``, which needs no statistics from
    other tiles: one pass yields the per-row losses
    ``Σ_j w_i·softplus(−z_ij(S_ij + β))`` and, ``with_grads``, the gradients.

  A backend runs every form through one tile loop, each form one epilogue;
  what else a form is (its outputs, what travels across ranks, its 16-bit
  rescaling) is its :class:`Form` entry (``docs/adding-a-form.md``).

A backend module implements :class:`Primitives` and ends with its
:class:`Backend` declaration (devices and probes, dtypes, forms, result dtype,
size limit, tiles, tolerances), registered in :mod:`tilecl.backends.registry`.
See ``docs/adding-a-backend.md``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, TypeVar

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FORMS",
    "Form",
    "KERNEL_DTYPES",
    "Backend",
    "Gradients",
    "LseStats",
    "OffsetTerms",
    "Primitives",
    "Scores",
    "SigmoidSweep",
    "SigmoidTerms",
    "TOLERANCES",
    "Tolerance",
    "Unsupported",
    "WholeTile",
    "accumulation_dtype",
    "anywhere",
    "cuda_visible",
    "form_of",
    "lse_parts",
    "merge_lse",
    "module_loader",
    "register_form",
    "softplus_threshold",
    "sweep_of",
    "two_sum",
]

_Result = TypeVar("_Result", bound=tuple)

#: every floating dtype a loss takes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the inputs of the GPU kernels (float32 accumulation, float32 results)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def anywhere() -> Optional[str]:
    """A device check that always passes."""
    return None


def cuda_visible() -> Optional[str]:
    """``None`` when a CUDA device is visible, else the reason a CUDA combination cannot run."""
    return None if torch.cuda.is_available() else "needs a CUDA device (torch.cuda.is_available() is False)"


class Scores(NamedTuple):
    """The score matrix ``S = scale · a bᵀ``, never stored: what both primitives work on.

    ``a``: ``(N, D)``; ``b``: ``(M, D)`` (same dtype and device; rows may be
    strided); ``scale``: a 0-d tensor; ``exclude_diagonal``: ``S_ii = -inf``
    (NT-Xent's and uniformity's self-pairs).

    False-negative masking (all three given, or none): ``row_groups`` (``(N,)``)
    and ``col_groups`` (``(M,)``) int64 group ids and ``kept_cols`` (``(N,)``
    int64, row ``i``'s positive column, or ``-1``). An entry is excluded,
    ``S_ij = -inf``, where ``row_groups[i] == col_groups[j]`` and
    ``j != kept_cols[i]``: a same-group entry is not a negative, the pair's own
    positive stays. Every backend applies it inside its tiles, so the forward
    and the recomputing backward see the same ``S``.

    ``shared_operands``: ``a`` and ``b`` are one tensor (NT-Xent, one-tower
    SupCon), so ``S`` is symmetric. A backend may then compute each pair of
    mirrored tiles once and return the whole gradient in ``grad_a`` with
    ``grad_b`` zero: only their sum is defined, which is what the shared
    tensor receives.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    exclude_diagonal: bool = False
    row_groups: Optional[torch.Tensor] = None
    col_groups: Optional[torch.Tensor] = None
    kept_cols: Optional[torch.Tensor] = None
    shared_operands: bool = False

    @property
    def masked(self) -> bool:
        """Whether group masking applies (``row_groups``, ``col_groups`` and ``kept_cols`` given)."""
        return self.row_groups is not None

    def group_mask(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(row_groups, col_groups, kept_cols)`` of a :attr:`masked` call."""
        if self.row_groups is None or self.col_groups is None or self.kept_cols is None:
            raise ValueError("group masking needs row_groups, col_groups and kept_cols together")
        return self.row_groups, self.col_groups, self.kept_cols


class LseStats(NamedTuple):
    """What the streaming forward yields, in the accumulation dtype.

    ``row_lse`` (``N``): ``LSE_j S_ij``; ``col_lse`` (``col_count``):
    ``LSE_i S_ij``; ``positive`` (``N``): ``S_{i, y_i}``, read from the same
    tiles as the LSEs so that ``LSE − S⁺`` cancels exactly for a saturated row.
    A row or column with every entry excluded gets ``-inf``, never NaN.

    ``row_lse_low`` (``N``) and ``col_lse_low`` (``col_count``): what rounding
    ``max + log Σ exp(S − max)`` to the accumulation dtype left out
    (:func:`two_sum`), so that ``row_lse + row_lse_low`` is that sum exactly.
    At ``|S| ≈ 100`` one ulp of ``row_lse`` is 7.6e-6 in float32, all of a
    nearly saturated row's loss ``LSE − S⁺``: the losses take
    ``(row_lse − positive) + row_lse_low``, and the backward's
    ``exp(S − LSE)`` the residual as a factor ``exp(−low)`` of its
    multiplier. 0 where the LSE is not finite.
    """

    row_lse: torch.Tensor
    col_lse: torch.Tensor
    positive: torch.Tensor
    row_lse_low: torch.Tensor
    col_lse_low: torch.Tensor


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth's TwoSum, any order of
    magnitudes); ``e = 0`` where ``s`` is not finite."""
    total = a + b
    b_part = total - a
    error = (a - (total - b_part)) + (b - b_part)
    return total, torch.where(torch.isfinite(total), error, torch.zeros_like(error))


def lse_parts(peak: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``peak + log(total)`` (a streaming LSE's maximum and shifted sum) as :func:`two_sum`'s pair."""
    return two_sum(peak, torch.log(total))


def merge_lse(
    lse: torch.Tensor, low: torch.Tensor, other: torch.Tensor, other_low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logaddexp`` of two LSEs given as :func:`two_sum` pairs, as such a pair."""
    peak = torch.maximum(lse, other)
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp((lse - shift) + low) + torch.exp((other - shift) + other_low)
    return lse_parts(shift, total)


class OffsetTerms(NamedTuple):
    """The terms of ``G_ij = g_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j) − p_i·[j = t_i]``.

    ``row_offset`` ``c`` and ``row_mult`` ``g``: ``(N,)``; ``col_offset`` ``r``
    and ``col_mult`` ``h``: ``(K,)`` with ``K ≤ M`` (columns ``j ≥ K`` carry
    no column term). A zero multiplier means no term, whatever its offset;
    an offset of ``-inf`` (a row or column whose every logit is excluded)
    means no term too — exactly 0, never ``0·inf`` or ``inf − inf``. Any other
    offset is used as it is: ``+inf`` gives ``exp(S − inf) = 0`` (the gamma
    loss's ``u_i = 0``) and NaN stays NaN, so NaN or inf inputs make the
    gradients non-finite exactly where the full-matrix loss's are.

    ``positive_cols`` ``t`` (``(N,)`` int64, ``-1``: none) and ``positive_mult``
    ``p`` (``(N,)``): each row's positive column and its weight in the loss, the
    one-hot part of ``softmax − onehot``. It is subtracted inside the float32
    (or float64) tile, before ``G`` is rounded for the products: for a
    saturated row ``g·exp(S − c) + h·exp(S − r)`` is ``p`` exactly and the
    gradient comes out exactly 0, as the full-matrix cross entropy's does,
    where subtracting ``p·b_t`` after a 16-bit product would leave its
    rounding. ``None`` (both): no positive term.
    """

    row_offset: torch.Tensor
    row_mult: torch.Tensor
    col_offset: torch.Tensor
    col_mult: torch.Tensor
    positive_cols: Optional[torch.Tensor] = None
    positive_mult: Optional[torch.Tensor] = None


class Gradients(NamedTuple):
    """The exponential part of the backward, in the accumulation dtype.

    ``grad_a = s·G·b`` (``N x D``), ``grad_b = s·Gᵀ·a`` (``M x D``),
    ``grad_scale = Σ_ij G_ij a_i·b_j`` (0-d).
    """

    grad_a: torch.Tensor
    grad_b: torch.Tensor
    grad_scale: torch.Tensor


class SigmoidTerms(NamedTuple):
    """The sigmoid (SigLIP) form of the gradient sweep: ``G_ij = w_i·(σ(S_ij + β) − [k_i = κ_j])``.

    ``bias`` ``β``: a 0-d tensor; ``row_keys`` ``k`` (``(N,)``) and
    ``col_keys`` ``κ`` (``(M,)``): int64, a pair is positive (``z_ij = +1``)
    where they are equal — the diagonal (``k = κ =`` global indices), labels
    (``k_i = y_i``) or group ids alike; ``row_weights`` ``w``: ``(N,)`` in the
    accumulation dtype (0 means the row adds nothing).
    """

    bias: torch.Tensor
    row_keys: torch.Tensor
    col_keys: torch.Tensor
    row_weights: torch.Tensor


class SigmoidSweep(NamedTuple):
    """What one sigmoid sweep yields, in the accumulation dtype.

    ``row_loss`` (``N``): ``Σ_j w_i·softplus(−z_ij ℓ_ij)`` with ``ℓ = S + β``;
    with gradients, ``grad_a = s·G·b`` (``N x D``), ``grad_b = s·Gᵀ·a``
    (``M x D``), ``grad_scale = Σ G_ij a_i·b_j`` and ``grad_bias = Σ G_ij``
    (0-d); without, those four are empty (``numel() == 0``).
    """

    row_loss: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    grad_scale: torch.Tensor
    grad_bias: torch.Tensor


class Primitives(Protocol):
    """The functions a backend implements (a module of functions or an object of methods)."""

    def lse_stats(self, scores: Scores, targets: torch.Tensor, col_count: int) -> LseStats:
        """:class:`LseStats` of ``scores``; ``targets``: ``(N,)`` int64 positive columns in ``[0, M)``;
        column statistics for the first ``col_count`` columns."""
        ...

    def sweep(self, scores: Scores, terms: Any, with_grads: bool = True) -> Any:
        """One gradient sweep in the form of ``terms`` (:func:`form_of`): its :attr:`Form.result`.

        Without ``with_grads`` only the form's :attr:`Form.values` are computed, the other fields
        are empty; a form without values (``"softmax"``) takes ``with_grads=True`` only."""
        ...


#: an output's shape by its code in :attr:`Form.outputs`: ``(N, D, M) -> shape``
_OUTPUT_SHAPES: Mapping[str, Callable[[int, int, int], tuple[int, ...]]] = {
    "N": lambda n, d, m: (n,),
    "ND": lambda n, d, m: (n, d),
    "MD": lambda n, d, m: (m, d),
    "": lambda n, d, m: (),
}


@dataclasses.dataclass(frozen=True)
class Form:
    """One elementwise form of the gradient sweep: everything above the kernels' epilogues.

    Attributes:
        name: the form's name (``Backend.forms``, ``explain_backend(form=...)``).
        terms: its terms type (a NamedTuple of tensors): :func:`form_of` finds the form by it.
        result: its result type (a NamedTuple of tensors).
        outputs: each result field's shape, ``"N"`` (per row of ``a``), ``"ND"``, ``"MD"`` (per
            row of ``b``) or ``""`` (0-d). Across ranks this says how a block's part merges:
            ``N``/``ND``/0-d parts are summed over the column blocks, the ``MD`` one (the
            gradient of ``b``) goes back to the columns' owner.
        values: the outputs a sweep without gradients computes (the others are then empty).
        column_terms: the terms indexed by ``b``'s rows, which travel with the columns across
            ranks: field → ``"cols"`` (one per column) or ``"stats"`` (one per column with
            statistics, a prefix of the columns).
        home_terms: the terms that refer to this rank's own columns: ``None`` against another
            rank's block.
        column_pointers: the int64 row terms holding a column of ``b`` (``-1``: none).
        scaled_terms, measured_terms: the 16-bit rescaling of :meth:`rescaled`: the terms it
            multiplies, and those whose largest magnitude sets the power of two.
    """

    name: str
    terms: type
    result: type
    outputs: Mapping[str, str]
    values: tuple[str, ...] = ()
    column_terms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    home_terms: tuple[str, ...] = ()
    column_pointers: tuple[str, ...] = ()
    scaled_terms: tuple[str, ...] = ()
    measured_terms: tuple[str, ...] = ()

    def check(self, with_grads: bool) -> None:
        if not with_grads and not self.values:
            raise ValueError(f"the {self.name} form computes gradients only: with_grads must be True")

    def column_count(self, terms: Any) -> int:
        """How many columns have statistics: the length of a ``"stats"`` column term (0: none)."""
        stats = [f for f, per in self.column_terms.items() if per == "stats"]
        return int(getattr(terms, stats[0]).shape[0]) if stats else 0

    def shapes(self, scores: Scores, with_grads: bool) -> list[tuple[int, ...]]:
        """Each output's shape (``(0,)``: not computed)."""
        (n, d), m = scores.a.shape, scores.b.shape[0]
        return [
            _OUTPUT_SHAPES[code](n, d, m) if with_grads or field in self.values else (0,)
            for field, code in self.outputs.items()
        ]

    def fake(self, scores: Scores, acc: torch.dtype, with_grads: bool) -> tuple:
        """The outputs without data (the registered op's fake)."""
        return self.result(
            *(scores.a.new_empty(shape, dtype=acc) for shape in self.shapes(scores, with_grads))
        )

    def zeros(self, scores: Scores, acc: torch.dtype, with_grads: bool) -> tuple:
        """The result of a block with no rows or no columns: every sum over nothing is 0."""
        return self.result(
            *(scores.a.new_zeros(shape, dtype=acc) for shape in self.shapes(scores, with_grads))
        )

    def merged(self, total: tuple, part: tuple) -> tuple:
        """``total`` plus another column block's ``part``, except the ``MD`` output (the block's own)."""
        return type(total)(*(
            x if code == "MD" else (x.add_(y) if x.dim() else x + y)
            for (x, y, code) in zip(total, part, self.outputs.values())
        ))  # fmt: skip

    def rescaled(self, sweep: Callable[..., _Result]) -> Callable[..., _Result]:
        """``sweep`` with float16 multipliers rescaled by a power of two (exact) around 1.

        The kernels round the gradient tile ``G`` (``g·exp(S − c) + …``, or
        ``w·(σ − [z = +1])``) to the input type for the second tensor-core
        product. The multipliers are ~1/N, so for float16 (smallest normal 6e-5)
        ``G`` falls into the subnormals and loses its digits at realistic N;
        scaled so the largest of the :attr:`measured_terms` is in [1, 2),
        ``G ≤ 2`` keeps full precision, and every output is scaled back.
        bfloat16 and float32 have float32's exponent range and pass through.
        """
        if not self.scaled_terms:
            return sweep

        def rescaled(scores: Scores, terms: Any, with_grads: bool = True) -> _Result:
            if scores.a.dtype != torch.float16:
                return sweep(scores, terms, with_grads)
            unit = _unit(*(getattr(terms, field) for field in self.measured_terms))
            present = {field: getattr(terms, field) for field in self.scaled_terms}
            scaled = {field: x * unit for field, x in present.items() if x is not None}
            result = sweep(scores, terms._replace(**scaled), with_grads)
            return type(result)(*(x / unit.to(x.dtype) for x in result))

        return rescaled


#: every form, by name (``register_form``)
FORMS: dict[str, Form] = {}
_FORMS_BY_TERMS: dict[type, Form] = {}


def register_form(form: Form) -> Form:
    """Adds ``form`` to :data:`FORMS`; its terms type then selects it."""
    FORMS[form.name] = _FORMS_BY_TERMS[form.terms] = form
    return form


def form_of(terms: Any) -> Form:
    """The form whose terms ``terms`` are."""
    form = _FORMS_BY_TERMS.get(type(terms))
    if form is None:
        raise TypeError(
            f"terms must be one of {[f.terms.__name__ for f in FORMS.values()]}, got {type(terms)}"
        )
    return form


register_form(
    Form(
        "softmax",
        OffsetTerms,
        Gradients,
        outputs={"grad_a": "ND", "grad_b": "MD", "grad_scale": ""},
        column_terms={"col_offset": "stats", "col_mult": "stats"},
        home_terms=("positive_cols", "positive_mult"),
        column_pointers=("positive_cols",),
        scaled_terms=("row_mult", "col_mult", "positive_mult"),
        measured_terms=("row_mult", "col_mult"),
    )
)
register_form(
    Form(
        "sigmoid",
        SigmoidTerms,
        SigmoidSweep,
        outputs={"row_loss": "N", "grad_a": "ND", "grad_b": "MD", "grad_scale": "", "grad_bias": ""},
        values=("row_loss",),
        column_terms={"col_keys": "cols"},
        scaled_terms=("row_weights",),
        measured_terms=("row_weights",),
    )
)


def sweep_of(
    epilogues: Mapping[str, Callable[..., Any]], rescale_16bit: bool = False
) -> Callable[[Scores, Any, bool], Any]:
    """A backend's :meth:`Primitives.sweep` from its implementation of each form, by form name
    (``(scores, terms, with_grads) -> result``); ``rescale_16bit``: through :meth:`Form.rescaled`
    (kernels that round ``G`` to the input type)."""
    by_terms = {
        FORMS[name].terms: (FORMS[name], FORMS[name].rescaled(impl) if rescale_16bit else impl)
        for name, impl in epilogues.items()
    }

    def sweep(scores: Scores, terms: Any, with_grads: bool = True) -> Any:
        found = by_terms.get(type(terms))
        if found is None:
            raise TypeError(f"this backend has no sweep for {type(terms).__name__}")
        form, epilogue = found
        form.check(with_grads)
        return epilogue(scores, terms, with_grads)

    return sweep


class WholeTile(Protocol):
    """What a backend that can hold all of a small ``S`` as one tile offers the one-tile Functions
    (:class:`tilecl.function.OneTileFunction`): a small batch's cost is per op, so its loss forms
    ``S`` once, keeps it between the passes and uses fused dense kernels."""

    def one_tile(self, n: int, m: int, dtype: torch.dtype) -> bool:
        """Whether an ``N x M`` score matrix of ``dtype`` inputs fits one tile of the backend's budget."""
        ...

    def one_tile_scores(self, scores: Scores, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All of ``S`` in ``acc`` (excluded entries ``-inf``), and ``s·a`` in ``acc``."""
        ...

    def one_tile_exclude_(self, tile: torch.Tensor, scores: Scores, value: float) -> torch.Tensor:
        """``value`` written into the excluded entries of a whole-``S`` tile."""
        ...

    def one_tile_products(
        self,
        grad: torch.Tensor,
        scores: Scores,
        acc: torch.dtype,
        row_scale: Optional[torch.Tensor] = None,
        with_grad_b: bool = True,
    ) -> Gradients:
        """The gradients from a whole-``S`` tile ``G`` (``W = diag(row_scale)``, identity for ``None``):
        ``s·W·G·b``, ``s·(W·G)ᵀ·a`` (empty without ``with_grad_b``) and ``Σ (W·G)_ij a_i·b_j``."""
        ...


class Unsupported(NamedTuple):
    """One reason a backend cannot take a call, and the exception kind it maps to."""

    error: type[Exception]
    reason: str


class Tolerance(NamedTuple):
    """How close a backend's results must be to the float64 oracle, for one input dtype.

    The error rule of the test matrix (flash-attention's): ``|ours − oracle| ≤
    factor · |naive − oracle| + slack · max|oracle|``, with ``naive`` the
    full-matrix PyTorch loss computed in the same dtype on the same device.
    """

    factor: float
    slack: float


#: the error rule every backend here meets, per input dtype
TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(2.0, 1e-12),
    torch.float32: Tolerance(2.0, 1e-6),
    torch.bfloat16: Tolerance(2.0, 1e-3),
    torch.float16: Tolerance(2.0, 1e-4),
}


def module_loader(name: str) -> Callable[[], Primitives]:
    """A :attr:`Backend.load` for a backend module of functions: returns the module ``name`` itself."""

    def load() -> Primitives:
        module: Primitives = sys.modules[name]
        return module

    return load


def softplus_threshold(acc: torch.dtype) -> float:
    """Above it ``softplus(u)`` is taken as ``u``: ``log1p(e^-u)`` is below ``u``'s last digit there."""
    return 40.0 if acc == torch.float64 else 20.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck works); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend's declaration: what it takes, where it runs, what it returns, how it is loaded.

    Written next to the backend's code and registered there
    (:func:`tilecl.backends.registry.register_backend`); dispatch, error
    messages, :func:`tilecl.explain_backend` and the test matrix read only this.

    Attributes:
        name: the ``backend=`` string.
        dtypes: the input dtypes it takes.
        devices: device type → a probe: ``None`` when this machine can run it
            there, else why not.
        missing: why it cannot run on this machine at all (a package or a
            build is missing), else ``None``.
        load: returns the :class:`Primitives` (called on first use; may import
            heavy packages).
        forms: the elementwise forms its kernels have: ``"softmax"`` (the
            offset form, every softmax loss) and ``"sigmoid"`` (SigLIP).
        result_dtype: the dtype of its statistics and gradients for an input
            dtype.
        max_extent: the largest ``N``, ``M`` or ``D`` it takes (``None``: no
            limit of its own).
        auto_devices: the device types on which ``backend="auto"`` may pick it.
        preference: ``auto`` tries the backends in ascending preference (the
            first that supports a call wins); listings follow it too.
        tiles: device type → the tile of ``S`` one step covers, ``(rows,
            columns, features)``: the test matrix sizes its shapes from it.
        emulated_on: device types where it runs through an interpreter or an
            emulator (correct but slow: the test matrix gives those cells the
            smallest shapes that still cross several tiles and a remainder).
        tolerances: the error rule it meets against the oracle, per dtype.
        whole_tile: returns its :class:`WholeTile` (``None``: it has none):
            a local call whose ``S`` fits one tile then takes the one-tile
            Function (eager only).
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    devices: Mapping[str, Callable[[], Optional[str]]]
    missing: Callable[[], Optional[str]]
    load: Callable[[], Primitives]
    forms: tuple[str, ...] = dataclasses.field(default_factory=lambda: tuple(FORMS))
    result_dtype: Callable[[torch.dtype], torch.dtype] = accumulation_dtype
    max_extent: Optional[int] = None
    auto_devices: tuple[str, ...] = ()
    preference: int = 100
    tiles: Mapping[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    emulated_on: tuple[str, ...] = ()
    tolerances: Mapping[torch.dtype, Tolerance] = dataclasses.field(default_factory=lambda: TOLERANCES)
    whole_tile: Optional[Callable[[], WholeTile]] = None

    def unsupported(
        self, device: torch.device, dtype: torch.dtype, form: str = "softmax", extent: Optional[int] = None
    ) -> list[Unsupported]:
        """Every reason this backend cannot run the ``form`` on ``device`` tensors of ``dtype`` here
        (and, given ``extent``, the largest of ``N``, ``M`` and ``D``, at that size)."""
        found = []
        if form not in self.forms:
            found.append(Unsupported(RuntimeError, f"its kernels have no {form} form yet"))
        missing = self.missing()
        if missing is not None:
            found.append(Unsupported(RuntimeError, missing))
        if device.type not in self.devices:
            kinds = " or ".join(kind.upper() for kind in self.devices)
            found.append(Unsupported(RuntimeError, f"needs {kinds} tensors, got tensors on {device}"))
        else:
            why = self.devices[device.type]()
            if why is not None:
                found.append(Unsupported(RuntimeError, why))
        if dtype not in self.dtypes:
            names = ", ".join(str(t).removeprefix("torch.") for t in self.dtypes)
            found.append(Unsupported(TypeError, f"takes {names} inputs, got {dtype}"))
        if extent is not None and self.max_extent is not None and extent > self.max_extent:
            found.append(Unsupported(ValueError, f"takes N, M and D up to {self.max_extent}, got {extent}"))
        return found

    def not_supported_reasons(
        self, device: torch.device, dtype: torch.dtype, form: str = "softmax", extent: Optional[int] = None
    ) -> list[str]:
        """Why not, as sentences (empty: it can run); xformers' convention."""
        return [u.reason for u in self.unsupported(device, dtype, form, extent)]


def _unit(*mults: torch.Tensor) -> torch.Tensor:
    """A power of two (exact) that brings the largest ``|mult|`` into [1, 2); 1 if there is none."""
    peak = torch.zeros((), dtype=torch.float32, device=mults[0].device)
    for mult in mults:
        if mult.numel():
            peak = torch.maximum(peak, mult.detach().abs().max().to(peak))
    usable = torch.isfinite(peak) & (peak > 0)
    # a tensor, not a float: no device synchronization
    return torch.where(usable, torch.exp2(-torch.floor(torch.log2(peak))), torch.ones_like(peak))
