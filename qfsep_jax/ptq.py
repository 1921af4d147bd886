"""Post-training quantization: zero-variance fix → BN folding → [CLE] → range calibration.

A :class:`PTQRecipe` names the choices; :func:`quantize_post_training` turns a float model and
its variables into a BN-folded model with calibrated activation ranges, whose ``"fake"`` forward
pass is the 8-bit simulation (and whose variables the integer-only pass converts).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from qfsep_jax import progress as progress_lib
from qfsep_jax.models.activations import get_activation
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.models.names import layer_paths
from qfsep_jax.quant import cle as cle_lib
from qfsep_jax.quant import observers
from qfsep_jax.quant.fold import fix_zero_variance, folded
from qfsep_jax.quant.numerics import check_all_ranges
from qfsep_jax.quantized import PTQRecipe, QuantizedModel

Variables = dict[str, Any]

log = logging.getLogger(__name__)

# A BN channel whose moving variance is at most this counts as zero-variance (the paper's fix).
ZERO_VARIANCE_THRESHOLD = 1e-10

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
    if not isinstance(name, str):
        raise TypeError(f"a recipe name must be a str, got {type(name).__name__}")
    if name not in RECIPES:
        raise ValueError(f"unknown PTQ recipe {name!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name]


def prepare_folded(
    model: MobileNetV1,
    variables: Variables,
    recipe: PTQRecipe,
    zero_variance_threshold: float = ZERO_VARIANCE_THRESHOLD,
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
        info["zero_variance_threshold"] = zero_variance_threshold
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
    progress: bool = True,
) -> Variables:
    """Runs calibration batches through ``model`` and returns variables with ``quant_ranges``.

    Padded images (``mask`` 0) are dropped before they reach the observers. ``counts``, if
    given, receives ``images`` (how many calibrated the ranges) and ``skipped_corrupt`` (files
    the input skipped as corrupt, from the batches' ``skipped``). ``progress=False`` hides the
    progress bar.
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
    for batch in progress_lib.bar(batches, progress, total=total, desc="calibrate", unit="batch"):
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
    log.info("calibrated on %d images (%.1f images/s)", n, n / (time.perf_counter() - start))
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
    recipe: PTQRecipe | str,
    calibration_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    num_calibration_batches: int | None = None,
    zero_variance_threshold: float = ZERO_VARIANCE_THRESHOLD,
    cle_iterations: int = 20,
    progress: bool = True,
) -> QuantizedModel:
    """The whole PTQ pipeline for one recipe (``calibration_batches()`` makes a fresh iterator).

    ``recipe`` is a :class:`PTQRecipe` or the name of one in :data:`RECIPES`. ``info`` of the
    result records, besides the recipe's steps, how many images calibrated the ranges
    (``calibration_images``) and how many corrupt files were skipped. :func:`quantize` takes
    arrays and iterables of batches as well.
    """
    recipe = _resolve_recipe(recipe)
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a dict of collections, got {type(variables).__name__}")
    if not recipe.dynamic_activation_ranges and not callable(calibration_batches):
        raise TypeError(
            "calibration_batches must be a zero-argument callable returning an iterable of "
            f"batches (e.g. EvalInput.make), got {type(calibration_batches).__name__} (a "
            "generator or iterator is consumed once; pass a function that makes it); "
            "ptq.quantize also takes an image array or an iterable of batches"
        )
    qmodel, folded, info = prepare_folded(
        model, variables, recipe, zero_variance_threshold, cle_iterations
    )
    if recipe.dynamic_activation_ranges:
        qvars = {**folded, "quant_ranges": empty_ranges(qmodel)}
    else:
        counts: dict[str, int] = {}
        batches = _checked_batches(calibration_batches())
        qvars = calibrate(qmodel, folded, batches, num_calibration_batches, counts, progress)
        info["calibration_images"] = counts["images"]
        info["calibration_skipped_corrupt"] = counts["skipped_corrupt"]
    return QuantizedModel(qmodel, qvars, recipe, info)


