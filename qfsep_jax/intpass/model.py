"""The integer model (:class:`IntModel`), its jitted integer-only forward pass, and converters.

An :class:`IntModel` is a chain of :class:`IntLayer` s (``conv``, ``depthwise``, ``avgpool``) in
network order, named like TF-slim (``Conv2d_0``, ``Conv2d_1_depthwise``, ...,
``Conv2d_13_pointwise``, ``AvgPool_1a``, ``Logits``). It is a JAX pytree: the integer parameters
are leaves, everything else (names, strides, zero points, clamps, float scales kept only for
(de)quantization helpers, the rounding rule) is static metadata.

Per conv/depthwise layer the leaves are:

* ``weight``: weight codes in the storage type (uint8 for the ``tf8`` scheme and TFLite's legacy
  models, int8 for the ``int8`` scheme), HWIO ``(kh, kw, Cin, Cout)`` for regular/1×1 convs and
  ``(kh, kw, C)`` for depthwise;
* ``weight_zero_point``: int32 ``(Cout,)`` (a per-tensor zero point is repeated);
* ``bias``: int32 ``(Cout,)`` with scale ``S_in * S_w`` and zero point 0;
* ``multiplier``, ``shift``: int32 ``(Cout,)``, the requantization multiplier
  ``M = S_in * S_w / S_out ≈ multiplier * 2**shift / 2**31`` (per-channel for per-channel
  weights, else repeated).

:func:`run` maps input codes (uint8 or int8 images) to logit codes using only integer ops (see
:mod:`qfsep_jax.intpass.kernels`), or to int32 *fine logits* (the classifier's accumulators on
the grid ``S_out / 2**FINE_LOGIT_BITS``, for an argmax that 8-bit ties do not decide);
:func:`quantize_input`, :func:`dequantize_logits`, :func:`dequantize_fine_logits` and
:func:`dequantize_intermediates` are the float boundaries around it.

Converters: :func:`from_variables` / :func:`from_quantized` for this project's MobileNetV1 (PTQ or
QAT variables with ``quant_ranges``), :func:`qfsep_jax.intpass.tflite_import.from_tflite` for
``.tflite`` files.
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

from qfsep_jax.intpass import kernels
from qfsep_jax.quant.fake_quant import (
    IntRange,
    check_range,
    dequantize,
    qparams,
    quantize,
    round_half_away_from_zero,
)
from qfsep_jax.quant.fold import folded
from qfsep_jax.quant.scheme import weight_range

Array = jax.Array
LAYER_KINDS = ("conv", "depthwise", "avgpool")
POOL_NAME = "AvgPool_1a"


@dataclasses.dataclass(frozen=True)
class Rounding:
    """Which requantization rounding (:data:`kernels.ROUNDINGS`) each op kind uses."""

    conv: str = "double"
    depthwise: str = "double"

    def __post_init__(self):
        for value in (self.conv, self.depthwise):
            if value not in kernels.ROUNDINGS:
                raise ValueError(f"unknown rounding {value!r}; choose from {kernels.ROUNDINGS}")

    def __str__(self) -> str:
        return f"conv={self.conv},depthwise={self.depthwise}"


# Named rounding rules, as measured against ai-edge-litert 2.3.0 on x86 (the tflite_check job
# re-measures them): ``reference``: TFLite's reference kernels (BUILTIN_REF op resolver), uint8
# and int8. ``litert_x86``: LiteRT's built-in optimized kernels for uint8 models (CONV_2D and
# FULLY_CONNECTED through ruy, uint8 DEPTHWISE_CONV_2D with gemmlowp's rounding).
# ``litert_x86_int8``: the same kernels for int8 models (the per-channel int8 depthwise kernel
# rounds ties up like ruy). ``single``: TFLite built with TFLITE_SINGLE_ROUNDING.
ROUNDING_PRESETS: dict[str, Rounding] = {
    "reference": Rounding("double", "double"),
    "litert_x86": Rounding("ruy", "double"),
    "litert_x86_int8": Rounding("ruy", "ruy"),
    "single": Rounding("single", "single"),
}


def parse_rounding(spec: str | Rounding) -> Rounding:
    """A :class:`Rounding` from a preset name, one rule name, or ``"conv=ruy,depthwise=double"``."""
    if isinstance(spec, Rounding):
        return spec
    if spec in ROUNDING_PRESETS:
        return ROUNDING_PRESETS[spec]
    if spec in kernels.ROUNDINGS:
        return Rounding(spec, spec)
    try:
        fields = dict(part.split("=") for part in spec.split(","))
        return Rounding(**fields)
    except (ValueError, TypeError):
        raise ValueError(
            f"bad rounding {spec!r}: use a preset {sorted(ROUNDING_PRESETS)}, a rule "
            f"{kernels.ROUNDINGS}, or 'conv=<rule>,depthwise=<rule>'"
        ) from None


@dataclasses.dataclass(frozen=True)
class IntLayer:
    """One integer layer; see the module docstring for the array fields.

    Static fields: ``name``, ``kind`` (``conv``/``depthwise``/``avgpool``), ``stride``,
    ``padding`` (``SAME``/``VALID``, TFLite geometry), ``window`` (avgpool; ``None`` = global),
    ``input_zero_point``/``output_zero_point``, fused clamp ``act_min``/``act_max`` in output
    codes, ``activation`` (for information), and the float scales ``input_scale``,
    ``output_scale``, ``weight_scale`` (used only by the (de)quantization helpers, never in the
    integer body).
    """

    weight: Array | None
    weight_zero_point: Array | None
    bias: Array | None
    multiplier: Array | None
    shift: Array | None
    name: str = ""
    kind: str = "conv"
    stride: int = 1
    padding: str = "SAME"
    window: tuple[int, int] | None = None
    input_zero_point: int = 0
    output_zero_point: int = 0
    act_min: int = 0
    act_max: int = 255
    activation: str = "none"
    input_scale: float = 1.0
    output_scale: float = 1.0
    weight_scale: tuple[float, ...] | None = None

    @property
    def out_channels(self) -> int | None:
        return None if self.bias is None else int(self.bias.shape[0])


jax.tree_util.register_dataclass(
    IntLayer,
    data_fields=["weight", "weight_zero_point", "bias", "multiplier", "shift"],
    meta_fields=[f.name for f in dataclasses.fields(IntLayer)][5:],
)


@dataclasses.dataclass(frozen=True)
class IntModel:
    """An integer-only network: layers in order, input quantization, rounding rule.

    Attributes:
      layers: the :class:`IntLayer` chain.
      input_scale, input_zero_point: how float inputs map to input codes.
      dtype: ``"uint8"`` or ``"int8"``: the storage type of activations (and input).
      rounding: the :class:`Rounding` the forward pass applies.
      source: where the model came from (for reports).
      tensor_map: for imported ``.tflite`` models, ``(layer name, file index, tensor index)`` of
        every op output that the integer pass reproduces (file 0 = backbone, 1 = head).
    """

    layers: tuple[IntLayer, ...]
    input_scale: float
    input_zero_point: int
    dtype: str = "uint8"
    rounding: Rounding = ROUNDING_PRESETS["reference"]
    source: str = ""
    tensor_map: tuple[tuple[str, int, int], ...] = ()

    def with_rounding(self, rounding: str | Rounding) -> IntModel:
        """The same model with another rounding rule (see :func:`parse_rounding`)."""
        return dataclasses.replace(self, rounding=parse_rounding(rounding))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def int_range(self) -> tuple[int, int]:
        return (0, 255) if self.dtype == "uint8" else (-128, 127)

    def layer(self, name: str) -> IntLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers are {self.layer_names}")

    def summary(self) -> str:
        """One line per layer: kind, shapes, zero points, clamp."""
        lines = [f"IntModel from {self.source} ({self.dtype}, rounding {self.rounding})"]
        for layer in self.layers:
            shape = None if layer.weight is None else tuple(layer.weight.shape)
            lines.append(
                f"  {layer.name:22s} {layer.kind:9s} stride {layer.stride} {layer.padding:5s} "
                f"w{shape} Zin {layer.input_zero_point} Zout {layer.output_zero_point} "
                f"clamp [{layer.act_min}, {layer.act_max}]"
            )
        return "\n".join(lines)


jax.tree_util.register_dataclass(
    IntModel,
    data_fields=["layers"],
    meta_fields=["input_scale", "input_zero_point", "dtype", "rounding", "source", "tensor_map"],
)


# --------------------------------------------------------------------------------------------
# The integer-only forward pass.
# --------------------------------------------------------------------------------------------


def layer_accumulate(layer: IntLayer, x: Array, rounding: Rounding) -> tuple[Array, str]:
    """A conv/depthwise layer's int32 accumulators on codes ``x``, and its requantization rule."""
    args = (x, layer.input_zero_point, layer.weight, layer.weight_zero_point, layer.bias)
    if layer.kind == "conv":
        return kernels.conv_accumulate(*args, layer.stride, layer.padding), rounding.conv
    if layer.kind == "depthwise":
        acc = kernels.depthwise_accumulate(*args, layer.stride, layer.padding)
        return kernels.fusion_barrier(acc, layer.multiplier), rounding.depthwise
    raise ValueError(f"layer {layer.name}: unknown kind {layer.kind!r}")


