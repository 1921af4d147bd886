"""Conv layers with batch norm, activation and the shared fake-quant hooks.

Every layer of MobileNetV1 is a :class:`ConvLayer`: conv (regular or depthwise, TF "SAME"
padding), then optionally BN, an activation, and an activation quantizer (:class:`ActQuant`).
How a forward pass treats quantization is chosen per call by ``quant_mode``:

* ``"float"``: the float model (BN in batch or moving statistics as ``train`` says);
* ``"calibrate"``: the float inference model; every activation quantizer feeds its observer
  (range calibration for PTQ), nothing is rounded;
* ``"fake"``: inference with BN folded into the weights, weights and activations fake-quantized
  with the calibrated ranges; the simulation that the integer pass matches;
* ``"qat"``: like ``"fake"``; with ``train=True`` it is quantization-aware training, with BN
  folding simulated by correction-and-freeze and moving-average activation ranges.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.models import depthwise, native
from qfsep_jax.models.activations import Activation, get_activation, is_builtin
from qfsep_jax.models.names import tfslim_name
from qfsep_jax.quant import observers
from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.fold import fold_bn
from qfsep_jax.quant.numerics import check_range
from qfsep_jax.quant.scheme import QuantConfig, fake_quant_weights

QUANT_MODES = ("float", "calibrate", "fake", "qat")


def activation_fn(activation: str | Activation, x: jax.Array) -> jax.Array:
    """Applies ``activation`` (a registered name or an :class:`Activation`) to ``x``."""
    return get_activation(activation)(x)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "lax") -> jax.Array:
    """A regular NHWC conv with TF "SAME" padding (stride 2, even size: 0 before, 1 after).

    A 1×1 stride-1 conv (pointwise, classifier) is the matmul ``[N*H*W, Cin] @ [Cin, Cout]``:
    XLA:CPU then runs forward and both gradients as plain matmuls, where its convolution path
    transposes activations for the kernel gradient ; same result up to summation order.
    Larger kernels use XLA's convolution; with ``impl`` resolving to ``shift`` or ``native``
    (the CPU choices of ``auto``, as for depthwise layers) a conv with at most 8 input channels
    (the RGB stem) runs its forward pass as shifted multiply-adds, and with ``native`` its
    kernel gradient in a C++ custom call (:func:`~qfsep_jax.models.depthwise.direct_conv2d`).
    """
    if kernel.shape[:2] == (1, 1) and stride == 1:
        n, h, w, c = x.shape
        return jnp.reshape(jnp.reshape(x, (n * h * w, c)) @ kernel[0, 0], (n, h, w, -1))
    if kernel.shape[2] <= 8 and depthwise.resolve_impl(impl) != "lax":
        return depthwise.direct_conv2d(x, kernel, stride, impl=impl)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def activation_grad_weight(activation: str | Activation, z: jax.Array) -> jax.Array | float:
    """The derivative of :func:`activation_fn` at ``z``, as JAX's autodiff gives it.

    relu: 1 above 0, 0 at and below (``jax.nn.relu``); relu6 (a clip to [0, 6]): 1 inside,
    1/2 at exactly 0 or 6 (the tie rule of ``max``/``min``), 0 outside; none: 1. The native
    gradient sums (``csrc/cpu_kernels.cc``, ``ActivationGrad``) use the same rule. Any other
    activation: ``jax.jvp`` of its function with a tangent of ones (it is elementwise).
    """
    act = get_activation(activation)
    if is_builtin(act, tuple(ACTIVATION_CODES)):
        if act.name == "relu6":
            inside = (z > 0) & (z < 6)
            return jnp.where(inside, 1.0, jnp.where((z == 0) | (z == 6), 0.5, 0.0)).astype(z.dtype)
        if act.name == "relu":
            return (z > 0).astype(z.dtype)
        return 1.0
    return act.derivative(z)


# The activation attribute of the native BN gradient sums (csrc/cpu_kernels.cc kAct*).
ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2}


def _channel_sums(target: str, *args: jax.Array, **attrs) -> tuple[jax.Array, jax.Array]:
    """The two ``[C]`` per-channel sums of a native BN custom call over ``[..., C]`` arrays."""
    if not native.available():  # also registers the custom calls
        raise RuntimeError(f"native BN sums unavailable: {native.unavailable_reason()}")
    c = args[0].shape[-1]
    out = jax.ShapeDtypeStruct((2, c), jnp.float32)
    sums = jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, **attrs)
    return sums[0], sums[1]


@jax.custom_vjp
def _native_moments(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel E[y] and E[y^2] over all but the last axis, in one native pass."""
    s0, s1 = _channel_sums(native.CHANNEL_MOMENTS_TARGET, y)
    count = y.size // y.shape[-1]
    return s0 / count, s1 / count


