"""Evaluation inputs: sources, preprocessing and padded batches, from arguments or a config.

TensorFlow (tf.data, tfds) is imported on the first call, not with this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np

DEFAULT_DATA_DIR = "../shared/data"


def resolve_path(data_dir: str, path: str) -> str:
    """``path`` if absolute, else relative to ``data_dir``."""
    return path if os.path.isabs(path) else os.path.join(data_dir, path)


@dataclasses.dataclass
class EvalInput:
    """A re-iterable evaluation input: ``make()`` returns a fresh batch iterator."""

    make: Callable[[], Iterator[dict[str, np.ndarray]]]
    num_examples: int
    num_batches: int
    name: str


def eval_batches(
    source: str = "folder:imagenet_val500",
    data_dir: str = DEFAULT_DATA_DIR,
    image_size: int = 224,
    batch_size: int = 32,
    limit: int | None = None,
    *,
    label_space: str = "imagenet1001",
    crop_fraction: float = 0.875,
    uint8: bool = False,
    on_corrupt: str = "error",
    shard: tuple[int, int] = (0, 1),
    tfds_data_dir: str | None = None,
    manual_dir: str | None = None,
) -> EvalInput:
    """Padded evaluation batches of a source, without a config.

    Args:
      source: ``"folder:<path under data_dir>"`` (e.g. ``"folder:imagenet_val500"``,
        ``"folder:imagenette/val"``) or ``"tfds:<name>:<split>"``.
      data_dir: the project's data directory (default ``../shared/data``).
      image_size: the square side the images are resized to.
      batch_size: images per batch; the last batch is padded (``mask`` 0).
      limit: read at most this many images (the first ones, in the source's fixed order).
      label_space: ``imagenet1001`` (TF-slim's, 0 = background), ``imagenet1000``,
        ``imagenette`` or ``folder``.
      crop_fraction: TF-slim's central crop before the resize (0.875).
      uint8: uint8 pixels (for integer-only models) instead of float32 in [-1, 1].
      on_corrupt: ``"error"`` or ``"skip"`` for undecodable files.
      shard: ``(index, count)``: every ``count``-th image from ``index``.
      tfds_data_dir, manual_dir: for tfds sources.

    Returns:
      An :class:`EvalInput`: ``make()`` gives a fresh iterator of batches ``{"image", "label",
      "mask", "skipped"}``; ``num_examples`` and ``num_batches`` say how many.
    """
    from qfsep_jax.data import pipeline, preprocess, sources

    if source.startswith("folder:") and not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory not found: {os.path.abspath(data_dir)!r} (the data_dir argument, "
            "--config.data_dir in a job); point it at the project's data (../shared/data)"
        )
    src = sources.make_source(
        source,
        data_dir,
        label_space=label_space,
        tfds_data_dir=tfds_data_dir,
        manual_dir=manual_dir,
    )
    fn = preprocess.eval_preprocess_uint8 if uint8 else preprocess.eval_preprocess
    prep = functools.partial(fn, image_size=image_size, crop_fraction=crop_fraction)
    n = pipeline.expected_count(src.num_examples, shard, limit)
    make = functools.partial(
        pipeline.batches, src, prep, batch_size, limit=limit, on_corrupt=on_corrupt, shard=shard
    )
    return EvalInput(make, n, pipeline.num_batches(n, batch_size), src.name)


def load_images(
    source: str = "folder:imagenet_val500",
    data_dir: str = DEFAULT_DATA_DIR,
    image_size: int = 224,
    limit: int | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a source as NumPy arrays, in the source's fixed order.

    ``images`` is float32 ``[N, image_size, image_size, 3]`` scaled to [-1, 1] (uint8 with
    ``uint8=True``), ``labels`` int32 ``[N]`` in the label space. Further keyword arguments are
    those of :func:`eval_batches`. All images are held in memory: use ``limit`` or
    :func:`eval_batches` for large sources.
    """
    data = eval_batches(source, data_dir, image_size, limit=limit, **kwargs)
    images, labels = [], []
    for batch in data.make():
        valid = batch["mask"] > 0
        images.append(batch["image"][valid])
        labels.append(batch["label"][valid].astype(np.int32))
    if not images:
        raise ValueError(f"{source}: no images")
    return np.concatenate(images), np.concatenate(labels)


def eval_input(
    config,
    spec: str,
    limit: int | None = None,
    uint8: bool = False,
    batch_size: int | None = None,
    image_size: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> EvalInput:
    """Padded eval batches of ``spec`` under the config's data fields (see :func:`eval_batches`).

    Reads ``config.data_dir``, ``label_space``, ``image_size``, ``crop_fraction``,
    ``eval_batch_size``, ``on_corrupt`` and, for tfds sources, ``tfds_data_dir``/``manual_dir``.
    ``uint8=True`` yields uint8 pixels (integer-only models) instead of [-1, 1] floats.
    """
    return eval_batches(
        spec,
        config.data_dir,
        image_size or config.image_size,
        batch_size or config.eval_batch_size,
        limit,
        label_space=config.label_space,
        crop_fraction=config.crop_fraction,
        uint8=uint8,
        on_corrupt=config.on_corrupt,
        shard=shard,
        tfds_data_dir=config.get("tfds_data_dir") or None,
        manual_dir=config.get("manual_dir") or None,
    )
