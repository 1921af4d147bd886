"""Conversion of this project's quantized MobileNetV1 (PTQ or QAT) to an :class:`IntModel`.

:func:`from_variables` / :func:`from_quantized` quantize the weights with the very ranges and
primitives the ``fake`` simulation uses, biases to int32 and multipliers as TFLite forms them;
:func:`float_variables` goes back (the float network the integer model computes, for
benchmarks). ``.tflite`` files convert with :func:`qfsep_jax.integer.tflite_import.from_tflite`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.integer import kernels
from qfsep_jax.integer.types import POOL_NAME, IntLayer, IntModel, Rounding, parse_rounding
from qfsep_jax.models.activations import Activation, get_activation
from qfsep_jax.models.layers import ConvLayer
from qfsep_jax.models.names import layer_path, tfslim_name
from qfsep_jax.quant.fold import folded
from qfsep_jax.quant.numerics import check_range, qparams, quantize, round_half_away_from_zero
from qfsep_jax.quant.scheme import INPUT_NAME, QuantConfig, weight_range
from qfsep_jax.tree_utils import subtree

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _ConvRecord:
    path: tuple[str, ...]
    module: Any
    in_shape: tuple[int, ...]
    quant: QuantConfig | None = None  # the layer's own config (its bits resolved)
    out_shape: tuple[int, ...] | None = None
    # The traced input and output values: whether each layer takes its predecessor's output.
    inputs: Any = dataclasses.field(default=None, repr=False)
    output: Any = dataclasses.field(default=None, repr=False)


def _trace_conv_layers(model, variables, image_size: int = 64) -> list[_ConvRecord]:
    """Every ConvLayer call of the model's ``fake`` pass, in execution order (shapes only)."""
    records: list[_ConvRecord] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvLayer) and context.method_name == "__call__":
            module = context.module
            rec = _ConvRecord(tuple(module.path), module, tuple(args[0].shape), module.layer_quant)
            rec.inputs = args[0]
            out = next_fun(*args, **kwargs)
            rec.out_shape, rec.output = tuple(out.shape), out
            records.append(rec)
            return out
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, quant_mode="fake"), variables, images)
    return records


def _act_qparams(ranges: dict, path: tuple[str, ...], int_range) -> tuple[float, int]:
    node = subtree(ranges, path, "quant_ranges")
    name = "/".join(path)
    check_range(name, node["min"], node["max"])
    scale, zp = qparams(node["min"], node["max"], int_range)
    return float(scale), int(zp)