def _native_moments_bwd(y, cotangents):
    d_mean, d_mean_sq = cotangents
    count = y.size // y.shape[-1]
    return ((d_mean + 2.0 * d_mean_sq * y) / count,)


_native_moments.defvjp(lambda y: (_native_moments(y), y), _native_moments_bwd)


def _raw_moments(
    y: jax.Array, axis_name: str | None, native_sums: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per-channel E[y] and E[y^2] over batch and space (and over ``axis_name`` devices).

    ``native_sums``: both in one pass of a C++ custom call (float32 on CPU), where XLA reads
    ``y`` once per sum. Computed in float32 at least, whatever ``y``'s dtype.
    """
    if native_sums:
        mean, mean_sq = _native_moments(y)
    else:
        # At least float32: bfloat16 activations get float32 statistics (squares included).
        y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
        mean = jnp.mean(y, axis=(0, 1, 2))
        mean_sq = jnp.mean(jnp.square(y), axis=(0, 1, 2))
    if axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    return mean, mean_sq


@jax.custom_vjp
def linear_moments(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-column E[y] and E[y^2] of ``y = x @ w`` (``x`` [M, K], ``w`` [K, N]), without ``y``.

    ``E[y] = mean(x) @ w`` and ``E[y^2]_n = w_n . (x^T x / M) w_n``: one ``K x K`` Gram matrix
    (``M*K*K`` multiply-adds) where ``y`` costs ``M*K*N`` forward and twice that backward; the
    hand-written VJP needs one more ``M*K*K`` matmul (``dx = (2/M) x w diag(d) w^T`` plus a
    broadcast), where autodiff of the Gram would make two. Same values as the moments of ``y``
    up to float rounding.
    """
    return _linear_moments_fwd(x, w)[0]


def _linear_moments_fwd(x, w):
    count = x.shape[0]
    x_mean = jnp.mean(x, axis=0)
    gram = (x.T @ x) / count
    gw = gram @ w
    return (x_mean @ w, jnp.sum(gw * w, axis=0)), (x, w, x_mean, gw)


def _linear_moments_bwd(residuals, cotangents):
    x, w, x_mean, gw = residuals
    d_mean, d_mean_sq = cotangents
    count = x.shape[0]
    a = (w * d_mean_sq) @ w.T  # w diag(d) w^T, [K, K]
    dx = (2.0 / count) * (x @ a) + (w @ d_mean) / count
    dw = jnp.outer(x_mean, d_mean) + 2.0 * gw * d_mean_sq
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear_moments.defvjp(_linear_moments_fwd, _linear_moments_bwd)


def native_bn_sums(impl: str, y: jax.Array) -> bool:
    """Whether BN's sums over ``y`` run natively: ``impl`` (the model's ``depthwise_impl``)
    resolves to ``native`` and ``y`` is float32 (else XLA's reductions)."""
    return depthwise.native_applies(depthwise.resolve_impl(impl), y.dtype == jnp.float32)


def batch_norm_train(
    y: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    epsilon: float,
    axis_name: str | None,
    activation: str | Activation = "none",
    native_sums: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BN of NHWC ``y`` and the activation after it, with a hand-written VJP.

    Returns ``(act((y - mean) * gamma / sqrt(var + eps) + beta), mean, var)``, ``mean``/``var``
    the batch moments (``var = max(E[y^2] - E[y]^2, 0)``, combined over ``axis_name`` devices).
    The VJP gives the gradients that autodiff of this forward gives (up to float rounding) in
    two reductions (sum of ``g * w`` and of ``g * w * y``, ``w`` the activation's derivative
    recomputed from ``y``) and one elementwise pass, where autodiff materializes ``y - mean``
    and ``g * w`` and needs more reductions and passes.

    ``native_sums`` (see :func:`native_bn_sums`): the moments, and the two gradient sums, each
    in one pass of a C++ custom call (``csrc/cpu_kernels.cc``); XLA reads its inputs once per
    sum and writes ``g * w`` to memory first.

    An activation other than the built-in relu/relu6/none (the only ones the C++ sums know)
    runs with XLA's sums and its derivative from autodiff (:func:`activation_grad_weight`).
    """
    act = get_activation(activation)
    if not is_builtin(act, tuple(ACTIVATION_CODES)):
        native_sums = False
    return _bn_act_train(y, gamma, beta, epsilon, axis_name, act, native_sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _bn_act_train(y, gamma, beta, epsilon, axis_name, activation, native_sums):
    return _bn_train_fwd(y, gamma, beta, epsilon, axis_name, activation, native_sums)[0]


def _bn_train_fwd(y, gamma, beta, epsilon, axis_name, activation, native_sums):
    mean, mean_sq = _raw_moments(y, axis_name, native_sums)
    diff = mean_sq - jnp.square(mean)
    var = jnp.maximum(diff, 0.0)
    inv = jax.lax.rsqrt(var + epsilon)
    out = activation_fn(activation, (y - mean) * (gamma * inv) + beta)
    return (out, mean, var), (y, gamma, beta, mean, diff, inv)


def _bn_train_bwd(epsilon, axis_name, activation, native_sums, residuals, cotangents):
    del epsilon
    g, g_mean, g_var = cotangents
    y, gamma, beta, mean, diff, inv = residuals
    alpha = gamma * inv
    # The activation's derivative, recomputed from y (no pre-activation residual is kept).
    g_act = g * activation_grad_weight(activation, (y - mean) * alpha + beta)
    if native_sums:
        params = jnp.stack([mean, alpha, beta]).astype(jnp.float32)
        sum_g, sum_gy = _channel_sums(
            native.BN_GRAD_SUMS_TARGET,
            g.astype(jnp.float32),
            y,
            params,
            activation=np.int64(ACTIVATION_CODES[activation.name]),
        )
    else:
        sum_g = jnp.sum(g_act, axis=(0, 1, 2))
        sum_gy = jnp.sum(g_act * y, axis=(0, 1, 2))
    # sum(g * (y - mean)) as sum(g * y) - mean * sum(g): XLA:CPU would write ``y - mean`` to
    # memory first for the centred form.
    sum_gyc = sum_gy - mean * sum_g
    # Through var = max(diff, 0): jnp.maximum's gradient is 1 above, 1/2 at the tie, 0 below.
    var_grad = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    d_var = (sum_gyc * gamma * (-0.5) * inv**3 + g_var) * var_grad
    d_mean = g_mean - sum_g * alpha - 2.0 * mean * d_var
    d_mean_sq = d_var
    count = y.shape[0] * y.shape[1] * y.shape[2]
    if axis_name is not None:
        # The transpose of the forward pmean: every device's cotangent reaches every device.
        d_mean, d_mean_sq = jax.lax.psum((d_mean, d_mean_sq), axis_name)
        count = count * jax.lax.psum(1, axis_name)
    dy = g_act * alpha + d_mean / count + (2.0 / count) * d_mean_sq * y
    return dy.astype(y.dtype), sum_gyc * inv, sum_g


_bn_act_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def _check_mode(quant_mode: str, quant: QuantConfig | None) -> None:
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"unknown quant_mode {quant_mode!r}; choose from {QUANT_MODES}")
    if quant_mode != "float" and quant is None:
        raise ValueError(
            f"quant_mode={quant_mode!r} needs a model built with quant=QuantConfig(...)"
        )


def _where(flag, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a if flag else b`` for a Python bool or a traced scalar bool."""
    if isinstance(flag, bool):
        return a if flag else b
    return jnp.where(flag, a, b)


class ActQuant(nn.Module):
    """Activation quantizer: an observed range in the ``quant_ranges`` collection.

    Variables ``min``, ``max`` and ``count`` hold the observer state (see
    :mod:`qfsep_jax.quant.observers`). ``quant`` None makes it the identity.
    """

    quant: QuantConfig | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, quant_mode: str = "float", train: bool = False, quant_active=True
    ) -> jax.Array:
        if self.quant is None:
            return x
        init = observers.init_range_state()
        state = {k: self.variable("quant_ranges", k, lambda v=v: v) for k, v in init.items()}
        if quant_mode == "float":
            return x
        observing = quant_mode == "calibrate" or (quant_mode == "qat" and train)
        if observing and not self.is_initializing():
            new = observers.observe(
                {k: v.value for k, v in state.items()},
                jax.lax.stop_gradient(x),
                self.quant,
                self.axis_name,
            )
            for k, v in state.items():
                v.value = new[k]
        if quant_mode == "calibrate":
            return x
        if self.is_initializing():
            return x
        if self.quant.dynamic_activation_ranges:
            axes = tuple(range(1, x.ndim))
            lo = jax.lax.stop_gradient(jnp.min(x, axis=axes))
            hi = jax.lax.stop_gradient(jnp.max(x, axis=axes))
            return fake_quant(x, lo, hi, self.quant.act_int_range, axis=0)
        lo, hi = state["min"].value, state["max"].value
        _check_concrete_range(self, lo, hi, quant_active)
        return _where(quant_active, fake_quant(x, lo, hi, self.quant.act_int_range), x)


def _check_concrete_range(module: nn.Module, lo, hi, quant_active) -> None:
    """Raises a ValueError naming the layer when a range that will be used is concretely invalid.

    Outside ``jit`` a never-calibrated range (``+inf``/``-inf``) would otherwise quantize every
    value to a plausible 0; under ``jit`` the values are tracers and the NaN scale of
    :func:`~qfsep_jax.quant.numerics.qparams` marks the output instead.
    """
    if any(isinstance(v, jax.core.Tracer) for v in (lo, hi, quant_active)):
        return
    if not bool(quant_active):
        return
    name = "/".join(str(p) for p in module.scope.path) or type(module).__name__
    try:
        check_range(name, lo, hi)
    except ValueError as err:
        raise ValueError(
            f"{err}. Calibrate the ranges first (qfsep_jax.ptq.quantize or ptq.calibrate), or "
            "run quant_mode='float'"
        ) from None


@dataclasses.dataclass
class _BatchNorm:
    """A layer's BN parameters, moving statistics (Flax variables), whether to update them."""

    gamma: jax.Array
    beta: jax.Array
    mean: Any  # flax.core.scope.Variable
    var: Any
    update: bool


class ConvLayer(nn.Module):
    """Conv (regular or depthwise) → [BN] → activation → [activation quantizer].

    Parameters are named ``kernel`` (HWIO; ``(k, k, 1, C)`` for depthwise), ``bias``,
    ``bn_scale``/``bn_bias`` (params) and ``bn_mean``/``bn_var`` (batch_stats). With
    ``bn_folded=True`` the layer holds the folded ``kernel`` and ``bias`` only.

    The conv runs in the dtype of the input ``x`` (parameters are cast to it), BN and the QAT
    folding arithmetic in float32 at least, and the output is cast back to ``x``'s dtype: a
    bfloat16 input makes a mixed-precision layer with float32 parameters and statistics.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    depthwise: bool = False
    use_bn: bool = True
    use_bias: bool = False
    activation: str | Activation = "relu6"
    quantize_output: bool = True
    bn_folded: bool = False
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-3
    quant: QuantConfig | None = None
    axis_name: str | None = None
    depthwise_impl: str = "lax"

    @property
    def layer_name(self) -> str:
        """The TF-slim name (``Conv2d_0``, ``Conv2d_3_depthwise``, ``Logits``) of this layer."""
        if self.name in ("depthwise", "pointwise") and len(self.path) >= 2:
            return tfslim_name(tuple(self.path[-2:]))
        return self.name or ""  # an unnamed top-level layer matches no override

    @property
    def layer_quant(self) -> QuantConfig | None:
        """``quant`` with this layer's bits resolved (:meth:`QuantConfig.for_layer`)."""
        return None if self.quant is None else self.quant.for_layer(self.layer_name)

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        # The conv runs in the activations' dtype (bfloat16 under half precision); the float32
        # parameters, and any fake-quantized kernel made from them, are cast here.
        kernel = kernel.astype(x.dtype)
        impl = self.depthwise_impl
        if impl == "auto" and jnp.finfo(x.dtype).bits < 32:
            # XLA's convolutions accumulate below-float32 inputs in float32; the shifted
            # multiply-adds would sum in the input's dtype, and the native kernels are float32.
            impl = "lax"
        if self.depthwise:
            return depthwise.depthwise_conv2d(x, kernel, self.stride, impl=impl)
        return conv2d(x, kernel, self.stride, impl=impl)

    def _batch_moments(
        self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Batch mean and variance of the float conv ``conv(x, kernel) + bias`` (QAT's BN).

        For a pointwise conv (a matmul), from the input's moments (:func:`linear_moments`)
        without computing the conv; otherwise from the conv's output.
        """
        if not self.depthwise and kernel.shape[:2] == (1, 1) and self.stride == 1:
            n, h, w, c = x.shape
            x2 = jnp.reshape(x, (n * h * w, c)).astype(jnp.promote_types(x.dtype, jnp.float32))
            mean, mean_sq = linear_moments(x2, kernel[0, 0])
            if bias is not None:  # E[(y + b)^2] = E[y^2] + 2 b E[y] + b^2
                mean_sq = mean_sq + 2.0 * bias * mean + jnp.square(bias)
                mean = mean + bias
            if self.axis_name is not None:
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        else:
            y = self._conv(x, kernel)
            if bias is not None:
                y = y + bias
            impl = native_bn_sums(self.depthwise_impl, y)
            mean, mean_sq = _raw_moments(y, self.axis_name, impl)
        return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)

    def _float_forward(
        self, x: jax.Array, kernel: jax.Array, bias, bn: _BatchNorm | None, train: bool
    ) -> tuple[jax.Array, bool]:
        """The float layer (BN in batch or moving statistics); whether the activation ran."""
        y = self._conv(x, kernel)
        if bias is not None:
            y = y + bias
        if bn is None:
            return y, False
        if not train:
            alpha = bn.gamma * jax.lax.rsqrt(bn.var.value + self.bn_epsilon)
            return (y - bn.mean.value) * alpha + bn.beta, False
        y, mean, var = batch_norm_train(
            y,
            bn.gamma,
            bn.beta,
            self.bn_epsilon,
            self.axis_name,
            self.activation,
            native_bn_sums(self.depthwise_impl, y),
        )
        if bn.update:
            m = self.bn_momentum
            bn.mean.value = m * bn.mean.value + (1 - m) * mean
            bn.var.value = m * bn.var.value + (1 - m) * var
        return y, True

    def _qat_forward(
        self, x: jax.Array, kernel: jax.Array, bias, bn: _BatchNorm, bn_frozen, quant_active
    ) -> jax.Array:
        """QAT with BN folding simulated by correction-and-freeze (Krishnamoorthi 2018, 3.2.2)."""
        mean_b, var_b = self._batch_moments(x, kernel, bias)  # of the float conv
        sigma_b = jnp.sqrt(var_b + self.bn_epsilon)
        sigma_m = jnp.sqrt(bn.var.value + self.bn_epsilon)
        w_fold, b_frozen = fold_bn(
            kernel, bias, bn.gamma, bn.beta, bn.mean.value, bn.var.value, self.bn_epsilon
        )
        w_q = _where(quant_active, fake_quant_weights(w_fold, self.layer_quant), w_fold)
        y_q = self._conv(x, w_q)
        conv_bias = 0.0 if bias is None else bias
        b_batch = bn.beta + bn.gamma * (conv_bias - mean_b) / sigma_b
        y = _where(bn_frozen, y_q + b_frozen, y_q * (sigma_m / sigma_b) + b_batch)
        if bn.update:
            m = self.bn_momentum
            keep = jnp.asarray(bn_frozen, bool)
            bn.mean.value = jnp.where(keep, bn.mean.value, m * bn.mean.value + (1 - m) * mean_b)
            bn.var.value = jnp.where(keep, bn.var.value, m * bn.var.value + (1 - m) * var_b)
        return y

    def _folded_forward(
        self, x: jax.Array, kernel: jax.Array, bias, bn: _BatchNorm | None, quant_active
    ) -> jax.Array:
        """Inference with BN folded into the kernel and bias, weights fake-quantized."""
        if bn is not None:
            w, b = fold_bn(
                kernel, bias, bn.gamma, bn.beta, bn.mean.value, bn.var.value, self.bn_epsilon
            )
        else:
            w, b = kernel, bias
        w_q = _where(quant_active, fake_quant_weights(w, self.layer_quant), w)
        y = self._conv(x, w_q)
        return y if b is None else y + b

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        quant_mode: str = "float",
        bn_frozen=False,
        quant_active=True,
    ) -> jax.Array:
        _check_mode(quant_mode, self.quant)
        in_features = x.shape[-1]
        if self.depthwise and self.features != in_features:
            raise ValueError(
                f"depthwise layer {self.name}: features={self.features} must equal the input "
                f"channels {in_features} (depth multiplier 1)"
            )
        kshape = (
            (self.kernel_size, self.kernel_size, 1, in_features)
            if self.depthwise
            else (self.kernel_size, self.kernel_size, in_features, self.features)
        )
        kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
        kernel = self.param("kernel", kernel_init, kshape)
        has_bn = self.use_bn and not self.bn_folded
        has_bias = self.use_bias or (self.use_bn and self.bn_folded)
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if has_bias else None
        bn = None
        if has_bn:
            bn = _BatchNorm(
                self.param("bn_scale", nn.initializers.ones, (self.features,)),
                self.param("bn_bias", nn.initializers.zeros, (self.features,)),
                self.variable("batch_stats", "bn_mean", jnp.zeros, (self.features,)),
                self.variable("batch_stats", "bn_var", jnp.ones, (self.features,)),
                update=train and not self.is_initializing(),
            )

        # ``activated``: the activation ran already (fused into BN's training VJP).
        if quant_mode not in ("fake", "qat"):
            y, activated = self._float_forward(x, kernel, bias, bn, train)
        elif bn is not None and train:
            y, activated = self._qat_forward(x, kernel, bias, bn, bn_frozen, quant_active), False
        else:
            y, activated = self._folded_forward(x, kernel, bias, bn, quant_active), False
        # BN, biases and the QAT correction computed in float32 (the parameters' dtype); the
        # layer's output is in the input's dtype again.
        y = y.astype(x.dtype)
        if not activated:
            y = activation_fn(self.activation, y)
        if self.quantize_output:
            y = ActQuant(self.layer_quant, self.axis_name, name="act_quant")(
                y, quant_mode, train, quant_active
            )
        self.sow("intermediates", "out", y)
        return y