def apply_layer(layer: IntLayer, x: Array, rounding: Rounding) -> Array:
    """One integer layer on codes ``x`` (NHWC, storage dtype); integer ops only."""
    if layer.kind == "avgpool":
        return kernels.average_pool(
            x, layer.window, layer.stride, layer.padding, layer.act_min, layer.act_max
        )
    acc, rule = layer_accumulate(layer, x, rounding)
    return _requantize_codes(layer, acc, x.dtype, rule)


def _requantize_codes(layer: IntLayer, acc: Array, dtype, rule: str) -> Array:
    return kernels.requantize(
        acc, layer.multiplier, layer.shift, layer.output_zero_point,
        layer.act_min, layer.act_max, dtype, rule,
    )  # fmt: skip


# The fine logits' grid: the classifier's output scale / 2**FINE_LOGIT_BITS (see :func:`run`).
FINE_LOGIT_BITS = 16


def fine_logits_from_accumulators(layer: IntLayer, acc: Array) -> Array:
    """The classifier's int32 accumulators → fine logits (see :func:`run`); integer ops only.

    ``round(acc * M * 2**FINE_LOGIT_BITS)`` with the layer's own multiplier ``M`` (one exact
    rounding, :func:`kernels.requantize_fine`). Activation ``none`` clamps the codes only to the
    storage range, which the fine logits drop; a ReLU-type fused activation clamps them to its
    bounds ``(act_min - Z_out) * 2**FINE_LOGIT_BITS`` and ``(act_max - Z_out) * 2**...``.
    """
    lower = upper = None
    if layer.activation != "none":
        lower = (layer.act_min - layer.output_zero_point) << FINE_LOGIT_BITS
        upper = (layer.act_max - layer.output_zero_point) << FINE_LOGIT_BITS
    return kernels.requantize_fine(
        acc, layer.multiplier, layer.shift, FINE_LOGIT_BITS, lower, upper
    )  # fmt: skip


