"""Read quantized MobileNetV1-family ``.tflite`` models into an :class:`IntModel`.

The flatbuffer is read with the ``tflite`` package (generated from TFLite's schema), not a
hand-written parser. Supported: a single-subgraph chain of CONV_2D, DEPTHWISE_CONV_2D (depth
multiplier 1), AVERAGE_POOL_2D, FULLY_CONNECTED (as a 1×1 conv), RESHAPE/SQUEEZE (no
arithmetic) and a final SOFTMAX (not computed: the integer pass stops at the logits that feed it),
with uint8 (legacy) or int8 activations, per-tensor or per-channel weights and int32 biases.
That covers the official quantized MobileNetV1 models of any width and resolution.

Backbone + head pairs (Coral's split models): ``from_tflite(backbone, head)`` continues the chain
into a second file whose input tensor is the first file's output (same shape and quantization).

Layer names follow the MobileNetV1 chain by position: the first conv is ``Conv2d_0``, each
depthwise conv opens block ``i`` (``Conv2d_i_depthwise``) and the conv after it is
``Conv2d_i_pointwise``; the average pool is ``AvgPool_1a`` and the conv after it ``Logits``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from qfsep_jax.integer import kernels
from qfsep_jax.integer.inference import forward
from qfsep_jax.integer.types import POOL_NAME, IntLayer, IntModel, Rounding, parse_rounding

_ACTIVATIONS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6"}
_PADDINGS = {0: "SAME", 1: "VALID"}
_CODES = {2: np.int32, 3: np.uint8, 9: np.int8}
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 7: "int16", 9: "int8"}
SUPPORTED_OPS = (
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "AVERAGE_POOL_2D",
    "FULLY_CONNECTED",
    "RESHAPE",
    "SQUEEZE",
    "SOFTMAX",
)


class TFLiteImportError(ValueError):
    """The file is not a TFLite model the integer pass can run."""


@dataclasses.dataclass
class _Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    type: int
    scale: np.ndarray
    zero_point: np.ndarray
    quantized_dimension: int
    data: np.ndarray | None

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.type, f"type {self.type}")


class _Graph:
    """One subgraph of a flatbuffer, with typed access to tensors and operators."""

    def __init__(self, path: str):
        import tflite

        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TFLite model not found: {path}")
        with open(path, "rb") as f:
            self.buf = f.read()
        if len(self.buf) < 8 or not tflite.Model.ModelBufferHasIdentifier(self.buf, 0):
            raise TFLiteImportError(
                f"{path} is not a TensorFlow Lite flatbuffer (no 'TFL3' file identifier)"
            )
        try:
            self.model = tflite.Model.GetRootAsModel(self.buf, 0)
            n_sub = self.model.SubgraphsLength()
            if n_sub != 1:
                raise TFLiteImportError(f"{path}: expected 1 subgraph, found {n_sub}")
            self.sg = self.model.Subgraphs(0)
            self.ops = [self._op(i) for i in range(self.sg.OperatorsLength())]
            self.inputs = list(self.sg.InputsAsNumpy())
            self.outputs = list(self.sg.OutputsAsNumpy())
        except TFLiteImportError:
            raise
        except Exception as err:  # flatbuffers raises assorted errors on garbage
            raise TFLiteImportError(f"{path}: malformed TFLite flatbuffer ({err!r})") from None

    def _op(self, i: int):
        import tflite

        op = self.sg.Operators(i)
        code = self.model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = tflite.BUILTIN_OPCODE2NAME.get(builtin, f"builtin {builtin}")
        if builtin == tflite.BuiltinOperator.CUSTOM:
            name = f"CUSTOM({code.CustomCode()})"
        inputs = [int(v) for v in op.InputsAsNumpy()] if op.InputsLength() else []
        outputs = [int(v) for v in op.OutputsAsNumpy()] if op.OutputsLength() else []
        return name, inputs, outputs, op

    def tensor(self, index: int) -> _Tensor:
        t = self.sg.Tensors(index)
        q = t.Quantization()
        scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else np.zeros(0)
        zp = q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else np.zeros(0)
        qdim = q.QuantizedDimension() if q is not None else 0
        data = None
        buf = self.model.Buffers(t.Buffer())
        if buf is not None:
            if buf.Offset() > 1:
                raw = np.frombuffer(self.buf, np.uint8, buf.Size(), buf.Offset())
            elif buf.DataLength():
                raw = buf.DataAsNumpy()
            else:
                raw = None
            if raw is not None and t.Type() in _CODES:
                data = np.frombuffer(raw.tobytes(), _CODES[t.Type()])
        shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        if data is not None:
            data = data.reshape(shape)
        return _Tensor(
            index,
            t.Name().decode(errors="replace"),
            shape,
            t.Type(),
            np.asarray(scale, np.float32),
            np.asarray(zp, np.int64),
            int(qdim),
            data,
        )


@dataclasses.dataclass
class _State:
    """Parsing state carried from the backbone into the head."""

    layers: list
    tensor_map: list
    block: int = 0
    n_conv: int = 0
    after: str = "input"  # kind of the previous arithmetic layer
    scale: float = 0.0
    zero_point: int = 0
    dtype: type = np.uint8
    shape: tuple[int, ...] = ()
    done: bool = False


def _act_tensor(g: _Graph, index: int, what: str) -> _Tensor:
    t = g.tensor(index)
    if t.type not in (3, 9):
        raise TFLiteImportError(
            f"{g.path}: {what} tensor {t.name!r} is {t.type_name}; the integer pass runs "
            "uint8 (legacy) or int8 quantized models only"
        )
    if t.scale.size != 1 or t.zero_point.size != 1:
        raise TFLiteImportError(f"{g.path}: activation tensor {t.name!r} is not per-tensor")
    return t


def _options(op, cls):
    table = op.BuiltinOptions()
    if table is None:
        raise TFLiteImportError(f"operator without builtin options ({cls.__name__})")
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    return opts


def _activation(code: int, g: _Graph, op_name: str) -> str:
    if code not in _ACTIVATIONS:
        raise TFLiteImportError(f"{g.path}: {op_name} has unsupported fused activation {code}")
    return _ACTIVATIONS[code]


def _square_stride(h: int, w: int, g: _Graph, op_name: str) -> int:
    if h != w:
        raise TFLiteImportError(f"{g.path}: {op_name} with unequal strides {h}x{w}")
    return int(h)


def _conv_layer(g: _Graph, st: _State, name_op: str, inputs, out_t: _Tensor, op) -> IntLayer:
    import tflite

    in_t = _act_tensor(g, inputs[0], "input")
    w_t = g.tensor(inputs[1])
    b_t = g.tensor(inputs[2]) if len(inputs) > 2 and inputs[2] >= 0 else None
    if w_t.data is None or w_t.type not in (3, 9):
        raise TFLiteImportError(f"{g.path}: {name_op} weights {w_t.name!r} are not constant 8-bit")
    if b_t is not None and (b_t.data is None or b_t.type != 2):
        raise TFLiteImportError(f"{g.path}: {name_op} bias {b_t.name!r} is not constant int32")
    if name_op == "CONV_2D":
        o = _options(op, tflite.Conv2DOptions)
        if o.DilationHFactor() != 1 or o.DilationWFactor() != 1:
            raise TFLiteImportError(f"{g.path}: dilated CONV_2D is not supported")
        weight = np.transpose(w_t.data, (1, 2, 3, 0))  # OHWI -> HWIO
        stride = _square_stride(o.StrideH(), o.StrideW(), g, name_op)
        padding, act, kind = _PADDINGS[o.Padding()], o.FusedActivationFunction(), "conv"
    elif name_op == "DEPTHWISE_CONV_2D":
        o = _options(op, tflite.DepthwiseConv2DOptions)
        if o.DilationHFactor() != 1 or o.DilationWFactor() != 1:
            raise TFLiteImportError(f"{g.path}: dilated DEPTHWISE_CONV_2D is not supported")
        if w_t.shape[3] != in_t.shape[3]:
            raise TFLiteImportError(
                f"{g.path}: depthwise conv with depth multiplier "
                f"{w_t.shape[3] // max(in_t.shape[3], 1)} is not supported"
            )
        weight = w_t.data[0]  # (kh, kw, C)
        stride = _square_stride(o.StrideH(), o.StrideW(), g, name_op)
        padding, act, kind = _PADDINGS[o.Padding()], o.FusedActivationFunction(), "depthwise"
    else:  # FULLY_CONNECTED: a 1x1 conv on a 1x1 map
        o = _options(op, tflite.FullyConnectedOptions)
        if int(np.prod(in_t.shape[1:-1], dtype=np.int64)) != 1:
            raise TFLiteImportError(f"{g.path}: FULLY_CONNECTED on a non-flat input {in_t.shape}")
        weight = np.transpose(w_t.data, (1, 0))[None, None]  # [O, I] -> (1, 1, I, O)
        stride, padding, act, kind = 1, "VALID", o.FusedActivationFunction(), "conv"
    cout = weight.shape[-1]
    if w_t.scale.size not in (1, cout):
        raise TFLiteImportError(f"{g.path}: weights {w_t.name!r} have {w_t.scale.size} scales")
    w_scale = np.broadcast_to(w_t.scale, (cout,)).astype(np.float32)
    w_zp = np.broadcast_to(w_t.zero_point, (cout,)).astype(np.int32)
    bias = np.zeros(cout, np.int32) if b_t is None else b_t.data.astype(np.int32).reshape(cout)
    s_in, s_out = float(in_t.scale[0]), float(out_t.scale[0])
    # The legacy uint8 kernels form M from a float32 product; int8 kernels per channel in double.
    legacy = in_t.type == 3
    real_m = kernels.conv_multiplier(s_in, w_scale, s_out, per_channel=not legacy)
    m0, shift = kernels.quantize_multiplier(real_m)
    lo, hi = (0, 255) if out_t.type == 3 else (-128, 127)
    activation = _activation(act, g, name_op)
    act_min, act_max = kernels.activation_range(activation, s_out, int(out_t.zero_point[0]), lo, hi)
    name = _layer_name(st, kind)
    return IntLayer(
        np.asarray(weight),
        w_zp,
        bias,
        m0,
        shift,
        name=name,
        kind=kind,
        stride=stride,
        padding=padding,
        input_zero_point=int(in_t.zero_point[0]),
        output_zero_point=int(out_t.zero_point[0]),
        act_min=act_min,
        act_max=act_max,
        activation=activation,
        input_scale=s_in,
        output_scale=s_out,
        weight_scale=tuple(float(s) for s in w_scale),
    )


def _layer_name(st: _State, kind: str) -> str:
    if kind == "depthwise":
        st.block += 1
        return f"Conv2d_{st.block}_depthwise"
    if kind == "avgpool":
        return POOL_NAME
    st.n_conv += 1
    if st.after == "input":
        return "Conv2d_0"
    if st.after == "depthwise":
        return f"Conv2d_{st.block}_pointwise"
    if st.after == "avgpool":
        return "Logits"
    return f"Conv2d_extra_{st.n_conv}"


def _parse(g: _Graph, st: _State, file_index: int) -> None:
    import tflite

    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise TFLiteImportError(
            f"{g.path}: expected one input and one output, got {len(g.inputs)} and {len(g.outputs)}"
        )
    cur = g.inputs[0]
    in_t = _act_tensor(g, cur, "input")
    if file_index == 0:
        st.scale, st.zero_point = float(in_t.scale[0]), int(in_t.zero_point[0])
        st.dtype = _CODES[in_t.type]
        if len(in_t.shape) != 4:
            raise TFLiteImportError(f"{g.path}: input must be NHWC, got shape {in_t.shape}")
        st.shape = in_t.shape
    else:
        same = (
            _CODES[in_t.type] == st.dtype
            and int(np.prod(in_t.shape)) == int(np.prod(st.shape))
            and np.float32(in_t.scale[0]) == np.float32(st.scale)
            and int(in_t.zero_point[0]) == st.zero_point
        )
        if not same:
            raise TFLiteImportError(
                f"{g.path}: head input {in_t.name!r} {in_t.shape} (S={in_t.scale[0]}, "
                f"Z={in_t.zero_point[0]}) does not match the backbone output {st.shape} "
                f"(S={st.scale}, Z={st.zero_point})"
            )
    for k, (name_op, inputs, outputs, op) in enumerate(g.ops):
        if st.done:
            raise TFLiteImportError(f"{g.path}: operator {name_op} after the final SOFTMAX")
        if name_op not in SUPPORTED_OPS:
            raise TFLiteImportError(
                f"{g.path}: operator {k} is {name_op}; the integer pass supports "
                f"MobileNetV1-family models made of {', '.join(SUPPORTED_OPS)}"
            )
        if not inputs or inputs[0] != cur or len(outputs) != 1:
            raise TFLiteImportError(
                f"{g.path}: operator {k} ({name_op}) does not continue a single chain of "
                "tensors; only sequential (MobileNetV1-like) graphs are supported"
            )
        out_t = g.tensor(outputs[0])
        if name_op == "SOFTMAX":
            st.done = True
            cur = outputs[0]
            continue
        out_t = _act_tensor(g, outputs[0], "output")
        if _CODES[out_t.type] != st.dtype:
            raise TFLiteImportError(f"{g.path}: mixed uint8/int8 activations at operator {k}")
        if name_op in ("RESHAPE", "SQUEEZE"):
            if (
                np.float32(out_t.scale[0]) != np.float32(st.scale)
                or int(out_t.zero_point[0]) != st.zero_point
            ):
                raise TFLiteImportError(f"{g.path}: {name_op} changes quantization parameters")
            if st.layers:
                st.tensor_map.append((st.layers[-1].name, file_index, outputs[0]))
            cur = outputs[0]
            st.shape = out_t.shape
            continue
        if name_op == "AVERAGE_POOL_2D":
            o = _options(op, tflite.Pool2DOptions)
            if (
                np.float32(out_t.scale[0]) != np.float32(st.scale)
                or int(out_t.zero_point[0]) != st.zero_point
            ):
                raise TFLiteImportError(
                    f"{g.path}: AVERAGE_POOL_2D must keep the input's scale and zero point"
                )
            lo, hi = (0, 255) if st.dtype == np.uint8 else (-128, 127)
            activation = _activation(o.FusedActivationFunction(), g, name_op)
            act_min, act_max = kernels.activation_range(activation, st.scale, st.zero_point, lo, hi)
            layer = IntLayer(
                None,
                None,
                None,
                None,
                None,
                name=_layer_name(st, "avgpool"),
                kind="avgpool",
                stride=_square_stride(o.StrideH(), o.StrideW(), g, name_op),
                padding=_PADDINGS[o.Padding()],
                window=(o.FilterHeight(), o.FilterWidth()),
                input_zero_point=st.zero_point,
                output_zero_point=st.zero_point,
                act_min=act_min,
                act_max=act_max,
                activation=activation,
                input_scale=st.scale,
                output_scale=st.scale,
            )
            st.after = "avgpool"
        else:
            layer = _conv_layer(g, st, name_op, inputs, out_t, op)
            st.after = layer.kind
        st.layers.append(layer)
        st.tensor_map.append((layer.name, file_index, outputs[0]))
        st.scale, st.zero_point = float(out_t.scale[0]), int(out_t.zero_point[0])
        st.shape = out_t.shape
        cur = outputs[0]
    if cur != g.outputs[0]:
        raise TFLiteImportError(f"{g.path}: the op chain does not end at the model output")


def from_tflite(
    path: str, head_path: str | None = None, rounding: str | Rounding = "reference"
) -> IntModel:
    """Reads a quantized ``.tflite`` model (and optionally its head) into an :class:`IntModel`.

    Raises :class:`TFLiteImportError` for files that are not TFLite flatbuffers, graphs that are
    not a chain of the supported ops, float models, or a head that does not fit the backbone.
    The imported layer shapes are checked against the file's tensor shapes.
    """
    st = _State(layers=[], tensor_map=[])
    graphs = [_Graph(path)] + ([_Graph(head_path)] if head_path else [])
    for i, g in enumerate(graphs):
        if i == 1 and st.done:
            raise TFLiteImportError(f"{path} ends with SOFTMAX; it cannot take a head")
        _parse(g, st, i)
    if not st.layers:
        raise TFLiteImportError(f"{path}: no convolution layers found")
    layers = tuple(
        dataclasses.replace(
            layer,
            **{
                f: None if getattr(layer, f) is None else np.asarray(getattr(layer, f))
                for f in ("weight", "weight_zero_point", "bias", "multiplier", "shift")
            },
        )
        for layer in st.layers
    )
    source = path if head_path is None else f"{path} + {head_path}"
    g0 = graphs[0]
    first = g0.tensor(g0.inputs[0])
    model = IntModel(
        layers,
        float(first.scale[0]),
        int(first.zero_point[0]),
        "uint8" if first.type == 3 else "int8",
        parse_rounding(rounding),
        source,
        tuple(st.tensor_map),
    )
    _check_shapes(model, graphs, first.shape)
    return model


def _check_shapes(model: IntModel, graphs: list[_Graph], input_shape) -> None:
    """Every reproduced tensor must have the element count the file declares."""
    spec = jax.ShapeDtypeStruct(tuple(input_shape), np.dtype(model.dtype))
    _, inter = jax.eval_shape(lambda m, x: forward(m, x, True), model, spec)
    for name, file_index, tensor_index in model.tensor_map:
        t = graphs[file_index].tensor(tensor_index)
        got = inter[name].shape
        if int(np.prod(got)) != int(np.prod(t.shape)):
            raise TFLiteImportError(
                f"{graphs[file_index].path}: layer {name} computes shape {got} but tensor "
                f"{t.name!r} has shape {t.shape}"
            )
