"""Entry point: ``python launch/main.py --config configs/<x>.py --workdir <dir>``.

The config's ``job`` field picks what runs; the logic lives in the library.
"""

import importlib
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from qfsep_jax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = {
    "table1": "qfsep_jax.jobs.table1:run",
    "train": "qfsep_jax.train:train_and_evaluate",
    "tflite_check": "qfsep_jax.jobs.tflite_check:run",
    "analyze": "qfsep_jax.jobs.analyze:run",
    "export_tflite": "qfsep_jax.jobs.export_tflite:run",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    config = _CONFIG.value
    job = config.get("job")
    if job not in JOBS:
        raise app.UsageError(f"config.job={job!r} is not one of {sorted(JOBS)}")
    module, fn = JOBS[job].split(":")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    runtime.tune_malloc()  # reuse XLA's per-step scratch memory instead of page-faulting it
    logging.info("job %s, workdir %s\n%s", job, _WORKDIR.value, config)
    getattr(importlib.import_module(module), fn)(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
