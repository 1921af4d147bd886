"""Top-1/top-5 evaluation over padded, masked batches, with a progress bar."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax import progress as progress_lib

log = logging.getLogger(__name__)


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Masked counts of top-1 and top-5 hits in a batch (pure; usable in jit/pmap)."""
    top5 = jax.lax.top_k(logits, 5)[1]
    hit1 = (top5[:, 0] == labels).astype(jnp.float32)
    hit5 = jnp.any(top5 == labels[:, None], axis=1).astype(jnp.float32)
    return {"top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask), "n": jnp.sum(mask)}


def evaluate(
    logits_fn: Callable[[np.ndarray], jax.Array],
    batches: Iterable[dict[str, np.ndarray]],
    total: int | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, float]:
    """Runs ``logits_fn`` (jitted by the caller) over masked batches; returns top1/top5 in % and n.

    ``total`` is the number of batches, for the progress bar; ``progress=False`` hides it.
    """
    sums = {"top1": 0.0, "top5": 0.0, "n": 0.0}
    start = time.perf_counter()
    skipped = 0
    for batch in progress_lib.bar(batches, progress, total=total, desc=desc, unit="batch"):
        logits = logits_fn(batch["image"])
        counts = topk_correct(logits, jnp.asarray(batch["label"]), jnp.asarray(batch["mask"]))
        for k, v in counts.items():
            sums[k] += float(v)
        skipped = int(batch.get("skipped", 0))
    seconds = time.perf_counter() - start
    n = int(sums["n"])
    if n == 0:
        raise ValueError(f"{desc}: no images were evaluated")
    log.info("%s: %d images in %.1fs (%.1f images/s)", desc, n, seconds, n / seconds)
    result = {"top1": 100.0 * sums["top1"] / n, "top5": 100.0 * sums["top5"] / n, "n": n}
    if skipped:
        result["skipped_corrupt"] = skipped
    return result
