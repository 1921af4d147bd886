"""The jitted integer-only forward pass and the float boundaries around it.

:func:`run` maps input codes (uint8 or int8 images) to logit codes using only integer ops (see
:mod:`qfsep_jax.integer.kernels`), or to int32 *fine logits* (the classifier's accumulators on
the grid ``S_out / 2**FINE_LOGIT_BITS``, for an argmax that 8-bit ties do not decide);
:func:`quantize_input`, :func:`dequantize_logits`, :func:`dequantize_fine_logits` and
:func:`dequantize_intermediates` are the float boundaries around it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.integer import kernels
from qfsep_jax.integer.types import IntLayer, IntModel, Rounding
from qfsep_jax.quant.numerics import IntRange, dequantize, quantize, round_half_away_from_zero

Array = jax.Array


def layer_accumulate(layer: IntLayer, x: Array, rounding: Rounding) -> tuple[Array, str]:
    """A conv/depthwise layer's int32 accumulators on codes ``x``, and its requantization rule."""
    args = (x, layer.input_zero_point, layer.weight, layer.weight_zero_point, layer.bias)
    if layer.kind == "conv":
        return kernels.conv_accumulate(*args, layer.stride, layer.padding), rounding.conv
    if layer.kind == "depthwise":
        acc = kernels.depthwise_accumulate(*args, layer.stride, layer.padding)
        return kernels.fusion_barrier(acc, layer.multiplier), rounding.depthwise
    raise ValueError(f"layer {layer.name}: unknown kind {layer.kind!r}")


def apply_layer(layer: IntLayer, x: Array, rounding: Rounding) -> Array:
    """One integer layer on codes ``x`` (NHWC, storage dtype); integer ops only."""
    if layer.kind == "avgpool":
        return kernels.average_pool(
            x, layer.window, layer.stride, layer.padding, layer.act_min, layer.act_max
        )
    acc, rule = layer_accumulate(layer, x, rounding)
    return _requantize_codes(layer, acc, x.dtype, rule)


def _requantize_codes(layer: IntLayer, acc: Array, dtype, rule: str) -> Array:
    return kernels.requantize(
        acc,
        layer.multiplier,
        layer.shift,
        layer.output_zero_point,
        layer.act_min,
        layer.act_max,
        dtype,
        rule,
    )


# The fine logits' grid: the classifier's output scale / 2**FINE_LOGIT_BITS (see :func:`run`).
FINE_LOGIT_BITS = 16


def fine_logits_from_accumulators(layer: IntLayer, acc: Array) -> Array:
    """The classifier's int32 accumulators → fine logits (see :func:`run`); integer ops only.

    ``round(acc * M * 2**FINE_LOGIT_BITS)`` with the layer's own multiplier ``M`` (one exact
    rounding, :func:`kernels.requantize_fine`). Activation ``none`` clamps the codes only to the
    storage range, which the fine logits drop; a ReLU-type fused activation clamps them to its
    bounds ``(act_min - Z_out) * 2**FINE_LOGIT_BITS`` and ``(act_max - Z_out) * 2**...``.
    """
    lower = upper = None
    if layer.activation != "none":
        lower = (layer.act_min - layer.output_zero_point) << FINE_LOGIT_BITS
        upper = (layer.act_max - layer.output_zero_point) << FINE_LOGIT_BITS
    return kernels.requantize_fine(
        acc, layer.multiplier, layer.shift, FINE_LOGIT_BITS, lower, upper
    )


def _check_fine_logits(int_model: IntModel) -> None:
    last = int_model.layers[-1]
    if last.kind == "avgpool":
        raise ValueError(
            "fine logits need a conv layer (the classifier) last; this model ends "
            f"with {last.name} ({last.kind})"
        )
    if isinstance(last.shift, jax.core.Tracer):
        return  # traced (e.g. make_jaxpr of forward): run() checks concrete models
    shift = np.asarray(last.shift)
    lo, hi = -31 - FINE_LOGIT_BITS, 30 - FINE_LOGIT_BITS
    if np.any((shift < lo) | (shift > hi)):
        raise ValueError(
            f"{last.name}: requantization shifts {shift.min()}..{shift.max()} leave the range "
            f"[{lo}, {hi}] that fine logits ({FINE_LOGIT_BITS} extra bits) can represent"
        )


