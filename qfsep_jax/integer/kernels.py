"""Integer-only kernels in ``jax.lax``: fixed-point requantization, convolutions, average pool.

Every function here takes and returns integer arrays (int8/uint8 codes, int32 accumulators, and
uint32 limbs inside the 64-bit emulation); no floating-point op runs in them. The arithmetic is
TensorFlow Lite's (see ``../shared/docs/numerics.md``):

* accumulators are exact int32 sums of ``(q_in - Z_in) * (q_w - Z_w)`` plus the int32 bias;
* the real multiplier ``M = S_in * S_w / S_out`` is stored as ``M0 * 2**shift / 2**31`` with
  ``M0`` an int32 in ``[2**30, 2**31)`` (:func:`quantize_multiplier`, host-side float64 like
  TFLite's ``QuantizeMultiplier``);
* requantization applies ``M`` with one of three rounding rules (:data:`ROUNDINGS`):

  ``"double"``
      gemmlowp's ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2**left, M0),
      right)``: two roundings, the second one with ties away from zero. TFLite's reference
      kernels and its own optimized depthwise kernels (``MultiplyByQuantizedMultiplier`` built
      without ``TFLITE_SINGLE_ROUNDING``).
  ``"ruy"``
      the same first rounding, then a right shift that rounds ties up (towards +inf): what
      ruy's x86 kernels (AVX/AVX2/AVX-512) compute; LiteRT's CONV_2D and FULLY_CONNECTED run
      through ruy, and its optimized int8 depthwise kernel rounds the same way (measured). It
      differs from ``"double"`` only on negative ties of the second rounding.
  ``"single"``
      ``(x * M0 + 2**(30 - shift)) >> (31 - shift)`` in 64 bits: TFLite built with
      ``TFLITE_SINGLE_ROUNDING`` (one rounding, ties up).

64-bit products are emulated exactly with 16-bit limbs in uint32 (no ``jax_enable_x64``).

For speed on XLA:CPU the layers avoid integer grouped convolutions: regular and 1×1 convolutions
are int8×int8→int32 ``dot_general`` calls (uint8 codes become int8 by subtracting 128, and the
zero points are folded in with exact algebra), and the depthwise 3×3 is k·k shifted int32
multiply-adds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qfsep_jax.padding import same_padding

Array = jax.Array

ROUNDINGS = ("double", "ruy", "single")
PADDINGS = ("SAME", "VALID")
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Host-side (numpy, float64) parameter preparation, as TFLite does it when a model is prepared.
# --------------------------------------------------------------------------------------------


def quantize_multiplier(
    real_multiplier: np.ndarray, single_rounding: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's ``QuantizeMultiplier``: ``M ≈ M0 * 2**shift / 2**31`` for every entry of ``M``.

    ``M0 = round(frac * 2**31)`` (half away from zero) with ``frac`` from ``frexp`` in
    ``[0.5, 1)``; ``M0 == 2**31`` renormalizes to ``2**30`` with ``shift + 1``; shifts below -31
    flush to ``(0, 0)``; with ``single_rounding`` shifts above 30 saturate as TFLite does.
    Returns ``(M0 int32, shift int32)`` arrays of the input's shape.
    """
    m = np.asarray(real_multiplier, np.float64)
    if np.any(~np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"requantization multipliers must be finite and >= 0, got {m}")
    frac, exp = np.frexp(m)
    # std::round: half away from zero (np.round would round half to even).
    q = np.sign(frac) * np.floor(np.abs(frac) * 2.0**31 + 0.5)
    q = q.astype(np.int64)
    exp = exp.astype(np.int64)
    carry = q == 2**31
    q = np.where(carry, q // 2, q)
    exp = np.where(carry, exp + 1, exp)
    tiny = exp < -31
    q = np.where(tiny, 0, q)
    exp = np.where(tiny, 0, exp)
    if single_rounding:
        big = exp > 30
        q = np.where(big, 2**31 - 1, q)
        exp = np.where(big, 30, exp)
    zero = m == 0
    q = np.where(zero, 0, q)
    exp = np.where(zero, 0, exp)
    return q.astype(np.int32), exp.astype(np.int32)


def conv_multiplier(
    input_scale: float, weight_scale: np.ndarray, output_scale: float, per_channel: bool
) -> np.ndarray:
    """The real requantization multiplier(s), formed exactly as TFLite forms them.

    Per-tensor (the legacy uint8 path, ``GetQuantizedConvolutionMultipler``): the product
    ``S_in * S_w`` is a float32 product, widened to double, then divided by ``S_out`` in double.
    Per-channel (``PopulateConvolutionQuantizationParams``): ``S_in * S_w[c] / S_out`` in double.
    """
    s_in = np.float32(input_scale)
    s_w = np.asarray(weight_scale, np.float32)
    s_out = np.float64(np.float32(output_scale))
    if per_channel:
        return np.float64(s_in) * s_w.astype(np.float64) / s_out
    return (s_in * s_w).astype(np.float64) / s_out


# The clamps of TFLite's fused activations, ``(lo, hi)`` with ``None`` for an open side.
FUSED_CLAMPS: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None),
    "relu": (0.0, None),
    "relu6": (0.0, 6.0),
    "relu_n1_to_1": (-1.0, 1.0),
}


