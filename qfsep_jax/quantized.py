"""A quantized model: the BN-folded MobileNetV1 with calibrated ranges, and how it was made.

:class:`QuantizedModel` is what post-training quantization (:mod:`qfsep_jax.ptq`) returns and
what a QAT run exports (:func:`from_qat`); its ``"fake"`` forward pass is the 8-bit simulation,
and :func:`qfsep_jax.integer.from_quantized` converts it to the integer-only model.
:func:`save_quantized` / :func:`load_quantized` write and read it (Orbax variables and a JSON
description), atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from qfsep_jax.io_utils import write_json
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.quant.fold import folded
from qfsep_jax.quant.numerics import check_all_ranges
from qfsep_jax.quant.scheme import QuantConfig

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PTQRecipe:
    """One post-training quantization pipeline.

    Attributes:
      scheme: ``tf8`` (uint8 asymmetric) or ``int8`` (symmetric int8 weights).
      per_channel_weights: one weight range per output channel.
      zero_variance_fix: the paper's fix (replace near-zero BN variances before folding).
      cross_layer_equalization: Nagel et al.'s CLE on the folded weights (swaps ReLU6 → ReLU).
      observer: activation range observer (``minmax``, ``ema``, ``percentile``).
      dynamic_activation_ranges: per-input activation ranges instead of calibrated ones.
    """

    scheme: str = "tf8"
    per_channel_weights: bool = False
    zero_variance_fix: bool = False
    cross_layer_equalization: bool = False
    observer: str = "minmax"
    dynamic_activation_ranges: bool = False

    def quant_config(self) -> QuantConfig:
        return QuantConfig(
            scheme=self.scheme,
            per_channel_weights=self.per_channel_weights,
            observer=self.observer,
            dynamic_activation_ranges=self.dynamic_activation_ranges,
        )


@dataclasses.dataclass
class QuantizedModel:
    """A BN-folded model with its variables (incl. ``quant_ranges``) and what was done to it."""

    model: MobileNetV1
    variables: Variables
    recipe: PTQRecipe
    info: dict[str, Any]


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
    recipe = PTQRecipe(scheme=q.scheme, per_channel_weights=q.per_channel_weights, observer="ema")
    return QuantizedModel(
        qmodel, {**folded_vars, "quant_ranges": ranges}, recipe, {"source": "qat"}
    )


def model_kwargs(model: MobileNetV1) -> dict[str, Any]:
    """The dataclass fields of a model as JSON-able values (``quant`` as a dict)."""
    out = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
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
    """Reads a model written by :func:`save_quantized`."""
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
    return QuantizedModel(
        MobileNetV1(**kw), variables, PTQRecipe(**desc["recipe"]), {"source": "qat"}
    )
