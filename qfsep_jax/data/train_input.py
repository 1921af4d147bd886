"""Training input: a pure function of (seed, step), sharded per process, prefetched to devices.

The training stream is defined by positions, not by iterator state, so that a run resumed at step
``k`` reads exactly the batches an uninterrupted run reads from step ``k`` on:

* **Random-access sources** (``folder:`` trees, read through tfds's ``ImageFolder``): the global
  stream is ``position p -> example index_shuffle(p mod N; seed, epoch = p div N)``, a stateless
  permutation per epoch. The global batch of step ``s`` is positions ``[s*B, (s+1)*B)``; process
  ``i`` of ``P`` reads only its slice ``[s*B + i*B/P, s*B + (i+1)*B/P)``. The global batch is
  therefore the same whatever the number of processes and devices.
* **Streaming sources** (``tfds:`` datasets, record files without random access): each process
  reads its own even split of the tfds split; each epoch permutes consecutive windows of
  ``shuffle_buffer`` records with a stateless seed derived from ``(seed, process, epoch)``
  (independent of TF's global seed); resuming skips records inside
  the current epoch (it reads, but does not decode, up to one epoch of this process's records).
  The stream depends on the process count.

Augmentation (inception crop + flip) uses a stateless seed derived from ``(seed, position)``.
Corrupt images: ``on_corrupt="error"`` raises :class:`~qfsep_jax.data.pipeline.CorruptImageError`
naming the file; ``"skip"`` drops them and refills the batch by repeating its valid images (so
every step still covers exactly its own positions), counting them in ``batch["skipped"]``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qfsep_jax.data import pipeline, preprocess
from qfsep_jax.data.sources import Source

# How many steps past the failing one are searched for the corrupt file (the parallel pipeline
# may have started later steps).
_CORRUPT_LOOKAHEAD_STEPS = 4


@dataclasses.dataclass(frozen=True)
class TrainStream:
    """What defines the training stream of one process.

    Attributes:
      seed: the run's seed.
      global_batch: images per step over all processes.
      process_index, process_count: this process and how many read the stream.
      image_size: training crop size.
      area_range, aspect_ratio_range: inception crop parameters.
      on_corrupt: ``error`` or ``skip``.
      shuffle_buffer: records per shuffled window of streaming sources.
      num_classes: if set, every label must lie in ``[0, num_classes)``.
    """

    seed: int
    global_batch: int
    process_index: int = 0
    process_count: int = 1
    image_size: int = 224
    area_range: tuple[float, float] = (0.05, 1.0)
    aspect_ratio_range: tuple[float, float] = (0.75, 1.33)
    on_corrupt: str = "error"
    shuffle_buffer: int = 10_000
    num_classes: int | None = None

    def __post_init__(self):
        if self.on_corrupt not in pipeline.CORRUPT_POLICIES:
            raise ValueError(
                f"on_corrupt must be one of {pipeline.CORRUPT_POLICIES}, got {self.on_corrupt!r}"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"bad process {self.process_index} of {self.process_count}")
        if self.global_batch % self.process_count:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by the process count "
                f"{self.process_count}"
            )
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count


def _seed_pair(a, b) -> tf.Tensor:
    return tf.stack([tf.cast(a, tf.int64), tf.cast(b, tf.int64)])


def _raw_stream(source: Source, stream: TrainStream, start_step: int) -> tf.data.Dataset:
    """Undecoded examples ``{image_bytes, label, filename, position, step}`` from ``start_step``.

    ``position`` identifies the example's place in the stream (and seeds its augmentation).
    """
    lb, gb = stream.local_batch, stream.global_batch
    if source.random_access:
        n = source.num_examples
        # A fresh copy: `at` must not share its dataset with another pipeline (see Source).
        base = source.reopen() if source.reopen is not None else source.dataset

        def read(k):
            step, j = k // lb, k % lb
            position = step * gb + stream.process_index * lb + j
            epoch, offset = position // n, position % n
            seed = tf.cast(_seed_pair(stream.seed, epoch), tf.int32)
            index = tf.random.experimental.index_shuffle(offset, seed, tf.constant(n - 1, tf.int64))
            ex = tf.data.experimental.at(base, index)
            return {**ex, "position": position, "step": step}

        return tf.data.Dataset.range(start_step * lb, 2**62).map(
            read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    n = source.num_examples  # this process's split
    start = start_step * lb
    first_epoch = start // n
    base = source.dataset
    buffer = stream.shuffle_buffer
    salt = stream.process_index

    def epoch_ds(epoch):
        # Permute consecutive windows of ``buffer`` records with a stateless op seeded by
        # (seed, process, epoch). ``Dataset.shuffle`` would mix in TF's global seed (and cannot
        # take a traced seed once one is set), which would break exact resumption.
        mix = tf.cast(salt, tf.int64) * 2**32 + epoch
        seed = _seed_pair(stream.seed, mix)

        def permute(window_index, window):
            size = tf.shape(window["label"], out_type=tf.int64)[0]
            order = tf.random.experimental.stateless_shuffle(
                tf.range(size), seed + tf.stack([tf.constant(0, tf.int64), window_index])
            )
            return tf.data.Dataset.from_tensor_slices(
                {k: tf.gather(v, order) for k, v in window.items()}
            )

        ds = base.batch(buffer).enumerate().flat_map(permute)
        return ds.enumerate(start=epoch * n).map(lambda q, ex: {**ex, "local": q})

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_ds).skip(start - first_epoch * n)

    def tag(ex):
        q = ex.pop("local")
        # Unique over processes: interleave the processes' local positions.
        ex["position"] = q * stream.process_count + stream.process_index
        ex["step"] = q // lb
        return ex

    return ds.map(tag)


def _decode_batch(stream: TrainStream, raw: dict) -> tf.data.Dataset:
    """One step's raw examples → a dataset holding one decoded batch (shorter if skipping)."""

    def decode(ex):
        seed = _seed_pair(stream.seed, ex["position"])
        image = preprocess.train_preprocess_encoded(
            ex["image_bytes"],
            stream.image_size,
            seed,
            area_range=stream.area_range,
            aspect_ratio_range=stream.aspect_ratio_range,
        )
        label = tf.cast(ex["label"], tf.int32)
        return {"image": image, "label": label, "step": ex["step"]}

    ds = tf.data.Dataset.from_tensor_slices(raw).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    if stream.on_corrupt == "skip":
        ds = ds.ignore_errors()
    return ds.batch(stream.local_batch)