def activation_range(
    activation: str | tuple[float | None, float | None],
    scale: float,
    zero_point: int,
    qmin: int,
    qmax: int,
) -> tuple[int, int]:
    """TFLite's fused-activation clamp ``[act_min, act_max]`` in codes.

    ``activation`` is a fused activation's name (:data:`FUSED_CLAMPS`) or a clamp ``(lo, hi)``
    (``None`` for an open side). TFLite's rule (``CalculateActivationRangeQuantized``):
    ``[max(qmin, Z + round(lo/S)), min(qmax, Z + round(hi/S))]``, an open side giving
    ``qmin``/``qmax``: ``relu6`` is ``[max(qmin, Z + round(0/S)), min(qmax, Z + round(6/S))]``,
    ``relu`` ``[max(qmin, Z), qmax]``, ``relu_n1_to_1`` the codes of ±1, ``none``
    ``[qmin, qmax]``. The division is float32 and the rounding half away from zero
    (``TfLiteRound``).
    """

    def q(f: float) -> int:
        v = np.float32(f) / np.float32(scale)
        return int(zero_point + int(np.sign(v) * np.floor(np.abs(np.float64(v)) + 0.5)))

    if isinstance(activation, str):
        if activation not in FUSED_CLAMPS:
            raise ValueError(
                f"unsupported fused activation {activation!r}; choose from "
                f"{sorted(FUSED_CLAMPS)} or give a clamp (lo, hi)"
            )
        activation = FUSED_CLAMPS[activation]
    lo, hi = activation
    return (qmin if lo is None else max(qmin, q(lo)), qmax if hi is None else min(qmax, q(hi)))


# --------------------------------------------------------------------------------------------
# Exact 64-bit helpers on int32/uint32 (XLA without x64).
# --------------------------------------------------------------------------------------------


def _u32(x: Array) -> Array:
    return lax.bitcast_convert_type(x, jnp.uint32)


def _i32(x: Array) -> Array:
    return lax.bitcast_convert_type(x, jnp.int32)


