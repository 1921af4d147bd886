"""QAT semantics of ConvLayer: correction-and-freeze, quant delay, EMA ranges, straight-through.

Layer-level (fast): one conv + BN + ReLU6 + activation quantizer, checked against the float BN
layer, the BN-folded ``fake`` layer and hand-computed folding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qfsep_jax.models.layers import ConvLayer, linear_moments
from qfsep_jax.quant import QuantConfig, fake_quant
from qfsep_jax.quant.fold import fold_batch_norm
from qfsep_jax.quant.scheme import fake_quant_weights

QC = QuantConfig(observer="ema", ema_decay=0.9)


def _layer(**kw):
    return ConvLayer(features=8, kernel_size=3, stride=1, quant=QC, bn_momentum=0.9, **kw)


@pytest.fixture(scope="module")
def setup():
    layer = _layer()
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 5)).astype(np.float32))
    variables = layer.init(jax.random.key(1), x)
    # Non-trivial BN parameters and moving statistics.
    variables["params"]["bn_scale"] = jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32)
    variables["params"]["bn_bias"] = jnp.asarray(rng.normal(size=8), jnp.float32)
    variables["batch_stats"]["bn_mean"] = jnp.asarray(rng.normal(size=8), jnp.float32)
    variables["batch_stats"]["bn_var"] = jnp.asarray(rng.uniform(0.5, 3.0, 8), jnp.float32)
    return layer, x, variables


def _apply(layer, variables, x, **kw):
    return layer.apply(variables, x, mutable=["batch_stats", "quant_ranges"], **kw)


def test_qat_before_delay_equals_float_batch_norm_training(setup):
    """Correction phase without rounding = BN with batch statistics, moving stats updated alike."""
    layer, x, v = setup
    y_float, new_float = _apply(layer, v, x, train=True, quant_mode="float")
    y_qat, new_qat = _apply(
        layer, v, x, train=True, quant_mode="qat", quant_active=False, bn_frozen=False
    )
    # The activation quantizer is inactive, so the outputs are the float ones.
    np.testing.assert_allclose(y_qat, y_float, rtol=1e-5, atol=1e-5)
    for k in ("bn_mean", "bn_var"):
        np.testing.assert_allclose(
            new_qat["batch_stats"][k], new_float["batch_stats"][k], rtol=1e-6, atol=1e-6
        )
    # The range observer ran although nothing was rounded (quant delay keeps observing).
    assert float(new_qat["quant_ranges"]["act_quant"]["count"]) == 1.0
    assert float(new_qat["quant_ranges"]["act_quant"]["max"]) == pytest.approx(
        float(jnp.max(y_float))
    )


def test_correction_uses_moving_folded_weights_and_batch_statistics(setup):
    """Before freezing: conv(x, Q(W*g/sigma_moving)) * sigma_moving/sigma_batch + batch bias."""
    layer, x, v = setup
    p, s = v["params"], v["batch_stats"]
    eps = layer.bn_epsilon
    y_conv = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean_b = jnp.mean(y_conv, axis=(0, 1, 2))
    var_b = jnp.mean(jnp.square(y_conv), axis=(0, 1, 2)) - jnp.square(mean_b)
    sigma_b, sigma_m = jnp.sqrt(var_b + eps), jnp.sqrt(s["bn_var"] + eps)
    w_q = fake_quant_weights(p["kernel"] * p["bn_scale"] / sigma_m, QC)
    y_q = jax.lax.conv_general_dilated(
        x, w_q, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = jnp.clip(
        y_q * (sigma_m / sigma_b) + p["bn_bias"] - p["bn_scale"] * mean_b / sigma_b, 0.0, 6.0
    )
    # Ranges observed this step (EMA initialised by the first batch) quantize the output.
    expected = fake_quant(expected, jnp.min(expected), jnp.max(expected))
    y, _ = _apply(layer, v, x, train=True, quant_mode="qat", quant_active=True, bn_frozen=False)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_frozen_bn_equals_inference_and_keeps_moving_statistics(setup):
    layer, x, v = setup
    y_train, new = _apply(layer, v, x, train=True, quant_mode="qat", bn_frozen=True)
    for k in ("bn_mean", "bn_var"):
        np.testing.assert_array_equal(new["batch_stats"][k], v["batch_stats"][k])
    # Inference with the ranges the training step produced.
    v_eval = {**v, "quant_ranges": new["quant_ranges"]}
    y_eval = layer.apply(v_eval, x, train=False, quant_mode="qat")
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-5, atol=1e-5)
    # ... which is the BN-folded layer's fake-quant pass (what the integer pass converts).
    folded = fold_batch_norm({k: v[k] for k in ("params", "batch_stats")}, layer.bn_epsilon)
    folded_layer = _layer(bn_folded=True)
    y_fake = folded_layer.apply(
        {**folded, "quant_ranges": new["quant_ranges"]}, x, quant_mode="fake"
    )
    np.testing.assert_allclose(y_eval, y_fake, rtol=1e-5, atol=1e-5)


def test_traced_flags_match_python_flags(setup):
    """quant_active / bn_frozen may be traced (step-dependent under jit)."""
    layer, x, v = setup

    @jax.jit
    def run(step):
        return _apply(
            layer, v, x, train=True, quant_mode="qat", quant_active=step >= 2, bn_frozen=step >= 4
        )

    for step, (active, frozen) in {0: (False, False), 3: (True, False), 5: (True, True)}.items():
        y_traced, new_traced = run(jnp.int32(step))
        y_py, new_py = _apply(
            layer, v, x, train=True, quant_mode="qat", quant_active=active, bn_frozen=frozen
        )
        np.testing.assert_allclose(y_traced, y_py, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            new_traced["batch_stats"]["bn_var"], new_py["batch_stats"]["bn_var"], rtol=1e-6
        )


def test_straight_through_gradient_reaches_the_kernel(setup):
    """A QAT loss is piecewise constant in the weights; the STE still gives a useful gradient."""
    layer, x, v = setup
    target = jnp.asarray(np.random.RandomState(2).uniform(0, 6, (4, 6, 6, 8)), jnp.float32)

    def loss(params, quant_active):
        y, _ = _apply(
            layer,
            {**v, "params": params},
            x,
            train=True,
            quant_mode="qat",
            quant_active=quant_active,
            bn_frozen=True,
        )
        return jnp.mean(jnp.square(y - target))

    g_q = jax.grad(loss)(v["params"], True)["kernel"]
    g_f = jax.grad(loss)(v["params"], False)["kernel"]
    assert np.all(np.isfinite(g_q)) and float(jnp.max(jnp.abs(g_q))) > 0
    # The straight-through gradient is the float gradient up to the rounding of the forward pass.
    cos = float(jnp.vdot(g_q, g_f) / (jnp.linalg.norm(g_q) * jnp.linalg.norm(g_f)))
    assert cos > 0.9, cos
    # One SGD step changes the loss (weights move through the rounding).
    params = {**v["params"], "kernel": v["params"]["kernel"] - 0.05 * g_q}
    assert float(loss(params, True)) < float(loss(v["params"], True))


def test_linear_moments_equal_the_moments_of_the_matmul():
    # QAT's pointwise batch statistics come from the input's mean and Gram matrix; values and
    # gradients (the hand-written VJP) equal those of the matmul's own moments.
    rng = np.random.RandomState(4)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(300, 12)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(12, 20)).astype(np.float32))
    cm, cv = (jnp.asarray(rng.normal(size=20).astype(np.float32)) for _ in range(2))

    def direct(x, w):
        y = x @ w
        return jnp.mean(y, axis=0), jnp.mean(jnp.square(y), axis=0)

    def loss(fn, x, w):
        mean, mean_sq = fn(x, w)
        return jnp.sum(mean * cm) + jnp.sum(mean_sq * cv)

    for a, b in zip(jax.jit(linear_moments)(x, w), jax.jit(direct)(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(lambda x, w: loss(linear_moments, x, w), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(lambda x, w: loss(direct, x, w), argnums=(0, 1)))(x, w)
    for name, a, b in zip(("d/dx", "d/dw"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("use_bias", [False, True])
def test_qat_pointwise_before_delay_equals_float_bn_with_gradients(use_bias):
    # A pointwise layer (statistics from linear_moments, bias algebra included) in the
    # correction phase without rounding: the float BN layer's outputs, statistics and gradients.
    layer = ConvLayer(
        features=6,
        kernel_size=1,
        quant=QC,
        bn_momentum=0.9,
        use_bias=use_bias,
        depthwise_impl="lax",
    )
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.normal(0.5, 1.5, size=(4, 5, 5, 7)).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(4, 5, 5, 6)).astype(np.float32))
    v = layer.init(jax.random.key(3), x)
    v["params"]["bn_scale"] = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
    if use_bias:
        v["params"]["bias"] = jnp.asarray(rng.normal(size=6), jnp.float32)

    def run(params, **kw):
        y, new = _apply(layer, {**v, "params": params}, x, train=True, **kw)
        return jnp.sum(y * cot), (y, new["batch_stats"])

    grad = jax.grad(run, has_aux=True)
    g_f, (y_f, s_f) = jax.jit(lambda p: grad(p, quant_mode="float"))(v["params"])
    g_q, (y_q, s_q) = jax.jit(
        lambda p: grad(p, quant_mode="qat", quant_active=False, bn_frozen=False)
    )(v["params"])
    np.testing.assert_allclose(y_q, y_f, rtol=1e-5, atol=1e-5)
    for k in ("bn_mean", "bn_var"):
        np.testing.assert_allclose(s_q[k], s_f[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in g_f:
        np.testing.assert_allclose(g_q[k], g_f[k], rtol=1e-4, atol=1e-4, err_msg=k)
