"""Users' own separable blocks and activations: float, training, PTQ, the integer pass, saving.

Tiny models on purpose (MobileNetV1 0.25 at 32 px, random weights with BN statistics,
post-training quantized on 8 random images); see docs/extending.md.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qfsep_jax import checkpointing, integer, ptq, quantized
from qfsep_jax.analysis import agreement
from qfsep_jax.config_validation import ConfigError, validate
from qfsep_jax.integer import kernels
from qfsep_jax.models import activations, mobilenet_v1
from qfsep_jax.models.activations import Activation
from qfsep_jax.models.layers import ConvLayer, batch_norm_train, conv2d
from qfsep_jax.models.mobilenet_v1 import MobileNetV1, SeparableBlockBase, random_variables

SIZE = 32


class DWBNNoActBlock(SeparableBlockBase):
    """DW 3×3 → BN → PW 1×1 → BN → act: the original block without the depthwise activation."""

    @nn.compact
    def __call__(self, x, train=False, quant_mode="float", bn_frozen=False, quant_active=True):
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        x = self._layer(
            "depthwise",
            features=x.shape[-1],
            kernel_size=3,
            stride=self.stride,
            depthwise=True,
            activation="none",
        )(x, **kw)
        return self._layer(
            "pointwise", features=self.features, kernel_size=1, activation=self.activation
        )(x, **kw)


class NoBNBlock(SeparableBlockBase):
    """DW 3×3 + bias → PW 1×1 + bias → act, no BN anywhere."""

    @nn.compact
    def __call__(self, x, train=False, quant_mode="float", bn_frozen=False, quant_active=True):
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        x = self._layer(
            "depthwise",
            features=x.shape[-1],
            kernel_size=3,
            stride=self.stride,
            depthwise=True,
            use_bn=False,
            use_bias=True,
            activation=self.activation,
        )(x, **kw)
        return self._layer(
            "pointwise",
            features=self.features,
            kernel_size=1,
            use_bn=False,
            use_bias=True,
            activation=self.activation,
        )(x, **kw)


class ScaledBetweenBlock(DWBNNoActBlock):
    """Computes something between its layers, which the integer pass cannot follow."""

    @nn.compact
    def __call__(self, x, train=False, quant_mode="float", bn_frozen=False, quant_active=True):
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        x = self._layer(
            "depthwise", features=x.shape[-1], kernel_size=3, stride=self.stride, depthwise=True
        )(x, **kw)
        return self._layer(
            "pointwise", features=self.features, kernel_size=1, activation=self.activation
        )(0.5 * x, **kw)


class OtherNamesBlock(SeparableBlockBase):
    """DW → PW with layers named ``dw`` and ``pw``: the model needs its last one ``pointwise``."""

    @nn.compact
    def __call__(self, x, train=False, quant_mode="float", bn_frozen=False, quant_active=True):
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        x = self._layer("dw", features=x.shape[-1], kernel_size=3, depthwise=True)(x, **kw)
        return self._layer("pw", features=self.features, kernel_size=1)(x, **kw)


RELU4 = Activation("test_relu4", clamp=(0.0, 4.0))  # clip(x, 0, 4)


def _softplus_ish(x):
    return jnp.log1p(jnp.exp(x)) - 0.5


SOFTPLUS = Activation("test_softplus", _softplus_ish, None)


@pytest.fixture
def registered():
    """The test's block and activation under registered names, removed afterwards."""
    mobilenet_v1.register_block("test_nobn", NoBNBlock)
    activations.register_activation(RELU4)
    yield
    mobilenet_v1.unregister_block("test_nobn")
    activations.unregister_activation(RELU4.name)


def _tiny(block, activation="relu6", seed=0) -> MobileNetV1:
    return MobileNetV1(
        num_classes=10,
        width_multiplier=0.25,
        block=block,
        activation=activation,
        stem_stride=1,
        dropout_rate=0.0,
        depthwise_impl="lax",
    )


