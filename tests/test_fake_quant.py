"""The fake-quant primitive: values, gradients, transforms and degenerate inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qfsep_jax.quant import (
    INT8,
    INT8_NARROW,
    UINT8,
    QuantConfig,
    check_range,
    fake_quant,
    fake_quant_weights,
    qparams,
)


def test_values_match_hand_computation_tf8():
    # Range [-64, 63.5], uint8: scale = 127.5 / 255 = 0.5 and zero point = 128, all exact.
    x = np.array([-100.0, -64.0, -10.3, -0.25, 0.0, 0.25, 0.74, 63.5, 100.0], np.float32)
    # -10.3 / 0.5 = -20.6 -> -21; +-0.25 / 0.5 = +-0.5 -> +-1 (half away from zero);
    # 0.74 / 0.5 = 1.48 -> 1.
    expected = np.array([-64.0, -64.0, -10.5, -0.5, 0.0, 0.5, 0.5, 63.5, 63.5])
    got = np.asarray(fake_quant(jnp.asarray(x), -64.0, 63.5, UINT8))
    np.testing.assert_array_equal(got, expected)
    scale, zp = qparams(-64.0, 63.5, UINT8)
    assert float(scale) == 0.5 and int(zp) == 128


def test_zero_point_is_computed_in_float32_like_tf():
    # [-1, 1]: 1 / float32(2/255) = 127.49999 in float32, so the zero point is 127, not 128.
    scale, zp = qparams(-1.0, 1.0, UINT8)
    assert float(scale) == np.float32(2.0) / np.float32(255.0)
    assert int(zp) == 127


def test_matches_tensorflow_fake_quant_op():
    """Random inputs (no ties or edges: see the next test)."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = rng.normal(scale=2.0, size=(1000,)).astype(np.float32)
    for lo, hi in [(-1.0, 1.0), (-0.37, 2.9), (0.0, 6.0), (-5.0, 0.2)]:
        ours = np.asarray(fake_quant(jnp.asarray(x), lo, hi, UINT8))
        ref = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8).numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
        g = rng.normal(size=x.shape).astype(np.float32)
        dx, dlo, dhi = jax.vjp(lambda a, b, c: fake_quant(a, b, c, UINT8), jnp.asarray(x), lo, hi)[
            1
        ](jnp.asarray(g))
        tdx, tdlo, tdhi = tf.quantization.fake_quant_with_min_max_vars_gradient(g, x, lo, hi)
        np.testing.assert_array_equal(np.asarray(dx), tdx.numpy())
        np.testing.assert_allclose(float(dlo), float(tdlo), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(dhi), float(tdhi), rtol=1e-5, atol=1e-5)