def quantize(
    model: MobileNetV1,
    variables: Variables,
    recipe: PTQRecipe | str,
    calibration: Any,
    batch_size: int = 32,
    progress: bool = True,
    zero_variance_threshold: float = ZERO_VARIANCE_THRESHOLD,
    cle_iterations: int = 20,
) -> QuantizedModel:
    """Post-training quantization of a float model in one call.

    Args:
      model: the unfolded float :class:`~qfsep_jax.models.mobilenet_v1.MobileNetV1`.
      variables: its ``params`` and ``batch_stats``.
      recipe: a name in :data:`RECIPES` (e.g. ``"tf8_zero_variance_fix"``) or a
        :class:`PTQRecipe`.
      calibration: the calibration images, as one of
        * a NumPy or JAX float array ``[N, H, W, 3]``, RGB scaled to [-1, 1] (what the float
          model takes), run in batches of ``batch_size``;
        * an iterable of batches, each a dict with ``"image"`` (and optionally ``"mask"``: 0
          marks padding) or a plain image array; a one-shot iterator (a generator) is consumed;
        * a zero-argument callable returning such an iterable (e.g. ``EvalInput.make``), or an
          :class:`~qfsep_jax.data.EvalInput`.
        Unused (may be ``None``) for recipes with dynamic activation ranges.
      batch_size: images per calibration step when ``calibration`` is an array.
      progress: show a progress bar.
      zero_variance_threshold, cle_iterations: as in :func:`prepare_folded`.

    Returns:
      The :class:`QuantizedModel`; ``.logits(images, mode)`` runs it, ``.to_integer()``
      converts it to the integer-only model.
    """
    recipe = _resolve_recipe(recipe)
    if recipe.dynamic_activation_ranges and calibration is None:
        factory, total = (lambda: iter(())), None
    else:
        factory, total = calibration_factory(calibration, batch_size)
    return quantize_post_training(
        model,
        variables,
        recipe,
        factory,
        total,
        zero_variance_threshold=zero_variance_threshold,
        cle_iterations=cle_iterations,
        progress=progress,
    )


def _resolve_recipe(recipe: PTQRecipe | str) -> PTQRecipe:
    if isinstance(recipe, str):
        return recipe_by_name(recipe)
    if not isinstance(recipe, PTQRecipe):
        raise TypeError(
            f"recipe must be a PTQRecipe or one of the names {sorted(RECIPES)}, "
            f"got {type(recipe).__name__}"
        )
    return recipe


_CALIBRATION_KINDS = (
    "calibration must be an image array [N, H, W, 3] (scaled to [-1, 1]), an iterable of "
    "batches (dicts with 'image' and optional 'mask', or image arrays) or a zero-argument "
    "callable returning one"
)


def _check_images(images: Any, what: str) -> None:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what} must be images [N, H, W, 3], got shape {shape}")
    if not np.issubdtype(np.dtype(images.dtype), np.floating):
        raise TypeError(f"{what} must be float images scaled to [-1, 1], got dtype {images.dtype}")


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _checked_batches(batches: Iterable) -> Iterator[dict[str, Any]]:
    for i, batch in enumerate(batches):
        if _is_array(batch):
            batch = {"image": batch}
        elif not isinstance(batch, Mapping) or "image" not in batch:
            raise TypeError(
                f"calibration batch {i} must be a dict with 'image' (and optional 'mask') or an "
                f"image array, got {type(batch).__name__}"
            )
        _check_images(batch["image"], f"calibration batch {i}")
        yield batch


def calibration_factory(
    calibration: Any, batch_size: int = 32
) -> tuple[Callable[[], Iterator[dict[str, Any]]], int | None]:
    """``(factory, num_batches or None)`` for any calibration form :func:`quantize` takes.

    Raises TypeError (what was expected, what was given) for anything else, ValueError for an
    image array of the wrong shape.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if _is_array(calibration):
        _check_images(calibration, "calibration")
        n = len(calibration)

        def from_array():
            for start in range(0, n, batch_size):
                yield {"image": calibration[start : start + batch_size]}

        return from_array, math.ceil(n / batch_size)
    make = getattr(calibration, "make", None)
    if callable(make) and hasattr(calibration, "num_batches"):  # an EvalInput
        return (lambda: _checked_batches(make())), calibration.num_batches
    if isinstance(calibration, (str, bytes, Mapping)) or calibration is None:
        raise TypeError(f"{_CALIBRATION_KINDS}; got {type(calibration).__name__}")
    if callable(calibration):

        def from_factory():
            made = calibration()
            if isinstance(made, (str, bytes, Mapping)) or not isinstance(made, Iterable):
                raise TypeError(
                    "the calibration callable must return an iterable of batches, got "
                    f"{type(made).__name__}"
                )
            return _checked_batches(made)

        return from_factory, None
    if isinstance(calibration, Iterable):
        total = len(calibration) if hasattr(calibration, "__len__") else None
        return (lambda: _checked_batches(calibration)), total
    raise TypeError(f"{_CALIBRATION_KINDS}; got {type(calibration).__name__}")


def fake_quant_logits_fn(qmodel: QuantizedModel) -> Callable[[np.ndarray], jax.Array]:
    """A jitted images → logits function of the 8-bit simulation.

    The ranges are checked on the host first: a never-calibrated range raises ValueError.
    """
    qmodel.check_ranges()
    apply = jax.jit(lambda v, x: qmodel.model.apply(v, x, quant_mode="fake"))
    return lambda images: apply(qmodel.variables, images)


def float_logits_fn(model: MobileNetV1, variables: Variables) -> Callable[[np.ndarray], jax.Array]:
    """A jitted images → logits function of the float model in inference mode."""
    variables = {k: v for k, v in variables.items() if k != "quant_ranges"}
    apply = jax.jit(lambda v, x: model.apply(v, x))
    return lambda images: apply(variables, images)
