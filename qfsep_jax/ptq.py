"""Post-training quantization: zero-variance fix → BN folding → [CLE] → range calibration.

A :class:`PTQRecipe` names the choices; :func:`quantize_post_training` turns a float model and
its variables into a BN-folded model with calibrated activation ranges, whose ``"fake"`` forward
pass is the 8-bit simulation (and whose variables the integer-only pass converts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from qfsep_jax.models.activations import get_activation
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.models.names import layer_paths
from qfsep_jax.quant import cle as cle_lib
from qfsep_jax.quant import observers
from qfsep_jax.quant.fold import fix_zero_variance, folded
from qfsep_jax.quant.numerics import check_all_ranges
from qfsep_jax.quantized import PTQRecipe, QuantizedModel

Variables = dict[str, Any]


# The rows of the paper's Table 1 reproduction, plus extra pipelines for comparison.
RECIPES: dict[str, PTQRecipe] = {
    "tf8_per_tensor": PTQRecipe(),
    "tf8_zero_variance_fix": PTQRecipe(zero_variance_fix=True),  # depthwise layers, the paper's
    "tf8_zero_variance_fix_all": PTQRecipe(zero_variance_fix=True, zero_variance_scope="all"),
    "per_channel": PTQRecipe(per_channel_weights=True),
    "cle_per_tensor": PTQRecipe(cross_layer_equalization=True),
    "tf8_dynamic_ranges": PTQRecipe(dynamic_activation_ranges=True),
    "tf8_zero_variance_fix_per_channel": PTQRecipe(
        zero_variance_fix=True, per_channel_weights=True
    ),
    "int8_per_channel": PTQRecipe(scheme="int8", per_channel_weights=True),
}


def recipe_by_name(name: str) -> PTQRecipe:
    """The registered recipe called ``name``, with a clear error listing the choices."""
    if name not in RECIPES:
        raise ValueError(f"unknown PTQ recipe {name!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name]


def prepare_folded(
    model: MobileNetV1,
    variables: Variables,
    recipe: PTQRecipe,
    zero_variance_threshold: float = 1e-10,
    cle_iterations: int = 20,
) -> tuple[MobileNetV1, Variables, dict[str, Any]]:
    """The weight-side steps of ``recipe``: returns the folded model, its variables and info."""
    if model.bn_folded:
        raise ValueError("prepare_folded expects an unfolded float model (bn_folded=False)")
    info: dict[str, Any] = {}
    if recipe.zero_variance_fix:
        variables, fixed = fix_zero_variance(
            variables, zero_variance_threshold, scope=recipe.zero_variance_scope
        )
        info["zero_variance_scope"] = recipe.zero_variance_scope
        info["zero_variance_channels"] = fixed
    qmodel, folded_vars = folded(model, variables)
    activation = model.activation
    if recipe.cross_layer_equalization:
        act = get_activation(activation)
        if act.clamp is None or act.clamp[0] != 0.0:
            # CLE swaps a clamp [0, hi] for ReLU; other activations are not ReLU-like.
            raise ValueError(
                f"cross_layer_equalization needs a ReLU-type activation (a clamp [0, hi]); "
                f"the model's is {act.name!r} (clamp {act.clamp})"
            )
        folded_params, scales = cle_lib.equalize(
            folded_vars["params"], layer_paths(folded_vars["params"]), iterations=cle_iterations
        )
        folded_vars = {**folded_vars, "params": folded_params}
        activation = "relu"
        info["cle_max_scale"] = float(max(np.max(s) for s in scales.values()))
        info["cle_min_scale"] = float(min(np.min(s) for s in scales.values()))
    qmodel = qmodel.clone(activation=activation, quant=recipe.quant_config())
    folded_vars = {k: v for k, v in folded_vars.items() if k != "quant_ranges"}
    return qmodel, jax.tree.map(np.asarray, folded_vars), info


def calibrate(
    model: MobileNetV1,
    variables: Variables,
    batches: Iterable[dict[str, np.ndarray]],
    total: int | None = None,
    counts: dict[str, int] | None = None,
) -> Variables:
    """Runs calibration batches through ``model`` and returns variables with ``quant_ranges``.

    Padded images (``mask`` 0) are dropped before they reach the observers. ``counts``, if
    given, receives ``images`` (how many calibrated the ranges) and ``skipped_corrupt`` (files
    the input skipped as corrupt, from the batches' ``skipped``).
    """
    if model.quant is None:
        raise ValueError("calibrate needs a model built with quant=QuantConfig(...)")
    ranges = empty_ranges(model)
    params = {k: v for k, v in variables.items() if k != "quant_ranges"}

    @jax.jit
    def step(ranges, images):
        _, new = model.apply(
            {**params, "quant_ranges": ranges},
            images,
            quant_mode="calibrate",
            mutable=["quant_ranges"],
        )
        return new["quant_ranges"]

    start, n, skipped = time.perf_counter(), 0, 0
    for batch in tqdm(batches, total=total, desc="calibrate", unit="batch", leave=False):
        valid = int(batch["mask"].sum()) if "mask" in batch else len(batch["image"])
        if valid == 0:
            continue
        ranges = step(ranges, batch["image"][:valid])
        n += valid
        skipped = int(batch.get("skipped", 0))
    if counts is not None:
        counts.update(images=n, skipped_corrupt=skipped)
    if n == 0:
        raise ValueError("calibration saw no images")
    ranges = jax.block_until_ready(ranges)
    logging.info("calibrated on %d images (%.1f images/s)", n, n / (time.perf_counter() - start))
    ranges = jax.tree.map(np.asarray, ranges)
    check_all_ranges(ranges)
    return {**params, "quant_ranges": ranges}


def empty_ranges(model: MobileNetV1) -> dict:
    """A ``quant_ranges`` tree of fresh observer states for ``model`` (no compute, no compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    fresh = {k: np.asarray(v) for k, v in observers.init_range_state().items()}

    def fill(tree: dict) -> dict:
        return {k: fill(v) if isinstance(v, dict) else fresh[k] for k, v in tree.items()}

    return fill(shapes["quant_ranges"])


def quantize_post_training(
    model: MobileNetV1,
    variables: Variables,
    recipe: PTQRecipe,
    calibration_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    num_calibration_batches: int | None = None,
    zero_variance_threshold: float = 1e-10,
    cle_iterations: int = 20,
) -> QuantizedModel:
    """The whole PTQ pipeline for one recipe (``calibration_batches()`` makes a fresh iterator).

    ``info`` of the result records, besides the recipe's steps, how many images calibrated the
    ranges (``calibration_images``) and how many corrupt files were skipped.
    """
    qmodel, folded, info = prepare_folded(
        model, variables, recipe, zero_variance_threshold, cle_iterations
    )
    if recipe.dynamic_activation_ranges:
        qvars = {**folded, "quant_ranges": empty_ranges(qmodel)}
    else:
        counts: dict[str, int] = {}
        qvars = calibrate(qmodel, folded, calibration_batches(), num_calibration_batches, counts)
        info["calibration_images"] = counts["images"]
        info["calibration_skipped_corrupt"] = counts["skipped_corrupt"]
    return QuantizedModel(qmodel, qvars, recipe, info)


def fake_quant_logits_fn(qmodel: QuantizedModel) -> Callable[[np.ndarray], jax.Array]:
    """A jitted images → logits function of the 8-bit simulation."""
    apply = jax.jit(lambda v, x: qmodel.model.apply(v, x, quant_mode="fake"))
    return lambda images: apply(qmodel.variables, images)


def float_logits_fn(model: MobileNetV1, variables: Variables) -> Callable[[np.ndarray], jax.Array]:
    """A jitted images → logits function of the float model in inference mode."""
    variables = {k: v for k, v in variables.items() if k != "quant_ranges"}
    apply = jax.jit(lambda v, x: model.apply(v, x))
    return lambda images: apply(variables, images)
