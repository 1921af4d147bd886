"""What several jobs share: the official float model, quantized models from a source string."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ml_collections

from qfsep_jax import checkpointing, evaluation, integer, ptq
from qfsep_jax.data.input import EvalInput, eval_input, resolve_path
from qfsep_jax.importers import tfslim
from qfsep_jax.importers.tfslim import OFFICIAL_MODEL
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.quantized import PTQRecipe, QuantizedModel

log = logging.getLogger(__name__)


def load_official(
    config: ml_collections.ConfigDict,
) -> tuple[MobileNetV1, dict[str, Any], str]:
    """The paper's float MobileNetV1 (TF-slim graph at ``config.model_path`` under ``data_dir``)
    in inference mode: ``(model, variables, source)``."""
    model_path = config.get("model_path", OFFICIAL_MODEL)
    model, variables = tfslim.load_official(
        config.data_dir, model_path, depthwise_impl=config.get("depthwise_impl", "auto")
    )
    return model, variables, resolve_path(config.data_dir, model_path)


def calibration_input(config: ml_collections.ConfigDict) -> EvalInput:
    """The first ``num_calibration_images`` of ``config.calibration_data`` (eval preprocessing)."""
    return eval_input(config, config.calibration_data, limit=config.num_calibration_images)


def quantize(
    model: MobileNetV1,
    variables: dict[str, Any],
    recipe: PTQRecipe,
    config: ml_collections.ConfigDict,
    calib: EvalInput | None = None,
) -> QuantizedModel:
    """``recipe`` applied to a float model, calibrated on ``calib`` (default
    :func:`calibration_input`)."""
    calib = calib or calibration_input(config)
    return ptq.quantize_post_training(
        model,
        variables,
        recipe,
        calib.make,
        calib.num_batches,
        zero_variance_threshold=config.get("zero_variance_threshold", ptq.ZERO_VARIANCE_THRESHOLD),
        cle_iterations=config.get("cle_iterations", 20),
    )


def score_quantized(
    qmodel: QuantizedModel, data: EvalInput, *, integer_pass: bool, desc: str
) -> dict[str, Any]:
    """Top-1/top-5 (%) of a quantized model on ``data``, in 8-bit fake-quant and, with
    ``integer_pass``, in the integer-only pass (top-1 on its fine logits,
    :func:`qfsep_jax.integer.logits_fn`).

    Returns ``{"fake_quant": scores, "integer": scores | None}``; ``"integer"`` is None for a
    recipe with dynamic activation ranges (no static input qparams to run integers with), and
    ``"integer_error"`` says why when the integer-only model cannot be built (e.g. the int32
    accumulator bound check), so that one bad row does not lose the others.
    """

    def score(logits_fn, what):
        return evaluation.evaluate(logits_fn, data.make(), data.num_batches, desc=f"{desc} {what}")

    out = {"fake_quant": score(ptq.fake_quant_logits_fn(qmodel), "fake-quant"), "integer": None}
    if not integer_pass or qmodel.recipe.dynamic_activation_ranges:
        return out
    try:
        int_model = integer.from_quantized(qmodel)
    except ValueError as err:
        log.warning("%s: no integer-only evaluation: %s", desc, err)
        out["integer_error"] = str(err)
        return out
    out["integer"] = score(integer.logits_fn(int_model), "integer")
    return out


def recipe_with_observer(name: str, config: ml_collections.ConfigDict) -> PTQRecipe:
    """The named PTQ recipe with the config's activation range ``observer`` (if it sets one)."""
    recipe = ptq.recipe_by_name(name)
    observer = config.get("observer")
    return dataclasses.replace(recipe, observer=observer) if observer else recipe


def parse_source(source: str, kinds: tuple[str, ...]) -> tuple[str, str]:
    """``"kind:value"`` → ``(kind, value)``, with an error that lists the allowed kinds."""
    kind, sep, value = source.partition(":")
    if not sep or kind not in kinds or not value:
        raise ValueError(f"source {source!r}: use one of " + ", ".join(f"'{k}:...'" for k in kinds))
    return kind, value


def run_config_of(directory: str) -> ml_collections.ConfigDict | None:
    """The training config in ``directory`` or the run directory above an export in it."""
    for d in (directory, os.path.dirname(os.path.abspath(directory))):
        if os.path.isfile(os.path.join(d, "config.json")):
            return checkpointing.load_run_config(d)
    return None
