"""Matplotlib PNGs shaped like the paper's figures, written atomically through ``io_utils``.

* :func:`plot_alpha_channels`: Figure 3, α per channel of one layer (log scale), zero-variance
  channels marked, the paper's values overlaid when given.
* :func:`plot_alpha_layers`: α of every channel of every depthwise layer, one column per layer.
* :func:`plot_sqnr`: Figure 4, SQNR per layer for several pipelines (measured solid, the
  uniform-noise estimate dashed).
* :func:`plot_accuracy`: Figure 5's comparison, top-1 per variant for float / fake-quant /
  integer-only, with the spread over seeds as error bars.
* :func:`plot_training_curves`: train loss, train and val top-1 per epoch, one line per run.
* :func:`plot_top2_margins`: integer pass against fake-quant simulation, per image: how close
  the simulation's top two classes are against how much the integer pass moves that gap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qfsep_jax.io_utils import save_figure  # noqa: E402
from qfsep_jax.models.names import short_layer_name  # noqa: E402


def plot_alpha_channels(
    alpha: Sequence[float],
    path: str,
    zero_variance: Sequence[int] = (),
    paper: Sequence[float] | None = None,
    title: str = "",
) -> None:
    """Bar chart of α per channel on a log axis (the paper's Figure 3)."""
    a = np.asarray(alpha, np.float64)
    idx = np.arange(a.size)
    colors = np.where(np.isin(idx, list(zero_variance)), "tab:red", "tab:blue")
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(idx, np.abs(a), color=colors)
    if paper is not None:
        ax.plot(idx, np.abs(np.asarray(paper)), "k_", markersize=12, label="paper (Fig. 3)")
    ax.set_yscale("log")
    ax.set_xlabel("channel")
    ax.set_ylabel("|α| = |γ| / sqrt(σ² + ε)")
    ax.set_xticks(idx if a.size <= 64 else idx[:: max(1, a.size // 32)])
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="tab:blue", label="channel"),
        plt.Rectangle((0, 0), 1, 1, color="tab:red", label="zero variance"),
    ]
    if paper is not None:
        handles.append(ax.get_lines()[0])
    ax.legend(handles=handles)
    ax.set_title(title or "folded BN scale α per channel")
    save_figure(fig, path)
    plt.close(fig)


def plot_alpha_layers(alphas: Mapping[str, Mapping[str, Sequence]], path: str) -> None:
    """α of every channel of each layer (one column per layer, log scale, zero variance red)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(alphas) + 2), 4.5))
    rng = np.random.default_rng(0)  # horizontal jitter only, fixed for reproducible images
    for i, row in enumerate(alphas.values()):
        a = np.abs(np.asarray(row["alpha"], np.float64))
        dead = np.isin(np.arange(a.size), list(row["zero_variance"]))
        x = i + rng.uniform(-0.25, 0.25, a.size)
        ax.scatter(x[~dead], a[~dead], s=4, color="tab:blue", alpha=0.5)
        ax.scatter(
            x[dead], a[dead], s=16, color="tab:red", label="zero variance" if i == 0 else None
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(alphas)))
    ax.set_xticklabels([short_layer_name(n) for n in alphas], rotation=45)
    ax.set_ylabel("|α|")
    ax.set_title("folded BN scales of the layers after a depthwise conv")
    if any(row["zero_variance"] for row in alphas.values()):
        ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def plot_sqnr(
    curves: Mapping[str, Mapping[str, float]],
    path: str,
    estimates: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "per-layer SQNR (accumulated error)",
    spreads: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """SQNR (dB) per layer in network order, one line per curve (the paper's Figure 4).

    ``estimates`` (same keys) are drawn dashed in the same colour; ``spreads`` (same keys) as
    error bars. Layers are taken in the order of the first curve.
    """
    if not curves:
        raise ValueError("plot_sqnr needs at least one curve")
    layers = list(next(iter(curves.values())))
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(layers) + 3), 4.5))
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        y = np.array([curve.get(n, np.nan) for n in layers], np.float64)
        err = None
        if spreads and label in spreads:
            err = np.array([spreads[label].get(n, np.nan) for n in layers], np.float64)
        ax.errorbar(x, y, yerr=err, color=color, marker="o", markersize=3, label=label)
        if estimates and label in estimates:
            e = np.array([estimates[label].get(n, np.nan) for n in layers], np.float64)
            ax.plot(x, e, color=color, linestyle="--", linewidth=1, label=f"{label} (estimate)")
    ax.set_xticks(x)
    ax.set_xticklabels([short_layer_name(n) for n in layers], rotation=90)
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    save_figure(fig, path)
    plt.close(fig)


def plot_accuracy(
    table: Mapping[str, Mapping[str, float]],
    path: str,
    spreads: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "top-1 by core layer",
) -> None:
    """Grouped bars: per variant (outer key), one bar per measure (inner key, e.g. float/fake)."""
    if not table:
        raise ValueError("plot_accuracy needs at least one variant")
    variants = list(table)
    measures = list(dict.fromkeys(m for row in table.values() for m in row))
    width = 0.8 / len(measures)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(variants)), 4.5))
    for j, m in enumerate(measures):
        y = [table[v].get(m, np.nan) for v in variants]
        err = [spreads[v].get(m, 0.0) for v in variants] if spreads else None
        ax.bar(
            np.arange(len(variants)) + (j - (len(measures) - 1) / 2) * width,
            y,
            width,
            yerr=err,
            label=m,
            capsize=3,
        )
    ax.set_xticks(np.arange(len(variants)))
    ax.set_xticklabels(variants, rotation=15)
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    ax.set_title(title)
    save_figure(fig, path)
    plt.close(fig)


def plot_top2_margins(per_image: Mapping[str, Sequence], path: str, title: str = "") -> None:
    """Per image, the simulation's top-2 gap against the integer pass's error on that gap.

    ``per_image`` is :func:`qfsep_jax.analysis.agreement.agreement_report`'s ``per_image``: x is
    ``sim_top2_gap_lsb`` (log scale), y is ``|top2_pair_error_lsb|``; images whose fine top-1
    differs are drawn in red. Below the diagonal the error is smaller than the gap, so the top-1
    can only flip above it (or through a third class).
    """
    gap = np.maximum(np.asarray(per_image["sim_top2_gap_lsb"], np.float64), 1e-4)
    err = np.maximum(np.abs(np.asarray(per_image["top2_pair_error_lsb"], np.float64)), 1e-4)
    agrees = np.asarray(per_image["fine_top1_agrees"], bool)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter(
        gap[agrees],
        err[agrees],
        s=8,
        c="tab:blue",
        alpha=0.6,
        label=f"same top-1 ({int(agrees.sum())})",
    )
    ax.scatter(
        gap[~agrees],
        err[~agrees],
        s=24,
        c="tab:red",
        marker="x",
        label=f"top-1 differs ({int((~agrees).sum())})",
    )
    lo = max(1e-4, min(float(gap.min()), float(err.min())) / 2)
    hi = max(float(gap.max()), float(err.max())) * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="error = gap")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("simulation's top-2 logit gap (output LSBs)")
    ax.set_ylabel("|integer minus simulation| on that gap (LSBs)")
    ax.set_title(title or f"integer pass vs fake-quant simulation, {gap.size} images", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_training_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]], path: str, title: str = ""
) -> None:
    """Three panels per run label: train loss, train top-1 and val top-1 against the epoch.

    ``curves`` maps a label to :func:`qfsep_jax.analysis.curves.per_epoch`'s lists. Runs sharing
    the label's first word (the variant) share a colour; the rest of the label sets the style.
    """
    if not curves:
        raise ValueError("plot_training_curves needs at least one run")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours: dict[str, str] = {}
    styles = ["-", "--", ":", "-."]
    for i, (label, c) in enumerate(curves.items()):
        group = label.split()[0]
        colour = colours.setdefault(group, f"C{len(colours)}")
        style = styles[sum(1 for k in list(curves)[:i] if k.split()[0] == group) % len(styles)]
        kw = dict(color=colour, linestyle=style, label=label)
        axes[0].plot(c["epoch"], c["train_loss"], **kw)
        axes[1].plot(c["epoch"], c["train_accuracy"], **kw)
        axes[2].plot(c["eval_epoch"], c["eval_top1"], marker=".", **kw)
    for ax, name in zip(
        axes, ("train loss (CE + L2)", "train top-1 (%), augmented", "val top-1 (%)"), strict=True
    ):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)