def from_variables(
    model, variables: dict, rounding: str | Rounding = "reference", check: bool = True
) -> IntModel:
    """Converts a quantized :class:`~qfsep_jax.models.mobilenet_v1.MobileNetV1` to an IntModel.

    Works for post-training-quantized and QAT models alike: ``variables`` must hold
    ``quant_ranges`` (calibrated activation ranges); an unfolded model (``bn_folded=False``) has
    its BN folded with :func:`qfsep_jax.quant.fold.fold_batch_norm` first. Weights are quantized
    with the very ranges and primitives the ``fake`` pass uses (:func:`weight_range`,
    :func:`qparams`, :func:`quantize`), biases to int32 with scale ``S_in * S_w``, multipliers as
    TFLite forms them (:func:`kernels.conv_multiplier`, :func:`kernels.quantize_multiplier`).
    The layer structure (strides, activations, order) is read from the model's own ``fake`` pass.
    Each layer gets its own bit widths (:meth:`QuantConfig.for_layer`): codes stay uint8/int8,
    weights use the layer's narrower range, and its clamp ``[act_min, act_max]`` lies within its
    output range (the pool keeps the range of the tensor it pools).
    A channel whose int32 bias would not fit (tiny weights, e.g. a dead channel under per-channel
    scales) gets a wider weight scale, as TFLite's converter does (logged; its weights were ~0).
    ``rounding``: see :data:`ROUNDING_PRESETS` (default ``reference``: TFLite's gemmlowp rounding).
    """
    _check_convertible(model, variables)
    quant = model.quant
    model, variables = folded(model, variables)
    variables = jax.tree.map(np.asarray, variables)
    params, ranges = variables["params"], variables["quant_ranges"]
    in_quant = quant.for_layer(INPUT_NAME)
    records = _trace_conv_layers(model, variables)
    for rec in records:
        _clamp_activation(rec)
    kernels_f = [
        np.asarray(subtree(params, rec.path, "params")["kernel"], np.float32) for rec in records
    ]
    w_codes, w_scales, w_zps = _quantize_kernels(kernels_f, tuple(rec.quant for rec in records))
    in_scale, in_zp = _act_qparams(ranges, ("input_quant",), in_quant.act_int_range)
    layers: list[IntLayer] = []
    prev_scale, prev_zp, prev_shape, prev_quant = in_scale, in_zp, None, in_quant
    for k, rec in enumerate(records):
        name = tfslim_name(rec.path)
        if prev_shape is not None and rec.in_shape[1:3] != prev_shape[1:3]:
            if rec.in_shape[1:3] != (1, 1):
                raise ValueError(f"unexpected spatial change before {name}: {prev_shape}")
            # MobileNetV1 global-average-pools and re-rounds to the last layer's grid.
            layers.append(_pool_layer(prev_scale, prev_zp, prev_quant))
        elif k > 0 and rec.inputs is not records[k - 1].output:
            raise ValueError(
                f"layer {name}: its input is not the output of {tfslim_name(records[k - 1].path)}"
                "; the integer pass runs a chain of ConvLayers and cannot express what the block "
                "computes between them"
            )
        if not rec.module.quantize_output:
            raise ValueError(f"layer {name} has no output quantizer; cannot run integer-only")
        out_range = rec.quant.act_int_range
        out_scale, out_zp = _act_qparams(ranges, rec.path + ("act_quant",), out_range)
        bias = subtree(params, rec.path, "params").get("bias")
        weights = _LayerWeights(kernels_f[k], bias, w_codes[k], w_scales[k], w_zps[k])
        layers.append(
            _conv_layer(rec, weights, rec.quant, (prev_scale, prev_zp), (out_scale, out_zp))
        )
        prev_scale, prev_zp, prev_shape, prev_quant = out_scale, out_zp, rec.out_shape, rec.quant
    bits = ""
    if quant.layer_bits or (quant.weight_bits, quant.act_bits) != (8, 8):
        bits = f", w{quant.weight_bits}a{quant.act_bits}, layer_bits={list(quant.layer_bits)}"
    int_model = IntModel(
        tuple(layers),
        in_scale,
        in_zp,
        "uint8" if quant.scheme == "tf8" else "int8",
        parse_rounding(rounding),
        source=f"MobileNetV1(width={model.width_multiplier}, "
        f"block={getattr(model.block, '__qualname__', model.block)}, "
        f"scheme={quant.scheme}, per_channel={quant.per_channel_weights}{bits})",
        input_bits=in_quant.act_bits,
    )
    if check:
        check_accumulator_range(int_model)
    return int_model


def _check_convertible(model, variables: dict) -> None:
    """Clear errors for models the integer pass cannot run."""
    if model.quant is None:
        raise ValueError("from_variables needs a model built with quant=QuantConfig(...)")
    if model.quant.dynamic_activation_ranges:
        raise ValueError(
            "dynamic_activation_ranges models quantize each input with its own range; an "
            "integer-only model needs static (calibrated) activation ranges"
        )
    if "quant_ranges" not in variables:
        raise ValueError("variables have no 'quant_ranges': calibrate (PTQ) or train (QAT) first")


def _pool_layer(scale: float, zero_point: int, quant: QuantConfig) -> IntLayer:
    """The global average pool, which keeps its input's scale, zero point and code range
    (``quant``: the config of the layer whose output it pools)."""
    act_range = quant.act_int_range
    return IntLayer(
        None,
        None,
        None,
        None,
        None,
        name=POOL_NAME,
        kind="avgpool",
        window=None,
        padding="VALID",
        input_zero_point=zero_point,
        output_zero_point=zero_point,
        act_min=act_range.qmin,
        act_max=act_range.qmax,
        input_scale=scale,
        output_scale=scale,
        act_bits=quant.act_bits,
    )


def _clamp_activation(rec: _ConvRecord) -> Activation:
    """The layer's activation, which must be a clamp: the integer pass clamps output codes."""
    act = get_activation(rec.module.activation)
    if not act.is_clamp:
        raise ValueError(
            f"layer {tfslim_name(rec.path)}: activation {act.name!r} is not a clamp [lo, hi] "
            "(Activation.clamp is None); the integer-only pass applies an activation only as a "
            "clamp of the output codes and cannot express it"
        )
    return act


