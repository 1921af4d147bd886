"""Per-epoch training curves from a run's metrics (train loss/accuracy, val top-1).

The training loop logs window means every ``log_every_steps`` and the val top-1 at its
evaluation steps (``metrics.jsonl``, read by :func:`qfsep_jax.metrics_log.read_metrics`);
:func:`per_epoch` turns those rows into one point per epoch, the windows weighted by the steps
they cover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def per_epoch(rows: Iterable[Mapping[str, Any]], steps_per_epoch: int) -> dict[str, list]:
    """``{"epoch", "train_loss", "train_accuracy", "eval_epoch", "eval_top1"}`` lists.

    A training row at step ``s`` covers the steps since the previous row; it counts towards the
    epoch that holds step ``s`` (rows are expected at epoch ends, as an evaluation logs one).
    Rows already per epoch (with an ``epoch`` field, e.g. the PyTorch peer's) pass through.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    rows = sorted(rows, key=lambda r: r["step"])
    sums: dict[int, list[float]] = {}
    evals: dict[int, float] = {}
    prev = 0
    for r in rows:
        epoch = int(r["epoch"]) if "epoch" in r else math.ceil(r["step"] / steps_per_epoch)
        weight = 1.0 if "epoch" in r else float(r["step"] - prev)
        prev = r["step"]
        if "train_loss" in r and weight > 0:
            s = sums.setdefault(epoch, [0.0, 0.0, 0.0])
            s[0] += weight * r["train_loss"]
            s[1] += weight * r.get("train_accuracy", math.nan)
            s[2] += weight
        if "eval_top1" in r:
            evals[epoch] = float(r["eval_top1"])
    epochs = sorted(sums)
    return {
        "epoch": epochs,
        "train_loss": [sums[e][0] / sums[e][2] for e in epochs],
        "train_accuracy": [100.0 * sums[e][1] / sums[e][2] for e in epochs],
        "eval_epoch": sorted(evals),
        "eval_top1": [evals[e] for e in sorted(evals)],
    }