def test_matches_tensorflow_on_rounding_ties_and_range_edges():
    """Values and gradients against TF's ``FakeQuantWithMinMaxVars`` where they can differ.

    Random inputs never land on a rounding tie or a range edge; these do, in ranges whose scale
    is a power of 2 so that TF's arithmetic is exact too. Mutations that passed the random test
    and fail this one: half-to-even rounding (the positive ties 0.25 and 1.25 round down), and
    ``x == nudged_min`` treated as clipped (input gradient 0 at ReLU6's exact zeros; TF's is 1).

    Intended difference: on a *negative* tie TF rounds up (it floors ``(x - min) / scale + 0.5``),
    ours rounds half away from zero, as TFLite's quantize kernels (``std::round``) and the
    integer pass do, so there ours is one step lower than TF's.
    """
    import tensorflow as tf

    # [-64, 63.5]: scale 0.5, zero point 128, nudged range = the range.
    pos_ties = np.array([0.25, 0.75, 1.25, 2.25, 63.25], np.float32)
    neg_ties = np.array([-0.25, -0.75, -1.25, -63.75], np.float32)
    edges = np.array([-64.0, 63.5, 0.0, -64.25, 63.75, -64.0001, 63.5001, -63.9999], np.float32)
    x = np.concatenate([pos_ties, neg_ties, edges])
    ours = np.asarray(fake_quant(jnp.asarray(x), -64.0, 63.5, UINT8))
    ref = tf.quantization.fake_quant_with_min_max_vars(x, -64.0, 63.5, num_bits=8).numpy()
    n_pos, n_neg = len(pos_ties), len(neg_ties)
    np.testing.assert_array_equal(ours[:n_pos], ref[:n_pos])
    np.testing.assert_array_equal(ours[:n_pos], pos_ties + 0.25)  # up, away from zero
    np.testing.assert_array_equal(ours[n_pos : n_pos + n_neg], ref[n_pos : n_pos + n_neg] - 0.5)
    np.testing.assert_array_equal(ours[n_pos : n_pos + n_neg], neg_ties - 0.25)  # away from 0
    np.testing.assert_array_equal(ours[n_pos + n_neg :], ref[n_pos + n_neg :])
    # Gradients at and around the edges, in that range and in ReLU6's [0, 6] (nudged min 0).
    for lo, hi, xs in [
        (-64.0, 63.5, edges),
        (0.0, 6.0, np.array([0.0, 0.0, -1e-6, 3.0, 6.0, 6.5, 1e-6], np.float32)),
    ]:
        g = np.arange(1, len(xs) + 1, dtype=np.float32)
        dx, dlo, dhi = jax.vjp(lambda a, b, c: fake_quant(a, b, c, UINT8), jnp.asarray(xs), lo, hi)[
            1
        ](jnp.asarray(g))
        tdx, tdlo, tdhi = tf.quantization.fake_quant_with_min_max_vars_gradient(g, xs, lo, hi)
        np.testing.assert_array_equal(np.asarray(dx), tdx.numpy())
        assert float(dlo) == float(tdlo) and float(dhi) == float(tdhi), (lo, hi)
    assert np.asarray(dx)[0] == 1.0  # ReLU6's exact zero passes the gradient, as in TF


def test_rounds_half_away_from_zero():
    # Range [0, 255] gives scale 1, zero point 0: x = k + 0.5 must round up for positives.
    x = jnp.array([0.5, 1.5, 2.5, 253.5])
    np.testing.assert_array_equal(np.asarray(fake_quant(x, 0.0, 255.0, UINT8)), [1, 2, 3, 254])
    # Symmetric int8, scale 1, zero point 0: negatives round away from zero too.
    y = jnp.array([-0.5, -1.5, -2.5, 2.5])
    np.testing.assert_array_equal(
        np.asarray(fake_quant(y, -127.0, 127.0, INT8_NARROW)), [-1, -2, -3, 3]
    )


def test_range_is_nudged_to_contain_zero():
    # [2, 5] acts as [0, 5]; [-3, -1] as [-3, 0]: 0 is exactly representable in both.
    for lo, hi in [(2.0, 5.0), (-3.0, -1.0), (-0.37, 1.91)]:
        scale, zp = qparams(lo, hi, UINT8)
        assert 0 <= int(zp) <= 255
        assert float(fake_quant(jnp.array(0.0), lo, hi, UINT8)) == 0.0
    np.testing.assert_allclose(float(fake_quant(jnp.array(5.0), 2.0, 5.0, UINT8)), 5.0, rtol=1e-6)
    np.testing.assert_allclose(
        float(fake_quant(jnp.array(-3.0), -3.0, -1.0, UINT8)), -3.0, rtol=1e-6
    )


def test_int8_symmetric_weights_have_zero_zero_point():
    w = jnp.array([[-0.5, 0.25], [1.0, -2.0]])
    config = QuantConfig(scheme="int8", per_channel_weights=True)
    wq = np.asarray(fake_quant_weights(w, config))
    # Channel 0: max|w| = 1 -> scale 1/127; channel 1: 2 -> 2/127.
    scales = np.array([1 / 127, 2 / 127])
    np.testing.assert_allclose(wq, np.round(np.asarray(w) / scales) * scales, atol=1e-7)
    np.testing.assert_allclose(wq[1, 0], 1.0, rtol=1e-6)
    assert int(qparams(-1.0, 1.0, INT8_NARROW)[1]) == 0