def _ptq(model, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    variables = random_variables(model, SIZE, seed)
    recipe = ptq.recipe_by_name("tf8_per_tensor")
    qmodel = ptq.quantize_post_training(model, variables, recipe, lambda: [{"image": images}], 1)
    return qmodel, images


def _max_lsb(qmodel, int_model, images) -> dict:
    lw = agreement.layerwise_agreement(qmodel.model, qmodel.variables, int_model, images)
    assert list(lw) == int_model.layer_names
    return {name: v["max_lsb"] for name, v in lw.items()}


def test_custom_block_class_through_ptq_and_the_integer_pass():
    qmodel, images = _ptq(_tiny(DWBNNoActBlock))
    int_model = integer.from_quantized(qmodel)
    # The block's own structure reached the integer model: BN folded into the depthwise layer
    # (a bias) and no activation there, the model's relu6 after the pointwise layer.
    dw, pw = int_model.layer("Conv2d_1_depthwise"), int_model.layer("Conv2d_1_pointwise")
    assert dw.activation == "none" and (dw.act_min, dw.act_max) == (0, 255)
    assert np.any(np.asarray(dw.bias) != 0)
    assert pw.activation == "relu6"
    lsb = _max_lsb(qmodel, int_model, images)
    assert max(lsb.values()) <= 1, lsb
    # The class itself cannot be saved by name.
    with pytest.raises(ValueError, match="DWBNNoActBlock is not registered.*register_block"):
        quantized.model_kwargs(qmodel.model)


def test_registered_block_and_clamp_activation_through_ptq_integer_and_save(registered, tmp_path):
    qmodel, images = _ptq(_tiny("test_nobn", RELU4.name))
    # Widen every activation range beyond the clamp: the simulation still clips at 4, so the
    # integer pass agrees only if it clamps at the code of 4 ([0, 4] in TFLite's rule; with
    # act_max 255 instead, they differ by more than 1 LSB).
    ranges = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            np.maximum(v, np.float32(8.0))
            if jax.tree_util.keystr(p).endswith("['max']")
            and "Logits" not in jax.tree_util.keystr(p)
            else v
        ),
        qmodel.variables["quant_ranges"],
    )
    qmodel = quantized.QuantizedModel(
        qmodel.model, {**qmodel.variables, "quant_ranges": ranges}, qmodel.recipe, qmodel.info
    )
    int_model = integer.from_quantized(qmodel)
    clamped = [layer for layer in int_model.layers if layer.activation == RELU4.name]
    assert len(clamped) == 1 + 2 * 13  # stem and both layers of every block
    for layer in clamped:
        want = kernels.activation_range(
            (0.0, 4.0), layer.output_scale, layer.output_zero_point, 0, 255
        )
        assert (layer.act_min, layer.act_max) == want and layer.act_max < 255, layer.name
    lsb = _max_lsb(qmodel, int_model, images)
    assert max(lsb.values()) <= 1, lsb

    # Saved by name, loaded back to the same model and the same simulation.
    kw = quantized.model_kwargs(qmodel.model)
    assert kw["block"] == "test_nobn" and kw["activation"] == RELU4.name
    quantized.save_quantized(qmodel, str(tmp_path / "q"))
    back = quantized.load_quantized(str(tmp_path / "q"))
    # A process that has not registered the name cannot rebuild the model, and says why.
    mobilenet_v1.unregister_block("test_nobn")
    with pytest.raises(ValueError, match="unknown block 'test_nobn'.*register_block"):
        quantized.load_quantized(str(tmp_path / "q"))
    mobilenet_v1.register_block("test_nobn", NoBNBlock)
    # Same model and variables: the same simulation and integer model.
    assert back.model == qmodel.model
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(qmodel.variables),
        jax.tree.leaves(back.variables),
        strict=True,
    ):
        np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))

    # TFLite has no fused activation for the clamp [0, 4].
    with pytest.raises(integer.TFLiteExportError, match="layer Conv2d_0: activation 'test_relu4'"):
        integer.to_tflite(int_model, str(tmp_path / "m.tflite"), SIZE)


