"""Multi-process start-up: ``jax.distributed.initialize()`` when the config or environment asks.

``config.distributed.mode``:

* ``"off"``: single process.
* ``"on"``: always initialize. Empty ``coordinator_address``/``num_processes``/``process_id``
  let JAX detect them (Cloud TPU pod slices, SLURM, Open MPI, ...).
* ``"auto"`` (default): initialize when the environment names a multi-process job
  (``JAX_COORDINATOR_ADDRESS``, a multi-host TPU slice, ``SLURM_NTASKS`` or
  ``OMPI_COMM_WORLD_SIZE`` above 1).

On CPU the cross-process collectives use gloo. Must run before any JAX computation.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def requested_by_environment(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment describes a job of more than one process."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def maybe_initialize(dist_config) -> bool:
    """Initializes the JAX distributed runtime if ``dist_config`` (or the environment) asks.

    ``dist_config`` has ``mode``, ``coordinator_address``, ``num_processes``, ``process_id``
    (the last three empty/negative to let JAX detect them). Returns whether it initialized.
    Calling it again in an initialized process is a no-op.
    """
    mode = dist_config.mode
    if mode not in MODES:
        raise ValueError(f"distributed.mode must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not requested_by_environment()):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if dist_config.coordinator_address:
        kwargs["coordinator_address"] = dist_config.coordinator_address
    if dist_config.num_processes > 0:
        kwargs["num_processes"] = dist_config.num_processes
    if dist_config.process_id >= 0:
        kwargs["process_id"] = dist_config.process_id
    if dist_config.get("local_device_ids"):
        kwargs["local_device_ids"] = list(dist_config.local_device_ids)
    # Cross-process collectives of the CPU backend (used by the localhost test).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
