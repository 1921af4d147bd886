"""Training metrics: clu writers (TensorBoard + console) and ``WORKDIR/metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per logged step (``{"step": ..., "train_loss": ...,
...}``). Each line is appended with a single ``write`` on an ``O_APPEND`` descriptor and fsynced,
so a crash leaves whole lines only (at worst a torn last line, which :func:`read_metrics` drops).
After a resume the steps between the restored checkpoint and the crash are logged again; readers
keep the last record of each step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from clu import metric_writers
from clu.metric_writers import interface

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value if math.isfinite(value) else str(value)


class JsonlWriter(interface.MetricWriter):
    """A clu ``MetricWriter`` that appends each ``write_scalars`` call as one JSON line."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def create_writer(workdir: str, is_main_process: bool) -> interface.MetricWriter:
    """TensorBoard + console + ``metrics.jsonl`` on the main process, console only elsewhere."""
    if not is_main_process:
        return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, asynchronous=False),
            JsonlWriter(os.path.join(workdir, METRICS_FILE)),
        ]
    )


def read_metrics(workdir: str) -> dict[int, dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` by step (the last record of a step wins)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file: {path}")
    records: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn last line of a crashed run
                log.warning("ignoring a torn last line of %s", path)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        records[int(record["step"])] = record
    return dict(sorted(records.items()))
