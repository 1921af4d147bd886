"""Mixed precision for training and QAT: which compute dtype a run uses.

``config.half_precision`` (``configs/train_base.py``) chooses it:

* ``True``: convolutions and activations in bfloat16 (the ``dtype`` of
  :class:`~qfsep_jax.models.mobilenet_v1.MobileNetV1`);
* ``False``: everything in float32;
* ``None`` (the default): bfloat16 where JAX's default backend is a GPU or TPU, float32 on CPU.

Whatever the choice, parameters and optimizer state, BN statistics, the loss, and the
fake-quant ranges, scales and rounding stay float32, so a checkpoint does not depend on the
precision it was trained in: a bfloat16 run is evaluated, post-training quantized and exported
with the float32 model (:func:`qfsep_jax.checkpointing.load_trained`,
:func:`qfsep_jax.quantized.from_qat`). :func:`resolved` writes the choice into the run's
config before it is saved, so ``config.json`` records what ran.
"""

from __future__ import annotations

import copy
import logging

import jax
import ml_collections

log = logging.getLogger(__name__)

HALF_DTYPE = "bfloat16"
# Backends on which ``half_precision=None`` means bfloat16 (jax.default_backend() names).
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_half_precision(value: bool | None, backend: str | None = None) -> bool:
    """``value``, or for ``None`` whether ``backend`` (default: JAX's default) is an accelerator.

    Raises:
      ValueError: ``value`` is neither a bool nor None (e.g. the string ``"yes"``).
    """
    if value is None:
        backend = backend or jax.default_backend()
        return backend in ACCELERATOR_BACKENDS
    if not isinstance(value, bool):
        raise ValueError(
            f"half_precision must be True, False or None (auto: bfloat16 on GPU/TPU), got "
            f"{value!r} of type {type(value).__name__}"
        )
    return value


def compute_dtype(config) -> str | None:
    """The model ``dtype`` for a training config: ``"bfloat16"`` or None (float32)."""
    return HALF_DTYPE if resolve_half_precision(config.get("half_precision")) else None


def resolved(config) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``half_precision`` set to the bool this process uses (logged)."""
    out = copy.deepcopy(config)
    half = resolve_half_precision(config.get("half_precision"))
    with out.unlocked():
        out.half_precision = half
    log.info(
        "precision: %s compute, float32 parameters (half_precision=%r resolved on backend %s)",
        HALF_DTYPE if half else "float32",
        config.get("half_precision"),
        jax.default_backend(),
    )
    return out