def forward(
    int_model: IntModel,
    q_images: Array,
    return_intermediates: bool = False,
    fine_logits: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """The un-jitted integer pass (see :func:`run`); useful for ``jax.make_jaxpr``."""
    if fine_logits:
        _check_fine_logits(int_model)
    x = q_images
    intermediates = {}
    fine = None
    last = len(int_model.layers) - 1
    for i, layer in enumerate(int_model.layers):
        if fine_logits and i == last:
            # One accumulation feeds both the 8-bit codes (unchanged) and the fine logits.
            acc, rule = layer_accumulate(layer, x, int_model.rounding)
            fine = fine_logits_from_accumulators(layer, acc)
            x = _requantize_codes(layer, acc, x.dtype, rule)
        else:
            x = apply_layer(layer, x, int_model.rounding)
        intermediates[layer.name] = x
    out = fine if fine_logits else x
    if out.ndim == 4 and out.shape[1:3] == (1, 1):
        out = jnp.reshape(out, (out.shape[0], out.shape[3]))
    return (out, intermediates) if return_intermediates else out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _forward_jit(
    int_model: IntModel, q_images: Array, return_intermediates: bool, fine_logits: bool
):
    out = forward(int_model, q_images, return_intermediates, fine_logits)
    if return_intermediates:  # a list keeps network order (jit sorts dict keys)
        return out[0], [out[1][name] for name in int_model.layer_names]
    return out


def run(
    int_model: IntModel, q_images, return_intermediates: bool = False, fine_logits: bool = False
) -> Array | tuple[Array, dict[str, Array]]:
    """Integer-only, jit-compiled, batched forward pass.

    Args:
      int_model: the integer model.
      q_images: input codes ``[N, H, W, C]`` of the model's storage dtype (uint8 for ``tf8`` and
        TFLite's legacy models, int8 for ``int8``), e.g. from :func:`quantize_input`.
      return_intermediates: also return ``{layer name: output codes}`` (NHWC, storage dtype) for
        every layer in network order (``Conv2d_0``, ``Conv2d_1_depthwise``, ...,
        ``AvgPool_1a``, ``Logits``).
      fine_logits: return int32 *fine logits* instead of the last layer's 8-bit codes. The
        classifier's int32 accumulators (zero-point corrections and int32 bias included: the
        very values its codes are requantized from) are requantized with the layer's own
        fixed-point multiplier times ``2**FINE_LOGIT_BITS``, i.e. onto the one grid
        ``S_out / 2**FINE_LOGIT_BITS`` with zero point 0 (:func:`fine_logit_scale`), with one
        exact 64-bit rounding and no 8-bit clamp (int32 saturation; see
        :func:`fine_logits_from_accumulators`). Integer ops only. With per-channel weights each
        class's accumulator has its own scale ``S_in S_w[c]``; the common grid makes them
        comparable. Where the code is not clamped, ``|fine - 2**FINE_LOGIT_BITS (code -
        Z_out)| <= 2**(FINE_LOGIT_BITS - 1)`` plus the code's first-rounding error. Their argmax
        is the classifier's top-1 at full resolution, whereas 8-bit logit codes often tie (1001
        classes on 256 codes) and ``argmax`` then picks the lowest tied index. The 8-bit codes
        (TFLite's output, on which bit-exactness is checked) do not change; they are
        ``intermediates[<last layer>]``.

    Returns:
      Logit codes ``[N, num_classes]`` (storage dtype; the last layer's output, squeezed when it
      is 1×1) or, with ``fine_logits``, int32 fine logits of that shape; or ``(logits,
      intermediates)``.
    """
    q_images = jnp.asarray(q_images)
    if q_images.dtype != jnp.dtype(int_model.dtype):
        raise ValueError(
            f"integer pass input must be {int_model.dtype} codes, got {q_images.dtype}; "
            "quantize float images with integer.quantize_input"
        )
    if q_images.ndim != 4:
        raise ValueError(f"expected NHWC input codes, got shape {q_images.shape}")
    if fine_logits:
        _check_fine_logits(int_model)
    out = _forward_jit(int_model, q_images, return_intermediates, fine_logits)
    if return_intermediates:
        return out[0], dict(zip(int_model.layer_names, out[1], strict=True))
    return out


def quantize_input(int_model: IntModel, images) -> Array:
    """Float images (as the float model takes them) → the model's input codes."""
    lo, hi = int_model.input_int_range
    q = quantize(
        jnp.asarray(images, jnp.float32),
        jnp.float32(int_model.input_scale),
        jnp.int32(int_model.input_zero_point),
        IntRange(lo, hi),
    )
    return q.astype(int_model.dtype)


def output_qparams(int_model: IntModel) -> dict[str, tuple[float, int]]:
    """``{layer name: (scale, zero point)}`` of every layer's output codes."""
    return {layer.name: (layer.output_scale, layer.output_zero_point) for layer in int_model.layers}


def dequantize_codes(codes, scale: float, zero_point: int, dtype=jnp.float32) -> Array:
    """Codes → ``scale * (q - Z)`` in ``dtype`` (float32; float64, exact, under x64)."""
    return dequantize(jnp.asarray(codes), jnp.float32(scale), jnp.int32(zero_point), dtype)


def dequantize_logits(int_model: IntModel, codes) -> Array:
    """Logit codes → float logits (the last layer's scale and zero point)."""
    last = int_model.layers[-1]
    return dequantize_codes(codes, last.output_scale, last.output_zero_point)


def fine_logit_scale(int_model: IntModel) -> float:
    """The scale of the fine logits (``run(..., fine_logits=True)``; zero point 0)."""
    return float(np.float32(int_model.layers[-1].output_scale) / np.float32(2**FINE_LOGIT_BITS))


def dequantize_fine_logits(int_model: IntModel, fine) -> Array:
    """Fine logits → float logits ``fine_logit_scale * fine``."""
    return jnp.asarray(fine, jnp.float32) * jnp.float32(fine_logit_scale(int_model))


def dequantize_intermediates(
    int_model: IntModel, intermediates: dict, dtype=jnp.float32
) -> dict[str, Array]:
    """``{name: codes}`` from :func:`run` → ``{name: values}`` (float32, or float64 under x64)."""
    params = output_qparams(int_model)
    return {k: dequantize_codes(v, *params[k], dtype) for k, v in intermediates.items()}


def logits_fn(int_model: IntModel, fine: bool = True):
    """A float images → int32 logits function for :func:`qfsep_jax.evaluation.evaluate`.

    Inputs are quantized with the model's input parameters (a separate jitted step), then run
    through the integer pass. By default it returns the fine logits (``run(...,
    fine_logits=True)``): top-k is that of the classifier's integer output at full resolution,
    not of its 8-bit codes, among which ties are common (1001 classes on 256 codes) and
    ``top_k``/``argmax`` would break them towards the lowest class index, i.e. arbitrarily.
    ``fine=False``: the 8-bit logit codes (TFLite's output) as int32.
    """
    quant = jax.jit(functools.partial(quantize_input, int_model))

    def fn(images):
        return run(int_model, quant(images), fine_logits=fine).astype(jnp.int32)

    return fn


def round_codes(values, scale: float, zero_point: int, dtype=jnp.float32) -> np.ndarray:
    """Float values on a quantization grid → their integer codes (int32 numpy).

    Divided and rounded in ``dtype`` (float64 needs x64).
    """
    v = jnp.asarray(values, dtype) / jnp.asarray(np.float32(scale), dtype)
    return np.asarray(round_half_away_from_zero(v) + zero_point).astype(np.int32)
