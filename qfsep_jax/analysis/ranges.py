"""Weight and activation range tables per layer of a quantized (BN-folded) model.

The weight table shows what per-tensor quantization has to cover: the kernel's range, the
spread of the per-channel maxima (``max_over_median``: the largest per-channel max|w| over the
median one, 82× in the official model's worst depthwise layer) and the resulting step Δ. The
activation table lists each calibrated output range with its scale and zero point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qfsep_jax.models.names import layer_paths, tfslim_name
from qfsep_jax.quant.numerics import UINT8, IntRange, qparams
from qfsep_jax.quant.scheme import INPUT_NAME, QuantConfig, layer_act_range, weight_range
from qfsep_jax.tree_utils import find_nodes, subtree


def weight_range_table(
    params: Mapping[str, Any], quant: QuantConfig | None = None
) -> dict[str, dict[str, Any]]:
    """Per conv layer (network order): kernel range, per-channel max|w| spread and step Δ.

    ``params`` are the folded (``bn_folded=True``) params of a quantized model, or any params
    tree of conv layers. Δ follows ``quant`` (default: TF8 per-tensor) with each layer's own
    weight bits; with per-channel weights the largest and smallest per-channel Δ are given.
    """
    quant = quant or QuantConfig()
    table = {}
    for path in layer_paths(params):
        w = np.asarray(subtree(params, path)["kernel"], np.float32)
        per_channel = np.max(np.abs(w.reshape(-1, w.shape[-1])), axis=0)
        layer_quant = quant.for_layer(tfslim_name(path))
        lo, hi = weight_range(w, layer_quant)
        scale, _ = qparams(lo, hi, layer_quant.weight_int_range)
        scale = np.asarray(scale, np.float64)
        median = float(np.median(per_channel))
        table[tfslim_name(path)] = {
            "shape": list(w.shape),
            "min": float(w.min()),
            "max": float(w.max()),
            "abs_max_channel_median": median,
            "max_over_median": float(per_channel.max() / median) if median > 0 else None,
            "step_max": float(scale.max()),
            "step_min": float(scale.min()),
        }
    return table


def activation_range_table(
    quant_ranges: Mapping[str, Any], int_range: IntRange | QuantConfig = UINT8
) -> dict[str, dict[str, Any]]:
    """Per quantized tensor: calibrated ``[min, max]``, scale and zero point, by TF-slim name.

    The input quantizer is listed as ``input``; layer outputs by their TF-slim name, in network
    order. Ranges that were never calibrated (dynamic-range models) are skipped. ``int_range``:
    one code range for all, or a :class:`QuantConfig` whose per-layer bits give each tensor's.
    """
    rows = [
        (path[:-1] if path[-1] == "act_quant" else path, state)
        for path, state in find_nodes(quant_ranges, lambda node: "min" in node and "max" in node)
    ]
    order = {p: i for i, p in enumerate(layer_paths(_as_layer_tree(rows)))}
    table = {}
    for path, state in sorted(rows, key=lambda r: order.get(r[0], -1)):
        lo, hi = float(np.asarray(state["min"])), float(np.asarray(state["max"]))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            continue
        name = INPUT_NAME if path == ("input_quant",) else tfslim_name(path)
        scale, zp = qparams(lo, hi, layer_act_range(int_range, name))
        table[name] = {"min": lo, "max": hi, "scale": float(scale), "zero_point": int(zp)}
    return table


def _as_layer_tree(rows) -> dict:
    """A params-like tree with a ``kernel`` leaf per layer path, so layer_paths can order it."""
    tree: dict = {}
    for path, _ in rows:
        if path == ("input_quant",):
            continue
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node["kernel"] = None
    return tree


def format_markdown(table: Mapping[str, Mapping[str, Any]], columns: list[str]) -> str:
    """A Markdown table with one row per layer and the given columns (floats to 4 significant)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
