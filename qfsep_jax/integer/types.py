"""The integer model: :class:`IntModel`, a chain of :class:`IntLayer` s, and its rounding rules.

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
"""

from __future__ import annotations

import dataclasses

import jax

from qfsep_jax.integer import kernels
from qfsep_jax.models.names import POOL_NAME
from qfsep_jax.quant.numerics import int_range_for_bits

Array = jax.Array
__all__ = ["POOL_NAME", "IntLayer", "IntModel", "Rounding", "ROUNDING_PRESETS", "parse_rounding"]
LAYER_KINDS = ("conv", "depthwise", "avgpool")


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
    integer body), ``weight_bits``/``act_bits``: the bit widths of the weight and output codes
    (8: full uint8/int8 codes; the clamp already holds a narrower output range, the export
    reads them).
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
    weight_bits: int = 8
    act_bits: int = 8

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
      input_bits: bit width of the input codes (:attr:`input_int_range`); 8 for full codes.
    """

    layers: tuple[IntLayer, ...]
    input_scale: float
    input_zero_point: int
    dtype: str = "uint8"
    rounding: Rounding = ROUNDING_PRESETS["reference"]
    source: str = ""
    tensor_map: tuple[tuple[str, int, int], ...] = ()
    input_bits: int = 8

    def with_rounding(self, rounding: str | Rounding) -> IntModel:
        """The same model with another rounding rule (see :func:`parse_rounding`)."""
        return dataclasses.replace(self, rounding=parse_rounding(rounding))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def int_range(self) -> tuple[int, int]:
        return (0, 255) if self.dtype == "uint8" else (-128, 127)

    @property
    def input_int_range(self) -> tuple[int, int]:
        """The range of the input codes: :attr:`int_range` narrowed to ``input_bits``."""
        r = int_range_for_bits(self.input_bits, signed=self.dtype == "int8")
        return (r.qmin, r.qmax)

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
    meta_fields=[
        "input_scale",
        "input_zero_point",
        "dtype",
        "rounding",
        "source",
        "tensor_map",
        "input_bits",
    ],
)
