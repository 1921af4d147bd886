"""Layer names and paths of MobileNetV1: TF-slim names, Flax module paths, network order.

A conv layer of MobileNetV1 lives at a module path such as ``("Conv2d_3", "pointwise")`` in every
variable collection; its TF-slim name is ``Conv2d_3_pointwise``. Analysis tables, the integer
model and imported checkpoints are keyed by TF-slim names; the Flax variables by paths
(:mod:`qfsep_jax.tree_utils` reads them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qfsep_jax.tree_utils import find_nodes

NUM_BLOCKS = 13  # MobileNetV1's separable blocks, Conv2d_1 ... Conv2d_13
POOL_NAME = "AvgPool_1a"  # TF-slim's name of the global average pool


def tfslim_name(path: tuple[str, ...]) -> str:
    """TF-slim name of a module path: ``("Conv2d_3", "pointwise")`` → ``Conv2d_3_pointwise``."""
    return "_".join(path)


def layer_path(name: str) -> tuple[str, ...]:
    """``Conv2d_3_pointwise`` → ``("Conv2d_3", "pointwise")``; other names are one level."""
    for suffix in ("_depthwise", "_pointwise"):
        if name.endswith(suffix):
            return (name[: -len(suffix)], suffix[1:])
    return (name,)


def short_layer_name(name: str) -> str:
    """The paper's axis labels: ``Conv2d_0`` → ``conv0``, ``Conv2d_3_depthwise`` → ``dw3``."""
    if name == "Logits":
        return "logits"
    parts = name.split("_")
    if len(parts) == 2:
        return f"conv{parts[1]}"
    kind = {"depthwise": "dw", "pointwise": "pw"}.get(parts[2], parts[2])
    return f"{kind}{parts[1]}"


def layer_order(path: tuple[str, ...]) -> tuple[int, int]:
    """Sort key of a conv layer path in network order (stem, blocks dw → pw, classifier)."""
    head = path[0]
    if head == "Logits":
        return (NUM_BLOCKS + 1, 0)
    index = int(head.split("_")[1])
    return (index, 0 if len(path) == 1 or path[1] == "depthwise" else 1)


def layer_paths(tree: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Paths of the conv layers (dicts holding a ``kernel``) of a params tree, in network order."""
    found = find_nodes(tree, lambda node: "kernel" in node)
    return sorted((path for path, _ in found), key=layer_order)
