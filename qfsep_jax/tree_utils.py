"""Reading nested variable dicts: the node at a path, and the nodes that match a test."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def subtree(tree: Mapping[str, Any], path: tuple[str, ...], what: str = "tree") -> Any:
    """The node of a nested dict at ``path``; a ``ValueError`` names ``what`` and the path."""
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"{what} has no entry {'/'.join(path)}")
        node = node[key]
    return node


def find_nodes(
    tree: Mapping[str, Any], is_match: Callable[[Mapping[str, Any]], bool]
) -> list[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """``(path, node)`` of every dict node below ``tree`` for which ``is_match(node)`` holds.

    Depth first in key order; a matching node is not searched further.
    """
    found: list[tuple[tuple[str, ...], Mapping[str, Any]]] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        if is_match(node):
            found.append((path, node))
            return
        for key, sub in node.items():
            if isinstance(sub, Mapping):
                walk(sub, path + (key,))

    walk(tree, ())
    return found
