"""A quantized model: the BN-folded MobileNetV1 with calibrated ranges, and how it was made.

:class:`QuantizedModel` is what post-training quantization (:mod:`qfsep_jax.ptq`) returns and
what a QAT run exports (:func:`from_qat`); its ``"fake"`` forward pass is the 8-bit simulation,
and :func:`qfsep_jax.integer.from_quantized` converts it to the integer-only model.
:func:`save_quantized` / :func:`load_quantized` write and read it (Orbax variables and a JSON
description), atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import numpy as np

from qfsep_jax.io_utils import write_json
from qfsep_jax.models.activations import activation_name
from qfsep_jax.models.mobilenet_v1 import MobileNetV1, block_name
from qfsep_jax.quant.fold import ZERO_VARIANCE_SCOPES, folded
from qfsep_jax.quant.numerics import check_all_ranges
from qfsep_jax.quant.scheme import QuantConfig, normalize_layer_bits

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PTQRecipe:
    """One post-training quantization pipeline.

    Attributes:
      scheme: ``tf8`` (uint8 asymmetric) or ``int8`` (symmetric int8 weights).
      per_channel_weights: one weight range per output channel.
      zero_variance_fix: the paper's fix (replace near-zero BN variances before folding).
      zero_variance_scope: the BN layers the fix touches: ``depthwise`` (the paper's fix) or
        ``all`` (also Conv2d_0 and the pointwise layers).
      cross_layer_equalization: Nagel et al.'s CLE on the folded weights (swaps ReLU6 → ReLU).
      observer: activation range observer (``minmax``, ``ema``, ``percentile``).
      dynamic_activation_ranges: per-input activation ranges instead of calibrated ones.
      weight_bits, act_bits, layer_bits: bit widths and per-layer overrides, passed to
        :class:`~qfsep_jax.quant.scheme.QuantConfig` (8 bits: the paper's 8-bit pipeline).
    """

    scheme: str = "tf8"
    per_channel_weights: bool = False
    zero_variance_fix: bool = False
    cross_layer_equalization: bool = False
    observer: str = "minmax"
    dynamic_activation_ranges: bool = False
    zero_variance_scope: str = "depthwise"
    weight_bits: int = 8
    act_bits: int = 8
    layer_bits: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.zero_variance_scope not in ZERO_VARIANCE_SCOPES:
            raise ValueError(
                f"PTQRecipe.zero_variance_scope must be one of {ZERO_VARIANCE_SCOPES}, "
                f"got {self.zero_variance_scope!r}"
            )
        # Hashable and JSON-round-trippable (load_quantized passes lists); bits are checked by
        # quant_config().
        object.__setattr__(self, "layer_bits", normalize_layer_bits(self.layer_bits))
        self.quant_config()

    def quant_config(self) -> QuantConfig:
        """The :class:`QuantConfig` this recipe quantizes with."""
        return QuantConfig(
            scheme=self.scheme,
            per_channel_weights=self.per_channel_weights,
            observer=self.observer,
            dynamic_activation_ranges=self.dynamic_activation_ranges,
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            layer_bits=self.layer_bits,
        )


LOGIT_MODES = ("float", "fake", "integer")


@dataclasses.dataclass
class QuantizedModel:
    """A BN-folded model with its variables (incl. ``quant_ranges``) and what was done to it."""

    model: MobileNetV1
    variables: Variables
    recipe: PTQRecipe
    info: dict[str, Any]

    def check_ranges(self) -> None:
        """Raises ValueError naming the first activation range that is not finite and ordered.

        Models with per-input (dynamic) activation ranges have no calibrated ranges to check.
        """
        if self.recipe.dynamic_activation_ranges:
            return
        ranges = self.variables.get("quant_ranges")
        if not ranges:
            raise ValueError("the quantized model's variables hold no quant_ranges")
        check_all_ranges(jax.tree.map(np.asarray, ranges))

    def to_integer(self, rounding: str = "reference") -> Any:
        """The integer-only model (:class:`qfsep_jax.integer.IntModel`) of this model.

        ``rounding`` is a preset name of :data:`qfsep_jax.integer.ROUNDING_PRESETS` (or a
        :class:`~qfsep_jax.integer.Rounding`); ``"reference"`` is TFLite's reference kernels.
        """
        from qfsep_jax import integer

        return integer.from_quantized(self, rounding)

    def logits(
        self, images: Any, mode: str = "fake", batch_size: int = 64, rounding: str = "reference"
    ) -> np.ndarray:
        """Float logits ``[N, num_classes]`` of images ``[N, H, W, 3]`` scaled to [-1, 1].

        Args:
          images: NumPy or JAX float images, RGB, NHWC, scaled to [-1, 1].
          mode: ``"float"`` (the BN-folded float network, no rounding), ``"fake"`` (the 8-bit
            simulation) or ``"integer"`` (the integer-only pass: images quantized to the input
            codes, :func:`qfsep_jax.integer.run`, the 8-bit logit codes dequantized).
          batch_size: images per jitted call.
          rounding: the integer pass's rounding preset (``mode="integer"`` only).

        The ranges are checked on the host first (a never-calibrated range raises ValueError).
        Nothing is cached: for many calls in integer mode, convert once with :meth:`to_integer`
        and use :mod:`qfsep_jax.integer` directly.
        """
        if mode not in LOGIT_MODES:
            raise ValueError(f"mode must be one of {LOGIT_MODES}, got {mode!r}")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        images = images.astype(np.float32)
        if mode != "float":
            self.check_ranges()
        if mode == "integer":
            from qfsep_jax import integer

            int_model = self.to_integer(rounding)

            def fn(x):
                codes = integer.run(int_model, integer.quantize_input(int_model, x))
                return integer.dequantize_logits(int_model, codes)

        else:

            def fn(x):
                return _apply(self.model, self.variables, x, mode)

        n = len(images)
        if n == 0:
            return np.zeros((0, self.model.num_classes), np.float32)
        size = min(batch_size, n)
        out = []
        for start in range(0, n, size):
            chunk = images[start : start + size]
            valid = len(chunk)
            if valid < size:  # pad: one compiled shape for every batch
                chunk = np.concatenate(
                    [chunk, np.zeros((size - valid,) + chunk.shape[1:], chunk.dtype)]
                )
            out.append(np.asarray(fn(chunk))[:valid])
        return np.concatenate(out)

    def with_bits(
        self,
        weight_bits: int = 8,
        act_bits: int = 8,
        layer_bits: tuple[tuple[str, int, int], ...] | str = (),
    ) -> QuantizedModel:
        """The same calibrated model at other bit widths (see :class:`QuantConfig`).

        Calibration observes the float activations, never rounded ones, so the calibrated
        ranges hold for any bit width; only the rounding grid changes.
        """
        recipe = dataclasses.replace(
            self.recipe, weight_bits=weight_bits, act_bits=act_bits, layer_bits=layer_bits
        )
        model = self.model.clone(quant=recipe.quant_config())
        return QuantizedModel(model, self.variables, recipe, dict(self.info))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model: MobileNetV1, variables: Variables, images: jax.Array, quant_mode: str):
    return model.apply(variables, images, quant_mode=quant_mode)


def from_qat(model: MobileNetV1, variables: Variables) -> QuantizedModel:
    """A QAT model as the BN-folded quantized model the integer-only pass converts.

    BN is folded with the moving statistics (what the QAT model evaluates with); the EMA ranges
    of ``quant_ranges`` become the activation ranges. The folded model's ``"fake"`` forward pass
    equals the QAT model's inference pass (``quant_mode="qat"``, ``train=False``) bit for bit
    when that pass runs in float32 (``dtype=None``), at any training step: both fold with
    :func:`~qfsep_jax.quant.fold.fold_bn`, which rounds the same inside and outside ``jit``. A
    bfloat16 QAT model (``dtype="bfloat16"``) computes its own pass in bfloat16; the export is
    float32 (what the integer pass models), so the two then differ by bfloat16 rounding.
    Raises ValueError for a model whose ranges were never observed (no QAT step yet).
    """
    if model.quant is None:
        raise ValueError("from_qat needs a QAT model (built with quant=QuantConfig)")
    ranges = variables.get("quant_ranges")
    if not ranges:
        raise ValueError("from_qat: the variables hold no quant_ranges")
    ranges = jax.tree.map(np.asarray, ranges)
    for path, count in jax.tree_util.tree_leaves_with_path(ranges):
        if jax.tree_util.keystr(path).endswith("['count']") and count <= 0:
            raise ValueError(
                f"quant range {jax.tree_util.keystr(path)} was never observed: export a QAT "
                "model after at least one training step"
            )
    check_all_ranges(ranges)
    qmodel, folded_vars = folded(
        model, {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    )
    folded_vars = jax.tree.map(np.asarray, folded_vars)
    # The integer pass and its simulation are float32 whatever precision the QAT run used.
    qmodel = qmodel.clone(axis_name=None, dtype=None)
    q = model.quant
    recipe = PTQRecipe(
        scheme=q.scheme,
        per_channel_weights=q.per_channel_weights,
        observer="ema",
        weight_bits=q.weight_bits,
        act_bits=q.act_bits,
        layer_bits=q.layer_bits,
    )
    return QuantizedModel(
        qmodel, {**folded_vars, "quant_ranges": ranges}, recipe, {"source": "qat"}
    )


def model_kwargs(model: MobileNetV1) -> dict[str, Any]:
    """The dataclass fields of a model as JSON-able values (``quant`` as a dict).

    ``block`` and ``activation`` are saved by their registered names
    (:func:`~qfsep_jax.models.mobilenet_v1.register_block`,
    :func:`~qfsep_jax.models.activations.register_activation`); an unregistered block class or
    :class:`~qfsep_jax.models.activations.Activation` raises ValueError, since a loader could not
    rebuild it. The loading process must register the same names before
    :func:`load_quantized`.
    """
    out = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
        if f.name == "block":
            v = block_name(v)
        elif f.name == "activation":
            v = activation_name(v)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def save_quantized(quantized: QuantizedModel, directory: str) -> None:
    """Writes an exported model: ``variables`` (Orbax) and ``model.json`` (its attributes).

    Written completely into a sibling directory (``<directory>.tmp-<pid>``) first and then
    renamed into place, the previous export moved aside (``<directory>.old-<pid>``) and deleted
    last. A crash never leaves a mix of two exports or half a model at ``directory``; between
    the two renames (a moment) both complete copies sit under those sibling names.
    """
    import shutil

    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    staging, retired = f"{directory}.tmp-{os.getpid()}", f"{directory}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(staging, "variables"), quantized.variables)
    write_json(
        os.path.join(staging, "model.json"),
        {"model": model_kwargs(quantized.model), "recipe": dataclasses.asdict(quantized.recipe)},
    )
    if os.path.exists(directory):
        os.rename(directory, retired)
    os.rename(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


def load_quantized(directory: str) -> QuantizedModel:
    """Reads a model written by :func:`save_quantized`.

    A model with a user-registered block or activation needs those names registered in this
    process first (else ValueError naming the registered ones).
    """
    import orbax.checkpoint as ocp

    path = os.path.join(directory, "model.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported quantized model in {directory}")
    with open(path) as f:
        desc = json.load(f)
    kw = dict(desc["model"])
    kw["quant"] = QuantConfig(**kw["quant"])
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(os.path.abspath(directory), "variables"))
    variables = jax.tree.map(np.asarray, variables)
    # A model saved before the recipe had a scope was fixed on all BN layers.
    recipe = {"zero_variance_scope": "all", **desc["recipe"]}
    return QuantizedModel(MobileNetV1(**kw), variables, PTQRecipe(**recipe), {"source": "qat"})