def mul_i32_nonneg(a: Array, m: Array) -> tuple[Array, Array]:
    """Exact 64-bit product ``a * m`` of int32 ``a`` and int32 ``m >= 0``.

    Returns ``(hi int32, lo uint32)``: the two's-complement halves of the product. Uses 16-bit
    limbs in uint32, so every partial product is exact.
    """
    neg = a < 0
    ua = _u32(jnp.where(neg, -a, a))  # |INT32_MIN| wraps to 2**31, its correct uint32 value
    um = _u32(m)
    mask = jnp.uint32(0xFFFF)
    a0, a1 = ua & mask, ua >> 16
    m0, m1 = um & mask, um >> 16
    p00, p01, p10, p11 = a0 * m0, a0 * m1, a1 * m0, a1 * m1
    mid = (p00 >> 16) + (p01 & mask) + (p10 & mask)  # < 3 * 2**16: no overflow
    lo = (p00 & mask) | (mid << 16)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    # Two's-complement negation of the 128-bit... 64-bit pair where a < 0.
    lo_n = ~lo + jnp.uint32(1)
    hi_n = ~hi + (lo == 0).astype(jnp.uint32)
    lo = jnp.where(neg, lo_n, lo)
    hi = jnp.where(neg, hi_n, hi)
    return _i32(hi), lo


def _add64(hi: Array, lo: Array, add_hi: Array, add_lo: Array) -> tuple[Array, Array]:
    """(hi, lo) + (add_hi, add_lo) modulo 2**64; hi int32, lo uint32."""
    new_lo = lo + add_lo
    carry = (new_lo < lo).astype(jnp.int32)
    return hi + add_hi + carry, new_lo


