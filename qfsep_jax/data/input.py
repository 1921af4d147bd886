"""Evaluation inputs built from a config: sources, preprocessing and padded batches."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np

from qfsep_jax.data import pipeline, preprocess, sources


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


def eval_input(
    config,
    spec: str,
    limit: int | None = None,
    uint8: bool = False,
    batch_size: int | None = None,
    image_size: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> EvalInput:
    """Padded eval batches of ``spec`` under the config's data fields.

    Reads ``config.data_dir``, ``label_space``, ``image_size``, ``crop_fraction``,
    ``eval_batch_size``, ``on_corrupt`` and, for tfds sources, ``tfds_data_dir``/``manual_dir``.
    ``uint8=True`` yields uint8 pixels (integer-only models) instead of [-1, 1] floats.
    """
    source = sources.make_source(
        spec,
        config.data_dir,
        label_space=config.label_space,
        tfds_data_dir=config.get("tfds_data_dir") or None,
        manual_dir=config.get("manual_dir") or None,
    )
    size = image_size or config.image_size
    fn = preprocess.eval_preprocess_uint8 if uint8 else preprocess.eval_preprocess
    prep = functools.partial(fn, image_size=size, crop_fraction=config.crop_fraction)
    bs = batch_size or config.eval_batch_size
    n = pipeline.expected_count(source.num_examples, shard, limit)
    make = functools.partial(
        pipeline.batches, source, prep, bs, limit=limit, on_corrupt=config.on_corrupt, shard=shard
    )
    return EvalInput(make, n, pipeline.num_batches(n, bs), source.name)
