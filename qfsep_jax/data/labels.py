"""Label spaces: how folder names (ImageNet wnids) map to class indices."""

from __future__ import annotations

import os

LABEL_SPACES = ("imagenet1001", "imagenet1000", "imagenette", "folder")


def read_lines(path: str) -> list[str]:
    """Non-empty stripped lines of a text file, with a clear error if it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file not found: {path}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def wnid_to_index(label_space: str, data_dir: str) -> dict[str, int] | None:
    """The wnid → class index map of a label space (``None`` for ``folder``: tfds's own order).

    ``imagenet1001`` is TF-slim's: index = line of ``imagenet_synsets.txt`` + 1, 0 = background.
    """
    if label_space not in LABEL_SPACES:
        raise ValueError(f"unknown label_space {label_space!r}; choose from {LABEL_SPACES}")
    if label_space == "folder":
        return None
    labels_dir = os.path.join(data_dir, "labels")
    if label_space == "imagenette":
        wnids = read_lines(os.path.join(labels_dir, "imagenette_synsets.txt"))
        return {w: i for i, w in enumerate(wnids)}
    wnids = read_lines(os.path.join(labels_dir, "imagenet_synsets.txt"))
    offset = 1 if label_space == "imagenet1001" else 0
    return {w: i + offset for i, w in enumerate(wnids)}


def num_classes(label_space: str, data_dir: str) -> int:
    """Number of classes of a label space (not defined for ``folder``)."""
    mapping = wnid_to_index(label_space, data_dir)
    if mapping is None:
        raise ValueError("label_space 'folder' has no fixed class count")
    return max(mapping.values()) + 1
