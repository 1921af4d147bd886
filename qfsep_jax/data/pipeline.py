"""Batched numpy iterators over sources: decoding with named errors, padding and masking."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from qfsep_jax.data.sources import Source
from qfsep_jax.data.specs import CORRUPT_POLICIES


class CorruptImageError(ValueError):
    """An image file could not be decoded."""


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes → uint8 HWC RGB."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def find_corrupt_file(filenames) -> tuple[str, str] | None:
    """The first of ``filenames`` that does not decode, with the decoder's message."""
    for name in filenames:
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            decode_image(tf.io.read_file(name))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
            return name, err.message.splitlines()[0]
    return None


def batches(
    source: Source,
    preprocess: Callable[[tf.Tensor], tf.Tensor],
    batch_size: int,
    *,
    limit: int | None = None,
    on_corrupt: str = "error",
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches ``{"image", "label", "mask"}``, each image exactly once.

    The last batch is padded to ``batch_size`` with ``mask`` 0, so one compiled step serves all.
    ``shard=(index, count)`` reads every ``count``-th example (one process's part). A corrupt
    image raises :class:`CorruptImageError` naming the file (``on_corrupt="error"``) or is
    skipped and counted (``"skip"``; the count is in the ``skipped`` attribute of the returned
    iterator's last batch as ``batch["skipped"]``).
    """
    if on_corrupt not in CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt must be one of {CORRUPT_POLICIES}, got {on_corrupt!r}")
    ds = source.dataset
    index, count = shard
    if count > 1:
        ds = ds.shard(count, index)
    if limit is not None:
        ds = ds.take(limit)
    ds = ds.map(
        lambda ex: {
            "image": preprocess(decode_image(ex["image_bytes"])),
            "label": tf.cast(ex["label"], tf.int32),
            "filename": ex["filename"],
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if on_corrupt == "skip":
        ds = ds.ignore_errors()
    ds = ds.batch(batch_size).prefetch(2)
    expected = expected_count(source.num_examples, shard, limit)
    seen = 0
    iterator = iter(ds)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        except tf.errors.InvalidArgumentError as err:
            _raise_corrupt(source, shard, limit, err)
        out = {k: v.numpy() for k, v in batch.items() if k != "filename"}
        n = out["label"].shape[0]
        seen += n
        out["mask"] = np.ones((batch_size,), np.float32)
        if n < batch_size:
            out["mask"][n:] = 0.0
            pad = batch_size - n
            out = {
                k: (
                    v
                    if k == "mask"
                    else np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                )
                for k, v in out.items()
            }
        out["skipped"] = np.int64(expected - seen) if on_corrupt == "skip" else np.int64(0)
        yield out


def expected_count(num_examples: int, shard: tuple[int, int], limit: int | None) -> int:
    index, count = shard
    n = len(range(index, num_examples, count))
    return n if limit is None else min(n, limit)


def _raise_corrupt(source: Source, shard, limit, err) -> None:
    index, count = shard
    ds = source.dataset.shard(count, index) if count > 1 else source.dataset
    if limit is not None:
        ds = ds.take(limit)
    names = [f.numpy() for f in ds.map(lambda ex: ex["filename"])]
    found = find_corrupt_file(names)
    if found is not None:
        raise CorruptImageError(
            f"corrupt image file {found[0]}: {found[1]} (set on_corrupt='skip' to skip such files)"
        ) from None
    raise CorruptImageError(f"could not decode an image of {source.name}: {err.message}") from err


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches needed to cover ``num_examples`` once."""
    return -(-num_examples // batch_size)
