"""``python -m experiments reproduce synthetic``: the article's headline experiment, reconstructed.

Setting (docs/design.md, **[reconstructed]** — the paper's exact setup is not
public). Anchors ``x_i`` (2,000) and a pool of items ``v_k`` (1,000) in R⁸,
random directions of norm 2; fixed scores ``S = X Vᵀ``. The model scores
``s_θ(i, k) = θ·S_ik`` with one parameter θ (it enters the library as the
``logit_scale``). Each anchor's positive is drawn once, noisily:
``k_i ~ softmax_k(θ*·S_ik)`` with ``θ* = 1``. Every step takes a batch of 64
anchors and M negatives drawn uniformly from the pool, and the loss is the
decoupled one (the positive is not in the denominator):
``ℓ_i = −θ·S_{i,k_i} + log D̂_i``, ``D̂_i = mean over the M negatives of exp(θ·S_ik)``.

Why θ = 1 is the exact optimum: the population loss
``E_i[−θ S_{i,k_i} + log E_{k~U(pool)} exp(θ S_ik)]`` has gradient
``−E_i[S_{i,k_i}] + E_i[E_{k~softmax(θ S_i)} S_ik]``; since ``k_i`` is drawn
from ``softmax(θ* S_i)``, the two terms cancel at ``θ = θ*``. Minibatch
InfoNCE follows ``E[∇ log D̂] ≠ ∇ log D`` instead (few negatives → strong
bias), so it settles elsewhere; the gamma-EM surrogate ``u_i·D̂_i`` is
linear in ``D̂`` and unbiased given ``u``. The finite-sample MLE (exact
``D_i`` over the whole pool, the drawn positives) is reported beside it.

Every method drives the library: ``tilecl.contrastive_loss(..., positives=)``
for InfoNCE, ``tilecl.GammaContrastiveLoss(..., positives=)`` (its E-step and
surrogate) for gamma-EM.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import tilecl

from .demo import one_thread

METHODS = ("infonce", "gamma-sample", "gamma-mean")
COLORS = {"infonce": "tab:red", "gamma-sample": "tab:blue", "gamma-mean": "tab:green"}


@dataclass
class SyntheticConfig:
    anchors: int = 2000
    pool: int = 1000
    dim: int = 8
    norm: float = 2.0
    theta_star: float = 1.0
    theta_init: float = 0.5
    negatives: int = 8
    batch: int = 64
    steps: int = 30000
    lr: float = 0.05
    gamma: float = 0.02
    alpha: float = 1.0
    average_last: int = 5000
    record_every: int = 50


@dataclass
class SyntheticData:
    x: torch.Tensor  # (anchors, dim)
    v: torch.Tensor  # (pool, dim)
    positive: torch.Tensor  # (anchors,) index into the pool


def make_data(cfg: SyntheticConfig, seed: int) -> SyntheticData:
    gen = torch.Generator().manual_seed(10_000 + seed)

    def directions(rows: int) -> torch.Tensor:
        return cfg.norm * torch.nn.functional.normalize(
            torch.randn(rows, cfg.dim, generator=gen, dtype=torch.float64), dim=1
        )

    x, v = directions(cfg.anchors), directions(cfg.pool)
    positive = torch.multinomial(torch.softmax(cfg.theta_star * x @ v.T, dim=1), 1, generator=gen).squeeze(1)
    return SyntheticData(x, v, positive)


def finite_sample_mle(data: SyntheticData) -> float:
    """argmax_θ Σ_i [θ S_{i,k_i} − log mean_k exp(θ S_ik)] (exact D_i over the pool), by Newton's method."""
    scores = data.x @ data.v.T
    positive = scores[torch.arange(len(scores)), data.positive]
    theta = 1.0
    for _ in range(50):
        p = torch.softmax(theta * scores, dim=1)
        mean = (p * scores).sum(1)
        var = (p * scores**2).sum(1) - mean**2
        step = float((mean - positive).sum() / var.sum())
        theta -= step
        if abs(step) < 1e-12:
            break
    return theta


