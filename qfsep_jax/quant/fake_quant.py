"""The one fake-quantization primitive, with a straight-through gradient.

Everything that simulates integer arithmetic in this project (weights and activations of both
block types, PTQ simulation, QAT) goes through :func:`fake_quant`; its arithmetic (the affine
mapping, rounding half away from zero, exact scales) is :mod:`qfsep_jax.quant.numerics`.

Gradients follow TF's ``FakeQuantWithMinMaxVarsGradient``: the input gradient passes where the
input lies inside the nudged range and is zero outside; the gradient of ``x_min`` (``x_max``)
collects the upstream gradient of the inputs clipped below (above) the range.

Degenerate inputs have defined behaviour:
* a range that does not contain 0 is widened to contain it (``[2, 5]`` acts as ``[0, 5]``);
* an empty range (``x_min == x_max == 0``, e.g. an all-zero tensor) quantizes every value to 0
  with scale 1;
* NaN inputs stay NaN in the output (so a training NaN guard sees them) and get zero gradient;
* a non-finite or inverted range is rejected by :func:`~qfsep_jax.quant.numerics.check_range`,
  which every producer of ranges (calibration, import, QAT export) and the activation quantizer
  outside ``jit`` call; under ``jit`` the primitive cannot raise, and a non-finite range (NaN,
  or the ``+inf``/``-inf`` of a never-calibrated observer) yields NaN outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qfsep_jax.quant.numerics import (
    UINT8,
    IntRange,
    dequantize,
    qparams,
    round_half_away_from_zero,
)

Array = jax.Array


def _broadcast_channel(v: Array, ndim: int, axis: int | None) -> Array:
    if axis is None:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.reshape(v, shape)


def _fq_forward(x, x_min, x_max, qmin, qmax, axis, out_dtype):
    int_range = IntRange(qmin, qmax)
    scale, zp = qparams(x_min, x_max, int_range)
    scale = _broadcast_channel(scale, x.ndim, axis)
    zp = _broadcast_channel(zp, x.ndim, axis).astype(jnp.float32)
    q = jnp.clip(round_half_away_from_zero(x / scale) + zp, qmin, qmax)
    out_dtype = out_dtype or x.dtype
    # float32, or float64 where asked for: there scale * code is exact (24 + 8 bits).
    out = dequantize(q, scale, zp, jnp.promote_types(out_dtype, jnp.float32)).astype(out_dtype)
    nudged_min = scale * (qmin - zp)
    nudged_max = scale * (qmax - zp)
    return out, (x, nudged_min, nudged_max)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fake_quant(x, x_min, x_max, qmin, qmax, axis, out_dtype):
    return _fq_forward(x, x_min, x_max, qmin, qmax, axis, out_dtype)[0]


def _fq_fwd(x, x_min, x_max, qmin, qmax, axis, out_dtype):
    out, res = _fq_forward(x, x_min, x_max, qmin, qmax, axis, out_dtype)
    return out, (res, jnp.shape(x_min), jnp.shape(x_max))


def _fq_bwd(qmin, qmax, axis, out_dtype, residuals, g):
    (x, nudged_min, nudged_max), min_shape, max_shape = residuals
    below = x < nudged_min
    above = x > nudged_max
    inside = jnp.logical_not(below | above) & ~jnp.isnan(x)
    dx = jnp.where(inside, g, jnp.zeros_like(g)).astype(x.dtype)
    reduce_axes = tuple(a for a in range(x.ndim) if axis is None or a != axis % x.ndim)
    d_min = jnp.sum(jnp.where(below, g, 0.0), axis=reduce_axes).astype(jnp.float32)
    d_max = jnp.sum(jnp.where(above, g, 0.0), axis=reduce_axes).astype(jnp.float32)
    return dx, jnp.reshape(d_min, min_shape), jnp.reshape(d_max, max_shape)


_fake_quant.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(
    x: Array,
    x_min: Array,
    x_max: Array,
    int_range: IntRange = UINT8,
    axis: int | None = None,
    out_dtype: jax.typing.DTypeLike | None = None,
) -> Array:
    """Quantize ``x`` to the integer grid of ``[x_min, x_max]`` and dequantize it again.

    Args:
      x: the tensor to fake-quantize.
      x_min, x_max: the range; scalars for per-tensor, vectors of length ``x.shape[axis]`` for
        per-channel quantization along ``axis``.
      int_range: the integer code range (``UINT8``, ``INT8``, ``INT8_NARROW``, or a narrower
        range of fewer bits, :func:`~qfsep_jax.quant.numerics.int_range_for_bits`).
      axis: the channel axis for per-channel ranges, ``None`` for per-tensor.
      out_dtype: the dtype the codes are dequantized in (default ``x.dtype``); the codes are
        rounded from ``x`` in its own dtype either way.

    Returns:
      ``x`` rounded to the grid, same shape, dtype ``out_dtype``. Gradients are straight-through
      inside the range (see the module docstring).
    """
    x_min = jnp.asarray(x_min, jnp.float32)
    x_max = jnp.asarray(x_max, jnp.float32)
    if axis is None and (x_min.ndim or x_max.ndim):
        raise ValueError("per-tensor fake_quant takes scalar x_min/x_max; pass axis= for vectors")
    if axis is not None:
        n = x.shape[axis]
        if x_min.shape != (n,) or x_max.shape != (n,):
            raise ValueError(
                f"per-channel fake_quant along axis {axis} needs x_min/x_max of shape ({n},), "
                f"got {x_min.shape} and {x_max.shape}"
            )
        axis = axis % x.ndim
    out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
    return _fake_quant(x, x_min, x_max, int_range.qmin, int_range.qmax, axis, out_dtype)
