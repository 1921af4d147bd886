"""Integer quantization arithmetic shared by the simulation and the integer pass.

The affine mapping is TFLite's: ``real = scale * (q - zero_point)`` with ``q`` an integer in
``[qmin, qmax]`` and real 0 exactly representable. Rounding is half away from zero, as TFLite's
quantize kernels and the paper's TF8 scheme round (``std::round``). Every function takes scalars
or per-channel vectors, traced or concrete.
"""

from __future__ import annotations

import dataclasses

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


def int_range_for_bits(bits: int, signed: bool, narrow: bool = False) -> IntRange:
    """The ``bits``-bit code range inside uint8 (``signed=False``) or int8 storage.

    Unsigned: ``[0, 2**bits - 1]``; signed: ``[-2**(bits-1), 2**(bits-1) - 1]``, or with
    ``narrow`` the symmetric ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``. 8 bits give exactly
    ``UINT8``, ``INT8`` and ``INT8_NARROW``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8] (uint8/int8 storage), got {bits!r}")
    if not signed:
        return IntRange(0, 2 ** int(bits) - 1)
    half = 2 ** (int(bits) - 1)
    return IntRange(-half + 1 if narrow else -half, half - 1)


def round_half_away_from_zero(v):
    """sgn(v) * floor(|v| + 0.5): TF's and TFLite's rounding (``std::round``).

    JAX arrays (traced too) are rounded with ``jax.numpy``, anything else with NumPy in its own
    dtype, so host-side conversions round exactly as the jitted simulation does.
    """
    xp = jnp if isinstance(v, jax.Array) else np
    return xp.sign(v) * xp.floor(xp.abs(v) + 0.5)


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

    A non-finite bound (e.g. the ``+inf``/``-inf`` of an observer that never saw data) gives a
    NaN scale, so whatever is quantized with it becomes NaN instead of a plausible 0: under
    ``jit`` nothing can raise, and a NaN guard catches it (:func:`check_range` is the eager
    check).
    """
    x_min = jnp.asarray(x_min, jnp.float32)
    x_max = jnp.asarray(x_max, jnp.float32)
    lo = jnp.minimum(x_min, 0.0)
    hi = jnp.maximum(x_max, 0.0)
    span = hi - lo
    scale = jnp.where(span > 0, divide_exactly(span, int_range.qmax - int_range.qmin), 1.0)
    scale = jnp.where(jnp.isfinite(x_min) & jnp.isfinite(x_max), scale, jnp.nan)
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
    :func:`qfsep_jax.integer.align.rounding_offsets`). ``sign_of`` defaults to ``x`` itself;
    offsets broadcast against ``x`` (per-channel along the last axis). No gradient effect: the
    shift is a constant.
    """
    sign_of = x if sign_of is None else sign_of
    offset = jnp.where(sign_of >= 0, positive, negative).astype(x.dtype)
    return x + offset * jnp.asarray(scale).astype(x.dtype)


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


def check_all_ranges(ranges: dict, path: str = "") -> None:
    """Validates every observer state of a ``quant_ranges`` tree (finite, ordered)."""
    if "min" in ranges and "max" in ranges:
        check_range(path or "quant_ranges", ranges["min"], ranges["max"])
        return
    for key, sub in ranges.items():
        check_all_ranges(sub, f"{path}/{key}" if path else key)