@dataclasses.dataclass(frozen=True)
class _LayerWeights:
    """A layer's float kernel and bias, and its weight codes, scales and zero points."""

    kernel: np.ndarray
    bias: np.ndarray | None
    codes: Any
    scale: Any
    zero_point: Any


def _conv_layer(rec: _ConvRecord, w: _LayerWeights, quant, qin: tuple, qout: tuple) -> IntLayer:
    """One conv or depthwise layer: int32 bias, TFLite's multiplier and clamp, given the input
    ``qin`` and output ``qout`` ``(scale, zero point)``."""
    mod, name = rec.module, tfslim_name(rec.path)
    (in_scale, in_zp), (out_scale, out_zp) = qin, qout
    w_range, act_range = quant.weight_int_range, quant.act_int_range
    cout = w.kernel.shape[-1]
    bias = np.asarray(np.zeros(cout) if w.bias is None else w.bias, np.float32)
    w_q = np.asarray(w.codes).astype(np.uint8 if w_range.qmin == 0 else np.int8)
    w_scale = np.broadcast_to(np.asarray(w.scale, np.float32), (cout,))
    w_zp = np.broadcast_to(np.asarray(w.zero_point, np.int32), (cout,)).copy()
    w_scale, w_q, w_zp, widened = _fit_bias(w.kernel, bias, w_scale, w_q, w_zp, in_scale, w_range)
    if widened:
        # TFLite's converter does the same; expected for per-channel weights of real models.
        log.info(
            "%s: widened the weight scale of channels %s so that their int32 "
            "bias fits (as TFLite's converter does)",
            name,
            widened,
        )
    bias_scale = (np.float32(in_scale) * w_scale).astype(np.float64)
    bias_q = round_half_away_from_zero(bias.astype(np.float64) / bias_scale).astype(np.int32)
    # TFLite's int8 kernels form every multiplier in double, per-tensor weights included.
    int8 = act_range.qmin < 0
    per_channel = quant.per_channel_weights or widened != [] or int8
    real_m = kernels.conv_multiplier(in_scale, w_scale, out_scale, per_channel=per_channel)
    m0, shift = kernels.quantize_multiplier(real_m)
    act = _clamp_activation(rec)
    act_min, act_max = kernels.activation_range(
        act.clamp, out_scale, out_zp, act_range.qmin, act_range.qmax
    )
    if mod.depthwise:
        w_q = w_q.reshape(w.kernel.shape[0], w.kernel.shape[1], cout)
    return IntLayer(
        w_q,
        w_zp,
        bias_q,
        m0,
        shift,
        name=name,
        kind="depthwise" if mod.depthwise else "conv",
        stride=int(mod.stride),
        padding="SAME",
        input_zero_point=in_zp,
        output_zero_point=out_zp,
        act_min=act_min,
        act_max=act_max,
        activation=act.name,
        input_scale=in_scale,
        output_scale=out_scale,
        weight_scale=tuple(float(s) for s in w_scale),
        weight_bits=quant.weight_bits,
        act_bits=quant.act_bits,
    )


_BIAS_LIMIT = 2**30  # int32 bias codes stay within ±2^30, leaving headroom for the sum


