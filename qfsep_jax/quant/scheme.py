"""Quantization schemes: which integer ranges weights and activations use, and weight ranges.

* ``tf8``: the paper's (and TFLite's legacy) scheme: uint8, asymmetric, per-tensor weights and
  activations. ``per_channel_weights=True`` gives asymmetric uint8 per-channel weights.
* ``int8``: TFLite's current scheme: symmetric narrow-range int8 weights ([-127, 127]), per-channel
  by default, and asymmetric int8 activations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.numerics import INT8, INT8_NARROW, UINT8, IntRange

SCHEMES = ("tf8", "int8")
OBSERVERS = ("minmax", "ema", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized. Hashable, so it can be a Flax module attribute.

    Attributes:
      scheme: ``"tf8"`` or ``"int8"`` (see the module docstring).
      per_channel_weights: one weight range per output channel instead of per tensor.
      observer: how activation ranges are calibrated: ``"minmax"`` (running min/max over all
        calibration batches), ``"ema"`` (exponential moving average of per-batch min/max, the QAT
        default) or ``"percentile"`` (mean over batches of the per-batch percentiles).
      ema_decay: decay of the ``ema`` observer.
      percentile: upper percentile of the ``percentile`` observer (the lower is 100 - it).
      dynamic_activation_ranges: quantize each activation with the min/max of that very input
        (per example) instead of calibrated ranges, as TF's 2018 graph-transform pipeline did at
        run time. Simulation only: an integer-only model needs static ranges.
    """

    scheme: str = "tf8"
    per_channel_weights: bool = False
    observer: str = "minmax"
    ema_decay: float = 0.99
    percentile: float = 99.99
    dynamic_activation_ranges: bool = False

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose from {SCHEMES}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown range observer {self.observer!r}; choose from {OBSERVERS}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def act_int_range(self) -> IntRange:
        return UINT8 if self.scheme == "tf8" else INT8

    @property
    def weight_int_range(self) -> IntRange:
        return UINT8 if self.scheme == "tf8" else INT8_NARROW

    @property
    def symmetric_weights(self) -> bool:
        return self.scheme == "int8"


def weight_range(w: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """The (min, max) used to quantize a conv kernel ``w`` (HWIO, output channels last).

    Per-channel ranges reduce over all axes but the last; symmetric schemes use ``±max|w|``.
    """
    axes = tuple(range(w.ndim - 1)) if config.per_channel_weights else None
    lo, hi = jnp.min(w, axis=axes), jnp.max(w, axis=axes)
    if config.symmetric_weights:
        hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        lo = -hi
    return lo, hi


def fake_quant_weights(w: jax.Array, config: QuantConfig) -> jax.Array:
    """Fake-quantizes a kernel with its own min/max range under ``config``.

    The range is taken from the kernel itself (no gradient flows into it, as in TF's
    ``contrib.quantize`` weight quantizers), the rounding through :func:`fake_quant`. The codes
    are always those of the float32 kernel, as the integer model's conversion computes them; a
    float64 simulation gets them dequantized exactly in float64.
    """
    w32 = w.astype(jnp.float32)
    lo, hi = weight_range(jax.lax.stop_gradient(w32), config)
    axis = w.ndim - 1 if config.per_channel_weights else None
    return fake_quant(w32, lo, hi, config.weight_int_range, axis=axis, out_dtype=w.dtype)
