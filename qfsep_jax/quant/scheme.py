"""Quantization schemes: which integer ranges weights and activations use, and weight ranges.

* ``tf8``: the paper's (and TFLite's legacy) scheme: uint8, asymmetric, per-tensor weights and
  activations. ``per_channel_weights=True`` gives asymmetric uint8 per-channel weights.
* ``int8``: TFLite's current scheme: symmetric narrow-range int8 weights ([-127, 127]), per-channel
  by default, and asymmetric int8 activations.

Bit widths (``weight_bits``, ``act_bits``, 2 to 8) narrow these ranges inside the same storage
type: ``b``-bit ``tf8`` codes lie in ``[0, 2**b - 1]``, ``b``-bit ``int8`` activations in
``[-2**(b-1), 2**(b-1) - 1]`` and weights in ``[-(2**(b-1) - 1), 2**(b-1) - 1]``; 8 bits are
exactly ``UINT8``, ``INT8`` and ``INT8_NARROW``. ``layer_bits`` overrides them per layer by
TF-slim name pattern (``"Conv2d_0"``, ``"Conv2d_*_depthwise"``, ``"Logits"``; ``"input"`` is the
input quantizer).
"""

from __future__ import annotations

import dataclasses
import fnmatch

import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.numerics import IntRange, int_range_for_bits

SCHEMES = ("tf8", "int8")
OBSERVERS = ("minmax", "ema", "percentile")
MIN_BITS, MAX_BITS = 2, 8
INPUT_NAME = "input"  # the name the input quantizer's bits are resolved under
# Named ``layer_bits`` values: the usual "first and last layer at 8 bits" (the image input, the
# stem conv and the classifier, weights and outputs).
LAYER_BITS_PRESETS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "first_last_8": ((INPUT_NAME, 8, 8), ("Conv2d_0", 8, 8), ("Logits", 8, 8)),
}


def _check_bits(name: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise TypeError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be in [{MIN_BITS}, {MAX_BITS}] (codes are stored in uint8/int8), "
            f"got {bits}"
        )
    return int(bits)


def normalize_layer_bits(layer_bits) -> tuple[tuple[str, int, int], ...]:
    """``layer_bits`` as a hashable tuple of ``(pattern, weight_bits, act_bits)`` triples.

    Accepts a preset name of :data:`LAYER_BITS_PRESETS`, or any sequence of 3-sequences (JSON
    gives lists); validates every entry. Raises ValueError/TypeError naming the bad entry.
    """
    if isinstance(layer_bits, str):
        if layer_bits not in LAYER_BITS_PRESETS:
            raise ValueError(
                f"unknown layer_bits preset {layer_bits!r}; choose from "
                f"{sorted(LAYER_BITS_PRESETS)} or give (pattern, weight_bits, act_bits) triples"
            )
        return LAYER_BITS_PRESETS[layer_bits]
    out = []
    for entry in layer_bits:
        if isinstance(entry, str) or len(entry) != 3:
            raise ValueError(
                f"layer_bits entries are (pattern, weight_bits, act_bits), got {entry!r}"
            )
        pattern, w_bits, a_bits = entry
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"layer_bits pattern must be a non-empty str, got {pattern!r}")
        out.append(
            (
                pattern,
                _check_bits(f"weight_bits of layer_bits {pattern!r}", w_bits),
                _check_bits(f"act_bits of layer_bits {pattern!r}", a_bits),
            )
        )
    return tuple(out)


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
      weight_bits, act_bits: bit widths (2 to 8) of weights and activations; codes below 8
        bits use part of the uint8/int8 range (see the module docstring).
      layer_bits: per-layer overrides ``(pattern, weight_bits, act_bits)``: an
        :func:`fnmatch.fnmatchcase` pattern on the TF-slim layer name (``"input"`` for the input
        quantizer); the first match wins. A preset name of :data:`LAYER_BITS_PRESETS` works too:
        ``QuantConfig(weight_bits=4, act_bits=4, layer_bits="first_last_8")``. A layer's
        ``act_bits`` are those of its output; the pooled tensor keeps the last conv's.
    """

    scheme: str = "tf8"
    per_channel_weights: bool = False
    observer: str = "minmax"
    ema_decay: float = 0.99
    percentile: float = 99.99
    dynamic_activation_ranges: bool = False
    weight_bits: int = 8
    act_bits: int = 8
    layer_bits: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose from {SCHEMES}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown range observer {self.observer!r}; choose from {OBSERVERS}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        # Frozen: normalized values are set through object.__setattr__ (hashable, JSON lists ok).
        object.__setattr__(self, "weight_bits", _check_bits("weight_bits", self.weight_bits))
        object.__setattr__(self, "act_bits", _check_bits("act_bits", self.act_bits))
        object.__setattr__(self, "layer_bits", normalize_layer_bits(self.layer_bits))

    def bits_for(self, name: str) -> tuple[int, int]:
        """``(weight_bits, act_bits)`` of the layer with TF-slim name ``name``."""
        for pattern, w_bits, a_bits in self.layer_bits:
            if fnmatch.fnmatchcase(name, pattern):
                return w_bits, a_bits
        return self.weight_bits, self.act_bits

    def for_layer(self, name: str) -> QuantConfig:
        """The config of one layer: its bits resolved, no overrides left (idempotent)."""
        w_bits, a_bits = self.bits_for(name)
        return dataclasses.replace(self, weight_bits=w_bits, act_bits=a_bits, layer_bits=())

    @property
    def act_int_range(self) -> IntRange:
        """The activation codes' range at ``act_bits`` (``UINT8``/``INT8`` at 8 bits)."""
        return int_range_for_bits(self.act_bits, signed=self.scheme == "int8")

    @property
    def weight_int_range(self) -> IntRange:
        """The weight codes' range at ``weight_bits`` (``UINT8``/``INT8_NARROW`` at 8 bits)."""
        int8 = self.scheme == "int8"
        return int_range_for_bits(self.weight_bits, signed=int8, narrow=int8)

    @property
    def symmetric_weights(self) -> bool:
        return self.scheme == "int8"


def layer_act_range(int_range: IntRange | QuantConfig, name: str) -> IntRange:
    """The output code range of layer ``name``: ``int_range`` itself, or from a config's bits."""
    if isinstance(int_range, QuantConfig):
        return int_range.for_layer(name).act_int_range
    return int_range


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