def train_theta(
    cfg: SyntheticConfig, data: SyntheticData, method: str, seed: int, progress=None
) -> list[float]:
    """SGD on θ with the given method; returns θ every ``record_every`` steps."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.tensor(cfg.theta_init, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=cfg.lr)
    gamma_loss = None
    if method != "infonce":
        gamma_loss = tilecl.GammaContrastiveLoss(
            cfg.anchors,
            alpha=cfg.alpha,
            gamma=cfg.gamma,
            estimator=method.split("-")[1],
            symmetric=False,
            backend="torch",
            generator=torch.Generator().manual_seed(seed + 1),
        )
    trace = []
    for step in range(cfg.steps):
        index = torch.randperm(cfg.anchors, generator=gen)[: cfg.batch]
        negatives = data.v[torch.randint(cfg.pool, (cfg.negatives,), generator=gen)]
        anchors, positives = data.x[index], data.v[data.positive[index]]
        if gamma_loss is None:
            loss = tilecl.contrastive_loss(
                anchors, negatives, theta, symmetric=False, positives=positives, backend="torch"
            )
        else:
            loss = gamma_loss(anchors, negatives, index, theta, positives=positives)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.record_every == 0 or step == cfg.steps - 1:
            trace.append(theta.item())
        if progress is not None:
            progress.update(1)
    return trace


def final_theta(cfg: SyntheticConfig, trace: list[float]) -> float:
    keep = max(1, cfg.average_last // cfg.record_every)
    return float(np.mean(trace[-keep:]))


@one_thread()
def run_synthetic(
    cfg: SyntheticConfig,
    seeds: int,
    json_path: Optional[str],
    plot_path: Optional[str],
    progress: bool = True,
) -> dict:
    from tqdm.auto import tqdm

    results: dict[str, dict[str, list]] = {m: {"final_theta": [], "trace": []} for m in METHODS}
    mles = []
    bar = tqdm(
        total=seeds * len(METHODS) * cfg.steps, desc="synthetic θ runs", unit="step", disable=not progress
    )
    for seed in range(seeds):
        data = make_data(cfg, seed)
        mles.append(finite_sample_mle(data))
        for method in METHODS:
            bar.set_postfix(method=method, seed=seed)
            trace = train_theta(cfg, data, method, seed, bar)
            results[method]["trace"].append(trace)
            results[method]["final_theta"].append(final_theta(cfg, trace))
    bar.close()
    out = {
        "optimum": cfg.theta_star,
        "mle": float(np.mean(mles)),
        "mle_per_seed": mles,
        "methods": {
            m: {
                "final_theta": r["final_theta"],
                "mean": float(np.mean(r["final_theta"])),
                "std": float(np.std(r["final_theta"])),
                "within_0.05_of_optimum": int(
                    np.sum(np.abs(np.array(r["final_theta"]) - cfg.theta_star) <= 0.05)
                ),
            }
            for m, r in results.items()
        },
        "config": {**asdict(cfg), "seeds": seeds},
    }
    print_table(out)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"JSON: {json_path}")
    if plot_path:
        plot_traces(cfg, results, out, plot_path)
        print(f"plot: {plot_path}")
    return out


def print_table(out: dict) -> None:
    cfg = out["config"]
    print(
        f"\nfinal θ (mean of the last {cfg['average_last']} steps), {cfg['seeds']} seeds, "
        f"M={cfg['negatives']} negatives, batch {cfg['batch']}, γ={cfg['gamma']}"
    )
    print(f"{'method':<14} {'mean ± std':>16}   within 0.05 of θ*")
    for name, r in out["methods"].items():
        print(f"{name:<14} {r['mean']:>8.3f} ± {r['std']:.3f}   {r['within_0.05_of_optimum']}/{cfg['seeds']}")
    print(f"{'optimum θ*':<14} {out['optimum']:>8.3f}")
    print(f"{'finite MLE':<14} {out['mle']:>8.3f}   (mean over seeds)")


def plot_traces(cfg: SyntheticConfig, results: dict, out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, r in results.items():
        for k, trace in enumerate(r["trace"]):
            steps = np.minimum(np.arange(len(trace)) * cfg.record_every, cfg.steps - 1)
            ax.plot(steps, trace, color=COLORS[method], lw=0.7, alpha=0.8, label=method if k == 0 else None)
    ax.axhline(out["optimum"], color="k", ls="--", lw=1, label="optimum θ* = 1")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("θ (inverse temperature)")
    ax.set_title(
        f"synthetic: {cfg.negatives} uniform negatives per step, batch {cfg.batch}, one line per seed"
    )
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fast_config() -> SyntheticConfig:
    """The ``make demo`` variant: fewer, shorter runs (same setting)."""
    return SyntheticConfig(steps=6000, average_last=2000)


__all__ = ["SyntheticConfig", "final_theta", "finite_sample_mle", "make_data", "run_synthetic", "train_theta"]


DIGITS_METHODS = ("infonce-B", "infonce-4B", "gamma-B")


@one_thread()
def run_digits(
    seeds: int = 3,
    batch: int = 32,
    epochs: int = 60,
    gamma: float = 0.9,
    json_path: Optional[str] = None,
    plot_path: Optional[str] = None,
    progress: bool = True,
    estimator: str = "sample",
) -> dict:
    """Two-view digits towers: InfoNCE at batch B and 4B, gamma-EM at batch B.

    Same number of epochs for every method (so batch B takes 4x the steps of
    4B). Reports held-out exact-pair retrieval R@1 and linear-probe accuracy,
    mean ± std over seeds.
    """
    from .demo import TwoTower, linear_probe_accuracy, load_digit_views, retrieval_r1, train

    views = load_digit_views()
    scores: dict[str, dict[str, list[float]]] = {m: {"r1": [], "probe": []} for m in DIGITS_METHODS}
    for seed in range(seeds):
        for method in DIGITS_METHODS:
            model = TwoTower(seed=seed)
            size = 4 * batch if method == "infonce-4B" else batch
            gamma_loss = None
            if method == "gamma-B":
                gamma_loss = tilecl.GammaContrastiveLoss(
                    len(views.left_train),
                    gamma=gamma,
                    estimator=estimator,
                    generator=torch.Generator().manual_seed(seed),
                )
            if progress:
                print(f"seed {seed}, {method} (batch {size})")
            train(model, views, epochs, size, seed=seed, progress=progress, gamma_loss=gamma_loss)
            scores[method]["r1"].append(retrieval_r1(model, views.left_test, views.right_test))
            scores[method]["probe"].append(linear_probe_accuracy(model, views, seed))
    config = {"seeds": seeds, "batch": batch, "epochs": epochs, "gamma": gamma, "estimator": estimator}
    title = f"digits halves, B={batch}, {epochs} epochs, {seeds} seeds"
    return _report(scores, config, title, "probe", json_path, plot_path)


def _report(
    scores: dict,
    config: dict,
    title: str,
    probe_label: str,
    json_path: Optional[str],
    plot_path: Optional[str],
) -> dict:
    """Mean ± std per method, printed, written as JSON and drawn as bars (R@1, probe accuracy)."""
    out = {
        "methods": {
            m: {
                **v,
                "r1_mean": float(np.mean(v["r1"])),
                "r1_std": float(np.std(v["r1"])),
                "probe_mean": float(np.mean(v["probe"])),
                "probe_std": float(np.std(v["probe"])),
            }
            for m, v in scores.items()
        },
        "config": config,
    }
    print(f"\n{title}: held-out R@1 and linear-probe accuracy")
    for m, r in out["methods"].items():
        r1, probe = f"{r['r1_mean']:.3f} ± {r['r1_std']:.3f}", f"{r['probe_mean']:.3f} ± {r['probe_std']:.3f}"
        print(f"{m:<16} R@1 {r1}   {probe_label} {probe}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"JSON: {json_path}")
    if plot_path:
        _plot_bars(out, plot_path, title)
        print(f"plot: {plot_path}")
    return out


MODALITY_METHODS = ("clip", "clip+separation", "clip+bridge", "clip+geometric")


class _TwoHeadTower(torch.nn.Module):
    """A trunk with a shared head ``z`` and an independent head ``zi`` (for feature separation)."""

    def __init__(self, in_dim: int = 32, hidden: int = 128, out_dim: int = 32) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU())
        self.shared = torch.nn.Linear(hidden, out_dim)
        self.independent = torch.nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        norm = torch.nn.functional.normalize
        return norm(self.shared(h), dim=-1), norm(self.independent(h), dim=-1)


def _degrade(x: torch.Tensor, seed: int, noise: float = 0.2, drop: float = 0.2) -> torch.Tensor:
    """The information gap: the right view loses pixels and gains noise (fixed per sample)."""
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(x.shape, generator=gen) > drop).float()
    return x * keep + noise * torch.randn(x.shape, generator=gen)


@one_thread()
def run_modality(
    seeds: int = 3,
    epochs: int = 100,
    batch: int = 128,
    json_path: Optional[str] = None,
    plot_path: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Digits halves with an information gap (the right half degraded), CLIP alone vs each regularizer.

    Reports held-out exact-pair retrieval R@1 and the accuracy of a logistic
    regression on the clean (left) view's shared features, mean ± std over seeds.
    Augmented views (for the bridge, ``L^a_gc`` and the in-modal terms) add
    Gaussian pixel noise (σ = 0.1) each step.
    """
    from sklearn.linear_model import LogisticRegression
    from tqdm.auto import tqdm

    from .demo import load_digit_views

    views = load_digit_views()
    right_train, right_test = _degrade(views.right_train, 1), _degrade(views.right_test, 2)
    weights: dict[str, dict[str, Any]] = {
        "clip": dict(lambda_sep=0.0, lambda_br=0.0, lambda_gc=0.0),
        "clip+separation": dict(lambda_sep=0.1, lambda_br=0.0, lambda_gc=0.0),
        "clip+bridge": dict(lambda_sep=0.0, lambda_br=0.1, lambda_gc=0.0),
        "clip+geometric": dict(lambda_sep=0.0, lambda_br=0.0, lambda_gc=0.25),
    }
    scores: dict[str, dict[str, list[float]]] = {m: {"r1": [], "probe": []} for m in MODALITY_METHODS}
    bar = tqdm(
        total=seeds * len(MODALITY_METHODS) * epochs, desc="modality runs", unit="epoch", disable=not progress
    )
    for seed in range(seeds):
        for method in MODALITY_METHODS:
            torch.manual_seed(seed)
            left_tower, right_tower = _TwoHeadTower(), _TwoHeadTower()
            log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            params = [*left_tower.parameters(), *right_tower.parameters(), log_scale]
            opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
            loss_fn = tilecl.ModalityStructureLoss(**weights[method])
            gen = torch.Generator().manual_seed(seed)
            n = len(views.left_train)
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n - batch + 1, batch):
                    idx = order[start : start + batch]
                    xl, xr = views.left_train[idx], right_train[idx]
                    z_v, zi_v = left_tower(xl)
                    z_t, zi_t = right_tower(xr)
                    z_va, zi_va = left_tower(xl + 0.1 * torch.randn(xl.shape, generator=gen))
                    z_ta, zi_ta = right_tower(xr + 0.1 * torch.randn(xr.shape, generator=gen))
                    loss = loss_fn(
                        z_v, z_t, log_scale.exp().clamp(max=100), z_v_aug=z_va, z_t_aug=z_ta,
                        zi_v=zi_v, zi_t=zi_t, zi_v_aug=zi_va, zi_t_aug=zi_ta,
                    )  # fmt: skip
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                bar.update(1)
            with torch.no_grad():
                zl_test, zr_test = left_tower(views.left_test)[0], right_tower(right_test)[0]
                nearest = (zl_test @ zr_test.T).argmax(dim=1).numpy()
                scores[method]["r1"].append(float(np.mean(nearest == np.arange(len(nearest)))))
                probe = LogisticRegression(max_iter=2000, random_state=seed)
                probe.fit(left_tower(views.left_train)[0].numpy(), views.labels_train)
                scores[method]["probe"].append(float(probe.score(zl_test.numpy(), views.labels_test)))
    bar.close()
    config = {"seeds": seeds, "epochs": epochs, "batch": batch, "weights": weights}
    title = f"modality (right view degraded), {seeds} seeds, {epochs} epochs, batch {batch}"
    return _report(scores, config, title, "probe (left view)", json_path, plot_path)


