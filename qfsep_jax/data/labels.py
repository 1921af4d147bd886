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


def class_names(label_space: str = "imagenet1001", data_dir: str = "../shared/data") -> list[str]:
    """Human-readable class names of a label space, indexed like its labels.

    ``imagenet1001``: TF-slim's 1001 classes (index 0 ``"background"``), from
    ``labels/imagenet_1001_labels.txt``; ``imagenet1000``: the same without background;
    ``imagenette``: the names of its 10 wnids. Names read like ``"tench, Tinca tinca"``.
    ``folder`` has no fixed classes (ValueError).
    """
    if label_space not in LABEL_SPACES:
        raise ValueError(f"unknown label_space {label_space!r}; choose from {LABEL_SPACES}")
    if label_space == "folder":
        raise ValueError("label_space 'folder' has no fixed class names (tfds's folder order)")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory not found: {os.path.abspath(data_dir)!r}; pass data_dir= the folder "
            "that holds labels/"
        )
    labels_dir = os.path.join(data_dir, "labels")
    names = read_lines(os.path.join(labels_dir, "imagenet_1001_labels.txt"))
    if label_space == "imagenet1001":
        return names
    if label_space == "imagenet1000":
        return names[1:]
    index = wnid_to_index("imagenet1001", data_dir)
    return [names[index[w]] for w in read_lines(os.path.join(labels_dir, "imagenette_synsets.txt"))]
