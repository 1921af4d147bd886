"""Aligning the fake-quant simulation with an integer model's arithmetic, from outside the model.

The simulation (``quant_mode="fake"``) adds float biases, multiplies by exact scale ratios and
rounds once; the integer model stores int32 biases and 31-bit multipliers, and TFLite's
requantization rounds twice. The agreement study (:mod:`qfsep_jax.analysis.agreement`) removes
these differences one at a time:

* :func:`snap_biases`: the simulation's variables with every bias on the int32 grid;
* :func:`rounding_alignment`: per layer, the integer model's two roundings written as one rounding
  with a moved threshold (:func:`rounding_offsets`), the stored multiplier over the real one
  (:func:`multiplier_ratios`, applied in float64 only), and the integer pool's exact-tie rule;
* :func:`aligned`: a context in which the model's own forward pass applies an alignment, through
  a Flax method interceptor on the activation quantizers and the pool's re-rounding. The model
  itself has no branch for it.

An alignment is a pytree of arrays, so a jitted function can take it as an argument and build
the context inside its trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.integer import kernels
from qfsep_jax.integer.types import POOL_NAME, IntModel
from qfsep_jax.models.layers import ActQuant
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.models.names import layer_path, tfslim_name
from qfsep_jax.quant.fold import folded
from qfsep_jax.quant.numerics import move_rounding_threshold, qparams
from qfsep_jax.tree_utils import subtree

Alignment = dict[str, Any]

# Far above float32 error (~2**-16 LSB at code 255) and far below 1/n for pool windows n <= 1024.
POOL_TIE_OFFSET = 2.0**-12
MAX_POOL_WINDOW = 1024


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
        node = subtree(params, layer_path(layer.name), "params")
        # float64: the product of the two float32 scales is exact there, so a float64
        # simulation sees the int32 bias itself (to 2**-53); a float32 one rounds it on use.
        bias_scale = np.float64(np.float32(layer.input_scale)) * np.asarray(
            layer.weight_scale, np.float32
        ).astype(np.float64)
        node["bias"] = np.asarray(layer.bias).astype(np.float64) * bias_scale
    return model, {**variables, "params": params}


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
            np.asarray(layer.shift, np.float64) - 31
        )
        real = kernels.conv_multiplier(
            layer.input_scale, layer.weight_scale, layer.output_scale, per_channel=True
        )
        out[layer.name] = stored / real
    return out


def rounding_alignment(int_model: IntModel) -> Alignment:
    """The simulation aligned with ``int_model``'s requantization rounding, for :func:`aligned`.

    Returns ``{"layers": {name: {"positive", "negative", "multiplier_ratio"}}, "pool":
    {"positive", "negative"}}``: each conv layer's output is shifted by its
    :func:`rounding_offsets` times the output scale before the usual rounding, so the
    simulation's rounding threshold sits where the integer model's does; a simulation run in
    float64 also multiplies each output by its layer's :func:`multiplier_ratios` first (in
    float32 that ratio, within 6e-8 of 1, is at or below resolution and skipped). The pool's
    entry moves exact ties away from code 0. Everything else (the float sums, the float bias
    unless :func:`snap_biases` ran) stays the simulation's own.
    """
    ratios = multiplier_ratios(int_model)
    layers, pool = {}, {}
    for name, (pos, neg) in rounding_offsets(int_model).items():
        if name == POOL_NAME:
            pool = {"positive": pos, "negative": neg}
        else:
            layers[name] = {"positive": pos, "negative": neg, "multiplier_ratio": ratios[name]}
    return {"layers": layers, "pool": pool}


@contextlib.contextmanager
def aligned(alignment: Alignment | None) -> Iterator[None]:
    """A context in which ``fake`` forward passes apply ``alignment`` (``None``: no change).

    Intercepts each activation quantizer whose layer the alignment names (the value it rounds
    is multiplied by the layer's ``multiplier_ratio`` in float64, then moved by the offsets)
    and the model's pool re-rounding (exact ties moved away from code 0). Use it inside the
    function that ``jit`` traces, with the alignment passed in as an argument.
    """
    if alignment is None:
        yield
        return

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, ActQuant) and context.method_name == "__call__":
            return _aligned_act_quant(module, alignment, next_fun, args, kwargs)
        if isinstance(module, MobileNetV1) and context.method_name == "_requantize_pool":
            return _aligned_pool(module, alignment, next_fun, args, kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _aligned_act_quant(module: ActQuant, alignment: Alignment, next_fun, args, kwargs):
    """ActQuant's call with its input moved as the integer model's requantization rounds."""
    path = tuple(module.path)
    entry = alignment["layers"].get(tfslim_name(path[:-1])) if path[-1] == "act_quant" else None
    quant_mode = kwargs.get("quant_mode", args[1] if len(args) > 1 else "float")
    if entry is None or quant_mode != "fake" or module.quant.dynamic_activation_ranges:
        return next_fun(*args, **kwargs)
    x = args[0]
    lo = module.get_variable("quant_ranges", "min")
    hi = module.get_variable("quant_ranges", "max")
    if x.dtype == jnp.float64:  # the stored multiplier: within float32's resolution
        x = x * entry["multiplier_ratio"]
    scale = qparams(lo, hi, module.quant.act_int_range)[0]
    x = move_rounding_threshold(x, scale, entry["positive"], entry["negative"])
    return next_fun(x, *args[1:], **kwargs)


def _aligned_pool(module: MobileNetV1, alignment: Alignment, next_fun, args, kwargs):
    """The pool's re-rounding with exact ties moved away from code 0, as the integer pool rounds.

    The integer pool rounds ``sum / window`` of the codes, ties away from code 0; the
    simulation's float mean sits on such a tie give or take float32 error. The offsets are a
    small fixed fraction of an LSB: far above float32 error and, for windows of up to
    ``MAX_POOL_WINDOW`` values, far below the 1/window gap to the nearest value that is not a tie.
    """
    pooled, lo, hi, window = args
    if not alignment["pool"]:
        return next_fun(*args, **kwargs)
    if window > MAX_POOL_WINDOW:
        raise ValueError(
            f"the pool's tie rule is modelled for windows of up to "
            f"{MAX_POOL_WINDOW} values, got {window}"
        )
    scale, zero_point = qparams(lo, hi, module.pool_int_range())
    moved = move_rounding_threshold(
        pooled,
        scale,
        alignment["pool"]["positive"],
        alignment["pool"]["negative"],
        sign_of=pooled / scale + zero_point.astype(pooled.dtype),
    )
    return next_fun(moved, lo, hi, window, **kwargs)
