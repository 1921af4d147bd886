"""BN folding, the zero-variance fix, cross-layer equalization and the range observers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qfsep_jax.models import MobileNetV1, layer_paths
from qfsep_jax.quant import QuantConfig, observers
from qfsep_jax.quant.cle import equalize
from qfsep_jax.quant.fold import bn_alpha, fix_zero_variance, fold_batch_norm


def _random_model(block="original", seed=0):
    """A width-0.25 MobileNetV1 with random weights and non-trivial BN statistics."""
    model = MobileNetV1(num_classes=6, width_multiplier=0.25, block=block, depthwise_impl="lax")
    v = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)

    def perturb(tree):
        return {
            k: perturb(x)
            if isinstance(x, dict)
            else jnp.asarray(
                rng.uniform(0.5, 2.0, x.shape)
                if k in ("bn_var", "bn_scale")
                else rng.normal(0, 0.3, x.shape)
                if k in ("bn_mean", "bn_bias", "bias")
                else x,
                jnp.float32,
            )
            for k, x in tree.items()
        }

    return model, {"params": perturb(v["params"]), "batch_stats": perturb(v["batch_stats"])}


@pytest.mark.parametrize("block", ["original", "qf"])
def test_folded_model_computes_the_same_function(block):
    model, v = _random_model(block)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ref = jax.jit(model.apply)(v, x)
    folded = fold_batch_norm(v, model.bn_epsilon)
    assert "batch_stats" not in folded
    fmodel = model.clone(bn_folded=True)
    shapes = jax.eval_shape(fmodel.init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, shapes["params"]) == jax.tree.map(jnp.shape, folded["params"])
    out = jax.jit(fmodel.apply)(folded, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_fold_formula_and_alpha():
    model, v = _random_model()
    p, s = v["params"]["Conv2d_1"]["depthwise"], v["batch_stats"]["Conv2d_1"]["depthwise"]
    folded = fold_batch_norm(v, 1e-3)["params"]["Conv2d_1"]["depthwise"]
    alpha = np.asarray(p["bn_scale"]) / np.sqrt(np.asarray(s["bn_var"]) + 1e-3)
    np.testing.assert_allclose(bn_alpha(p["bn_scale"], s["bn_var"], 1e-3), alpha, rtol=1e-6)
    np.testing.assert_allclose(folded["kernel"], np.asarray(p["kernel"]) * alpha, rtol=1e-6)
    bias = np.asarray(p["bn_bias"]) - alpha * np.asarray(s["bn_mean"])
    np.testing.assert_allclose(folded["bias"], bias, rtol=1e-5, atol=1e-6)


def test_zero_variance_fix_replaces_only_dead_channels():
    _, v = _random_model()
    var = np.asarray(v["batch_stats"]["Conv2d_2"]["depthwise"]["bn_var"]).copy()
    var[[1, 4]] = 4e-35
    v["batch_stats"]["Conv2d_2"]["depthwise"]["bn_var"] = jnp.asarray(var)
    fixed_v, fixed = fix_zero_variance(v, threshold=1e-10)
    assert fixed == {"Conv2d_2/depthwise": [1, 4]}
    new = np.asarray(fixed_v["batch_stats"]["Conv2d_2"]["depthwise"]["bn_var"])
    others = np.delete(var, [1, 4])
    np.testing.assert_allclose(new[[1, 4]], others.mean(), rtol=1e-6)
    np.testing.assert_array_equal(np.delete(new, [1, 4]), others)
    # Other layers untouched, and the input is not modified.
    assert np.asarray(v["batch_stats"]["Conv2d_2"]["depthwise"]["bn_var"])[1] == np.float32(4e-35)
    np.testing.assert_array_equal(
        fixed_v["batch_stats"]["Conv2d_3"]["pointwise"]["bn_var"],
        v["batch_stats"]["Conv2d_3"]["pointwise"]["bn_var"],
    )


def _plant_dead_channels(v, layers):
    """Sets the BN variance of channels 1 and 4 of each ``(block, conv)`` layer to ~0."""
    for block, conv in layers:
        var = np.asarray(v["batch_stats"][block][conv]["bn_var"]).copy()
        var[[1, 4]] = 4e-35
        v["batch_stats"][block][conv]["bn_var"] = jnp.asarray(var)
    return v


def _bn_variables(seed=0):
    """The variables tree of a width-0.25 MobileNetV1 (shapes only, no compile), BN variances
    in [0.5, 2]: enough for the zero-variance fix, which reads paths and BN statistics."""
    model = MobileNetV1(num_classes=6, width_multiplier=0.25, depthwise_impl="lax")
    shapes = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32), shapes)
    return {"params": v["params"], "batch_stats": v["batch_stats"]}


def test_zero_variance_fix_scope_selects_the_depthwise_layers():
    v = _bn_variables()
    planted = [("Conv2d_0",), ("Conv2d_2", "depthwise"), ("Conv2d_3", "pointwise")]
    v = _plant_dead_channels(v, [("Conv2d_2", "depthwise"), ("Conv2d_3", "pointwise")])
    var = np.asarray(v["batch_stats"]["Conv2d_0"]["bn_var"]).copy()
    var[[1, 4]] = 4e-35
    v["batch_stats"]["Conv2d_0"]["bn_var"] = jnp.asarray(var)

    dw_v, dw_fixed = fix_zero_variance(v, threshold=1e-10, scope="depthwise")
    assert dw_fixed == {"Conv2d_2/depthwise": [1, 4]}
    assert np.asarray(dw_v["batch_stats"]["Conv2d_2"]["depthwise"]["bn_var"])[1] > 0.5
    for path in (("Conv2d_0",), ("Conv2d_3", "pointwise")):
        node_new, node_old = dw_v["batch_stats"], v["batch_stats"]
        for key in path:
            node_new, node_old = node_new[key], node_old[key]
        np.testing.assert_array_equal(node_new["bn_var"], node_old["bn_var"])

    all_v, all_fixed = fix_zero_variance(v, threshold=1e-10, scope="all")
    assert all_fixed == {"/".join(p): [1, 4] for p in planted}
    assert np.asarray(all_v["batch_stats"]["Conv2d_3"]["pointwise"]["bn_var"])[4] > 0.5
    assert np.asarray(all_v["batch_stats"]["Conv2d_0"]["bn_var"])[1] > 0.5

    with pytest.raises(ValueError, match="scope must be one of"):
        fix_zero_variance(v, threshold=1e-10, scope="pointwise")


def test_cle_preserves_the_relu_function_and_equalizes_ranges():
    model, v = _random_model()
    folded = fold_batch_norm(v, model.bn_epsilon)
    # Make channel ranges very unequal so that equalization has work to do.
    k = np.asarray(folded["params"]["Conv2d_1"]["depthwise"]["kernel"]).copy()
    k[..., 0] *= 40.0
    folded["params"]["Conv2d_1"]["depthwise"]["kernel"] = k
    eq_params, scales = equalize(folded["params"], layer_paths(folded["params"]), iterations=50)
    fmodel = model.clone(bn_folded=True, activation="relu")
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    apply = jax.jit(fmodel.apply)
    np.testing.assert_allclose(
        apply({"params": eq_params}, x), apply(folded, x), rtol=1e-3, atol=1e-4
    )
    paths = layer_paths(eq_params)
    assert len(scales) == len(paths) - 1

    def spread(kernel):
        r = np.abs(np.asarray(kernel)).reshape(-1, kernel.shape[-1]).max(0)
        return r.max() / r.min()

    before = spread(folded["params"]["Conv2d_1"]["depthwise"]["kernel"])
    after = spread(eq_params["Conv2d_1"]["depthwise"]["kernel"])
    assert after < before / 5
    with pytest.raises(ValueError, match="fold"):
        equalize(v["params"], layer_paths(v["params"]))


def test_observers():
    x1 = jnp.array([-1.0, 0.5, 2.0])
    x2 = jnp.array([-3.0, 0.0, 1.0])
    mm = QuantConfig(observer="minmax")
    s = observers.observe(observers.observe(observers.init_range_state(), x1, mm), x2, mm)
    assert (float(s["min"]), float(s["max"]), float(s["count"])) == (-3.0, 2.0, 2.0)
    ema = QuantConfig(observer="ema", ema_decay=0.9)
    s = observers.observe(observers.observe(observers.init_range_state(), x1, ema), x2, ema)
    np.testing.assert_allclose([float(s["min"]), float(s["max"])], [-1.2, 1.9], rtol=1e-6)
    pc = QuantConfig(observer="percentile", percentile=99.0)
    big = jnp.concatenate([jnp.linspace(-1, 1, 10001), jnp.array([1000.0])])
    s = observers.observe(observers.init_range_state(), big, pc)
    assert float(s["max"]) < 2.0 and float(s["min"]) > -1.0  # the outlier is ignored
    with pytest.raises(ValueError, match="observer"):
        QuantConfig(observer="kl")
