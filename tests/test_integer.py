"""Integer kernels against int64 numpy references, the float-free jaxpr, the TFLite importer."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TFLITE_MODEL, require
from fixtures.synthetic_tflite import split_tflite

from qfsep_jax import integer
from qfsep_jax.integer import align, kernels

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------
# int64 references, written from the definitions (not from the kernels).
# ------------------------------------------------------------------------------------------


def ref_mbqm(x, m0, shift, rounding):
    x, m0, shift = (np.asarray(v, np.int64) for v in (x, m0, shift))
    if rounding == "single":
        total = 31 - shift
        return (x * m0 + (np.int64(1) << (total - 1))) >> total
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    xl = (x << left).astype(np.int32).astype(np.int64)  # int32 wrap, as C does
    y = (xl * m0 + (1 << 30)) >> 31  # floor((a*b + 2^30) / 2^31)
    half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), 0)
    if rounding == "double":  # ties away from zero
        mag = (np.abs(y) + half) >> right
        return np.sign(y) * mag
    return (y + half) >> right  # ruy: ties up


def _window(x, i, j, oh, ow, stride):
    return x[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride]


def ref_conv(q, zin, w, wzp, bias, stride, padding):
    """Direct conv: Σ (q - Zin)(w - Zw) over a Zin-padded input, + bias (int64)."""
    n, h, wd, _ = q.shape
    kh, kw, _, cout = w.shape
    pt, pb, oh = kernels.pad_amounts(h, kh, stride, padding)
    pl, pr, ow = kernels.pad_amounts(wd, kw, stride, padding)
    x = np.pad(q.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=zin)
    x = x - zin
    wc = w.astype(np.int64) - wzp.astype(np.int64)
    out = np.zeros((n, oh, ow, cout), np.int64) + bias
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride
            ]
            out += np.einsum("nhwc,co->nhwo", patch, wc[i, j])
    return out


def ref_depthwise(q, zin, w, wzp, bias, stride, padding):
    n, h, wd, c = q.shape
    kh, kw, _ = w.shape
    pt, pb, oh = kernels.pad_amounts(h, kh, stride, padding)
    pl, pr, ow = kernels.pad_amounts(wd, kw, stride, padding)
    x = np.pad(q.astype(np.int64) - zin, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    wc = w.astype(np.int64) - wzp.astype(np.int64)
    out = np.zeros((n, oh, ow, c), np.int64) + bias
    for i in range(kh):
        for j in range(kw):
            out += (
                x[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride]
                * wc[i, j]
            )
    return out


# ------------------------------------------------------------------------------------------
# Fixed-point arithmetic.
# ------------------------------------------------------------------------------------------


def test_quantize_multiplier_matches_definition():
    m = np.concatenate([RNG.uniform(1e-6, 2.0, 500), [0.5, 0.25, 1.0, 1 - 2**-40, 3e-12, 0.0]])
    m0, shift = kernels.quantize_multiplier(m)
    nz = m0 != 0
    assert np.all((m0[nz] >= 2**30) & (m0[nz] < 2**31))
    approx = m0.astype(np.float64) * 2.0 ** shift.astype(np.float64) / 2**31
    assert np.all(np.abs(approx[nz] - m[nz]) <= m[nz] * 2.0**-31)
    # 1 - 2^-40 rounds to M0 = 2^31, renormalized to 2^30 with shift + 1; tiny M flushes to 0.
    assert (m0[-3], shift[-3]) == (2**30, 1)
    assert (m0[-2], shift[-2]) == (0, 0) and (m0[-1], shift[-1]) == (0, 0)
    with pytest.raises(ValueError, match="finite"):
        kernels.quantize_multiplier(np.array([np.nan]))


def test_conv_multiplier_legacy_uses_float32_product():
    s_in, s_w, s_out = 0.0078125, np.array([0.00888241], np.float32), 0.02352848
    legacy = kernels.conv_multiplier(s_in, s_w, s_out, per_channel=False)
    assert legacy[0] == float(np.float32(s_in) * s_w[0]) / float(np.float32(s_out))
    per_channel = kernels.conv_multiplier(s_in, s_w, s_out, per_channel=True)
    assert per_channel[0] == float(np.float32(s_in)) * float(s_w[0]) / float(np.float32(s_out))


@pytest.mark.parametrize("rounding", kernels.ROUNDINGS)
def test_multiply_by_quantized_multiplier_matches_int64(rounding):
    n = 20000
    x = np.concatenate(
        [
            RNG.integers(-(2**31), 2**31, n // 2),
            RNG.integers(-(2**20), 2**20, n // 2),
            [-(2**31), 2**31 - 1, 0, 1, -1],
        ]
    ).astype(np.int32)
    m0 = RNG.integers(2**30, 2**31, x.size).astype(np.int32)
    shift = RNG.integers(-31, 1, x.size).astype(np.int32)
    # Keep to results that fit in int32 (as TFLite's real multipliers < 1 guarantee).
    got = np.asarray(kernels.multiply_by_quantized_multiplier(x, m0, shift, rounding))
    want = ref_mbqm(x, m0, shift, rounding)
    np.testing.assert_array_equal(got, want)
    # Positive shifts (M >= 1) on small accumulators.
    xs = RNG.integers(-(2**16), 2**16, 5000).astype(np.int32)
    m0s = RNG.integers(2**30, 2**31, xs.size).astype(np.int32)
    sh = RNG.integers(0, 8, xs.size).astype(np.int32)
    got = np.asarray(kernels.multiply_by_quantized_multiplier(xs, m0s, sh, rounding))
    np.testing.assert_array_equal(got, ref_mbqm(xs, m0s, sh, rounding))


def test_rounding_rules_differ_on_ties():
    # M = 0.25 (M0 = 2^30, shift = -1): x = -2 is exactly -0.5.
    def f(x, rule):
        return int(kernels.multiply_by_quantized_multiplier(jnp.int32(x), 2**30, -1, rule))

    assert [f(-2, r) for r in kernels.ROUNDINGS] == [-1, 0, 0]  # double: away from zero
    assert [f(2, r) for r in kernels.ROUNDINGS] == [1, 1, 1]
    # x * M = 2.49999...: the first rounding of "double"/"ruy" lands on the tie 2.5, "single"
    # sees the exact value: 3 vs 2.
    m0, shift = 2**31 - 1, -2  # M = (1 - 2^-31) / 4
    x = 10
    assert [
        int(kernels.multiply_by_quantized_multiplier(jnp.int32(x), m0, shift, r))
        for r in kernels.ROUNDINGS
    ] == [3, 3, 2]


@pytest.mark.parametrize("rule", kernels.ROUNDINGS)
def test_two_step_rounding_is_one_rounding_with_a_moved_threshold(rule):
    # model.rounding_offsets: "double" = sign(v) floor(|v| + 1/2 + d), "ruy" = floor(v + 1/2 + d)
    # with d = 2**-(r+1), r the right shift; "single" = floor(v + 1/2). Exact in float64 here:
    # |acc * M0| < 2**51 and every term is a multiple of 2**-(31 - shift).
    n = 40000
    acc = RNG.integers(-(2**20), 2**20, n).astype(np.int32)
    m0 = RNG.integers(2**30, 2**31, n).astype(np.int32)
    shift = RNG.integers(-12, 1, n).astype(np.int32)
    layer = integer.IntLayer(None, None, None, None, shift, name="c")
    int_model = integer.IntModel((layer,), 1.0, 0, rounding=integer.Rounding(rule, rule))
    pos, neg = align.rounding_offsets(int_model)["c"]
    right = np.maximum(-shift, 0)
    np.testing.assert_array_equal(
        pos, np.where((right > 0) & (rule != "single"), 0.5 ** (right + 1), 0.0)
    )
    v = acc.astype(np.float64) * m0 * np.exp2(shift.astype(np.float64) - 31)
    offset = np.where(v >= 0, pos, neg)
    moved = round_half_away(v + offset) if rule != "single" else np.floor(v + 0.5)
    got = np.asarray(kernels.multiply_by_quantized_multiplier(acc, m0, shift, rule))
    # Excluded: the first rounding's own ties (v * 2**r exactly half-way on the 2**-31 grid).
    first_tie = np.mod(acc.astype(np.int64) * m0.astype(np.int64), 2**31) == 2**30
    differ = (got != moved) & ~first_tie
    assert not differ.any(), (acc[differ][:5], shift[differ][:5], v[differ][:5])
    # Not vacuous: a single rounding differs from the two-step rules on about d of all values.
    if rule != "single":
        assert np.mean(got != round_half_away(v)) > 0.01


def round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def ref_fine(acc, m0, shift, bits):
    """round(acc * M0 * 2**(shift + bits) / 2**31), ties up, saturated: exact Python ints."""
    out = []
    for a, m, s in zip(
        np.ravel(acc).tolist(), np.ravel(m0).tolist(), np.ravel(shift).tolist(), strict=True
    ):
        t = 31 - s - bits
        out.append(min(max((a * m + (1 << (t - 1))) >> t, -(2**31)), 2**31 - 1))
    return np.array(out, np.int64).reshape(np.shape(acc))


@pytest.mark.parametrize("bits", [0, 16])
def test_requantize_fine_matches_exact_reference(bits):
    n = 6000
    acc = np.concatenate(
        [
            RNG.integers(-(2**31), 2**31, n // 2),
            RNG.integers(-(2**18), 2**18, n // 2),
            [-(2**31), 2**31 - 1, 0, 1, -1],
        ]
    ).astype(np.int32)
    m0 = RNG.integers(2**30, 2**31, acc.size).astype(np.int32)
    m0[-5:] = 2**31 - 1
    # Every shift the fine path accepts: t = 31 - shift - bits from 1 (saturating) to 62.
    shift = RNG.integers(-31 - bits, 31 - bits, acc.size).astype(np.int32)
    shift[:4] = [30 - bits, -31 - bits, -1 - bits, -bits]  # t = 1, 62, 32, 31
    got = np.asarray(kernels.requantize_fine(acc, m0, shift, bits))
    want = ref_fine(acc, m0, shift, bits)
    np.testing.assert_array_equal(got, want)
    assert np.any(np.abs(want) == 2**31 - 1)  # saturation was exercised
    clamped = np.asarray(kernels.requantize_fine(acc, m0, shift, bits, -(2**20), 2**20))
    np.testing.assert_array_equal(clamped, np.clip(want, -(2**20), 2**20))


def test_activation_range():
    assert kernels.activation_range("relu6", 0.02352848, 0, 0, 255) == (0, 255)
    assert kernels.activation_range("relu6", 0.05, 10, 0, 255) == (10, 130)
    assert kernels.activation_range("relu", 0.05, 10, 0, 255) == (10, 255)
    assert kernels.activation_range("none", 0.05, 10, -128, 127) == (-128, 127)
    with pytest.raises(ValueError, match="tanh"):
        kernels.activation_range("tanh", 0.05, 0, 0, 255)
    # Any clamp (lo, hi) by the same rule; the fused activations are clamps.
    assert kernels.activation_range((0.0, 4.0), 0.05, 10, 0, 255) == (10, 90)
    assert kernels.activation_range((-0.5, None), 0.05, 10, 0, 255) == (0, 255)
    assert kernels.activation_range((-0.25, 4.0), 0.05, 10, -128, 127) == (5, 90)
    for name in ("relu6", "relu", "none", "relu_n1_to_1"):
        clamp = kernels.FUSED_CLAMPS[name]
        for s, z in ((0.05, 10), (0.0235, -3)):
            assert kernels.activation_range(clamp, s, z, -128, 127) == kernels.activation_range(
                name, s, z, -128, 127
            )


# ------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,kernel,stride,padding,per_channel",
    [
        (np.uint8, 3, 2, "SAME", False),
        (np.uint8, 1, 1, "SAME", False),
        (np.uint8, 3, 1, "VALID", True),
        (np.int8, 3, 2, "SAME", True),
        (np.int8, 1, 1, "SAME", False),
    ],
)
def test_conv_accumulate_matches_direct_conv(dtype, kernel, stride, padding, per_channel):
    info = np.iinfo(dtype)
    q = RNG.integers(info.min, info.max + 1, (2, 9, 10, 5)).astype(dtype)
    w = RNG.integers(info.min, info.max + 1, (kernel, kernel, 5, 7)).astype(dtype)
    zin = int(RNG.integers(info.min, info.max + 1))
    wzp = (
        RNG.integers(info.min, info.max + 1, 7)
        if per_channel
        else np.full(7, RNG.integers(info.min, info.max + 1))
    ).astype(np.int32)
    bias = RNG.integers(-(2**20), 2**20, 7).astype(np.int32)
    got = kernels.conv_accumulate(jnp.asarray(q), zin, jnp.asarray(w), wzp, bias, stride, padding)
    np.testing.assert_array_equal(np.asarray(got), ref_conv(q, zin, w, wzp, bias, stride, padding))


@pytest.mark.parametrize(
    "dtype,stride,padding", [(np.uint8, 1, "SAME"), (np.uint8, 2, "SAME"), (np.int8, 2, "VALID")]
)
def test_depthwise_accumulate_matches_direct(dtype, stride, padding):
    info = np.iinfo(dtype)
    q = RNG.integers(info.min, info.max + 1, (2, 8, 7, 6)).astype(dtype)
    w = RNG.integers(info.min, info.max + 1, (3, 3, 6)).astype(dtype)
    zin = int(RNG.integers(info.min, info.max + 1))
    wzp = RNG.integers(info.min, info.max + 1, 6).astype(np.int32)
    bias = RNG.integers(-(2**16), 2**16, 6).astype(np.int32)
    got = kernels.depthwise_accumulate(
        jnp.asarray(q), zin, jnp.asarray(w), wzp, bias, stride, padding
    )
    np.testing.assert_array_equal(
        np.asarray(got), ref_depthwise(q, zin, w, wzp, bias, stride, padding)
    )


def test_average_pool_rounds_like_tflite():
    # Global pool, uint8: (sum + n/2) / n.
    q = RNG.integers(0, 256, (3, 4, 4, 5)).astype(np.uint8)
    s = q.astype(np.int64).sum(axis=(1, 2), keepdims=True)
    want = np.clip((s + 8) // 16, 0, 255)
    got = kernels.average_pool(jnp.asarray(q), None, 1, "VALID", 0, 255)
    np.testing.assert_array_equal(np.asarray(got), want)
    # SAME 3x3 stride 2 on int8: only valid taps count; ties away from zero; fused clamp.
    q = RNG.integers(-128, 128, (2, 5, 5, 3)).astype(np.int8)
    got = np.asarray(kernels.average_pool(jnp.asarray(q), (3, 3), 2, "SAME", -100, 100))
    x = q.astype(np.int64)
    for oy in range(3):
        for ox in range(3):
            ys = slice(max(0, 2 * oy - 1), min(5, 2 * oy + 2))
            xs = slice(max(0, 2 * ox - 1), min(5, 2 * ox + 2))
            win = x[:, ys, xs]
            cnt = win.shape[1] * win.shape[2]
            tot = win.sum(axis=(1, 2))
            val = np.where(tot > 0, (tot + cnt // 2) // cnt, -((-tot + cnt // 2) // cnt))
            np.testing.assert_array_equal(got[:, oy, ox], np.clip(val, -100, 100))


# ------------------------------------------------------------------------------------------
# Fine logits.
# ------------------------------------------------------------------------------------------


def _classifier(per_channel: bool, activation: str, cin=64, classes=400, seed=7):
    """A 1×1 classifier alone as an IntModel (uint8, TFLite's legacy parameters)."""
    rng = np.random.default_rng(seed)
    s_in, s_out, z_out = 6 / 255, 0.13, 96
    w_zp = rng.integers(100, 156, classes).astype(np.int32)
    w = (w_zp + rng.integers(-8, 9, (1, 1, cin, classes))).astype(np.uint8)
    w_scale = (
        np.exp(rng.uniform(np.log(1e-3), np.log(5e-2), classes))
        if per_channel
        else np.full(classes, 1e-2)
    ).astype(np.float32)
    bias = rng.integers(-3000, 3000, classes).astype(np.int32)
    m0, shift = kernels.quantize_multiplier(
        kernels.conv_multiplier(s_in, w_scale, s_out, per_channel)
    )
    act_min, act_max = kernels.activation_range(activation, s_out, z_out, 0, 255)
    layer = integer.IntLayer(
        w,
        w_zp,
        bias,
        m0,
        shift,
        name="Logits",
        kind="conv",
        input_zero_point=0,
        output_zero_point=z_out,
        act_min=act_min,
        act_max=act_max,
        activation=activation,
        input_scale=s_in,
        output_scale=s_out,
        weight_scale=tuple(map(float, w_scale)),
    )
    model = integer.IntModel((layer,), s_in, 0)
    q = rng.integers(0, 256, (48, 1, 1, cin)).astype(np.uint8)
    return model, q


@pytest.mark.parametrize(
    "per_channel,activation", [(True, "none"), (False, "none"), (True, "relu6")]
)
def test_fine_logits_match_accumulators(per_channel, activation):
    model, q = _classifier(per_channel, activation)
    layer = model.layers[0]
    bits = integer.FINE_LOGIT_BITS
    fine, inter = integer.run(model, q, True, fine_logits=True)
    assert fine.dtype == jnp.int32 and fine.shape == (48, 400)
    codes = np.asarray(integer.run(model, q), np.int64)
    # The 8-bit codes (TFLite's output) are untouched by the fine path.
    np.testing.assert_array_equal(np.asarray(inter["Logits"]).reshape(48, 400), codes)
    # Exactly the definition: round(acc * M0 * 2^(shift + bits) / 2^31) of the int32 accumulators.
    acc = ref_conv(q, 0, layer.weight, layer.weight_zero_point, layer.bias, 1, "SAME")
    acc = acc.reshape(48, 400)
    m0 = np.broadcast_to(layer.multiplier, acc.shape)
    shift = np.broadcast_to(layer.shift, acc.shape)
    want = ref_fine(acc, m0, shift, bits)
    if activation != "none":
        want = np.clip(want, (layer.act_min - 96) << bits, (layer.act_max - 96) << bits)
    fine = np.asarray(fine, np.int64)
    np.testing.assert_array_equal(fine, want)
    if per_channel:
        assert len(set(np.asarray(layer.shift).tolist())) > 2  # classes on different scales
    # Consistent with the codes: |fine - 2^bits (code - Z)| <= 2^(bits-1) + the code's first
    # rounding (2^(bits-1+shift)) where the code is not clamped.
    z = layer.output_zero_point
    bound = 2 ** (bits - 1) + 2.0 ** (bits - 1 + shift) + 1
    diff = fine - (codes - z) * 2**bits
    inside = (codes > layer.act_min) & (codes < layer.act_max)
    assert inside.mean() > 0.3 and np.all(np.abs(diff[inside]) <= bound[inside])
    assert np.all(fine[codes == layer.act_max] >= ((layer.act_max - z) << bits) - bound[0, 0])
    assert np.all(fine[codes == layer.act_min] <= ((layer.act_min - z) << bits) + bound[0, 0])
    # Monotonic with the dequantized accumulators, on one scale for all classes: argmax agrees.
    real = acc * np.float64(np.float32(layer.input_scale)) * np.asarray(layer.weight_scale)
    real = real * 2**bits / np.float64(np.float32(layer.output_scale))
    if activation != "none":
        real = np.clip(real, (layer.act_min - z) << bits, (layer.act_max - z) << bits)
    # (TFLite forms a per-tensor S_in * S_w in float32: 2^-24 relative.)
    assert np.all(np.abs(fine - real) <= 0.5 + np.abs(real) * 2.0**-22)
    top2 = np.sort(real, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2
    assert clear.sum() > 40 or activation != "none"  # (ReLU6 saturates the top classes)
    np.testing.assert_array_equal(np.argmax(fine, -1)[clear], np.argmax(real, -1)[clear])
    # logits_fn (evaluation, Table 1's int_top1) scores the fine logits unless told otherwise.
    images = (q.astype(np.float32) - model.input_zero_point) * np.float32(model.input_scale)
    np.testing.assert_array_equal(integer.logits_fn(model)(images), fine)
    np.testing.assert_array_equal(integer.logits_fn(model, fine=False)(images), codes)
    deq = np.asarray(integer.dequantize_fine_logits(model, fine))
    np.testing.assert_allclose(deq, fine * integer.fine_logit_scale(model), rtol=1e-6)
    assert integer.fine_logit_scale(model) == np.float32(0.13) / 2**bits


def test_fine_logits_need_a_classifier_in_range():
    model, q = _classifier(True, "none")
    pool = integer.IntLayer(None, None, None, None, None, name="AvgPool_1a", kind="avgpool")
    with pytest.raises(ValueError, match="conv layer"):
        integer.run(dataclasses.replace(model, layers=model.layers + (pool,)), q, fine_logits=True)
    big = dataclasses.replace(model.layers[0], shift=np.full(400, 15, np.int32))
    with pytest.raises(ValueError, match="fine logits"):
        integer.run(dataclasses.replace(model, layers=(big,)), q, fine_logits=True)


# ------------------------------------------------------------------------------------------
# No float op in the integer body.
# ------------------------------------------------------------------------------------------


def float_ops(jaxpr) -> list[str]:
    """Primitives of ``jaxpr`` (recursively) that read or write a floating-point value."""
    found = []

    def is_float(v):
        aval = getattr(v, "aval", None)
        dtype = getattr(aval, "dtype", None)
        return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)

    def walk(jx):
        for v in list(jx.invars) + list(jx.constvars):
            if is_float(v):
                found.append(f"input {v.aval}")
        for eqn in jx.eqns:
            if any(is_float(v) for v in list(eqn.invars) + list(eqn.outvars)):
                found.append(str(eqn.primitive))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    for c in jaxpr.consts:
        if jnp.issubdtype(np.asarray(c).dtype, jnp.inexact):
            found.append("float constant")
    return found


def test_float_op_walker_catches_floats():
    # The walker itself must be able to fail: a float op anywhere (even nested) is found.
    def f(x):
        return jax.jit(lambda y: (y.astype(jnp.float32) * 0.5).astype(jnp.int32))(x)

    assert float_ops(jax.make_jaxpr(f)(jnp.zeros(3, jnp.int32)))
    assert not float_ops(jax.make_jaxpr(lambda x: x * 3 + 1)(jnp.zeros(3, jnp.int32)))


@pytest.fixture(scope="module")
def official():
    return integer.from_tflite(require(TFLITE_MODEL))


@pytest.mark.parametrize("rounding", list(integer.ROUNDING_PRESETS))
def test_integer_body_has_no_float_op(official, rounding):
    model = official.with_rounding(rounding)
    x = jnp.zeros((2, 128, 128, 3), jnp.uint8)
    jaxpr = jax.make_jaxpr(lambda m, x: integer.forward(m, x, True))(model, x)
    assert float_ops(jaxpr) == []
    assert len(jaxpr.jaxpr.eqns) > 100  # the walk saw the whole network
    # The fine-logit path (the classifier's accumulators, requantized in 64 bits) as well.
    fine = jax.make_jaxpr(lambda m, x: integer.forward(m, x, True, fine_logits=True))(model, x)
    assert float_ops(fine) == []
    assert fine.out_avals[0].dtype == jnp.int32 and fine.out_avals[0].shape == (2, 1001)
    assert len(fine.jaxpr.eqns) > len(jaxpr.jaxpr.eqns) + 10  # ... and saw the extra ops


# ------------------------------------------------------------------------------------------
# TFLite import.
# ------------------------------------------------------------------------------------------


def test_official_model_structure(official):
    names = official.layer_names
    assert names[0] == "Conv2d_0" and names[-2:] == ["AvgPool_1a", "Logits"]
    assert names[1:27:2] == [f"Conv2d_{i}_depthwise" for i in range(1, 14)]
    assert names[2:28:2] == [f"Conv2d_{i}_pointwise" for i in range(1, 14)]
    assert (official.dtype, official.input_scale, official.input_zero_point) == (
        "uint8",
        0.0078125,
        128,
    )
    first = official.layer("Conv2d_0")
    assert first.weight.shape == (3, 3, 3, 8) and first.weight.dtype == np.uint8
    assert official.layer("Logits").out_channels == 1001
    assert official.layer("AvgPool_1a").window == (4, 4)
    logits, inter = integer.run(official, np.zeros((2, 128, 128, 3), np.uint8), True)
    assert logits.shape == (2, 1001) and logits.dtype == jnp.uint8
    assert list(inter) == names


def test_bad_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(integer.TFLiteImportError, match="not a TensorFlow Lite flatbuffer"):
        integer.from_tflite(str(garbage))
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(open(require(TFLITE_MODEL), "rb").read()[:5000])
    with pytest.raises(integer.TFLiteImportError, match="malformed|not a TensorFlow Lite"):
        integer.from_tflite(str(truncated))
    with pytest.raises(FileNotFoundError):
        integer.from_tflite(str(tmp_path / "missing.tflite"))


def test_unrelated_float_model_is_rejected(tmp_path):
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
    path = tmp_path / "float.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    with pytest.raises(integer.TFLiteImportError, match="float32"):
        integer.from_tflite(str(path))


def test_head_must_fit_backbone(tmp_path):
    # (The pair's bit-exactness against LiteRT is in test_tflite.py.)
    path = require(TFLITE_MODEL)
    bb, hd = str(tmp_path / "bb.tflite"), str(tmp_path / "hd.tflite")
    split_tflite(path, bb, hd, "MobilenetV1/Logits/AvgPool_1a/AvgPool")
    pair = integer.from_tflite(bb, hd)
    whole = integer.from_tflite(path)
    assert pair.layer_names == whole.layer_names
    assert [t[1] for t in pair.tensor_map] == [0] * 28 + [1, 1]  # the head holds the logits
    for a, b in zip(pair.layers, whole.layers, strict=True):
        assert a.name == b.name and (a.weight is None or np.array_equal(a.weight, b.weight))
    with pytest.raises(integer.TFLiteImportError, match="does not match the backbone"):
        integer.from_tflite(bb, bb)  # a backbone is no head for itself
    with pytest.raises(integer.TFLiteImportError, match="cannot take a head"):
        integer.from_tflite(path, hd)


def test_quantize_and_dequantize_helpers(official):
    images = np.linspace(-1, 1, 2 * 128 * 128 * 3, dtype=np.float32).reshape(2, 128, 128, 3)
    q = integer.quantize_input(official, images)
    assert q.dtype == jnp.uint8 and int(q.min()) == 0 and int(q.max()) == 255
    assert int(integer.quantize_input(official, np.zeros((1, 1, 1, 1)))[0, 0, 0, 0]) == 128
    logits, inter = integer.run(official, q, True)
    real = integer.dequantize_logits(official, logits)
    scale, zp = integer.output_qparams(official)["Logits"]
    np.testing.assert_allclose(real, scale * (np.asarray(logits, np.float32) - zp))
    deq = integer.dequantize_intermediates(official, inter)
    assert set(deq) == set(inter) and deq["Conv2d_0"].dtype == jnp.float32
    # Fine logits: every layer's codes unchanged; within half an LSB (and the codes' first
    # rounding) of the dequantized codes where they are not clamped.
    fine, inter_fine = integer.run(official, q, True, fine_logits=True)
    assert all(np.array_equal(inter_fine[k], inter[k]) for k in inter)
    unclamped = (np.asarray(logits) > 0) & (np.asarray(logits) < 255)
    real_fine = np.asarray(integer.dequantize_fine_logits(official, fine))
    assert np.all(np.abs(real_fine - np.asarray(real))[unclamped] <= scale * (0.5 + 2**-8))
    with pytest.raises(ValueError, match="uint8 codes"):
        integer.run(official, images)
