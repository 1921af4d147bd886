"""Folded batch-norm scales α = γ / sqrt(σ² + ε) per channel (the paper's Figure 3).

The paper's root cause: BN after a depthwise conv, folded into a per-tensor-quantized kernel,
multiplies channels by α values that differ by orders of magnitude, the largest coming from
channels whose moving variance is (numerically) zero. This module lists α per channel for every
BN layer that follows a depthwise conv and flags those channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qfsep_jax import paper
from qfsep_jax.models.names import layer_paths, tfslim_name
from qfsep_jax.quant.fold import bn_alpha
from qfsep_jax.tree_utils import subtree

_F32_SLACK = 4 * float(np.finfo(np.float32).eps)  # α is computed in float32


def bn_alphas(
    variables: Mapping[str, Any],
    eps: float = 1e-3,
    zero_variance_threshold: float = 1e-10,
    depthwise_only: bool = True,
) -> dict[str, dict[str, list]]:
    """α per channel of the BN layers of an unfolded model, by TF-slim layer name.

    Args:
      variables: ``{"params", "batch_stats"}`` of a model with BN (``bn_folded=False``).
      eps: the BN epsilon, ``model.bn_epsilon``; the default 1e-3 is :class:`MobileNetV1`'s and
        TF-slim's.
      zero_variance_threshold: channels with moving variance below this are flagged (the same
        threshold as the PTQ zero-variance fix, so the flagged channels are the ones it replaces).
      depthwise_only: only the BN layers that follow a depthwise conv (the paper's Figure 3);
        ``False`` lists every BN layer.

    Returns:
      ``{layer: {"alpha": [...], "variance": [...], "gamma": [...], "zero_variance": [indices]}}``
      in network order; empty when no such layer has BN (the quantization-friendly block).
    """
    if "params" not in variables:
        raise ValueError(f"expected a variables dict with 'params', got keys {list(variables)}")
    stats = variables.get("batch_stats", {})
    out = {}
    for path in layer_paths(variables["params"]):
        params = subtree(variables["params"], path)
        if "bn_scale" not in params or (depthwise_only and path[-1] != "depthwise"):
            continue
        var = np.asarray(subtree(stats, path)["bn_var"], np.float64)
        gamma = np.asarray(params["bn_scale"], np.float32)
        alpha = np.asarray(bn_alpha(gamma, np.asarray(var, np.float32), eps), np.float64)
        out[tfslim_name(path)] = {
            "alpha": alpha.tolist(),
            "variance": var.tolist(),
            "gamma": gamma.astype(np.float64).tolist(),
            "zero_variance": np.flatnonzero(var < zero_variance_threshold).tolist(),
        }
    return out


def alpha_summary(alphas: Mapping[str, Mapping[str, Sequence]]) -> dict[str, dict[str, Any]]:
    """Per layer: channel count, min/median/max α, max/median ratio and zero-variance count."""
    out = {}
    for name, row in alphas.items():
        a = np.asarray(row["alpha"], np.float64)
        out[name] = {
            "channels": int(a.size),
            "alpha_min": float(a.min()),
            "alpha_median": float(np.median(a)),
            "alpha_max": float(a.max()),
            "max_over_median": float(a.max() / np.median(a)),
            "zero_variance_channels": len(row["zero_variance"]),
        }
    return out


def compare_to_paper(
    alphas: Mapping[str, Mapping[str, Sequence]],
    layer: str = paper.FIG3_LAYER,
    paper: Sequence[float] = paper.FIG3_ALPHA,
) -> dict[str, Any]:
    """Compares the α of ``layer`` with the paper's printed Figure 3 values.

    ``matches_printed_digits`` is true when every channel rounds to the paper's printed value,
    i.e. differs by at most half a unit in its 6th significant digit (plus float32 slack).
    """
    if layer not in alphas:
        raise ValueError(f"no BN after a depthwise conv named {layer!r}; have {sorted(alphas)}")
    ours = np.asarray(alphas[layer]["alpha"], np.float64)
    ref = np.asarray(paper, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{layer} has {ours.size} channels, the paper lists {ref.size}")
    diff = np.abs(ours - ref)
    # Half a unit of the last printed digit: the paper prints 6 significant digits (fewer where
    # trailing zeros were dropped, e.g. 0.6962), so 6 digits is the strictest reading.
    half_ulp = 0.5 * 10.0 ** (np.floor(np.log10(np.abs(ref))) - 5)
    return {
        "layer": layer,
        "channels": int(ref.size),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(np.max(diff / np.abs(ref))),
        "matches_4_decimals": bool(np.all(diff < 5e-5)),
        "matches_printed_digits": bool(np.all(diff <= half_ulp + _F32_SLACK * np.abs(ref))),
        "ours": ours.tolist(),
        "paper": ref.tolist(),
    }