def test_per_channel_equals_per_tensor_on_each_channel():
    x = jax.random.normal(jax.random.key(0), (4, 5, 3))
    lo = jnp.array([-1.0, -0.2, -3.0])
    hi = jnp.array([1.0, 2.0, 0.5])
    out = fake_quant(x, lo, hi, INT8, axis=-1)
    for c in range(3):
        ref = fake_quant(x[..., c], lo[c], hi[c], INT8)
        np.testing.assert_allclose(np.asarray(out[..., c]), np.asarray(ref), rtol=1e-6)


def _surrogate(x, lo, hi):
    """The straight-through surrogate: clip to the nudged range (what the STE differentiates)."""
    scale, zp = qparams(lo, hi, UINT8)
    nmin = scale * (0 - zp.astype(jnp.float32))
    nmax = scale * (255 - zp.astype(jnp.float32))
    return jnp.clip(x, nmin, nmax), nmin, nmax


def test_gradients_hand_computed():
    x = jnp.array([-3.0, -0.5, 0.0, 0.7, 2.5])
    g = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])

    def loss(x, lo, hi):
        return jnp.sum(fake_quant(x, lo, hi, UINT8) * g)

    dx, dlo, dhi = jax.grad(loss, argnums=(0, 1, 2))(x, -1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(dx), [0.0, 2.0, 3.0, 4.0, 0.0])
    assert float(dlo) == 1.0  # only x = -3 is below the range
    assert float(dhi) == 5.0  # only x = 2.5 is above


