"""The one fake-quantization primitive, with a straight-through gradient.

Everything that simulates 8-bit arithmetic in this project (weights and activations of both block
types, PTQ simulation, QAT) goes through :func:`fake_quant`. The affine mapping is TFLite's:
``real = scale * (q - zero_point)`` with ``q`` an integer in ``[qmin, qmax]`` and real 0 exactly
representable. Quantization rounds half away from zero, as TFLite's quantize kernels and the
paper's TF8 scheme do.

Gradients follow TF's ``FakeQuantWithMinMaxVarsGradient``: the input gradient passes where the
input lies inside the nudged range and is zero outside; the gradient of ``x_min`` (``x_max``)
collects the upstream gradient of the inputs clipped below (above) the range.

Degenerate inputs have defined behaviour:
* a range that does not contain 0 is widened to contain it (``[2, 5]`` acts as ``[0, 5]``);
* an empty range (``x_min == x_max == 0``, e.g. an all-zero tensor) quantizes every value to 0
  with scale 1;
* NaN inputs stay NaN in the output (so a training NaN guard sees them) and get zero gradient;
* a non-finite or inverted range is rejected by :func:`check_range`, which every producer of
  ranges (calibration, import, QAT export) calls; under ``jit`` the primitive cannot raise, and a
  NaN range yields NaN outputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class IntRange:
    """The integer storage range of a quantized tensor."""

    qmin: int
    qmax: int

    def __post_init__(self):
        if not self.qmin < self.qmax:
            raise ValueError(f"IntRange needs qmin < qmax, got [{self.qmin}, {self.qmax}]")


UINT8 = IntRange(0, 255)
INT8 = IntRange(-128, 127)
INT8_NARROW = IntRange(-127, 127)


def round_half_away_from_zero(v: Array) -> Array:
    """sgn(v) * floor(|v| + 0.5): TF's and TFLite's rounding (std::round)."""
    return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


def divide_exactly(numerator: Array, denominator: float) -> Array:
    """``numerator / denominator``, correctly rounded in float32 also inside ``jit``.

    XLA:CPU compiles division by a constant into multiplication by the constant's float32
    reciprocal, which for 255 is one ulp off on about 70 % of inputs. A denominator that depends
    on the operand stays a true (IEEE) division, so scales computed in a jitted simulation and
    in an eager conversion to the integer model are the same float32 number.
    """
    numerator = jnp.asarray(numerator, jnp.float32)
    return numerator / (jnp.float32(denominator) + 0.0 * numerator)


def qparams(x_min: Array, x_max: Array, int_range: IntRange) -> tuple[Array, Array]:
    """Scale and integer zero point of the affine mapping for the range ``[x_min, x_max]``.

    The range is first widened to contain 0; the zero point is rounded (half away from zero) and
    clamped to the storage range, which nudges the range so that 0 is exact. Works on scalars or
    per-channel vectors, traced or concrete. Returns ``(scale float32, zero_point int32)``.
    """
    lo = jnp.minimum(jnp.asarray(x_min, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(x_max, jnp.float32), 0.0)
    span = hi - lo
    scale = jnp.where(span > 0, divide_exactly(span, int_range.qmax - int_range.qmin), 1.0)
    zp = int_range.qmin - round_half_away_from_zero(lo / scale)
    zp = jnp.clip(zp, int_range.qmin, int_range.qmax)
    return scale.astype(jnp.float32), zp.astype(jnp.int32)


def quantize(x: Array, scale: Array, zero_point: Array, int_range: IntRange) -> Array:
    """Float to integer codes (int32 array): round(x / scale) + zero_point, clamped."""
    q = round_half_away_from_zero(x / scale) + zero_point
    return jnp.clip(q, int_range.qmin, int_range.qmax).astype(jnp.int32)


def dequantize(
    q: Array, scale: Array, zero_point: Array, dtype: jax.typing.DTypeLike = jnp.float32
) -> Array:
    """Integer codes to float: scale * (q - zero_point), in ``dtype`` (float64 needs x64)."""
    return jnp.asarray(scale).astype(dtype) * (q.astype(dtype) - zero_point.astype(dtype))


def move_rounding_threshold(
    x: Array, scale: Array, positive: Array, negative: Array, sign_of: Array | None = None
) -> Array:
    """``x`` moved by ``positive`` LSBs where ``sign_of >= 0`` and ``negative`` LSBs elsewhere.

    Applied before :func:`fake_quant`, this moves its rounding threshold: another integer
    arithmetic's rounding rule written as one rounding (the offsets come from
    :func:`qfsep_jax.intpass.model.rounding_offsets`). ``sign_of`` defaults to ``x`` itself;
    offsets broadcast against ``x`` (per-channel along the last axis). No gradient effect: the
    shift is a constant.
    """
    sign_of = x if sign_of is None else sign_of
    offset = jnp.where(sign_of >= 0, positive, negative).astype(x.dtype)
    return x + offset * jnp.asarray(scale).astype(x.dtype)


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
      int_range: the integer storage range (``UINT8``, ``INT8`` or ``INT8_NARROW``).
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


def check_range(name: str, x_min, x_max) -> None:
    """Raises ValueError unless ``[x_min, x_max]`` is a finite, ordered (possibly empty) range."""
    lo = np.asarray(x_min, np.float64)
    hi = np.asarray(x_max, np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(
            f"range of {name!r} is not finite (min={lo}, max={hi}); it was never calibrated, "
            "or the calibration data produced NaN/inf"
        )
    if np.any(lo > hi):
        raise ValueError(f"range of {name!r} is inverted (min={lo} > max={hi})")