def _fit_bias(kernel, bias, w_scale, w_q, w_zp, input_scale, w_range):
    """Widens per-channel weight scales whose int32 bias ``b / (S_in S_w)`` would not fit.

    A near-dead channel (tiny weights after BN folding) gets a tiny weight scale, and its bias
    code can exceed int32. Like TFLite's converter, the channel's weight scale is raised until
    ``|bias| / (S_in S_w) <= 2^30`` and its weights are re-quantized (to ~0: they were tiny).
    Returns ``(w_scale, w_q, w_zp, widened channel indices)``.
    """
    need = np.abs(bias.astype(np.float64)) / (np.float64(input_scale) * _BIAS_LIMIT)
    widen = np.flatnonzero(w_scale.astype(np.float64) < need)
    if widen.size == 0:
        return w_scale, w_q, w_zp, []
    w_scale, w_q, w_zp = w_scale.copy(), w_q.copy(), w_zp.copy()
    flat = kernel.reshape(-1, kernel.shape[-1])
    codes = w_q.reshape(-1, w_q.shape[-1])
    for c in widen:
        # A larger scale with the same zero point covers the old range (and keeps 0 exact).
        scale = np.float32(need[c] * 1.001)
        q = round_half_away_from_zero(flat[:, c].astype(np.float64) / np.float64(scale)) + w_zp[c]
        codes[:, c] = np.clip(q, w_range.qmin, w_range.qmax)
        w_scale[c] = scale
    return w_scale, codes.reshape(w_q.shape), w_zp, widen.tolist()


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_kernels(kernels_f: list, quants: tuple) -> tuple[list, list, list]:
    """Weight codes, scales and zero points of every kernel, as ``fake_quant_weights`` rounds
    (``quants``: each layer's own config).

    One jitted call for all layers (eager per-layer calls would compile per shape).
    """
    codes, scales, zps = [], [], []
    for kernel, quant in zip(kernels_f, quants, strict=True):
        lo, hi = weight_range(kernel, quant)
        scale, zp = qparams(lo, hi, quant.weight_int_range)
        codes.append(quantize(kernel, scale, zp, quant.weight_int_range))
        scales.append(scale)
        zps.append(zp)
    return codes, scales, zps


def from_quantized(qmodel, rounding: str | Rounding = "reference") -> IntModel:
    """Converts a :class:`qfsep_jax.quantized.QuantizedModel` (see :func:`from_variables`)."""
    return from_variables(qmodel.model, qmodel.variables, rounding)


def check_accumulator_range(int_model: IntModel) -> None:
    """Raises if some layer's int32 accumulator could overflow for some input.

    The bound is ``Σ|q_w - Z_w| * max|q_in - Z_in| + |bias|`` per output channel.
    """
    for layer in int_model.layers:
        if layer.weight is None:
            continue
        w = np.asarray(layer.weight, np.int64) - np.asarray(layer.weight_zero_point, np.int64)
        w = w.reshape(-1, w.shape[-1])
        lo, hi = int_model.int_range
        x_max = max(hi - layer.input_zero_point, layer.input_zero_point - lo)
        bound = np.abs(w).sum(axis=0) * x_max + np.abs(np.asarray(layer.bias, np.int64))
        if np.any(bound >= 2**31):
            raise ValueError(
                f"layer {layer.name}: int32 accumulator may overflow (bound {bound.max()})"
            )


def float_variables(int_model: IntModel) -> tuple[dict, dict]:
    """Dequantized weights of a 13-block MobileNetV1 IntModel, for the same network in float.

    Returns ``(model_kwargs, variables)`` for a BN-folded float
    :class:`~qfsep_jax.models.mobilenet_v1.MobileNetV1` (kernel ``S_w (q_w - Z_w)``, bias
    ``S_in S_w q_b``): the float pass of the very model the integer pass runs (benchmarks).
    """
    params: dict = {}
    for layer in int_model.layers:
        if layer.kind == "avgpool":
            continue
        path = layer_path(layer.name)
        w_scale = np.asarray(layer.weight_scale, np.float32)
        w = (np.asarray(layer.weight, np.float32) - np.asarray(layer.weight_zero_point)) * w_scale
        if layer.kind == "depthwise":
            w = w.reshape(w.shape[0], w.shape[1], 1, w.shape[2])
        bias = np.asarray(layer.bias, np.float32) * np.float32(layer.input_scale) * w_scale
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"kernel": w, "bias": bias}
    names = set(int_model.layer_names)
    needed = {"Conv2d_0", "Conv2d_13_pointwise", "Logits"}
    if not needed <= names:
        raise ValueError(f"float_variables needs a 13-block MobileNetV1, missing {needed - names}")
    kwargs = {
        "num_classes": int_model.layer("Logits").out_channels,
        "width_multiplier": int_model.layer("Conv2d_13_pointwise").out_channels / 1024,
        "activation": int_model.layer("Conv2d_0").activation,
        "block": "original" if int_model.layer("Conv2d_1_depthwise").activation != "none" else "qf",
        "bn_folded": True,
        "dropout_rate": 0.0,
    }
    return kwargs, {"params": params}
