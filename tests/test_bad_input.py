"""Every bad input raises a clear error naming the argument, before any compute.

One exception type per kind of mistake (``tilecl.validation``): TypeError for a
wrong type or dtype, ValueError for a wrong value or shape, RuntimeError for a
backend that cannot run here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import tilecl
from tilecl.backends import BACKENDS


class NoCompute:
    """Primitives that fail loudly: a kernel started before the error was raised."""

    def lse_stats(self, *args, **kwargs):
        raise AssertionError("a kernel ran before the bad input was rejected")

    sweep = lse_stats


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    for name in ("torch", "reference"):
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], load=NoCompute))


def feats(n=4, d=3, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, dtype=dtype, device=device)


CASES = [
    (
        "mismatched D",
        lambda: tilecl.contrastive_loss(feats(4, 3), feats(4, 5)),
        ValueError,
        "feature dimension",
    ),
    (
        "mismatched dtype",
        lambda: tilecl.contrastive_loss(feats(), feats(dtype=torch.float64)),
        TypeError,
        "same dtype",
    ),
    (
        "a is 1-D",
        lambda: tilecl.contrastive_loss(torch.randn(4), feats()),
        ValueError,
        "a must be 2-D",
    ),
    (
        "b is 3-D",
        lambda: tilecl.contrastive_loss(feats(), torch.randn(2, 4, 3)),
        ValueError,
        "b must be 2-D",
    ),
    (
        "empty a",
        lambda: tilecl.contrastive_loss(feats(0), feats()),
        ValueError,
        "a is an empty batch",
    ),
    (
        "empty b",
        lambda: tilecl.contrastive_loss(feats(), feats(0), symmetric=False),
        ValueError,
        "b is an empty batch",
    ),
    (
        "D = 0",
        lambda: tilecl.contrastive_loss(feats(4, 0), feats(4, 0)),
        ValueError,
        "feature dimension 0",
    ),
    (
        "integer features",
        lambda: tilecl.contrastive_loss(torch.ones(4, 3, dtype=torch.long), feats()),
        TypeError,
        "a must be float",
    ),
    (
        "not a tensor",
        lambda: tilecl.contrastive_loss([[1.0]], feats()),
        TypeError,
        "a must be a torch.Tensor",
    ),
    (
        "label too large",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.tensor([0, 1, 2, 4])),
        ValueError,
        "labels must lie in",
    ),
    (
        "negative label",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.tensor([0, -1, 2, 3])),
        ValueError,
        "labels must lie in",
    ),
    (
        "labels wrong shape",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.tensor([0, 1])),
        ValueError,
        "labels must have shape",
    ),
    (
        "float labels",
        lambda: tilecl.contrastive_loss(feats(), feats(), labels=torch.zeros(4)),
        TypeError,
        "labels must be an integer",
    ),
    (
        "symmetric with M < N",
        lambda: tilecl.contrastive_loss(feats(5), feats(3)),
        ValueError,
        "symmetric=True needs",
    ),
    (
        "inf logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), float("inf")),
        ValueError,
        "logit_scale must be finite",
    ),
    (
        "nan logit_scale tensor",
        lambda: tilecl.contrastive_loss(feats(), feats(), torch.tensor(float("nan"))),
        ValueError,
        "logit_scale must be finite",
    ),
    (
        "vector logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), torch.ones(2)),
        ValueError,
        "logit_scale must be a scalar",
    ),
    (
        "string logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), "1"),
        TypeError,
        "logit_scale must be a number or a 0-d tensor",
    ),
    (
        "zero logit_scale",
        lambda: tilecl.contrastive_loss(feats(), feats(), 0.0),
        ValueError,
        "logit_scale must be > 0.*log-scale",
    ),
    (
        "negative logit_scale tensor",
        lambda: tilecl.ClipLoss()(feats(), feats(), torch.tensor(-2.0)),
        ValueError,
        "logit_scale must be > 0",
    ),
    (
        "bad reduction",
        lambda: tilecl.contrastive_loss(feats(), feats(), reduction="avg"),
        ValueError,
        "reduction must be one of",
    ),
    (
        "unknown backend",
        lambda: tilecl.contrastive_loss(feats(), feats(), backend="magic"),
        ValueError,
        "backend must be",
    ),
    (
        # CPU tensors here: "cuda" is either not built or refuses them, before any launch
        "unavailable backend",
        lambda: tilecl.contrastive_loss(feats(), feats(), backend="cuda"),
        RuntimeError,
        "backend='cuda' cannot run",
    ),
    (
        "nt_xent unequal views",
        lambda: tilecl.nt_xent_loss(feats(4), feats(5)),
        ValueError,
        "same number of samples",
    ),
    (
        "nt_xent temperature 0",
        lambda: tilecl.nt_xent_loss(feats(), feats(), 0.0),
        ValueError,
        "temperature must be",
    ),
    (
        "nt_xent mismatched D",
        lambda: tilecl.nt_xent_loss(feats(4, 3), feats(4, 2)),
        ValueError,
        "z1 and z2",
    ),
    (
        "ClipLoss names its arguments",
        lambda: tilecl.ClipLoss()(feats(4, 3), feats(4, 2), 1.0),
        ValueError,
        "image_features and text_features",
    ),
    ("ClipLoss dist_impl", lambda: tilecl.ClipLoss(world_size=2, dist_impl="tree"), ValueError, "dist_impl"),
    ("NTXentLoss world_size", lambda: tilecl.NTXentLoss(world_size=0), ValueError, "world_size"),
    (
        "ClipLoss world_size > 1 without a process group",
        lambda: tilecl.ClipLoss(world_size=2)(feats(), feats(), 1.0),
        RuntimeError,
        "initialized default process group",
    ),
    (
        "InfoNCELoss temperature",
        lambda: tilecl.InfoNCELoss(temperature=-1.0),
        ValueError,
        "temperature must be",
    ),
    (
        "InfoNCELoss negatives D",
        lambda: tilecl.InfoNCELoss()(feats(), feats(), negatives=feats(3, 7)),
        ValueError,
        "b and negatives",
    ),
    (
        "NTXentLoss reduction",
        lambda: tilecl.NTXentLoss(reduction="mean "),
        ValueError,
        "reduction must be one of",
    ),
]


# the same kind of mistake raises the same exception type in every entry point
CASES += [
    (
        "uniformity integer features",
        lambda: tilecl.uniformity_loss(torch.ones(4, 3, dtype=torch.long)),
        TypeError,
        "z must be float",
    ),
    (
        "uniformity not a tensor",
        lambda: tilecl.uniformity_loss([[1.0, 2.0]]),
        TypeError,
        "z must be a torch.Tensor",
    ),
    ("uniformity 1-D", lambda: tilecl.uniformity_loss(torch.randn(4)), ValueError, "z must be 2-D"),
    ("uniformity string t", lambda: tilecl.uniformity_loss(feats(), t="2"), TypeError, "t must be a number"),
    (
        "geometric dtype",
        lambda: tilecl.geometric_consistency_loss(feats(), feats(dtype=torch.float64)),
        TypeError,
        "z_t and z_v must have the same dtype",
    ),
    (
        "geometric shape",
        lambda: tilecl.geometric_consistency_loss(feats(4), feats(5)),
        ValueError,
        "z_t must have the shape of z_v",
    ),
    (
        "bridge t out of range",
        lambda: tilecl.brownian_bridge_loss(feats(), feats(), feats(), 1.5),
        ValueError,
        "t must lie in",
    ),
    (
        "separation temperature",
        lambda: tilecl.feature_separation_loss(*[feats()] * 6, temperature=0.0),
        ValueError,
        "temperature must be",
    ),
    (
        "gamma integer log_u",
        lambda: tilecl.gamma_contrastive_loss(
            feats(), feats(), torch.zeros(4, dtype=torch.long), torch.zeros(4)
        ),
        TypeError,
        "log_u_rows must be",
    ),
    ("gamma module num_samples", lambda: tilecl.GammaContrastiveLoss(2.5), TypeError, "num_samples must be"),
    (
        "gamma module gamma",
        lambda: tilecl.GammaContrastiveLoss(4, gamma=0.0),
        ValueError,
        "gamma must lie in",
    ),
    (
        "gamma module estimator",
        lambda: tilecl.GammaContrastiveLoss(4, estimator="mode"),
        ValueError,
        "estimator",
    ),
    (
        "gamma module index dtype",
        lambda: tilecl.GammaContrastiveLoss(4)(feats(), feats(), torch.zeros(4)),
        TypeError,
        "index must be an int64",
    ),
    (
        "backend not a string",
        lambda: tilecl.contrastive_loss(feats(), feats(), backend=None),
        TypeError,
        "backend must be a string",
    ),
    (
        "reduction not a string",
        lambda: tilecl.contrastive_loss(feats(), feats(), reduction=1),
        TypeError,
        "reduction must be a string",
    ),
    (
        "undeclared dtype",
        lambda: tilecl.contrastive_loss(
            feats(dtype=torch.float64), feats(dtype=torch.float64), backend="cuda-emu"
        ),
        TypeError,
        "cannot run torch.float64",
    ),
    (
        "ModalityStructureLoss lambda",
        lambda: tilecl.ModalityStructureLoss(lambda_sep=-1.0),
        ValueError,
        "lambda_sep",
    ),
]


def siglip(**kw):
    kw = {"logit_scale": 10.0, "logit_bias": -5.0, **kw}
    return lambda: tilecl.sigmoid_loss(kw.pop("a", feats()), kw.pop("b", feats()), **kw)


CASES += [
    ("sigmoid bias NaN", siglip(logit_bias=float("nan")), ValueError, "logit_bias must be finite"),
    (
        "sigmoid bias inf tensor",
        siglip(logit_bias=torch.tensor(float("inf"))),
        ValueError,
        "logit_bias must be",
    ),
    ("sigmoid bias shape", siglip(logit_bias=torch.zeros(3)), ValueError, "logit_bias must be a scalar"),
    ("sigmoid bias type", siglip(logit_bias="1"), TypeError, "logit_bias must be a number"),
    (
        "sigmoid bias integer tensor",
        siglip(logit_bias=torch.tensor(1)),
        TypeError,
        "logit_bias must be a floating",
    ),
    ("sigmoid scale 0", siglip(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    ("sigmoid mismatched D", siglip(b=feats(4, 2)), ValueError, "feature dimension"),
    ("sigmoid M < N", siglip(b=feats(3)), ValueError, "M >= N"),
    ("sigmoid labels range", siglip(labels=torch.tensor([0, 1, 2, 4])), ValueError, "labels must lie in"),
    (
        "sigmoid groups one side",
        siglip(row_groups=torch.zeros(4, dtype=torch.long)),
        ValueError,
        "both row_groups",
    ),
    (
        "sigmoid groups dtype",
        siglip(row_groups=torch.zeros(4), col_groups=torch.zeros(4)),
        TypeError,
        "row_groups must be an integer",
    ),
    (
        "sigmoid groups shape",
        siglip(row_groups=torch.zeros(4, dtype=torch.long), col_groups=torch.zeros(3, dtype=torch.long)),
        ValueError,
        r"col_groups must have shape \(4,\)",
    ),
    (
        "sigmoid labels and groups",
        siglip(labels=torch.arange(4), row_groups=torch.arange(4), col_groups=torch.arange(4)),
        ValueError,
        "exclusive",
    ),
    ("sigmoid reduction", siglip(reduction="avg"), ValueError, "reduction"),
    ("SigLipLoss dist_impl", lambda: tilecl.SigLipLoss(dist_impl="tree"), ValueError, "dist_impl"),
    (
        "SigLipLoss names its arguments",
        lambda: tilecl.SigLipLoss()(feats(4, 3), feats(4, 2), 10.0, -10.0),
        ValueError,
        "image_features and text_features",
    ),
]


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


def masked(**kw):
    return lambda: tilecl.contrastive_loss(kw.pop("a", feats()), kw.pop("b", feats()), **kw)


def supcon(**kw):
    return lambda: tilecl.supcon_loss(kw.pop("features", feats()), kw.pop("labels", ids(0, 0, 1, 1)), **kw)


CASES += [
    ("groups one side", masked(row_groups=ids(0, 1, 2, 3)), ValueError, "both row_groups and col_groups"),
    ("groups float", masked(row_groups=torch.zeros(4), col_groups=ids(0, 1, 2, 3)), TypeError, "integer"),
    ("col_groups length", masked(row_groups=ids(0, 1, 2, 3), col_groups=ids(0, 1)), ValueError, r"\(4,\)"),
    (
        "groups with decoupled positives",
        masked(row_groups=ids(0, 1, 2, 3), col_groups=ids(0, 1, 2, 3), positives=feats(), symmetric=False),
        ValueError,
        "positives",
    ),
    ("negative weight", masked(weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "non-negative"),
    ("NaN weight", masked(weights=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "finite"),
    ("weights length", masked(weights=torch.ones(3)), ValueError, r"weights must have shape \(4,\)"),
    ("integer weights", masked(weights=torch.ones(4, dtype=torch.long)), TypeError, "floating"),
    (
        "NT-Xent groups length",
        lambda: tilecl.nt_xent_loss(feats(), feats(), groups=ids(0, 1)),
        ValueError,
        "row_groups must have shape",
    ),
    (
        "NT-Xent negative weight",
        lambda: tilecl.nt_xent_loss(feats(), feats(), weights=-torch.ones(4)),
        ValueError,
        "non-negative",
    ),
    (
        "gamma groups one side",
        lambda: tilecl.gamma_contrastive_loss(
            feats(), feats(), torch.zeros(4), torch.zeros(4), col_groups=ids(0, 1, 2, 3)
        ),
        ValueError,
        "both row_groups",
    ),
    ("SupCon labels length", supcon(labels=ids(0, 1, 2)), ValueError, r"labels must have shape \(4,\)"),
    ("SupCon labels float", supcon(labels=torch.zeros(4)), TypeError, "labels must be an integer"),
    ("SupCon labels not a tensor", supcon(labels=[0, 0, 1, 1]), TypeError, "labels must be a torch.Tensor"),
    ("SupCon temperature", supcon(temperature=0.0), ValueError, "temperature"),
    ("SupCon negative weight", supcon(weights=-torch.ones(4)), ValueError, "non-negative"),
    (
        "SupCon columns without labels",
        supcon(columns=feats(5)),
        TypeError,
        "column_labels must be a torch.Tensor",
    ),
    ("SupCon column_labels alone", supcon(column_labels=ids(0, 1, 2, 3)), ValueError, "need columns"),
    (
        "SupCon column_labels length",
        supcon(columns=feats(5), column_labels=ids(0, 1)),
        ValueError,
        r"column_labels must have shape \(5,\)",
    ),
    (
        "SupCon mismatched D",
        supcon(columns=feats(5, 2), column_labels=ids(0, 1, 2, 3, 4)),
        ValueError,
        "feature dimension",
    ),
    (
        "SupConLoss ref_emb alone",
        lambda: tilecl.SupConLoss()(feats(), ids(0, 0, 1, 1), feats()),
        ValueError,
        "ref_emb and ref_labels",
    ),
    (
        "ClipLoss image_groups alone",
        lambda: tilecl.ClipLoss()(feats(), feats(), 10.0, image_groups=ids(0, 1, 2, 3)),
        ValueError,
        "both row_groups",
    ),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_before_compute(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_mismatched_device():
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        tilecl.contrastive_loss(feats(), meta)


def _options() -> dict[tuple[str, str], list[str]]:
    """Every boolean option (a parameter whose default is True or False) and every option chosen from
    a fixed set of strings, of every public function and module: ``{(owner, method): [names]}``."""
    import inspect

    from tilecl.integrations import pytorch_metric_learning, sentence_transformers

    owners = {name: getattr(tilecl, name) for name in tilecl.__all__}
    for adapters in (sentence_transformers, pytorch_metric_learning):
        for name in dir(adapters):
            thing = getattr(adapters, name)
            if inspect.isclass(thing) and thing.__module__ == adapters.__name__ and name[0] != "_":
                owners[f"{adapters.__name__.rsplit('.', 1)[1]}.{name}"] = thing
    found: dict[tuple[str, str], list[str]] = {}
    for name, owner in owners.items():
        methods = [("__init__", owner.__init__), ("forward", getattr(owner, "forward", None))]
        for method, fn in methods if inspect.isclass(owner) else [("", owner)]:
            if not callable(fn) or fn in (object.__init__, torch.nn.Module.__init__):
                continue
            params = inspect.signature(fn).parameters.values()
            names = [p.name for p in params if isinstance(p.default, bool) or p.name in ENUM_OPTIONS]
            if names:
                found[(name, method)] = names
    return found


#: options chosen from a fixed set of strings
ENUM_OPTIONS = ("reduction", "backend", "dist_impl", "estimator", "partition_mode", "mask_false_negatives")


def _option_calls() -> dict[tuple[str, str], Callable[..., object]]:
    """A valid call of each owner of an option, taking the option as a keyword."""
    from tilecl.integrations import pytorch_metric_learning as pml
    from tilecl.integrations import sentence_transformers as st

    a, b = feats(), feats()
    log_u = torch.zeros(4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    model = torch.nn.Linear(3, 3)
    return {
        ("ClipLoss", "__init__"): lambda **kw: tilecl.ClipLoss(**kw),
        ("ClipLoss", "forward"): lambda **kw: tilecl.ClipLoss()(a, b, 1.0, **kw),
        ("DistillClipLoss", "__init__"): lambda **kw: tilecl.DistillClipLoss(**kw),
        ("DistillClipLoss", "forward"): lambda **kw: tilecl.DistillClipLoss()(a, b, 1.0, a, b, 1.0, **kw),
        ("distill_clip_loss", ""): lambda **kw: tilecl.distill_clip_loss(a, b, 1.0, a, b, 1.0, **kw),
        ("GammaContrastiveLoss", "__init__"): lambda **kw: tilecl.GammaContrastiveLoss(4, **kw),
        ("GradCache", "__init__"): lambda **kw: tilecl.GradCache(model, mini_batch_size=2, **kw),
        ("InfoNCELoss", "__init__"): lambda **kw: tilecl.InfoNCELoss(**kw),
        ("ModalityStructureLoss", "__init__"): lambda **kw: tilecl.ModalityStructureLoss(**kw),
        ("ModalityStructureLoss", "forward"): lambda **kw: tilecl.ModalityStructureLoss()(a, b, 1.0, **kw),
        ("NTXentLoss", "__init__"): lambda **kw: tilecl.NTXentLoss(**kw),
        ("SigLipLoss", "__init__"): lambda **kw: tilecl.SigLipLoss(**kw),
        ("SigLipLoss", "forward"): lambda **kw: tilecl.SigLipLoss()(a, b, 1.0, **kw),
        ("SupConLoss", "__init__"): lambda **kw: tilecl.SupConLoss(**kw),
        ("contrastive_loss", ""): lambda **kw: tilecl.contrastive_loss(a, b, **kw),
        ("explain_backend", ""): lambda **kw: tilecl.explain_backend(a, b, **kw),
        ("feature_separation_loss", ""): lambda **kw: tilecl.feature_separation_loss(
            a, b, a, b, a, b, 0.1, **kw
        ),
        ("gamma_contrastive_loss", ""): lambda **kw: tilecl.gamma_contrastive_loss(a, b, log_u, log_u, **kw),
        ("nt_xent_loss", ""): lambda **kw: tilecl.nt_xent_loss(a, b, **kw),
        ("sigmoid_loss", ""): lambda **kw: tilecl.sigmoid_loss(a, b, 1.0, **kw),
        ("supcon_loss", ""): lambda **kw: tilecl.supcon_loss(a, labels, **kw),
        ("uniformity_loss", ""): lambda **kw: tilecl.uniformity_loss(a, **kw),
        ("sentence_transformers.MultipleNegativesRankingLoss", "__init__"): lambda **kw: (
            st.MultipleNegativesRankingLoss(model, **kw)
        ),
        ("sentence_transformers.CachedMultipleNegativesRankingLoss", "__init__"): lambda **kw: (
            st.CachedMultipleNegativesRankingLoss(model, **kw)
        ),
        ("pytorch_metric_learning.NTXentLoss", "__init__"): lambda **kw: pml.NTXentLoss(**kw),
        ("pytorch_metric_learning.SupConLoss", "__init__"): lambda **kw: pml.SupConLoss(**kw),
    }


def test_every_option_of_the_public_api_is_checked():
    """``symmetric="False"`` is a non-empty string, which Python reads as true: a boolean option
    takes ``True``/``False`` only (TypeError), an option from a set of strings one of them
    (ValueError; TypeError for a non-string), each naming the option, at the call or the
    constructor that takes it — never silently another meaning."""
    calls = _option_calls()
    options = _options()
    assert set(options) <= set(calls), f"no call in the table for {set(options) - set(calls)}"
    for owner, names in options.items():
        for name in names:
            if name in ENUM_OPTIONS:
                with pytest.raises(ValueError, match=name):
                    calls[owner](**{name: "no-such-option"})
            else:
                for bad in ("False", 1, None):
                    with pytest.raises(TypeError, match=f"{name} must be True or False"):
                        calls[owner](**{name: bad})
