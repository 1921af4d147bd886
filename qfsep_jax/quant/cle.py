"""Cross-layer equalization (Nagel et al. 2019, arXiv:1906.04721), data-free, on folded weights.

For consecutive layers ``y = f(W2 · g(W1 x + b1))`` with a positively homogeneous ``g``
(ReLU, identity, average pooling), scaling output channel ``i`` of layer 1 by ``1/s_i`` and input
channel ``i`` of layer 2 by ``s_i`` leaves the function unchanged. Choosing
``s_i = sqrt(r1_i / r2_i)`` (``r`` = the channel's weight range, max |w|) equalizes the two
ranges, which is what per-tensor weight quantization wants. The pairs of MobileNetV1 are the
chain stem → dw1 → pw1 → dw2 → … → pw13 → classifier; a depthwise layer is both the second
layer of one pair and the first of the next. The pairs are swept until the scales settle.

ReLU6 is not positively homogeneous (``relu6(x / s) != relu6(x) / s``), so equalizing a ReLU6
network changes its function. :func:`equalize` therefore requires the caller to build the
equalized model with ``activation="relu"``: the table reports the float accuracy of that ReLU
model too, so the cost of the swap is visible.
"""

from __future__ import annotations

import numpy as np

from qfsep_jax.tree_utils import subtree


def _out_range(layer: dict) -> np.ndarray:
    """max |w| per output channel (last axis)."""
    k = np.asarray(layer["kernel"])
    return np.abs(k).reshape(-1, k.shape[-1]).max(axis=0)


def _in_range(layer: dict, depthwise: bool) -> np.ndarray:
    """max |w| per input channel (axis 2; for depthwise kernels the channel is the last axis)."""
    k = np.asarray(layer["kernel"])
    if depthwise:
        return np.abs(k).reshape(-1, k.shape[-1]).max(axis=0)
    return np.abs(np.moveaxis(k, 2, -1)).reshape(-1, k.shape[2]).max(axis=0)


def equalize(
    folded_params: dict,
    layer_order: list[tuple[str, ...]],
    iterations: int = 20,
    tolerance: float = 1e-6,
    dead_fraction: float = 1e-6,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Equalizes every consecutive layer pair of a BN-folded chain of conv layers.

    Args:
      folded_params: ``params`` of a folded model (every layer has ``kernel`` and ``bias``).
      layer_order: the paths of the chain's layers in network order (for MobileNetV1,
        :func:`qfsep_jax.models.names.layer_paths`); a path ending in ``depthwise`` is a
        depthwise layer.
      iterations: maximum sweeps over the chain.
      tolerance: stop when every scale of a sweep is within ``1 ± tolerance``.
      dead_fraction: layer-1 channels whose weight range is below this fraction of the
        layer's largest are left alone. They are the dead channels of the trained MobileNetV1
        (weights ~1e-12): their output is a constant, and equalizing would scale that constant
        up by ~1e6 and, with it, the per-tensor activation range.

    Returns:
      The equalized params (new arrays) and, per layer pair ``"A->B"``, the accumulated scales.
    """
    params = _copy(folded_params)
    paths = list(layer_order)
    for path in paths:
        if "bias" not in subtree(params, path):
            raise ValueError(
                f"equalize needs folded params with a bias in every layer; {path} has none "
                "(fold batch norm first)"
            )
    total: dict[str, np.ndarray] = {}
    for _ in range(iterations):
        worst = 0.0
        for first, second in zip(paths[:-1], paths[1:], strict=True):
            l1, l2 = subtree(params, first), subtree(params, second)
            depthwise2 = second[-1] == "depthwise"
            r1, r2 = _out_range(l1), _in_range(l2, depthwise2)
            # A dead layer-1 channel (constant output) is never scaled up; a channel that layer 2
            # ignores (dead r2) is shrunk like any other, which removes its outlier weights.
            ok = (r1 > dead_fraction * r1.max()) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            l1["kernel"] = l1["kernel"] / s
            l1["bias"] = l1["bias"] / s
            if depthwise2:
                l2["kernel"] = l2["kernel"] * s
            else:
                l2["kernel"] = l2["kernel"] * s[:, None]
            key = "/".join(first) + "->" + "/".join(second)
            total[key] = total.get(key, np.ones_like(s)) * s
            worst = max(worst, float(np.max(np.abs(s - 1.0))))
        if worst < tolerance:
            break
    return params, total


def _copy(tree: dict) -> dict:
    return {
        k: _copy(v) if isinstance(v, dict) else np.array(v, np.float32) for k, v in tree.items()
    }
