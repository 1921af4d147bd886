"""Integer-only inference in ``jax.lax``, bit-exact with TensorFlow Lite's quantized kernels.

Public API:

* :class:`IntModel`, :class:`IntLayer`: the integer model (a pytree; see :mod:`.model`);
* :func:`from_quantized`, :func:`from_variables`: convert this project's quantized MobileNetV1
  (PTQ :class:`~qfsep_jax.ptq.QuantizedModel` or QAT variables);
* :func:`from_tflite`: import an official uint8 (or int8) MobileNetV1-family ``.tflite`` model,
  optionally with a separate head file; :func:`to_tflite`: write an integer model as a
  ``.tflite`` file that LiteRT runs bit-exactly (:class:`TFLiteExportError` if it cannot);
* :func:`run`: the jitted integer-only forward pass (input codes → logit codes, optionally every
  layer's codes; ``fine_logits=True``: int32 logits on the grid ``S_out / 2**FINE_LOGIT_BITS``,
  whose argmax 8-bit ties do not decide);
* :func:`quantize_input`, :func:`dequantize_logits`, :func:`dequantize_fine_logits`,
  :func:`fine_logit_scale`, :func:`dequantize_intermediates`, :func:`output_qparams`,
  :func:`logits_fn`: the float boundaries;
* :data:`ROUNDING_PRESETS`, :class:`Rounding`: the requantization rounding rules;
* :func:`snap_biases` (the simulation with int32-grid biases), :func:`with_rounding_offsets`
  (the simulation with the integer model's requantization rounding, :func:`rounding_offsets`;
  in float64 also its 31-bit multipliers, :func:`multiplier_ratios`),
  :func:`float_variables` (the same network in float, for benchmarks); :mod:`.compare`
  (integer pass vs simulation), :mod:`.reference` (LiteRT runner), :mod:`.synthetic` (test
  models).
"""

from qfsep_jax.intpass.kernels import ROUNDINGS
from qfsep_jax.intpass.model import (
    FINE_LOGIT_BITS,
    POOL_NAME,
    ROUNDING_PRESETS,
    IntLayer,
    IntModel,
    Rounding,
    dequantize_codes,
    dequantize_fine_logits,
    dequantize_intermediates,
    dequantize_logits,
    fine_logit_scale,
    float_variables,
    forward,
    from_quantized,
    from_variables,
    logits_fn,
    multiplier_ratios,
    output_qparams,
    parse_rounding,
    quantize_input,
    rounding_offsets,
    run,
    snap_biases,
    with_rounding_offsets,
)
from qfsep_jax.intpass.tflite_export import TFLiteExportError, to_tflite
from qfsep_jax.intpass.tflite_import import TFLiteImportError, from_tflite

__all__ = [
    "FINE_LOGIT_BITS",
    "POOL_NAME",
    "ROUNDINGS",
    "ROUNDING_PRESETS",
    "IntLayer",
    "IntModel",
    "Rounding",
    "TFLiteExportError",
    "TFLiteImportError",
    "dequantize_codes",
    "dequantize_fine_logits",
    "dequantize_intermediates",
    "dequantize_logits",
    "fine_logit_scale",
    "float_variables",
    "forward",
    "from_quantized",
    "from_tflite",
    "from_variables",
    "logits_fn",
    "multiplier_ratios",
    "output_qparams",
    "parse_rounding",
    "quantize_input",
    "rounding_offsets",
    "run",
    "snap_biases",
    "to_tflite",
    "with_rounding_offsets",
]
