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

from qfsep_jax.models.mobilenet_v1 import layer_paths, tfslim_name
from qfsep_jax.quant.fold import bn_alpha

# The paper's Figure 3 (docs/paper.md §4): α of the 32 channels of Conv2d_1_depthwise of the
# TF-slim float MobileNetV1 1.0/224, as printed (6 significant digits).
_F32_SLACK = 4 * float(np.finfo(np.float32).eps)  # α is computed in float32
PAPER_FIG3_LAYER = "Conv2d_1_depthwise"
PAPER_FIG3_ALPHA = (
    21.5191, 0.223199, 1.08687, 14.1944, 0.863097, 0.183423, 0.101928, 0.194357, 24.2374,
    0.0637057, 0.113416, 1.48599, 0.299164, 0.6962, 0.932557, 3.70812, 14.8428, 0.0413136,
    0.184471, 0.228431, 17.1846, 30.6505, 0.114515, 1.3315, 0.214905, 0.627026, 0.0899751,
    0.199664, 0.0595126, 0.461869, 0.339099, 0.229413,
)  # fmt: skip


def get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    """The subtree of a nested dict at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def bn_alphas(
    variables: Mapping[str, Any],
    eps: float,
    zero_variance_threshold: float = 1e-10,
    depthwise_only: bool = True,
) -> dict[str, dict[str, list]]:
    """α per channel of the BN layers of an unfolded model, by TF-slim layer name.

    Args:
      variables: ``{"params", "batch_stats"}`` of a model with BN (``bn_folded=False``).
      eps: the BN epsilon (``model.bn_epsilon``; 1e-3 for TF-slim).
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
        params = get_path(variables["params"], path)
        if "bn_scale" not in params or (depthwise_only and path[-1] != "depthwise"):
            continue
        var = np.asarray(get_path(stats, path)["bn_var"], np.float64)
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
    layer: str = PAPER_FIG3_LAYER,
    paper: Sequence[float] = PAPER_FIG3_ALPHA,
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