def test_builtin_activations_as_objects_convert_and_export(tmp_path):
    model = _tiny("qf", Activation("relu6", clamp=(0, 6)))
    assert activations.get_activation(model.activation) == activations.RELU6
    qmodel, images = _ptq(model)
    int_model = integer.from_quantized(qmodel)
    assert int_model.layer("Conv2d_0").activation == "relu6"
    integer.to_tflite(int_model, str(tmp_path / "m.tflite"), SIZE)
    back = integer.from_tflite(str(tmp_path / "m.tflite"))
    for a, b in zip(int_model.layers, back.layers, strict=True):
        assert (a.activation, a.act_min, a.act_max) == (b.activation, b.act_min, b.act_max)


def test_hard_swish_runs_in_float_but_the_integer_pass_refuses_it():
    model = _tiny("qf", "hard_swish")
    qmodel, images = _ptq(model)
    # Calibration ran the float forward pass: hard_swish reaches below 0 (down to -3/8).
    stem = qmodel.variables["quant_ranges"]["Conv2d_0"]["act_quant"]
    assert -0.375 <= stem["min"] < 0 < stem["max"]
    with pytest.raises(ValueError, match=r"layer Conv2d_0: activation 'hard_swish' is not a clamp"):
        integer.from_quantized(qmodel)
    with pytest.raises(ValueError, match="cross_layer_equalization needs a ReLU-type"):
        ptq.prepare_folded(model, random_variables(model, SIZE), ptq.RECIPES["cle_per_tensor"])


def test_a_block_computing_between_its_layers_is_refused_by_the_integer_pass():
    qmodel, _ = _ptq(_tiny(ScaledBetweenBlock))
    with pytest.raises(ValueError, match="layer Conv2d_1_pointwise: its input is not the output"):
        integer.from_quantized(qmodel)


def test_a_block_whose_last_layer_is_not_pointwise_is_refused_in_the_simulation():
    model = _tiny(OtherNamesBlock).clone(quant=quantized.PTQRecipe().quant_config())
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables["params"]["Conv2d_1"]) == {"dw", "pw"}
    with pytest.raises(ValueError, match="OtherNamesBlock: its last layer must be a ConvLayer"):
        jax.eval_shape(lambda v, x: model.apply(v, x, quant_mode="fake"), variables, x)