def _check_fine_logits(int_model: IntModel) -> None:
    last = int_model.layers[-1]
    if last.kind == "avgpool":
        raise ValueError("fine logits need a conv layer (the classifier) last; this model ends "
                         f"with {last.name} ({last.kind})")  # fmt: skip
    if isinstance(last.shift, jax.core.Tracer):
        return  # traced (e.g. make_jaxpr of forward): run() checks concrete models
    shift = np.asarray(last.shift)
    lo, hi = -31 - FINE_LOGIT_BITS, 30 - FINE_LOGIT_BITS
    if np.any((shift < lo) | (shift > hi)):
        raise ValueError(
            f"{last.name}: requantization shifts {shift.min()}..{shift.max()} leave the range "
            f"[{lo}, {hi}] that fine logits ({FINE_LOGIT_BITS} extra bits) can represent"
        )


def forward(
    int_model: IntModel,
    q_images: Array,
    return_intermediates: bool = False,
    fine_logits: bool = False,
) -> Array | tuple[Array, dict[str, Array]]:
    """The un-jitted integer pass (see :func:`run`); useful for ``jax.make_jaxpr``."""
    if fine_logits:
        _check_fine_logits(int_model)
    x = q_images
    intermediates = {}
    fine = None
    last = len(int_model.layers) - 1
    for i, layer in enumerate(int_model.layers):
        if fine_logits and i == last:
            # One accumulation feeds both the 8-bit codes (unchanged) and the fine logits.
            acc, rule = layer_accumulate(layer, x, int_model.rounding)
            fine = fine_logits_from_accumulators(layer, acc)
            x = _requantize_codes(layer, acc, x.dtype, rule)
        else:
            x = apply_layer(layer, x, int_model.rounding)
        intermediates[layer.name] = x
    out = fine if fine_logits else x
    if out.ndim == 4 and out.shape[1:3] == (1, 1):
        out = jnp.reshape(out, (out.shape[0], out.shape[3]))
    return (out, intermediates) if return_intermediates else out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _forward_jit(
    int_model: IntModel, q_images: Array, return_intermediates: bool, fine_logits: bool
):
    out = forward(int_model, q_images, return_intermediates, fine_logits)
    if return_intermediates:  # a list keeps network order (jit sorts dict keys)
        return out[0], [out[1][name] for name in int_model.layer_names]
    return out


