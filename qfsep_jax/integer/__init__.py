"""Integer-only inference in ``jax.lax``, bit-exact with TensorFlow Lite's quantized kernels.

* :mod:`~qfsep_jax.integer.types`: :class:`IntModel`, :class:`IntLayer` (a pytree) and the
  requantization rounding rules (:class:`Rounding`, :data:`ROUNDING_PRESETS`);
* :mod:`~qfsep_jax.integer.kernels`: TFLite's integer arithmetic in ``jax.lax``;
* :mod:`~qfsep_jax.integer.inference`: :func:`run`, the jitted integer-only forward pass (input
  codes → logit codes, optionally every layer's codes; ``fine_logits=True``: int32 logits on
  the grid ``S_out / 2**FINE_LOGIT_BITS``), and the float boundaries (:func:`quantize_input`,
  :func:`dequantize_logits`, :func:`logits_fn`, ...);
* :mod:`~qfsep_jax.integer.convert`: :func:`from_quantized` / :func:`from_variables` for this
  project's quantized MobileNetV1 (PTQ or QAT), :func:`float_variables` back to float;
* :mod:`~qfsep_jax.integer.tflite_import`: :func:`from_tflite` for official uint8/int8
  MobileNetV1-family ``.tflite`` files; :mod:`~qfsep_jax.integer.tflite_export`:
  :func:`to_tflite` writes an integer model as a ``.tflite`` file that LiteRT runs bit-exactly
  (:class:`TFLiteExportError` when TFLite cannot express it);
* :mod:`~qfsep_jax.integer.reference`: the LiteRT interpreter as a reference;
* :mod:`~qfsep_jax.integer.align`: the simulation aligned with the integer arithmetic (int32
  biases, TFLite's rounding) for the agreement study.
"""

from qfsep_jax.integer.convert import (
    check_accumulator_range,
    float_variables,
    from_quantized,
    from_variables,
)
from qfsep_jax.integer.inference import (
    FINE_LOGIT_BITS,
    dequantize_codes,
    dequantize_fine_logits,
    dequantize_intermediates,
    dequantize_logits,
    fine_logit_scale,
    forward,
    logits_fn,
    output_qparams,
    quantize_input,
    round_codes,
    run,
)
from qfsep_jax.integer.kernels import ROUNDINGS
from qfsep_jax.integer.tflite_export import TFLiteExportError, to_tflite
from qfsep_jax.integer.tflite_import import TFLiteImportError, from_tflite
from qfsep_jax.integer.types import (
    POOL_NAME,
    ROUNDING_PRESETS,
    IntLayer,
    IntModel,
    Rounding,
    parse_rounding,
)

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
    "check_accumulator_range",
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
    "output_qparams",
    "parse_rounding",
    "quantize_input",
    "round_codes",
    "run",
    "to_tflite",
]