def _plot_bars(out: dict, path: str, title: str) -> list[tuple[float, float]]:
    """Mean ± std per method (error bars) and each seed (dots), R@1 and probe accuracy side by side.

    Each panel's y range is zoomed to its data (every seed, every mean ± std)
    with a margin, not started at 0: accuracies 0.862 and 0.867 would otherwise
    look identical. Points, not bars, since a bar's length from a cut axis
    would misstate the ratio of two scores. Returns each panel's y limits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.0))
    names = list(out["methods"])
    probe = "linear-probe accuracy" + (", clean left view" if "weights" in out.get("config", {}) else "")
    limits = []
    for ax, key, label in zip(axes, ("r1", "probe"), ("held-out retrieval R@1", probe)):
        means = [out["methods"][m][f"{key}_mean"] for m in names]
        stds = [out["methods"][m][f"{key}_std"] for m in names]
        ax.errorbar(
            range(len(names)), means, yerr=stds, fmt="o", ms=7, capsize=6, lw=1.5, color="tab:blue",
            label="mean ± std over seeds", zorder=2,
        )  # fmt: skip
        # each seed right of its mean, a step apart so that equal scores stay visible
        seeds = [
            (x + 0.12 + 0.06 * k, v)
            for x, m in enumerate(names)
            for k, v in enumerate(out["methods"][m][key])
        ]
        ax.scatter(*zip(*seeds), color="k", s=10, label="one seed", zorder=3)
        for x, mean in enumerate(means):
            ax.annotate(
                f"{mean:.3f}", (x, mean), textcoords="offset points", xytext=(-9, 0), ha="right", va="center",
                fontsize=8,
            )  # fmt: skip
        values = (
            [v for _, v in seeds]
            + [m + s for m, s in zip(means, stds)]
            + [m - s for m, s in zip(means, stds)]
        )
        low, high = min(values), max(values)
        margin = max(0.15 * (high - low), 0.005)
        limits.append((max(0.0, low - margin), min(1.0, high + margin)))
        ax.set_ylim(*limits[-1])
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("fraction of the held-out set (axis zoomed)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return limits


def _bars_title(config: dict) -> str:
    """The title :func:`run_digits` or :func:`run_modality` gave the figure, from the JSON's config."""
    c = config
    if "weights" in c:
        return f"modality (right view degraded), {c['seeds']} seeds, {c['epochs']} epochs, batch {c['batch']}"
    estimator = f", gamma-EM estimator {c['estimator']}" if "estimator" in c else ""
    return f"digits halves, B={c['batch']}, {c['epochs']} epochs, {c['seeds']} seeds{estimator}"


def replot(json_path: str, plot_path: str) -> list[tuple[float, float]]:
    """Redraw a digits or modality figure from its JSON, without training again."""
    out = json.loads(Path(json_path).read_text())
    return _plot_bars(out, plot_path, _bars_title(out["config"]))


#: the committed figures :func:`replot` redraws from docs/results/ (synthetic's θ traces are not in its JSON)
REPLOTTABLE = ("digits", "digits-mean", "modality")

if __name__ == "__main__":  # python -m experiments.reproduce: redraw those figures from the committed JSON
    docs = Path(__file__).resolve().parents[1] / "docs"
    for name in REPLOTTABLE:
        replot(str(docs / "results" / f"{name}.json"), str(docs / "figures" / f"{name}.png"))
        print(f"wrote docs/figures/{name}.png")