def run(
    int_model: IntModel, q_images, return_intermediates: bool = False, fine_logits: bool = False
) -> Array | tuple[Array, dict[str, Array]]:
    """Integer-only, jit-compiled, batched forward pass.

    Args:
      int_model: the integer model.
      q_images: input codes ``[N, H, W, C]`` of the model's storage dtype (uint8 for ``tf8`` and
        TFLite's legacy models, int8 for ``int8``), e.g. from :func:`quantize_input`.
      return_intermediates: also return ``{layer name: output codes}`` (NHWC, storage dtype) for
        every layer in network order (``Conv2d_0``, ``Conv2d_1_depthwise``, ...,
        ``AvgPool_1a``, ``Logits``).
      fine_logits: return int32 *fine logits* instead of the last layer's 8-bit codes. The
        classifier's int32 accumulators (zero-point corrections and int32 bias included: the
        very values its codes are requantized from) are requantized with the layer's own
        fixed-point multiplier times ``2**FINE_LOGIT_BITS``, i.e. onto the one grid
        ``S_out / 2**FINE_LOGIT_BITS`` with zero point 0 (:func:`fine_logit_scale`), with one
        exact 64-bit rounding and no 8-bit clamp (int32 saturation; see
        :func:`fine_logits_from_accumulators`). Integer ops only. With per-channel weights each
        class's accumulator has its own scale ``S_in S_w[c]``; the common grid makes them
        comparable. Where the code is not clamped, ``|fine - 2**FINE_LOGIT_BITS (code -
        Z_out)| <= 2**(FINE_LOGIT_BITS - 1)`` plus the code's first-rounding error. Their argmax
        is the classifier's top-1 at full resolution, whereas 8-bit logit codes often tie (1001
        classes on 256 codes) and ``argmax`` then picks the lowest tied index. The 8-bit codes
        (TFLite's output, on which bit-exactness is checked) do not change; they are
        ``intermediates[<last layer>]``.

    Returns:
      Logit codes ``[N, num_classes]`` (storage dtype; the last layer's output, squeezed when it
      is 1×1) or, with ``fine_logits``, int32 fine logits of that shape; or ``(logits,
      intermediates)``.
    """
    q_images = jnp.asarray(q_images)
    if q_images.dtype != jnp.dtype(int_model.dtype):
        raise ValueError(
            f"integer pass input must be {int_model.dtype} codes, got {q_images.dtype}; "
            "quantize float images with intpass.quantize_input"
        )
    if q_images.ndim != 4:
        raise ValueError(f"expected NHWC input codes, got shape {q_images.shape}")
    if fine_logits:
        _check_fine_logits(int_model)
    out = _forward_jit(int_model, q_images, return_intermediates, fine_logits)
    if return_intermediates:
        return out[0], dict(zip(int_model.layer_names, out[1], strict=True))
    return out


def quantize_input(int_model: IntModel, images) -> Array:
    """Float images (as the float model takes them) → the model's input codes."""
    lo, hi = int_model.int_range
    q = quantize(
        jnp.asarray(images, jnp.float32),
        jnp.float32(int_model.input_scale),
        jnp.int32(int_model.input_zero_point),
        IntRange(lo, hi),
    )
    return q.astype(int_model.dtype)


def output_qparams(int_model: IntModel) -> dict[str, tuple[float, int]]:
    """``{layer name: (scale, zero point)}`` of every layer's output codes."""
    return {layer.name: (layer.output_scale, layer.output_zero_point) for layer in int_model.layers}