def _bn_reference(y, gamma, beta, eps):
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.maximum(jnp.mean(jnp.square(y), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
    return (y - mean) * (gamma * jax.lax.rsqrt(var + eps)) + beta, mean, var


@pytest.mark.parametrize("act", [activations.HARD_SWISH, SOFTPLUS, RELU4], ids=lambda a: a.name)
@pytest.mark.parametrize("native_sums", [False, True])
def test_bn_training_vjp_of_a_custom_activation_equals_autodiff(act, native_sums):
    rs = np.random.RandomState(1)
    y = (rs.randn(2, 9, 9, 12) * 3 + 1).astype(np.float32)
    gamma, beta = (rs.rand(12) + 0.5).astype(np.float32), rs.randn(12).astype(np.float32)
    cot = rs.randn(*y.shape).astype(np.float32)

    def loss(bn, y, gamma, beta):
        out, mean, var = bn(y, gamma, beta)
        return jnp.sum(out * cot) + jnp.sum(mean) + jnp.sum(var)

    def ref(y, g, b):
        out, mean, var = _bn_reference(y, g, b, 1e-3)
        return act(out), mean, var

    def fused(y, g, b):
        return batch_norm_train(y, g, b, 1e-3, None, act, native_sums)

    want = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(y, gamma, beta)
    got = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(y, gamma, beta)
    for name, a, b in zip(("d/dy", "d/dgamma", "d/dbeta"), want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("act", ["hard_swish", SOFTPLUS], ids=str)
def test_train_step_gradients_of_a_custom_activation_layer(act):
    # A ConvLayer in training (BN in batch statistics, the fused VJP) and in QAT before the
    # quant delay: the gradients of the plain forward conv → BN → act.
    layer = ConvLayer(features=6, kernel_size=3, activation=act, depthwise_impl="lax")
    qat = layer.clone(quant=quantized.PTQRecipe().quant_config())
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.normal(0.5, 1.5, size=(4, 7, 7, 5)).astype(np.float32))
    cot = jnp.asarray(rs.normal(size=(4, 7, 7, 6)).astype(np.float32))
    v = qat.init(jax.random.key(0), x)
    v["params"]["bn_scale"] = jnp.asarray(rs.uniform(0.5, 2.0, 6), jnp.float32)
    v["params"]["bn_bias"] = jnp.asarray(rs.normal(size=6), jnp.float32)
    fn = activations.get_activation(act)

    def plain(p):
        y, _, _ = _bn_reference(conv2d(x, p["kernel"], 1), p["bn_scale"], p["bn_bias"], 1e-3)
        return jnp.sum(fn(y) * cot)

    def model_loss(p, module, **kw):
        y, _ = module.apply({**v, "params": p}, x, train=True, mutable=True, **kw)
        return jnp.sum(y * cot)

    want = jax.jit(jax.grad(plain))(v["params"])
    got_float = jax.jit(jax.grad(lambda p: model_loss(p, layer)))(v["params"])
    got_qat = jax.jit(jax.grad(lambda p: model_loss(p, qat, quant_mode="qat", quant_active=False)))(
        v["params"]
    )
    for got in (got_float, got_qat):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_bad_block_and_activation_values():
    names = r"\('original', 'qf', 'original_linear_dw', 'original_nobn_dw'\)"
    with pytest.raises(ValueError, match=rf"unknown block 'fancy'.*{names}.*class"):
        MobileNetV1(block="fancy")
    with pytest.raises(ValueError, match="subclass of SeparableBlockBase"):
        MobileNetV1(block=ConvLayer)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*'hard_swish'.*Activation"):
        MobileNetV1(activation="swish")
    with pytest.raises(TypeError, match="activation must be a registered name"):
        MobileNetV1(activation=jax.nn.relu)
    with pytest.raises(TypeError, match="not a subclass of SeparableBlockBase"):
        mobilenet_v1.register_block("x", ConvLayer)
    with pytest.raises(ValueError, match="'qf' is already registered"):
        mobilenet_v1.register_block("qf", NoBNBlock)
    with pytest.raises(ValueError, match="'relu6' is already registered"):
        activations.register_activation(Activation("relu6", clamp=(0, 6)))
    with pytest.raises(TypeError, match="takes an Activation"):
        activations.register_activation(jax.nn.relu)
    with pytest.raises(ValueError, match="clamp needs lo < hi"):
        Activation("bad", clamp=(4, 0))
    with pytest.raises(ValueError, match="give fn, clamp, or both"):
        Activation("bad")
    with pytest.raises(ValueError, match="Activation.*'test_softplus'.*is not registered"):
        quantized.model_kwargs(_tiny("qf", SOFTPLUS))
    assert hash(SOFTPLUS) == hash(Activation("test_softplus", _softplus_ish, None))


def test_configs_take_registered_names(registered):
    from configs import smoke

    config = smoke.get_config()
    config.model.block, config.model.activation = "test_nobn", RELU4.name
    validate(config, "train", check_paths=False)
    model, _ = checkpointing.model_from_config(config, 10)
    assert model.block == "test_nobn" and model.activation == RELU4.name
    config.qat.enabled, config.qat.integer, config.model.activation = True, True, "hard_swish"
    with pytest.raises(ConfigError, match="model.activation='hard_swish': must be a clamp"):
        validate(config, "train", check_paths=False)
    config.qat.integer = False
    validate(config, "train", check_paths=False)
    config.model.block = "fancy"
    names = r"\('original', 'qf', 'original_linear_dw', 'original_nobn_dw', 'test_nobn'\)"
    with pytest.raises(ConfigError, match=f"must be one of {names}"):
        validate(config, "train", check_paths=False)
