"""Quantization: integer arithmetic, the fake-quant primitive, schemes, observers, BN folding, CLE.

* :mod:`~qfsep_jax.quant.numerics`: the affine mapping, rounding, exact scales, range checks;
* :mod:`~qfsep_jax.quant.fake_quant`: the one straight-through fake-quant primitive;
* :mod:`~qfsep_jax.quant.scheme`: :class:`QuantConfig` (TF8 / int8) and weight ranges;
* :mod:`~qfsep_jax.quant.observers`: activation range calibration (min/max, EMA, percentile);
* :mod:`~qfsep_jax.quant.fold`: BN folding and the paper's zero-variance fix;
* :mod:`~qfsep_jax.quant.cle`: cross-layer equalization (Nagel et al. 2019).
"""

from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.numerics import (
    INT8,
    INT8_NARROW,
    UINT8,
    IntRange,
    check_all_ranges,
    check_range,
    dequantize,
    qparams,
    quantize,
    round_half_away_from_zero,
)
from qfsep_jax.quant.scheme import QuantConfig, fake_quant_weights, weight_range

__all__ = [
    "INT8",
    "INT8_NARROW",
    "UINT8",
    "IntRange",
    "QuantConfig",
    "check_all_ranges",
    "check_range",
    "dequantize",
    "fake_quant",
    "fake_quant_weights",
    "qparams",
    "quantize",
    "round_half_away_from_zero",
    "weight_range",
]