def dequantize_codes(codes, scale: float, zero_point: int, dtype=jnp.float32) -> Array:
    """Codes → ``scale * (q - Z)`` in ``dtype`` (float32; float64, exact, under x64)."""
    return dequantize(jnp.asarray(codes), jnp.float32(scale), jnp.int32(zero_point), dtype)


def dequantize_logits(int_model: IntModel, codes) -> Array:
    """Logit codes → float logits (the last layer's scale and zero point)."""
    last = int_model.layers[-1]
    return dequantize_codes(codes, last.output_scale, last.output_zero_point)


def fine_logit_scale(int_model: IntModel) -> float:
    """The scale of the fine logits (``run(..., fine_logits=True)``; zero point 0)."""
    return float(np.float32(int_model.layers[-1].output_scale) / np.float32(2**FINE_LOGIT_BITS))


def dequantize_fine_logits(int_model: IntModel, fine) -> Array:
    """Fine logits → float logits ``fine_logit_scale * fine``."""
    return jnp.asarray(fine, jnp.float32) * jnp.float32(fine_logit_scale(int_model))


def dequantize_intermediates(
    int_model: IntModel, intermediates: dict, dtype=jnp.float32
) -> dict[str, Array]:
    """``{name: codes}`` from :func:`run` → ``{name: values}`` (float32, or float64 under x64)."""
    params = output_qparams(int_model)
    return {k: dequantize_codes(v, *params[k], dtype) for k, v in intermediates.items()}


def logits_fn(int_model: IntModel, fine: bool = True):
    """A float images → int32 logits function for :func:`qfsep_jax.evaluation.evaluate`.

    Inputs are quantized with the model's input parameters (a separate jitted step), then run
    through the integer pass. By default it returns the fine logits (``run(...,
    fine_logits=True)``): top-k is that of the classifier's integer output at full resolution,
    not of its 8-bit codes, among which ties are common (1001 classes on 256 codes) and
    ``top_k``/``argmax`` would break them towards the lowest class index, i.e. arbitrarily.
    ``fine=False``: the 8-bit logit codes (TFLite's output) as int32.
    """
    quant = jax.jit(functools.partial(quantize_input, int_model))

    def fn(images):
        return run(int_model, quant(images), fine_logits=fine).astype(jnp.int32)

    return fn


# --------------------------------------------------------------------------------------------
# Conversion of this project's (fake-)quantized MobileNetV1.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _ConvRecord:
    path: tuple[str, ...]
    module: Any
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...] | None = None


def _trace_conv_layers(model, variables, image_size: int = 64) -> list[_ConvRecord]:
    """Every ConvLayer call of the model's ``fake`` pass, in execution order (shapes only)."""
    from qfsep_jax.models.layers import ConvLayer

    records: list[_ConvRecord] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvLayer) and context.method_name == "__call__":
            rec = _ConvRecord(tuple(context.module.path), context.module, tuple(args[0].shape))
            out = next_fun(*args, **kwargs)
            rec.out_shape = tuple(out.shape)
            records.append(rec)
            return out
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, quant_mode="fake"), variables, images)
    return records


def _node(tree: dict, path: tuple[str, ...], what: str) -> dict:
    for key in path:
        if key not in tree:
            raise ValueError(f"{what} has no entry {'/'.join(path)}")
        tree = tree[key]
    return tree


def _act_qparams(ranges: dict, path: tuple[str, ...], int_range) -> tuple[float, int]:
    node = _node(ranges, path, "quant_ranges")
    name = "/".join(path)
    check_range(name, node["min"], node["max"])
    scale, zp = qparams(node["min"], node["max"], int_range)
    return float(scale), int(zp)