def train_dataset(source: Source, stream: TrainStream, start_step: int) -> tf.data.Dataset:
    """The tf.data pipeline of this process's batches from ``start_step`` on (endless)."""
    raw = _raw_stream(source, stream, start_step).batch(stream.local_batch)
    ds = raw.interleave(
        lambda r: _decode_batch(stream, r),
        cycle_length=4,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _fill(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Repeats the valid rows of a short batch cyclically up to ``size`` rows."""
    n = batch["label"].shape[0]
    idx = np.arange(size) % n
    return {k: v[idx] for k, v in batch.items()}


def train_batches(
    source: Source, stream: TrainStream, start_step: int, skipped_before: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Host batches ``{"image", "label", "step", "skipped"}`` of this process from ``start_step``.

    ``image`` is float32 ``[local_batch, size, size, 3]`` in [-1, 1]; ``skipped`` is the running
    count of corrupt images skipped by this process (``skipped_before`` carries it over a resume).
    """
    if source.num_examples < 1:
        raise ValueError(f"training source {source.name} is empty")
    iterator = iter(train_dataset(source, stream, start_step))
    skipped = skipped_before
    for expected in itertools.count(start_step):
        try:
            batch = next(iterator)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
            _raise_corrupt(source, stream, expected, err)
        # Read-only views of the tensors' buffers: .numpy() would copy every batch in this one
        # Python thread (tools/bench_input.py, "host handoff").
        batch = {k: np.asarray(v) for k, v in batch.items()}
        step = int(batch["step"][0])
        if step != expected:
            raise pipeline.CorruptImageError(
                f"every image of training step {expected} of {source.name} failed to decode"
            )
        if stream.num_classes is not None:
            bad = (batch["label"] < 0) | (batch["label"] >= stream.num_classes)
            if bad.any():
                raise ValueError(
                    f"training label {batch['label'][bad][0]} of {source.name} at step {step} "
                    f"is outside [0, {stream.num_classes}): check label_space / num_classes"
                )
        n = batch["label"].shape[0]
        if n < stream.local_batch:
            skipped += stream.local_batch - n
            batch = _fill(batch, stream.local_batch)
        batch["step"] = np.int64(step)
        batch["skipped"] = np.int64(skipped)
        yield batch


def _raise_corrupt(source: Source, stream: TrainStream, step: int, err) -> None:
    raw = _raw_stream(source, stream, step).take(_CORRUPT_LOOKAHEAD_STEPS * stream.local_batch)
    names = [ex["filename"] for ex in raw.map(lambda ex: {"filename": ex["filename"]})]
    found = pipeline.find_corrupt_file([n.numpy() for n in names])
    if found is not None:
        raise pipeline.CorruptImageError(
            f"corrupt image file {found[0]} at training step {step}: {found[1]} "
            "(set on_corrupt='skip' to skip such files)"
        ) from None
    raise pipeline.CorruptImageError(
        f"could not decode a training image of {source.name} at step {step}: {err.message}"
    ) from err


def device_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A one-axis mesh over this process's devices, for laying out per-device batch shards."""
    return Mesh(np.asarray(devices), ("batch",))


def shard_batch(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """``[n, ...]`` → ``[num_devices, n // num_devices, ...]`` for every array of a batch."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 0:
            continue
        if v.shape[0] % num_devices:
            raise ValueError(
                f"batch of {v.shape[0]} does not split over {num_devices} devices ({k!r})"
            )
        out[k] = v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:])
    return out


def prefetch_to_devices(
    batches: Iterator[dict[str, np.ndarray]], devices: Sequence[jax.Device], size: int = 2
) -> Iterator[tuple[dict[str, jax.Array], dict[str, np.ndarray]]]:
    """Shards host batches over ``devices`` and keeps ``size`` of them in flight on the devices.

    Yields ``(device_batch, host_scalars)``: the arrays laid out ``[devices, per_device, ...]``
    as ``pmap`` reads them, and the batch's scalar fields (``step``, ``skipped``) on the host.
    """
    sharding = NamedSharding(device_mesh(devices), PartitionSpec("batch"))
    queue: collections.deque = collections.deque()

    def put(batch):
        scalars = {k: v for k, v in batch.items() if np.ndim(v) == 0}
        arrays = shard_batch(batch, len(devices))
        queue.append((jax.device_put(arrays, sharding), scalars))

    for batch in itertools.islice(batches, size):
        put(batch)
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(batches, 1):
            put(batch)