def saturating_rounding_doubling_high_mul(a: Array, m: Array) -> Array:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul(a, m)`` for ``m >= 0``.

    Equals ``floor((a * m + 2**30) / 2**31)`` (its nudge-and-truncate form rounds ties up for
    both signs); the saturating case ``a == m == INT32_MIN`` cannot occur with ``m >= 0``.
    Computed with signed 16-bit limbs in int32 (about 20 ops): with ``a = a1·2^16 + a0`` and
    ``m = m1·2^16 + m0`` (``a1`` signed, the rest in ``[0, 2^16)``), ``a·m = H·2^32 + L·2^16 +
    (a0·m0 mod 2^16)`` where ``H = a1·m1 + (a1·m0 >> 16) + (a0·m1 >> 16)`` and
    ``L = (a1·m0 mod 2^16) + (a0·m1 mod 2^16) + (a0·m0 >> 16) < 3·2^16``, so the result is
    ``2H + ((L + 2^14) >> 15)`` (the dropped low bits cannot carry).
    """
    a = jnp.asarray(a, jnp.int32)
    m = jnp.asarray(m, jnp.int32)
    low = jnp.int32(0xFFFF)
    a1, a0 = a >> 16, a & low
    m1, m0 = m >> 16, m & low
    t0 = lax.shift_right_logical(a0 * m0, jnp.int32(16))  # a0*m0 < 2^32: read it unsigned
    t1, t2 = a1 * m0, a0 * m1  # both |.| < 2^31
    high = a1 * m1 + (t1 >> 16) + (t2 >> 16)
    mid = (t1 & low) + (t2 & low) + t0
    return 2 * high + ((mid + (1 << 14)) >> 15)


def rounding_divide_by_pot(x: Array, exponent: Array) -> Array:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2**exponent`` rounded, ties away from zero."""
    mask = (jnp.int32(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(jnp.int32)
    return (x >> exponent) + (remainder > threshold).astype(jnp.int32)


def rounding_shift_right_tie_up(x: Array, exponent: Array) -> Array:
    """``floor(x / 2**exponent + 1/2)`` without overflow (ruy's rounding right shift)."""
    bit = (x >> jnp.maximum(exponent - 1, 0)) & 1
    return (x >> exponent) + jnp.where(exponent > 0, bit, 0)


def multiply_by_quantized_multiplier(
    x: Array, multiplier: Array, shift: Array, rounding: str = "double"
) -> Array:
    """``x * M0 * 2**shift / 2**31`` rounded as ``rounding`` says (see the module docstring).

    ``x`` int32 accumulators; ``multiplier`` (M0) and ``shift`` int32, broadcastable to ``x``
    (per-tensor scalars or per-channel vectors along the last axis).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose from {ROUNDINGS}")
    multiplier = jnp.asarray(multiplier, jnp.int32)
    shift = jnp.asarray(shift, jnp.int32)
    if rounding == "single":
        total = 31 - shift  # in [1, 62]
        _, low_part, high_part, _ = _mul_round_shift64(x, multiplier, total)
        return jnp.where(total < 32, low_part, high_part)
    left = jnp.maximum(shift, 0)
    right = jnp.maximum(-shift, 0)
    y = saturating_rounding_doubling_high_mul(x * (jnp.int32(1) << left), multiplier)
    if rounding == "double":
        return rounding_divide_by_pot(y, right)
    return rounding_shift_right_tie_up(y, right)


def _mul_round_shift64(x: Array, multiplier: Array, total: Array):
    """``(x * M0 + 2**(t-1)) >> t`` in 64-bit, for ``t = total`` in ``[1, 62]`` (ties up).

    Returns ``(hi, low_part, high_part, small)``: the rounded product's high word, the result
    when ``t < 32`` (``low_part``, int32 bits of the shifted value) and when ``t >= 32``
    (``high_part``), and the clipped shift ``small`` used for ``low_part``.
    """
    hi, lo = mul_i32_nonneg(x, multiplier)
    round_hi = jnp.where(total > 32, jnp.int32(1) << jnp.clip(total - 33, 0, 31), 0)
    round_lo = jnp.where(
        total <= 32, _u32(jnp.int32(1) << jnp.clip(total - 1, 0, 31)), jnp.uint32(0)
    )
    hi, lo = _add64(hi, lo, round_hi, round_lo)
    small = jnp.clip(total, 1, 31)
    low_part = _i32((lo >> _u32(small)) | (_u32(hi) << _u32(32 - small)))
    high_part = hi >> jnp.clip(total - 32, 0, 31)
    return hi, low_part, high_part, small


def requantize_fine(
    acc: Array,
    multiplier: Array,
    shift: Array,
    extra_bits: int,
    lower: Array | int | None = None,
    upper: Array | int | None = None,
) -> Array:
    """int32 accumulators → ``round(acc * M * 2**extra_bits)`` in int32, no 8-bit clamp.

    ``M = multiplier * 2**shift / 2**31`` is the layer's own requantization multiplier, so the
    result is the output on the grid ``S_out / 2**extra_bits`` with zero point 0: a
    higher-resolution version of the layer's output codes (used for the logits, whose 8-bit codes
    tie). One exact 64-bit rounding ``(acc * M0 + 2**(t-1)) >> t`` with ``t = 31 - shift -
    extra_bits`` (ties up), saturated to int32; ``t`` must lie in ``[1, 62]``, i.e. ``-31 - e <=
    shift <= 30 - e`` for ``e = extra_bits`` (checked by the callers on the host). Optional
    ``lower``/``upper`` clamp the result (in the same fine units). Integer ops only.
    """
    multiplier = jnp.asarray(multiplier, jnp.int32)
    total = 31 - jnp.asarray(shift, jnp.int32) - jnp.int32(extra_bits)
    hi, low_part, high_part, small = _mul_round_shift64(acc, multiplier, total)
    # For t < 32 the shifted 64-bit value fits int32 iff its bits above 31 are low_part's sign.
    fits = (hi >> small) == (low_part >> 31)
    saturated = jnp.where(hi < 0, jnp.int32(_INT32_MIN), jnp.int32(_INT32_MAX))
    low_part = jnp.where(fits, low_part, saturated)  # (t >= 32: high_part always fits)
    out = jnp.where(total < 32, low_part, high_part)
    if lower is not None or upper is not None:
        out = jnp.clip(out, lower, upper)
    return out


def requantize(
    acc: Array,
    multiplier: Array,
    shift: Array,
    output_zero_point: int,
    act_min: int,
    act_max: int,
    out_dtype,
    rounding: str = "double",
) -> Array:
    """int32 accumulators → output codes: scale, add ``Z_out``, fused clamp, cast."""
    y = multiply_by_quantized_multiplier(acc, multiplier, shift, rounding)
    y = jnp.clip(y + jnp.int32(output_zero_point), act_min, act_max)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------


def storage_offset(dtype) -> int:
    """What to subtract from codes of ``dtype`` to get int8: 128 for uint8, 0 for int8."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 128
    if dtype == np.int8:
        return 0
    raise ValueError(f"integer pass codes must be uint8 or int8, got {dtype}")


def to_int8(q: Array) -> Array:
    """uint8 or int8 codes as int8 ``q - offset`` (exact; uint8 flips the top bit)."""
    if q.dtype == jnp.uint8:
        return lax.bitcast_convert_type(q ^ jnp.uint8(0x80), jnp.int8)
    if q.dtype == jnp.int8:
        return q
    raise ValueError(f"integer pass codes must be uint8 or int8, got {q.dtype}")


def pad_amounts(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(pad before, pad after, output size) along one axis with TFLite's geometry."""
    if padding == "SAME":
        before, after = same_padding(size, kernel, stride)
        return before, after, -(-size // stride)
    if padding == "VALID":
        return 0, 0, (size - kernel) // stride + 1
    raise ValueError(f"unknown padding {padding!r}; choose from {PADDINGS}")


def _taps(xp: Array, kh: int, kw: int, stride: int, out_h: int, out_w: int):
    """The k·k strided windows of a padded NHWC array, in (i, j) row-major order."""
    n, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            yield lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                (1, stride, stride, 1),
            )


def conv_accumulate(
    q_in: Array,
    input_zero_point: int,
    weight: Array,
    weight_zero_point: Array,
    bias: Array,
    stride: int,
    padding: str,
) -> Array:
    """int32 accumulators of a regular conv (HWIO ``weight`` codes) with TFLite's semantics.

    ``acc = Σ (q_in - Z_in)(q_w - Z_w) + bias`` computed as an int8×int8→int32 dot product on
    ``x8 = q_in - o_x`` and ``w8 = q_w - o_w`` (``o = 128`` for uint8, 0 for int8) plus the exact
    corrections ``b·Σx8 + a·Σw8 + n·a·b`` (``a = o_x - Z_in``, ``b = o_w - Z_w``). Padded taps
    hold ``x8 = Z_in - o_x``, i.e. ``q_in = Z_in``: real zero, as TFLite pads.
    """
    kh, kw, cin, cout = weight.shape
    x8 = to_int8(q_in)
    o_x = storage_offset(q_in.dtype)
    o_w = storage_offset(weight.dtype)
    a = o_x - int(input_zero_point)
    _, h, w, _ = x8.shape
    if kh == kw == 1 and stride == 1:
        patches = x8
    else:
        pt, pb, out_h = pad_amounts(h, kh, stride, padding)
        pl, pr, out_w = pad_amounts(w, kw, stride, padding)
        pad_value = jnp.int8(int(input_zero_point) - o_x)
        xp = lax.pad(x8, pad_value, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
        patches = jnp.concatenate(list(_taps(xp, kh, kw, stride, out_h, out_w)), axis=-1)
    w8 = to_int8(weight).reshape(kh * kw * cin, cout)
    acc = lax.dot_general(patches, w8, (((3,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    b = jnp.int32(o_w) - weight_zero_point.astype(jnp.int32)  # (cout,)
    w_sum = jnp.sum(w8.astype(jnp.int32), axis=0)  # (cout,)
    n = kh * kw * cin
    const = bias.astype(jnp.int32) + jnp.int32(a) * w_sum + jnp.int32(n * a) * b
    x_sum = jnp.sum(patches.astype(jnp.int32), axis=-1, keepdims=True)
    return acc + x_sum * b + const


def depthwise_accumulate(
    q_in: Array,
    input_zero_point: int,
    weight: Array,
    weight_zero_point: Array,
    bias: Array,
    stride: int,
    padding: str,
) -> Array:
    """int32 accumulators of a depthwise conv (``weight`` codes of shape ``(kh, kw, C)``).

    k·k shifted int32 multiply-adds of ``(q_in - Z_in)`` (zero-padded: padding is real zero)
    with ``(q_w - Z_w)``, which XLA:CPU fuses into one vectorized loop, plus the bias.
    """
    kh, kw, _ = weight.shape
    x = q_in.astype(jnp.int32) - jnp.int32(input_zero_point)
    _, h, w, _ = x.shape
    pt, pb, out_h = pad_amounts(h, kh, stride, padding)
    pl, pr, out_w = pad_amounts(w, kw, stride, padding)
    xp = lax.pad(x, jnp.int32(0), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    wc = weight.astype(jnp.int32) - weight_zero_point.astype(jnp.int32)
    acc = bias.astype(jnp.int32)
    for t, tap in enumerate(_taps(xp, kh, kw, stride, out_h, out_w)):
        acc = acc + tap * wc[t // kw, t % kw]
    return acc


def fusion_barrier(x: Array, multiplier: Array) -> Array:
    """``x`` unchanged, but materialized: XLA does not fuse across a conditional.

    XLA:CPU otherwise fuses the depthwise k·k tap sum into the requantization loop, which reads
    the accumulator several times and recomputes the taps for each read (measured: the whole
    0.25/128 network about 1.5× slower, its 8-channel depthwise layer 3×). The predicate
    ``multiplier[0] >= 0`` is always true (requantization multipliers are non-negative by
    construction, :func:`quantize_multiplier`) but is runtime data, so XLA cannot fold it; the
    never-taken branch differs (``-x``) only because identical branches are simplified away.
    """
    return lax.cond(multiplier[0] >= 0, lambda v: v, lambda v: -v, x)


def average_pool(
    q_in: Array,
    window: tuple[int, int] | None,
    stride: int,
    padding: str,
    act_min: int,
    act_max: int,
) -> Array:
    """TFLite's integer AVERAGE_POOL_2D (input and output share scale and zero point).

    The int32 sum over the valid taps is divided by their count ``n`` rounding half away from
    zero (``(s + n/2) / n`` for ``s > 0``, ``(s - n/2) / n`` otherwise, C division), then
    clamped. ``window=None`` pools the whole spatial extent (global average pool).
    """
    x = q_in.astype(jnp.int32)
    _, h, w, _ = x.shape
    if window is None:
        window, stride, padding = (h, w), 1, "VALID"
    kh, kw = window
    pt, pb, _ = pad_amounts(h, kh, stride, padding)
    pl, pr, _ = pad_amounts(w, kw, stride, padding)
    pads = ((0, 0), (pt, pb), (pl, pr), (0, 0))
    dims, strides = (1, kh, kw, 1), (1, stride, stride, 1)
    total = lax.reduce_window(x, jnp.int32(0), lax.add, dims, strides, pads)
    ones = np.ones((1, h, w, 1), np.int64)
    count = jnp.asarray(_np_window_sum(ones, kh, kw, stride, pads).astype(np.int32))
    half = count // 2
    rounded = jnp.where(total > 0, lax.div(total + half, count), lax.div(total - half, count))
    return jnp.clip(rounded, act_min, act_max).astype(q_in.dtype)


def _np_window_sum(x: np.ndarray, kh: int, kw: int, stride: int, pads) -> np.ndarray:
    """Host-side window sums (the constant tap counts of a padded pool)."""
    xp = np.pad(x, pads)
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), x.dtype)
    for i in range(kh):
        for j in range(kw):
            out += xp[
                :,
                i : i + (out_h - 1) * stride + 1 : stride,
                j : j + (out_w - 1) * stride + 1 : stride,
            ]
    return out