def _round_np(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


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
    A channel whose int32 bias would not fit (tiny weights, e.g. a dead channel under per-channel
    scales) gets a wider weight scale, as TFLite's converter does (logged; its weights were ~0).
    ``rounding``: see :data:`ROUNDING_PRESETS` (default ``reference``: TFLite's gemmlowp rounding).
    """
    quant = model.quant
    if quant is None:
        raise ValueError("from_variables needs a model built with quant=QuantConfig(...)")
    if quant.dynamic_activation_ranges:
        raise ValueError(
            "dynamic_activation_ranges models quantize each input with its own range; an "
            "integer-only model needs static (calibrated) activation ranges"
        )
    if "quant_ranges" not in variables:
        raise ValueError("variables have no 'quant_ranges': calibrate (PTQ) or train (QAT) first")
    model, variables = folded(model, variables)
    variables = jax.tree.map(np.asarray, variables)
    params, ranges = variables["params"], variables["quant_ranges"]
    act_range, w_range = quant.act_int_range, quant.weight_int_range
    dtype = "uint8" if act_range.qmin == 0 else "int8"
    w_dtype = np.uint8 if w_range.qmin == 0 else np.int8

    records = _trace_conv_layers(model, variables)
    kernels_f = [np.asarray(_node(params, rec.path, "params")["kernel"], np.float32)
                 for rec in records]  # fmt: skip
    w_codes, w_scales, w_zps = _quantize_kernels(kernels_f, quant)
    in_scale, in_zp = _act_qparams(ranges, ("input_quant",), act_range)
    layers: list[IntLayer] = []
    prev_scale, prev_zp, prev_shape = in_scale, in_zp, None
    for k, rec in enumerate(records):
        mod = rec.module
        name = "_".join(rec.path)
        if prev_shape is not None and rec.in_shape[1:3] != prev_shape[1:3]:
            if rec.in_shape[1:3] != (1, 1):
                raise ValueError(f"unexpected spatial change before {name}: {prev_shape}")
            # MobileNetV1 global-average-pools and re-rounds to the last layer's grid.
            layers.append(
                IntLayer(
                    None,
                    None,
                    None,
                    None,
                    None,
                    name=POOL_NAME,
                    kind="avgpool",
                    window=None,
                    padding="VALID",
                    input_zero_point=prev_zp,
                    output_zero_point=prev_zp,
                    act_min=act_range.qmin,
                    act_max=act_range.qmax,
                    input_scale=prev_scale,
                    output_scale=prev_scale,
                )  # fmt: skip
            )
        if not mod.quantize_output:
            raise ValueError(f"layer {name} has no output quantizer; cannot run integer-only")
        out_scale, out_zp = _act_qparams(ranges, rec.path + ("act_quant",), act_range)
        kernel = kernels_f[k]
        cout = kernel.shape[-1]
        node = _node(params, rec.path, "params")
        bias = np.asarray(node.get("bias", np.zeros(cout)), np.float32)
        w_q = np.asarray(w_codes[k]).astype(w_dtype)
        w_scale = np.broadcast_to(np.asarray(w_scales[k], np.float32), (cout,))
        w_zp = np.broadcast_to(np.asarray(w_zps[k], np.int32), (cout,)).copy()
        w_scale, w_q, w_zp, widened = _fit_bias(kernel, bias, w_scale, w_q, w_zp, prev_scale,
                                                w_range)  # fmt: skip
        if widened:
            logging.warning("%s: widened the weight scale of channels %s so that their int32 "
                            "bias fits (as TFLite's converter does)", name, widened)  # fmt: skip
        bias_scale = (np.float32(prev_scale) * w_scale).astype(np.float64)
        bias_q = _round_np(bias.astype(np.float64) / bias_scale).astype(np.int32)
        # TFLite's int8 kernels form every multiplier in double, per-tensor weights included.
        per_channel = quant.per_channel_weights or widened != [] or dtype == "int8"
        real_m = kernels.conv_multiplier(prev_scale, w_scale, out_scale, per_channel=per_channel)
        m0, shift = kernels.quantize_multiplier(real_m)
        act_min, act_max = kernels.activation_range(
            mod.activation, out_scale, out_zp, act_range.qmin, act_range.qmax
        )
        kind = "depthwise" if mod.depthwise else "conv"
        if mod.depthwise:
            w_q = w_q.reshape(kernel.shape[0], kernel.shape[1], cout)
        layers.append(
            IntLayer(
                w_q,
                w_zp,
                bias_q,
                m0,
                shift,
                name=name,
                kind=kind,
                stride=int(mod.stride),
                padding="SAME",
                input_zero_point=prev_zp,
                output_zero_point=out_zp,
                act_min=act_min,
                act_max=act_max,
                activation=mod.activation,
                input_scale=prev_scale,
                output_scale=out_scale,
                weight_scale=tuple(float(s) for s in w_scale),
            )  # fmt: skip
        )
        prev_scale, prev_zp, prev_shape = out_scale, out_zp, rec.out_shape
    int_model = IntModel(
        tuple(layers), in_scale, in_zp, dtype, parse_rounding(rounding),
        source=f"MobileNetV1(width={model.width_multiplier}, block={model.block}, "
        f"scheme={quant.scheme}, per_channel={quant.per_channel_weights})",
    )  # fmt: skip
    if check:
        check_accumulator_range(int_model)
    return int_model


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
        q = _round_np(flat[:, c].astype(np.float64) / np.float64(scale)) + w_zp[c]
        codes[:, c] = np.clip(q, w_range.qmin, w_range.qmax)
        w_scale[c] = scale
    return w_scale, codes.reshape(w_q.shape), w_zp, widen.tolist()


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_kernels(kernels_f: list, quant) -> tuple[list, list, list]:
    """Weight codes, scales and zero points of every kernel, as ``fake_quant_weights`` rounds.

    One jitted call for all layers (eager per-layer calls would compile per shape).
    """
    codes, scales, zps = [], [], []
    for kernel in kernels_f:
        lo, hi = weight_range(kernel, quant)
        scale, zp = qparams(lo, hi, quant.weight_int_range)
        codes.append(quantize(kernel, scale, zp, quant.weight_int_range))
        scales.append(scale)
        zps.append(zp)
    return codes, scales, zps


def from_quantized(qmodel, rounding: str | Rounding = "reference") -> IntModel:
    """Converts a :class:`qfsep_jax.ptq.QuantizedModel` (see :func:`from_variables`)."""
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


def round_codes(values, scale: float, zero_point: int, dtype=jnp.float32) -> np.ndarray:
    """Float values on a quantization grid → their integer codes (int32 numpy).

    Divided and rounded in ``dtype`` (float64 needs x64).
    """
    v = jnp.asarray(values, dtype) / jnp.asarray(np.float32(scale), dtype)
    return np.asarray(round_half_away_from_zero(v) + zero_point).astype(np.int32)


def snap_biases(model, variables: dict, int_model: IntModel) -> tuple[Any, dict]:
    """The simulation's variables with every bias replaced by its int32 value, dequantized.

    The integer pass stores biases as int32 with scale ``S_in * S_w`` (as TFLite does); the
    ``fake`` simulation adds the float bias. Snapping the float biases onto that grid
    (``b = q_b * S_in * S_w``) makes the simulation compute what the integer model computes up to
    float32 rounding, which removes most 1-LSB differences between the two. Returns the (folded)
    model and its snapped variables; ``int_model`` must be ``from_variables(model, variables)``.
    """
    model, variables = folded(model, variables)
    params = jax.tree.map(np.asarray, variables["params"])
    for layer in int_model.layers:
        if layer.kind == "avgpool":
            continue
        path = layer_path(layer.name)
        node = _node(params, path, "params")
        # float64: the product of the two float32 scales is exact there, so a float64
        # simulation sees the int32 bias itself (to 2**-53); a float32 one rounds it on use.
        bias_scale = np.float64(np.float32(layer.input_scale)) * np.asarray(
            layer.weight_scale, np.float32).astype(np.float64)  # fmt: skip
        node["bias"] = np.asarray(layer.bias).astype(np.float64) * bias_scale
    return model, {**variables, "params": params}


# Far above float32 error (~2**-16 LSB at code 255) and far below 1/n for pool windows n <= 1024.
POOL_TIE_OFFSET = 2.0**-12


def rounding_offsets(int_model: IntModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each conv layer's requantization rounding as one rounding with a moved threshold.

    With ``v = acc * M`` (the exact output in LSBs, before the zero point) and the multiplier's
    right shift ``r = max(-shift, 0)``, the two-step rules first round ``v * 2**r`` to an
    integer and then divide by ``2**r`` rounding again: ties away from zero (``"double"``) or up
    (``"ruy"``). For ``r >= 1`` the result equals a single rounding of ``v`` moved by
    ``d = 2**-(r + 1)`` LSB: ``sign(v) * floor(|v| + 1/2 + d)`` (``"double"``) and
    ``floor(v + 1/2 + d)`` (``"ruy"``), except where ``v * 2**r`` is itself a tie (the first
    rounding's ties, on its 2**-31-fine grid). So values whose fraction lies in
    ``[1/2 - d, 1/2)`` round one code further from zero (up, for ``"ruy"``) than a single
    rounding would put them: for ``r = 1`` that is a quarter of all values. ``r = 0`` and
    ``"single"`` round once (``d = 0``).

    Returns ``{layer name: (offset where v >= 0, offset where v < 0)}`` in output LSBs, float32
    per output channel: ``(d, -d)`` for ``"double"``, ``(d, d)`` for ``"ruy"``, zeros for
    ``"single"``. The average pool rounds once, but on exact ties (``sum / n`` half-way, 1 in
    ``n`` values for even ``n``) away from code 0, where a float mean lands either side: its
    entry is ``(POOL_TIE_OFFSET, -POOL_TIE_OFFSET)`` scalars, by the sign of the code.
    """
    out = {}
    for layer in int_model.layers:
        if layer.kind == "avgpool":
            e = np.float32(POOL_TIE_OFFSET)
            out[layer.name] = (e, -e)
            continue
        rounding = int_model.rounding
        rule = rounding.depthwise if layer.kind == "depthwise" else rounding.conv
        right = np.maximum(-np.asarray(layer.shift, np.int64), 0)
        d = np.where((right >= 1) & (rule != "single"), 0.5 ** (right + 1), 0.0).astype(np.float32)
        out[layer.name] = (d, -d if rule == "double" else d)
    return out


def multiplier_ratios(int_model: IntModel) -> dict[str, np.ndarray]:
    """Each conv layer's stored multiplier over the real one, per channel (float64).

    The integer pass multiplies by ``M0 * 2**shift / 2**31``: the real multiplier rounded to 31
    bits, and on TFLite's per-tensor uint8 path formed from a float32 product of the scales
    (:func:`kernels.conv_multiplier`). The simulation's dequantized arithmetic applies ``S_in *
    S_w / S_out`` exactly. The ratio is 1 to within about float32's resolution.
    """
    out = {}
    for layer in int_model.layers:
        if layer.kind == "avgpool":
            continue
        stored = np.asarray(layer.multiplier, np.float64) * np.exp2(
            np.asarray(layer.shift, np.float64) - 31)  # fmt: skip
        real = kernels.conv_multiplier(layer.input_scale, layer.weight_scale, layer.output_scale,
                                       per_channel=True)  # fmt: skip
        out[layer.name] = stored / real
    return out


def with_rounding_offsets(model, variables: dict, int_model: IntModel) -> tuple[Any, dict]:
    """The simulation with ``int_model``'s requantization rounding (see :func:`rounding_offsets`).

    Adds the ``requant_rounding`` collection that every conv layer's output quantizer
    (:class:`~qfsep_jax.models.layers.ActQuant`) and the pool's re-rounding read in ``fake``
    mode: each value is shifted by its offset times the output scale before the usual rounding,
    so the simulation's rounding threshold sits where the integer model's does. A simulation
    run in float64 also multiplies each value by its layer's :func:`multiplier_ratios` first (in
    float32 that ratio, within 6e-8 of 1, is at or below resolution and skipped). Everything
    else (the float sums, the float bias unless :func:`snap_biases` ran) stays the simulation's
    own.
    Returns the (folded) model and its variables; ``int_model`` must be ``from_variables(model,
    variables)``.
    """
    model, variables = folded(model, variables)
    tree: dict = {}
    ratios = multiplier_ratios(int_model)
    for name, (pos, neg) in rounding_offsets(int_model).items():
        if name == POOL_NAME:
            tree.update(pool_positive=pos, pool_negative=neg)
            continue
        node = tree
        for key in layer_path(name) + ("act_quant",):
            node = node.setdefault(key, {})
        node.update(positive=pos, negative=neg, multiplier_ratio=ratios[name])
    return model, {**variables, "requant_rounding": tree}


def layer_path(name: str) -> tuple[str, ...]:
    """``Conv2d_3_pointwise`` → ``("Conv2d_3", "pointwise")``; other names are one level."""
    for suffix in ("_depthwise", "_pointwise"):
        if name.endswith(suffix):
            return (name[: -len(suffix)], suffix[1:])
    return (name,)
