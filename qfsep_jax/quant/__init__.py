"""Quantization: the fake-quant primitive, schemes, observers, BN folding, equalization."""

from qfsep_jax.quant.fake_quant import (
    INT8,
    INT8_NARROW,
    UINT8,
    IntRange,
    check_range,
    dequantize,
    fake_quant,
    qparams,
    quantize,
)
from qfsep_jax.quant.scheme import QuantConfig, fake_quant_weights, weight_range

__all__ = [
    "INT8",
    "INT8_NARROW",
    "UINT8",
    "IntRange",
    "QuantConfig",
    "check_range",
    "dequantize",
    "fake_quant",
    "fake_quant_weights",
    "qparams",
    "quantize",
    "weight_range",
]