def test_gradients_match_finite_differences_of_surrogate():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-2, 2, size=64).astype(np.float32))
    w = jnp.asarray(rng.normal(size=64).astype(np.float32))
    lo, hi = -0.8, 1.3
    dx, dlo, dhi = jax.grad(
        lambda x, a, b: jnp.sum(fake_quant(x, a, b, UINT8) * w), argnums=(0, 1, 2)
    )(x, lo, hi)
    _, nmin, nmax = _surrogate(x, lo, hi)
    eps = 1e-3
    xs = np.asarray(x, np.float64)
    ref_dx = np.array(
        [
            w[i] * (np.clip(xs[i] + eps, nmin, nmax) - np.clip(xs[i] - eps, nmin, nmax)) / (2 * eps)
            for i in range(len(xs))
        ]
    )
    np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-4)
    f_lo = lambda a: float(np.sum(np.clip(xs, a, float(nmax)) * np.asarray(w)))
    f_hi = lambda b: float(np.sum(np.clip(xs, float(nmin), b) * np.asarray(w)))
    ref_dlo = (f_lo(float(nmin) + eps) - f_lo(float(nmin) - eps)) / (2 * eps)
    ref_dhi = (f_hi(float(nmax) + eps) - f_hi(float(nmax) - eps)) / (2 * eps)
    np.testing.assert_allclose(float(dlo), ref_dlo, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(float(dhi), ref_dhi, rtol=1e-3, atol=1e-3)


def test_per_channel_range_gradients_reduce_over_other_axes():
    x = jnp.array([[-5.0, 0.0], [5.0, -5.0], [0.1, 5.0]])
    lo, hi = jnp.array([-1.0, -1.0]), jnp.array([1.0, 1.0])
    dlo, dhi = jax.grad(lambda a, b: jnp.sum(fake_quant(x, a, b, UINT8, axis=1)), (0, 1))(lo, hi)
    np.testing.assert_array_equal(np.asarray(dlo), [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(dhi), [1.0, 1.0])


def test_jit_vmap_pmap_agree_with_eager():
    x = jax.random.uniform(jax.random.key(1), (8, 16), minval=-2, maxval=2)
    lo, hi = jnp.full((8,), -1.5), jnp.linspace(0.5, 2.0, 8)
    eager = jnp.stack([fake_quant(x[i], lo[i], hi[i], UINT8) for i in range(8)])
    f = lambda xi, a, b: fake_quant(xi, a, b, UINT8)
    vm = jax.jit(jax.vmap(f))(x, lo, hi)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(eager), rtol=1e-6)
    n = jax.local_device_count()
    assert n == 8, "tests run with 8 fake CPU devices (tests/conftest.py)"
    pm = jax.pmap(f)(x, lo, hi)
    np.testing.assert_allclose(np.asarray(pm), np.asarray(eager), rtol=1e-6)
    grads = jax.pmap(jax.grad(lambda xi, a, b: jnp.sum(f(xi, a, b) ** 2), argnums=(0, 1, 2)))(
        x, lo, hi
    )
    ref = jax.grad(lambda xi, a, b: jnp.sum(f(xi, a, b) ** 2), argnums=(0, 1, 2))(
        x[3], lo[3], hi[3]
    )
    np.testing.assert_allclose(np.asarray(grads[0][3]), np.asarray(ref[0]), rtol=1e-6)
    np.testing.assert_allclose(float(grads[2][3]), float(ref[2]), rtol=1e-6)


def test_scales_are_the_same_float32_under_jit_and_eager():
    # The simulation computes activation scales under jit, the integer conversion eagerly; a
    # division by the constant 255 compiled as a reciprocal multiply made ~70 % of them 1 ulp apart.
    rng = np.random.default_rng(0)
    span = rng.uniform(0.01, 10.0, 100_000).astype(np.float32)
    lo = -span * rng.uniform(0.0, 1.0, span.size).astype(np.float32)
    hi = lo + span
    exact = ((np.maximum(hi, 0) - np.minimum(lo, 0)) / np.float32(255)).astype(np.float32)
    jitted = np.asarray(jax.jit(lambda a, b: qparams(a, b, UINT8)[0])(lo, hi))
    np.testing.assert_array_equal(jitted, exact)
    for i in range(0, 100_000, 10_000):  # eager, on 0-d arrays as the conversion calls it
        assert np.float32(qparams(jnp.float32(lo[i]), jnp.float32(hi[i]), UINT8)[0]) == exact[i]
    # Non-vacuity: the plain constant division under jit does differ here.
    spans = np.maximum(hi, 0) - np.minimum(lo, 0)
    plain = np.asarray(jax.jit(lambda s: s / np.float32(255))(spans))
    assert np.mean(plain != exact) > 0.3


def test_constant_and_all_zero_tensors():
    c = jnp.full((10,), 3.0)
    np.testing.assert_allclose(np.asarray(fake_quant(c, 3.0, 3.0, UINT8)), 3.0, rtol=1e-6)
    z = jnp.zeros((10,))
    out = fake_quant(z, 0.0, 0.0, UINT8)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, 0.0, 0.0, UINT8)))(z)
    assert np.all(np.isfinite(np.asarray(g)))
    scale, zp = qparams(0.0, 0.0, UINT8)
    assert float(scale) == 1.0 and int(zp) == 0


def test_nan_inputs_propagate_with_zero_gradient():
    x = jnp.array([0.5, jnp.nan, -0.2])
    out = np.asarray(fake_quant(x, -1.0, 1.0, UINT8))
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
    g = np.asarray(jax.grad(lambda x: jnp.nansum(fake_quant(x, -1.0, 1.0, UINT8)))(x))
    assert g[1] == 0.0 and g[0] == 1.0


def test_bad_ranges_get_clear_errors():
    with pytest.raises(ValueError, match="not finite"):
        check_range("act", np.nan, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        check_range("act", np.inf, -np.inf)  # never calibrated
    with pytest.raises(ValueError, match="inverted"):
        check_range("act", 2.0, 1.0)
    check_range("act", 0.0, 0.0)
    with pytest.raises(ValueError, match="per-channel"):
        fake_quant(jnp.zeros((2, 3)), jnp.zeros(2), jnp.ones(2), UINT8, axis=1)
    with pytest.raises(ValueError, match="scalar"):
        fake_quant(jnp.zeros((2, 3)), jnp.zeros(3), jnp.ones(3), UINT8)
    with pytest.raises(ValueError, match="scheme"):
        QuantConfig(scheme="int4")
