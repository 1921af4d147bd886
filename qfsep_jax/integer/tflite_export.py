"""Write an :class:`IntModel` as a ``.tflite`` file that LiteRT runs bit-exactly.

:func:`to_tflite` is the mirror of :func:`qfsep_jax.integer.tflite_import.from_tflite`: it
writes the integer model as it is (weight codes, int32 biases, float32 scales and zero points)
with the flatbuffer object API that LiteRT ships (``ai_edge_litert.schema_py_generated`` and
``ai_edge_litert.tools.flatbuffer_utils``); no TensorFlow is imported.

A ``.tflite`` file does not hold the integer model's multipliers or clamps: LiteRT recomputes
them from the float32 scales when it prepares each op (``QuantizeMultiplier`` of
``S_in * S_w / S_out``, formed from a float32 product for uint8 and in double per channel for
int8, :func:`kernels.conv_multiplier`; ``CalculateActivationRangeQuantized`` for the fused
activation, :func:`kernels.activation_range`). So before anything is written, every layer is
checked: the written scales must give the model's ``(M0, shift)`` in every channel, and the
written fused activation its ``[act_min, act_max]``. A model TFLite cannot express (uint8
per-channel weights, int8 weights with a nonzero zero point, a multiplier no float32 scales give,
a clamp no fused activation gives, a requantization between two ops, activations below 8 bits,
...) raises :class:`TFLiteExportError` naming the layer and the reason, and no file is written.
Weights below 8 bits are ordinary uint8/int8 codes that use fewer values, and are written as
they are; activations below 8 bits are not expressible, since LiteRT derives a fused
activation's clamp from the uint8/int8 type, never from a narrower range.

The graph: ``input`` → one op per layer (CONV_2D for regular and 1×1 convs including the
classifier, DEPTHWISE_CONV_2D, AVERAGE_POOL_2D) → RESHAPE to ``[1, classes]`` when the last
output is 1×1 → optionally SOFTMAX. Tensors are named after the TF-slim layers (``Conv2d_0``,
``Conv2d_0/weights``, ``Conv2d_0/biases``, ..., ``Logits/SpatialSqueeze``, ``Predictions``).
The file has a ``serving_default`` signature (input ``input``, output ``logits`` or
``predictions``) and 16-byte aligned buffers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from qfsep_jax.integer import kernels
from qfsep_jax.integer.inference import forward
from qfsep_jax.integer.types import IntLayer, IntModel
from qfsep_jax.io_utils import write_atomic

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "input"
_ALIGN = 16  # the schema's ``Buffer.data: [ubyte] (force_align: 16)``
_FUSED = {"none": 0, "relu": 1, "relu_n1_to_1": 2, "relu6": 3}
_PADDING = {"SAME": 0, "VALID": 1}
# Softmax output quantization TFLite requires (``S = 1/256``; Z = 0 for uint8, -128 for int8).
_SOFTMAX_ZERO_POINT = {"uint8": 0, "int8": -128}


class TFLiteExportError(ValueError):
    """The integer model cannot be written as a ``.tflite`` file that computes the same codes."""


def to_tflite(
    int_model: IntModel,
    path: str,
    image_size: int | tuple[int, int],
    softmax: bool = False,
) -> IntModel:
    """Writes ``int_model`` to ``path`` (atomically) as a ``.tflite`` model LiteRT runs.

    Args:
      int_model: a chain of ``conv``/``depthwise``/``avgpool`` layers, uint8 (TF8: uint8
        per-tensor weights) or int8 (symmetric int8 weights, per-tensor or per-channel).
      path: the output file; nothing is written if the model cannot be expressed.
      image_size: the input's height and width (one int for square inputs). A TFLite model has a
        fixed input shape, and a global average pool becomes a fixed window.
      softmax: append TFLite's SOFTMAX (uint8 ``S = 1/256, Z = 0``, int8 ``Z = -128``) after the
        logits. The integer pass stops at the logits; the softmax is LiteRT's own.

    Returns:
      ``int_model`` with ``tensor_map`` naming, for every layer, the file's tensor holding its
      output (``(layer name, 0, tensor index)``, the reshaped logits under the last layer's name),
      so that :class:`~qfsep_jax.integer.reference.LiteRTRunner` can compare every tensor.

    Raises:
      TFLiteExportError: the model is not expressible in TFLite (see the module docstring).
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model, tensor_map = build_model(int_model, image_size, softmax)
    data = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    write_atomic(path, data)
    return dataclasses.replace(int_model, tensor_map=tuple(tensor_map))


def build_model(
    int_model: IntModel, image_size: int | tuple[int, int], softmax: bool = False
) -> tuple[Any, list[tuple[str, int, int]]]:
    """The checked flatbuffer object (``schema.ModelT``) and tensor map of :func:`to_tflite`."""
    from ai_edge_litert import schema_py_generated as schema

    return _Builder(schema, int_model, _size(image_size), softmax).build()


def _size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise TFLiteExportError(
            f"image_size must be a positive int or (height, width), got {image_size!r}"
        )
    return int(size[0]), int(size[1])


def _aligned_buffer_class(schema):
    class AlignedBufferT(schema.BufferT):
        """``BufferT`` whose data starts on a 16-byte boundary of the file.

        The schema asks for it (``force_align: 16``), but the generated Python ``Pack`` does not
        apply the attribute. Flatbuffers are built back to front: ``builder.Prep(16, n)`` pads so
        that the ``n`` data bytes written next start a multiple of 16 bytes before the end of
        the buffer, and ``Finish`` pads the whole file to a multiple of its largest alignment, so
        they also start at a multiple of 16 from the start of the file.
        """

        def Pack(self, builder):
            if self.data is not None:
                builder.Prep(_ALIGN, len(self.data))
            return super().Pack(builder)

    return AlignedBufferT


class _Builder:
    """Collects tensors, buffers and operators while checking each layer."""

    def __init__(self, schema, int_model: IntModel, size: tuple[int, int], softmax: bool):
        self.s = schema
        self.m = int_model
        self.size = size
        self.softmax = softmax
        self.buffer_cls = _aligned_buffer_class(schema)
        self.tensors: list = []
        self.buffers: list = [self.buffer_cls()]  # buffer 0: the empty sentinel
        self.operators: list = []
        self.opcodes: dict[tuple[int, int], int] = {}
        self.opcode_list: list = []
        if int_model.dtype not in ("uint8", "int8"):
            raise TFLiteExportError(f"model dtype {int_model.dtype!r}: only uint8 and int8")
        int8 = int_model.dtype == "int8"
        self.act_type = schema.TensorType.INT8 if int8 else schema.TensorType.UINT8
        self.qmin, self.qmax = int_model.int_range

    # -- tensors ---------------------------------------------------------------------------

    def tensor(self, name, shape, ttype, scale=None, zero_point=None, axis=0, data=None) -> int:
        t = self.s.TensorT()
        t.name = name
        t.shape = np.asarray(shape, np.int32)
        t.type = ttype
        if scale is not None:
            q = self.s.QuantizationParametersT()
            q.scale = np.asarray(scale, np.float32).reshape(-1)
            q.zeroPoint = np.asarray(zero_point, np.int64).reshape(-1)
            q.quantizedDimension = int(axis)
            t.quantization = q
        if data is not None:
            buf = self.buffer_cls()
            buf.data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def activation(self, name, shape, scale, zero_point) -> int:
        return self.tensor(name, shape, self.act_type, [scale], [zero_point])

    def op(self, code: int, version: int, inputs, outputs, options_type=0, options=None) -> None:
        key = (code, version)
        if key not in self.opcodes:
            oc = self.s.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = version
            self.opcodes[key] = len(self.opcode_list)
            self.opcode_list.append(oc)
        o = self.s.OperatorT()
        o.opcodeIndex = self.opcodes[key]
        o.inputs = np.asarray(inputs, np.int32)
        o.outputs = np.asarray(outputs, np.int32)
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    # -- the graph -------------------------------------------------------------------------

    def build(self):
        m = self.m
        if not m.layers:
            raise TFLiteExportError("the model has no layers")
        names = m.layer_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TFLiteExportError(f"layer names must be unique (tensor names): {dup} repeat")
        self._check_act_bits()
        shape = (1, *self.size, 3)
        shapes = self._shapes(shape)
        cur = self.activation(INPUT_NAME, shape, m.input_scale, m.input_zero_point)
        cur_q = (np.float32(m.input_scale), int(m.input_zero_point))
        tensor_map = []
        for layer in m.layers:
            self._check_input(layer, cur_q)
            if layer.kind == "avgpool":
                cur = self._pool(layer, cur, shape, shapes[layer.name])
            elif layer.kind in ("conv", "depthwise"):
                cur = self._conv(layer, cur, shapes[layer.name])
            else:
                raise TFLiteExportError(f"layer {layer.name}: unknown kind {layer.kind!r}")
            tensor_map.append((layer.name, 0, cur))
            shape = shapes[layer.name]
            cur_q = (np.float32(layer.output_scale), int(layer.output_zero_point))
        last = m.layers[-1]
        output_name = "logits"
        if tuple(shape[1:3]) == (1, 1) and shape[0] == 1:
            new_shape = np.asarray([1, shape[3]], np.int32)
            shape_t = self.tensor(
                f"{last.name}/shape", [2], self.s.TensorType.INT32, data=new_shape
            )
            out = self.activation(f"{last.name}/SpatialSqueeze", new_shape, *cur_q)
            self.op(self.s.BuiltinOperator.RESHAPE, 1, [cur, shape_t], [out])
            tensor_map.append((last.name, 0, out))
            cur, shape = out, tuple(new_shape)
        if self.softmax:
            zp = _SOFTMAX_ZERO_POINT[m.dtype]
            out = self.activation("Predictions", shape, 1.0 / 256.0, zp)
            opts = self.s.SoftmaxOptionsT()
            opts.beta = 1.0
            version = 1 if m.dtype == "uint8" else 2
            self.op(
                self.s.BuiltinOperator.SOFTMAX,
                version,
                [cur],
                [out],
                self.s.BuiltinOptions.SoftmaxOptions,
                opts,
            )
            cur, output_name = out, "predictions"
        return self._model(cur, output_name), tensor_map

    def _shapes(self, input_shape) -> dict[str, tuple[int, ...]]:
        spec = jax.ShapeDtypeStruct(input_shape, np.dtype(self.m.dtype))
        try:
            _, inter = jax.eval_shape(lambda mm, x: forward(mm, x, True), self.m, spec)
        except (TypeError, ValueError) as err:
            raise TFLiteExportError(
                f"the model does not run on input {input_shape}: {err}"
            ) from None
        return {k: tuple(int(d) for d in v.shape) for k, v in inter.items()}

    def _model(self, output: int, output_name: str):
        s = self.s
        sg = s.SubGraphT()
        sg.tensors = self.tensors
        sg.inputs = np.asarray([0], np.int32)
        sg.outputs = np.asarray([output], np.int32)
        sg.operators = self.operators
        sg.name = "main"
        sig = s.SignatureDefT()
        sig.signatureKey = SIGNATURE_KEY
        sig.subgraphIndex = 0
        sig.inputs = [_tensor_map(s, INPUT_NAME, 0)]
        sig.outputs = [_tensor_map(s, output_name, output)]
        model = s.ModelT()
        model.version = 3
        model.description = f"qfsep_jax to_tflite: {self.m.source}"
        model.operatorCodes = self.opcode_list
        model.subgraphs = [sg]
        model.buffers = self.buffers
        model.signatureDefs = [sig]
        return model

    # -- checks ----------------------------------------------------------------------------

    def _check_act_bits(self) -> None:
        """Activations below 8 bits: LiteRT would clamp outputs to the full uint8/int8 range."""
        named = [(INPUT_NAME, self.m.input_bits)]
        named += [(layer.name, layer.act_bits) for layer in self.m.layers]
        for name, bits in named:
            if bits < 8:
                raise TFLiteExportError(
                    f"layer {name}: {bits}-bit activations cannot be expressed in TFLite; its "
                    f"fused-activation clamp is derived from the {self.m.dtype} type, not from a "
                    f"{bits}-bit range, so LiteRT would compute codes outside it (use act_bits=8 "
                    "for an export; weights below 8 bits are fine)"
                )

    def _check_input(self, layer: IntLayer, cur_q) -> None:
        mine = (np.float32(layer.input_scale), int(layer.input_zero_point))
        if mine != cur_q:
            raise TFLiteExportError(
                f"layer {layer.name}: its input quantization (S={mine[0]!r}, Z={mine[1]}) is not "
                f"the previous tensor's (S={cur_q[0]!r}, Z={cur_q[1]}); TFLite ops pass tensors "
                "on unchanged, with no requantization between them"
            )

    def _fused(self, layer: IntLayer) -> int:
        """The fused activation code, after checking that LiteRT derives the model's clamp."""
        if layer.activation not in _FUSED:
            raise TFLiteExportError(
                f"layer {layer.name}: activation {layer.activation!r} has no TFLite fused "
                f"activation (supported: {sorted(_FUSED)})"
            )
        clamp = kernels.activation_range(
            layer.activation,
            np.float32(layer.output_scale),
            int(layer.output_zero_point),
            self.qmin,
            self.qmax,
        )
        mine = (int(layer.act_min), int(layer.act_max))
        if tuple(clamp) != mine:
            raise TFLiteExportError(
                f"layer {layer.name}: LiteRT derives the clamp {list(clamp)} from fused activation "
                f"{layer.activation!r} and output S={np.float32(layer.output_scale)!r}, "
                f"Z={layer.output_zero_point}, but the model clamps to {list(mine)}"
            )
        return _FUSED[layer.activation]

    def _weights(self, layer: IntLayer):
        """Checked weight codes, scales (1 or Cout) and zero points of a conv layer."""
        name, dtype = layer.name, self.m.dtype
        if layer.weight is None or layer.bias is None or layer.weight_scale is None:
            raise TFLiteExportError(
                f"layer {name}: a {layer.kind} layer without weights, bias or weight scales"
            )
        w = np.asarray(layer.weight)
        if w.dtype != np.dtype(dtype):
            raise TFLiteExportError(
                f"layer {name}: {w.dtype} weights in a model with {dtype} activations; TFLite's "
                "integer kernels take uint8 weights with uint8 activations and int8 with int8"
            )
        cout = int(np.asarray(layer.bias).shape[0])
        scale = np.asarray(layer.weight_scale, np.float32).reshape(-1)
        zp = np.broadcast_to(np.asarray(layer.weight_zero_point, np.int64), (cout,))
        if scale.size not in (1, cout) or w.shape[-1] != cout:
            raise TFLiteExportError(
                f"layer {name}: {scale.size} weight scales, {w.shape[-1]} "
                f"output channels, {cout} biases"
            )
        scale = np.broadcast_to(scale, (cout,))
        if not np.all(scale > 0) or not np.all(np.isfinite(scale)):
            raise TFLiteExportError(f"layer {name}: weight scales must be finite and > 0")
        per_channel = bool(np.any(scale != scale[0]))
        if dtype == "uint8":
            if per_channel or np.any(zp != zp[0]):
                raise TFLiteExportError(
                    f"layer {name}: uint8 weights with per-channel scales or zero points "
                    f"({np.unique(scale).size} scales, {np.unique(zp).size} zero points); "
                    "TFLite's per-axis quantization is int8 only (use the int8 scheme, or "
                    "per-tensor weights)"
                )
        elif np.any(zp != 0):
            c = int(np.flatnonzero(zp != 0)[0])
            raise TFLiteExportError(
                f"layer {name}: int8 weights with a nonzero zero point (channel {c}: Z={zp[c]}); "
                "TFLite's int8 kernels require symmetric weights (Z = 0)"
            )
        return w, (scale if per_channel else scale[:1]), (zp if per_channel else zp[:1]), cout

    def _check_multipliers(self, layer: IntLayer, w_scale: np.ndarray, cout: int) -> None:
        """LiteRT's ``QuantizeMultiplier`` of the written scales must give our M0 and shift."""
        name = layer.name
        m0 = np.broadcast_to(np.asarray(layer.multiplier, np.int64), (cout,))
        shift = np.broadcast_to(np.asarray(layer.shift, np.int64), (cout,))
        normal = ((m0 >= 2**30) & (m0 < 2**31)) | ((m0 == 0) & (shift == 0))
        in_range = (shift >= -31) & (shift <= 30)
        if not np.all(normal & in_range):
            c = int(np.flatnonzero(~(normal & in_range))[0])
            raise TFLiteExportError(
                f"layer {name}: multiplier of channel {c} (M0={m0[c]}, shift={shift[c]}) cannot "
                "be represented: LiteRT derives M0 in [2^30, 2^31) and a shift in [-31, 30] from "
                "float32 scales"
            )
        # uint8 kernels form S_in * S_w in float32 (legacy path), int8 kernels per channel in
        # double: the same rule as kernels.conv_multiplier and the importer.
        real = kernels.conv_multiplier(
            np.float32(layer.input_scale),
            w_scale,
            np.float32(layer.output_scale),
            per_channel=self.m.dtype == "int8",
        )
        want_m0, want_shift = kernels.quantize_multiplier(np.broadcast_to(real, (cout,)))
        bad = (want_m0 != m0) | (want_shift != shift)
        if np.any(bad):
            c = int(np.flatnonzero(bad)[0])
            raise TFLiteExportError(
                f"layer {name}: QuantizeMultiplier of the written scales (S_in="
                f"{np.float32(layer.input_scale)!r}, S_w={np.broadcast_to(w_scale, (cout,))[c]!r}, "
                f"S_out={np.float32(layer.output_scale)!r}) gives M0={want_m0[c]}, "
                f"shift={want_shift[c]} in channel {c} ({int(bad.sum())} of {cout} channels "
                f"differ), but the model has M0={m0[c]}, shift={shift[c]}"
            )

    # -- ops -------------------------------------------------------------------------------

    def _conv(self, layer: IntLayer, cur: int, out_shape) -> int:
        s = self.s
        w, w_scale, w_zp, cout = self._weights(layer)
        self._check_multipliers(layer, w_scale, cout)
        fused = self._fused(layer)
        if layer.padding not in _PADDING:
            raise TFLiteExportError(f"layer {layer.name}: padding {layer.padding!r}")
        s_in = np.float32(layer.input_scale)
        int8 = self.m.dtype == "int8"
        w_type = s.TensorType.INT8 if int8 else s.TensorType.UINT8
        if layer.kind == "depthwise":
            if w.ndim != 3:
                raise TFLiteExportError(
                    f"layer {layer.name}: depthwise weights of shape "
                    f"{w.shape}, expected (kh, kw, C)"
                )
            data, axis = w[None], 3  # (1, kh, kw, C), channels last
        else:
            if w.ndim != 4:
                raise TFLiteExportError(
                    f"layer {layer.name}: conv weights of shape {w.shape}, expected HWIO"
                )
            data, axis = np.transpose(w, (3, 0, 1, 2)), 0  # HWIO -> OHWI
        if w_scale.size == 1:
            # Per-tensor: quantized dimension 0, as TF's converter writes it; XNNPACK declines
            # per-tensor weights with another quantized dimension.
            axis = 0
        w_t = self.tensor(f"{layer.name}/weights", data.shape, w_type, w_scale, w_zp, axis, data)
        # The bias scale LiteRT checks against S_in * S_w: the float32 product.
        b_scale = s_in * w_scale
        bias = np.asarray(layer.bias, np.int32)
        b_t = self.tensor(
            f"{layer.name}/biases",
            [cout],
            s.TensorType.INT32,
            b_scale,
            np.zeros(b_scale.size, np.int64),
            0,
            bias,
        )
        out = self.activation(layer.name, out_shape, layer.output_scale, layer.output_zero_point)
        version = 3 if int8 else 1
        if layer.kind == "depthwise":
            o = s.DepthwiseConv2DOptionsT()
            o.depthMultiplier = 1
            code, otype = (
                s.BuiltinOperator.DEPTHWISE_CONV_2D,
                s.BuiltinOptions.DepthwiseConv2DOptions,
            )
        else:
            o = s.Conv2DOptionsT()
            code, otype = s.BuiltinOperator.CONV_2D, s.BuiltinOptions.Conv2DOptions
        o.padding = _PADDING[layer.padding]
        o.strideW = o.strideH = int(layer.stride)
        o.dilationWFactor = o.dilationHFactor = 1
        o.fusedActivationFunction = fused
        self.op(code, version, [cur, w_t, b_t], [out], otype, o)
        return out

    def _pool(self, layer: IntLayer, cur: int, in_shape, out_shape) -> int:
        s = self.s
        same = (np.float32(layer.input_scale), int(layer.input_zero_point)) == (
            np.float32(layer.output_scale),
            int(layer.output_zero_point),
        )
        if not same:
            raise TFLiteExportError(
                f"layer {layer.name}: TFLite's AVERAGE_POOL_2D keeps its "
                "input's scale and zero point; this pool changes them"
            )
        fused = self._fused(layer)
        o = s.Pool2DOptionsT()
        if layer.window is None:  # global: the whole input, as the integer pass pools it
            o.filterHeight, o.filterWidth = int(in_shape[1]), int(in_shape[2])
            o.strideH = o.strideW = 1
            o.padding = _PADDING["VALID"]
        else:
            o.filterHeight, o.filterWidth = (int(k) for k in layer.window)
            o.strideH = o.strideW = int(layer.stride)
            o.padding = _PADDING[layer.padding]
        o.fusedActivationFunction = fused
        out = self.activation(layer.name, out_shape, layer.output_scale, layer.output_zero_point)
        version = 2 if self.m.dtype == "int8" else 1
        self.op(
            s.BuiltinOperator.AVERAGE_POOL_2D,
            version,
            [cur],
            [out],
            s.BuiltinOptions.Pool2DOptions,
            o,
        )
        return out


def _tensor_map(schema, name: str, index: int):
    t = schema.TensorMapT()
    t.name = name
    t.tensorIndex = index
    return t
