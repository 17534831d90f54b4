"""The elementwise forms of the gradient sweep: what turns a tile of ``S`` into the gradient tile ``G``.

The sweep kernels of :mod:`tilecl.kernels.sweep` run one tile loop for
every form; a form is the launcher's argument type (``tilecl.backends.triton``)
and its epilogue here, nothing else. The epilogue is the dict of constexprs
the launcher passes with the form's arguments (:data:`OFFSET`, :data:`SIGMOID`):

* ``EPILOGUE(s, included, rows, cols, n_rows, n_cols, form, totals) -> (G, G∘S, totals)``
  — one tile: ``s`` is the fp32 tile of ``S`` (``-inf`` outside the matrix and
  where excluded), ``included`` the entries that are in the loss (``G`` is 0
  elsewhere; an ``S`` of ``-inf`` by value, from an infinite feature, is
  included and gives what the full-matrix loss gives), ``form`` the tuple of
  the form's own kernel arguments. ``G∘S`` feeds ``Σ G_ij S_ij`` (the logit
  scale's gradient) from the fp32 ``G``; it must be 0 wherever ``G`` is, or
  ``0·(-inf)`` poisons the sum.
* ``TOTALS`` — how many ``(BLOCK_M,)`` fp32 vectors the form carries across
  the tiles of a row block (its per-row reductions; zeros before the first tile);
* ``REPORT(totals, rows, n_rows, form)`` — stores them, once per row block
  (every feature chunk of the row kernel recomputes the same tiles, so the
  first one reports). The column kernel discards the totals, and the compiler
  drops what computed them.

The functions travel as constexprs, not as a form index chosen by ``if``: a
new form then adds no branch to the tile loop, and Triton keys a compiled
kernel by the source hash of each jit function passed this way, so editing an
epilogue recompiles every kernel that uses it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def offset_epilogue(s, included, rows, cols, n_rows, n_cols, form, totals):
    """``G = g_i·exp(S − c_i) + h_j·exp(S − r_j) − p_i·[j = t_i]``; ``form = (c, g, r, h, col_count, t, p)``
    (``t``, ``p``: ``None`` without positives).

    Columns ``j ≥ col_count`` carry no column term. The positive's one-hot is
    subtracted here, in fp32, before ``G`` is rounded for the products: a
    saturated row's gradient is then exactly 0.
    """
    c_ptr, g_ptr, r_ptr, h_ptr, col_count, t_ptr, p_ptr = form
    row_ok = rows < n_rows
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    col_ok = cols < col_count
    r = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    h = tl.load(h_ptr + cols, mask=col_ok, other=0.0)
    # a zero multiplier stands for "no term" and its offset is a placeholder: select, don't multiply,
    # or exp(S − 0) overflows to inf and 0·inf poisons the tile
    grad = tl.where(g[:, None] != 0, g[:, None] * tl.exp(s - c[:, None]), 0.0)
    grad += tl.where(h[None, :] != 0, h[None, :] * tl.exp(s - r[None, :]), 0.0)
    if t_ptr is not None:
        t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        p = tl.load(p_ptr + rows, mask=row_ok, other=0.0)
        grad -= tl.where(cols[None, :] == t[:, None], p[:, None], 0.0)
    # an excluded entry has no gradient even where an offset is NaN (a row or column of -inf logits)
    grad = tl.where(included, grad, 0.0)
    # the 16-bit G that feeds the products keeps 3 digits: Σ G_ij S_ij comes from this fp32 G
    # (an excluded entry adds 0, not 0·(-inf); an included -inf adds what IEEE says, as in full)
    return grad, grad * tl.where(included, s, 0.0), totals


@triton.jit
def offset_report(totals, rows, n_rows, form):
    """The offset form has no results of its own: its gradients are the sweep's."""
    pass


#: the softmax losses' offset form
OFFSET = dict(EPILOGUE=offset_epilogue, REPORT=offset_report, TOTALS=0)


@triton.jit
def sigmoid_epilogue(s, included, rows, cols, n_rows, n_cols, form, totals):
    """``G = w_i·(σ(ℓ) − [k_i = κ_j])`` and the losses ``w_i·softplus(−z·ℓ)``, ``ℓ = S + β``.

    ``form = (w, k, κ, β, row_loss, bias_partial)``; ``totals``: each row's
    running loss and ``Σ_j G_ij`` (the bias's gradient).
    """
    g_ptr, row_key_ptr, col_key_ptr, bias, row_loss_ptr, bias_partial_ptr = form
    loss_rows, grad_rows = totals
    row_ok = rows < n_rows
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    # the keys are >= 0 (the launcher shifts them): padding rows and columns never pair
    row_key = tl.load(row_key_ptr + rows, mask=row_ok, other=-1)
    col_key = tl.load(col_key_ptr + cols, mask=cols < n_cols, other=-2)
    # Nothing inside the matrix is excluded in this form (its group ids name positives, they mask
    # nothing): an S of -inf is padding or a value (an infinite feature). A negative's loss and G
    # at ℓ = -inf are 0 by the formulas below (e = 0, the pair leans its way), a positive's are
    # +inf and -w as in the full-matrix loss, and padding is never a positive: no mask is needed,
    # and none is held (holding `included` or the bounds spills on sm_80/sm_90).
    positive = row_key[:, None] == col_key[None, :]
    logit = s + bias
    small = tl.exp(-tl.abs(logit))  # e^-|ℓ| ≤ 1: both σ and softplus from one exp, never overflowing
    # |G| is σ(−|ℓ|) = e/(1+e) when the pair leans its own way (z·ℓ ≥ 0), else σ(|ℓ|) = 1/(1+e):
    # the positive's σ(ℓ) − 1 = −σ(−ℓ) is taken directly, not by cancelling against 1
    leans = positive == (logit >= 0)
    size = tl.where(leans, small, 1.0) / (1.0 + small)
    grad = g[:, None] * tl.where(positive, -size, size)
    # softplus(−z·ℓ) = max(−z·ℓ, 0) + log(1 + e); log(1 + e) loses e below fp32's epsilon, and a
    # confident pair's whole loss is e: the series there
    log_one_plus = tl.where(small < 1e-4, small * (1.0 - 0.5 * small), tl.log(1.0 + small))
    loss = g[:, None] * (tl.where(leans, 0.0, tl.abs(logit)) + log_one_plus)
    totals = (loss_rows + tl.sum(loss, axis=1), grad_rows + tl.sum(grad, axis=1))
    # G∘S: padding adds 0, not 0·(-inf); a positive at -inf adds +inf, as in the full-matrix loss
    return grad, grad * tl.where((s != float("-inf")) | positive, s, 0.0), totals


@triton.jit
def sigmoid_report(totals, rows, n_rows, form):
    """Each row's loss and this program's ``Σ G`` (0 from the feature chunks that do not report)."""
    g_ptr, row_key_ptr, col_key_ptr, bias, row_loss_ptr, bias_partial_ptr = form
    loss_rows, grad_rows = totals
    first = tl.program_id(1) == 0
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(row_loss_ptr + rows, loss_rows, mask=rows < tl.where(first, n_rows, 0))
    tl.store(bias_partial_ptr + program, tl.where(first, tl.sum(grad_rows, axis=0), 0.0))


#: SigLIP's sigmoid form
SIGMOID = dict(EPILOGUE=sigmoid_epilogue, REPORT=sigmoid_report, TOTALS=2)
