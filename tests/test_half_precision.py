"""Mixed precision (``half_precision``): bfloat16 compute, float32 parameters, statistics, codes.

Layer-level gradient comparisons: a whole MobileNetV1 at random initialisation is too chaotic
for one (``tools/bf16_sensitivity.py``: a relative input perturbation of 2**-9, bfloat16's
rounding, moves its float32 gradient by 74-85 %, bfloat16 compute by 98-106 %), so every layer
kind is compared on its own, and the whole model is checked for what must hold exactly (dtypes,
codes, the conversion to the integer pass). ``docs/pod.md`` has the loss curves of whole runs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs import smoke
from qfsep_jax import integer, precision, train
from qfsep_jax import quantized as quantized_lib
from qfsep_jax.analysis import agreement
from qfsep_jax.models import native
from qfsep_jax.models.layers import ActQuant, ConvLayer
from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.numerics import UINT8, qparams, round_half_away_from_zero
from qfsep_jax.quant.scheme import QuantConfig

BF16 = jnp.bfloat16
QC = QuantConfig(observer="ema", ema_decay=0.9)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _bf16_values(shape, seed=0) -> jax.Array:
    """float32 values that bfloat16 represents exactly (both precisions see the same input)."""
    x = np.random.RandomState(seed).normal(size=shape).astype(np.float32)
    return jnp.asarray(x).astype(BF16).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Configuration.


def test_half_precision_resolves_per_backend_and_rejects_non_bools():
    assert precision.resolve_half_precision(None, backend="cpu") is False
    assert precision.resolve_half_precision(None, backend="gpu") is True
    assert precision.resolve_half_precision(None, backend="tpu") is True
    assert precision.resolve_half_precision(False, backend="tpu") is False
    assert precision.resolve_half_precision(True, backend="cpu") is True
    with pytest.raises(ValueError, match="half_precision must be True, False or None"):
        precision.resolve_half_precision("yes")
    c = smoke.get_config()
    assert c.half_precision is None  # auto by default
    resolved = precision.resolved(c)
    assert resolved.half_precision is (jax.default_backend() != "cpu")
    assert c.half_precision is None  # the caller's config is not changed
    old = ConfigDict({"seed": 0})  # a run config written before the field existed
    assert precision.resolved(old).half_precision is (jax.default_backend() != "cpu")


# ----------------------------------------------------------------------------------------------
# Layers: gradients and BN statistics against float32.

LAYERS = {
    "conv3x3_s2": (dict(features=16, kernel_size=3, stride=2), 8),
    "depthwise": (dict(features=16, kernel_size=3, depthwise=True), 16),
    "pointwise": (dict(features=24, kernel_size=1), 16),
    "qf_depthwise": (
        dict(features=16, kernel_size=3, depthwise=True, use_bn=False, use_bias=True),
        16,
    ),
}


def _layer_grads(layer: ConvLayer, x: jax.Array, dtype, **kw):
    """(batch_stats after one step, param gradients, input gradient) of a fixed linear loss."""
    variables = layer.init(jax.random.key(0), x)
    mutable = ["batch_stats", "quant_ranges"]
    if layer.quant is not None:  # ranges from one observed batch
        _, new = layer.apply(
            variables, x, train=True, quant_mode="qat", quant_active=False, mutable=mutable
        )
        variables = {**variables, "quant_ranges": new["quant_ranges"]}
    out_shape = jax.eval_shape(
        lambda: layer.apply(variables, x, train=True, mutable=mutable, **kw)[0]
    ).shape
    r = jnp.asarray(np.random.RandomState(1).normal(size=out_shape).astype(np.float32))

    def loss(params, x):
        y, new = layer.apply(
            {**variables, "params": params}, x.astype(dtype), train=True, mutable=mutable, **kw
        )
        assert y.dtype == dtype, (y.dtype, dtype)
        return jnp.sum(y.astype(jnp.float32) * r), new

    (_, new), (d_params, d_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x
    )
    return new.get("batch_stats", {}), d_params, d_x


@pytest.mark.parametrize(
    "name,mode",
    [
        ("conv3x3_s2", "float"),
        ("qf_depthwise", "float"),
        ("pointwise", "qat_correction"),
        ("depthwise", "qat_frozen"),
    ],
)
def test_bfloat16_layer_gradients_match_float32(name, mode):
    """Each layer kind (activation 'none', so no ReLU mask can flip) in bfloat16 vs float32.

    Measured 0.12-0.33 % relative (tools/bf16_sensitivity.py; bfloat16 rounds to 2**-9
    relative). Tolerance 1 %. With ReLU6
    the difference is larger: a pre-activation within rounding of 0 or 6 switches its gradient
    on or off (see the ReLU6 test). QAT without rounding here (``quant_active=False``): the
    folding arithmetic; the codes are tested below.
    """
    attrs, cin = LAYERS[name]
    kw = {}
    layer = ConvLayer(**attrs, activation="none", bn_momentum=0.0, depthwise_impl="auto")
    if mode != "float":
        layer = layer.clone(quant=QC)
        kw = dict(quant_mode="qat", quant_active=False, bn_frozen=mode == "qat_frozen")
    x = _bf16_values((4, 12, 12, cin))
    stats16, dp16, dx16 = _layer_grads(layer, x, BF16, **kw)
    stats32, dp32, dx32 = _layer_grads(layer, x, jnp.float32, **kw)
    assert _rel(dx16, dx32) < 1e-2
    for k in dp32:
        assert dp16[k].dtype == np.float32, k  # gradients of float32 parameters
        assert _rel(dp16[k], dp32[k]) < 1e-2, (k, _rel(dp16[k], dp32[k]))
    for k in stats32:  # momentum 0: the batch moments themselves
        assert stats16[k].dtype == np.float32
        np.testing.assert_allclose(stats16[k], stats32[k], rtol=2e-2, atol=1e-3)


def test_bfloat16_relu6_layer_gradients_agree_up_to_mask_flips():
    layer = ConvLayer(features=16, kernel_size=3, stride=2, bn_momentum=0.0, depthwise_impl="lax")
    x = _bf16_values((4, 12, 12, 8))
    _, dp16, dx16 = _layer_grads(layer, x, BF16)
    _, dp32, dx32 = _layer_grads(layer, x, jnp.float32)
    # Measured 1.0-1.3 % (tools/bf16_sensitivity.py): the ReLU6 derivative is 0 or 1 and flips
    # for pre-activations within bfloat16 rounding of the clip points.
    assert _rel(dx16, dx32) < 0.1
    assert _rel(dp16["kernel"], dp32["kernel"]) < 0.1
    assert _rel(dp16["bn_scale"], dp32["bn_scale"]) < 0.02  # measured 0.22 %


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_bn_batch_moments_of_bfloat16_activations_are_float32_moments(kernel_size):
    """The moments are float32 statistics of the bfloat16 conv output (to float32 rounding).

    Negative control: bfloat16 moments of the same output differ from them by more than 5e-4,
    25x the tolerance.
    """
    layer = ConvLayer(
        features=16,
        kernel_size=kernel_size,
        activation="none",
        bn_momentum=0.0,
        depthwise_impl="lax",
    )
    x = _bf16_values((4, 12, 12, 8))
    variables = layer.init(jax.random.key(0), x)
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs: float32 is the reference
        _check_moments(layer, variables, x, kernel_size)


def _check_moments(layer, variables, x, kernel_size):
    for kw in ({}, dict(quant_mode="qat", quant_active=False)):
        lyr = layer.clone(quant=QC) if kw else layer
        v = lyr.init(jax.random.key(0), x) if kw else variables
        _, new = lyr.apply(
            v, x.astype(BF16), train=True, mutable=["batch_stats", "quant_ranges"], **kw
        )
        # QAT's pointwise moments come from the input's moments (linear_moments), in float32.
        dtype = jnp.float32 if kw and kernel_size == 1 else BF16
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            v["params"]["kernel"].astype(dtype),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ).astype(jnp.float32)
        mean = jnp.mean(y, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(y), axis=(0, 1, 2)) - jnp.square(mean)
        got = new["batch_stats"]
        np.testing.assert_allclose(got["bn_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["bn_var"], var, rtol=2e-5)
        y16 = y.astype(BF16)
        mean16 = jnp.mean(y16, axis=(0, 1, 2))
        var16 = jnp.mean(jnp.square(y16), axis=(0, 1, 2)) - jnp.square(mean16)
        assert _rel(var16.astype(jnp.float32), var) > 5e-4  # the control is sensitive


def test_bfloat16_convolutions_take_xla_which_accumulates_in_float32():
    """Under ``auto``, a bfloat16 depthwise layer runs XLA's convolution on every backend.

    Taps 1 and 8 x 2**-9 on an input of ones: exactly 1 + 2**-6, a bfloat16 value. XLA's
    convolution accumulates in float32 and gets it; control: the shifted multiply-adds
    (``shift``) sum in bfloat16 and lose half of it.
    """
    kernel = np.full((3, 3, 1, 4), 2.0**-9, np.float32)
    kernel[1, 1] = 1.0
    layer = ConvLayer(
        features=4,
        kernel_size=3,
        depthwise=True,
        use_bn=False,
        activation="none",
        quantize_output=False,
    )
    x = jnp.ones((1, 4, 4, 4), BF16)
    params = {"params": {"kernel": jnp.asarray(kernel)}}
    y = layer.clone(depthwise_impl="auto").apply(params, x)
    assert y.dtype == BF16 and float(y[0, 1, 1, 0]) == 1 + 2**-6
    y_shift = layer.clone(depthwise_impl="shift").apply(params, x)
    assert float(y_shift[0, 1, 1, 0]) < 1 + 2**-6


def test_native_kernels_are_float32_only_and_bfloat16_falls_back_explicitly():
    layer = ConvLayer(features=16, kernel_size=3, depthwise=True, depthwise_impl="auto")
    x = _bf16_values((2, 8, 8, 16))
    v = layer.init(jax.random.key(0), x)

    def step_jaxpr(dtype) -> str:
        def loss(params):
            y, _ = layer.apply(
                {**v, "params": params}, x.astype(dtype), train=True, mutable=["batch_stats"]
            )
            return jnp.sum(y.astype(jnp.float32))

        return str(jax.make_jaxpr(jax.grad(loss))(v["params"]))

    if jax.default_backend() == "cpu" and native.available():
        assert "qfsep_" in step_jaxpr(jnp.float32)  # float32 runs the C++ kernels ...
    bf16 = step_jaxpr(BF16)
    assert "qfsep_" not in bf16  # ... bfloat16 XLA's grouped convolution and reductions
    assert "feature_group_count=16" in bf16
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="covers float32 3x3 kernels only"):
            layer.clone(depthwise_impl="native").apply(
                v, x.astype(BF16), train=True, mutable=["batch_stats"]
            )


# ----------------------------------------------------------------------------------------------
# Fake quantization: the codes of the float32 value.


def test_fake_quant_of_bfloat16_gives_the_float32_codes():
    rng = np.random.RandomState(0)
    lo, hi = -1.7, 5.3
    scale, zp = qparams(lo, hi, UINT8)
    # Values at and next to the rounding ties (code + 1/2) and across the range, in bfloat16.
    ties = (np.arange(-3, 250) + 0.5 - float(zp)) * float(scale)
    x = np.concatenate([ties, np.nextafter(ties, np.inf), rng.uniform(-3, 7, 4000)])
    x16 = jnp.asarray(x, jnp.float32).astype(BF16)
    x32 = x16.astype(jnp.float32)  # the float32 value each bfloat16 value stands for
    want = fake_quant(x32, lo, hi, UINT8)
    got32 = fake_quant(x16, lo, hi, UINT8, out_dtype=jnp.float32)
    np.testing.assert_array_equal(got32, want)  # same codes, dequantized in float32
    got = fake_quant(x16, lo, hi, UINT8)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got, want.astype(BF16))
    # Gradient: straight through inside the range, in the input's dtype.
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, lo, hi, UINT8).astype(jnp.float32)))(x16)
    assert g.dtype == BF16
    np.testing.assert_array_equal(g, jax.grad(lambda v: jnp.sum(fake_quant(v, lo, hi)))(x32))
    # Control: rounding x / scale in bfloat16 arithmetic would give other codes.
    codes16 = round_half_away_from_zero(x16 / scale.astype(BF16)) + zp.astype(BF16)
    codes32 = round_half_away_from_zero(x32 / scale) + zp
    assert np.mean(np.asarray(codes16, np.float32) != np.asarray(codes32)) > 0.05


def test_activation_quantizer_observes_and_rounds_bfloat16_in_float32():
    q = ActQuant(QuantConfig(observer="minmax"))
    x32 = _bf16_values((4, 6, 6, 8)) * 4.0  # a power of two: still bfloat16 values
    x16 = x32.astype(BF16)
    v = q.init(jax.random.key(0), x32)
    _, new = q.apply(v, x16, quant_mode="calibrate", mutable=["quant_ranges"])
    ranges = new["quant_ranges"]
    assert ranges["min"].dtype == np.float32
    assert float(ranges["min"]) == float(jnp.min(x32))
    assert float(ranges["max"]) == float(jnp.max(x32))
    out16 = q.apply({"quant_ranges": ranges}, x16, quant_mode="fake")
    out32 = q.apply({"quant_ranges": ranges}, x32, quant_mode="fake")
    assert out16.dtype == BF16
    np.testing.assert_array_equal(out16, out32.astype(BF16))


# ----------------------------------------------------------------------------------------------
# The whole model: a bfloat16 QAT training step, its checkpoint, the integer pass.


@pytest.fixture(scope="module")
def bf16_qat_run():
    """One QAT step of the smoke config's model (0.25/32) with ``half_precision=True``: it
    observes the activation ranges and trains with fake quantization (no quant delay)."""
    config = smoke.get_config()
    config.half_precision = True
    config.qat.enabled = True
    model, variables = train.create_model_and_variables(config, 10)
    assert model.dtype == "bfloat16" and model.quant is not None
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (1, 8, 32, 32, 3)).astype(np.float32)
    labels = rng.randint(0, 10, (1, 8)).astype(np.int32)
    schedule = optax.constant_schedule(0.01)
    tx = optax.sgd(schedule, momentum=0.9)
    state = train.create_train_state(variables, tx, 0)
    step_config = train.StepConfig(num_classes=10, qat=True)
    step = train.pmap_step(
        functools.partial(
            train.train_step, model=model, tx=tx, schedule=schedule, step_config=step_config
        ),
        jax.local_devices()[:1],
    )
    state, metrics = step(state, {"image": images, "label": labels})
    return model, jax.device_get(state), np.asarray(metrics["train_loss"]), images[0]


def test_bfloat16_training_keeps_float32_state(bf16_qat_run):
    _, state, loss, _ = bf16_qat_run
    assert np.all(np.isfinite(loss)), loss
    assert int(state.step) == 1
    for name in ("params", "batch_stats", "quant_ranges", "opt_state"):
        leaves = [
            x for x in jax.tree.leaves(getattr(state, name)) if np.issubdtype(x.dtype, np.floating)
        ]
        assert leaves and all(leaf.dtype == np.float32 for leaf in leaves), name


def test_bfloat16_qat_model_exports_and_converts_to_the_integer_pass(bf16_qat_run):
    model, state, _, images = bf16_qat_run
    quantized = quantized_lib.from_qat(model, train.model_variables(state))
    assert quantized.model.dtype is None  # the integer pass's simulation is float32
    assert quantized_lib.model_kwargs(quantized.model)["dtype"] is None  # what model.json records
    int_model = integer.from_quantized(quantized)
    layers = agreement.layerwise_agreement(quantized.model, quantized.variables, int_model, images)
    assert list(layers) == int_model.layer_names
    assert max(v["max_lsb"] for v in layers.values()) <= 1, layers
