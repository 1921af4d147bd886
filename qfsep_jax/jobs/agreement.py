"""The integer-only pass against the fake-quant simulation of the same model: one JSON report.

    python launch/main.py --config configs/agreement.py --workdir results/agreement/tf8_zvf

The model is ``config.source``: ``official`` (the paper's float graph after the PTQ
``config.recipe``), ``trained:DIR`` (a training run's newest checkpoint after that recipe) or
``quantized:DIR`` (an exported quantized model, e.g. a QAT run's ``quantized_model``). Image size
and label space default to the training run's (``config.json`` of the run, or of the directory
holding the export). ``snap_biases`` and ``sim_rounding`` align the simulation with the integer
arithmetic (:mod:`qfsep_jax.integer.align`); the comparison itself is
:func:`qfsep_jax.analysis.agreement.agreement_report`. Writes ``workdir/report.json`` and the
per-image margin plot ``workdir/report_margins.png``.

``configs/agreement.py:summary`` instead collects reports (``config.reports``, globs) into
``workdir/summary.json``, the README's agreement table.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Any

import ml_collections

from qfsep_jax import checkpointing, config_validation, io_utils, ptq
from qfsep_jax.analysis import agreement
from qfsep_jax.data.input import eval_input
from qfsep_jax.integer import align
from qfsep_jax.integer.convert import from_quantized
from qfsep_jax.jobs import common
from qfsep_jax.quantized import QuantizedModel, load_quantized

log = logging.getLogger(__name__)

SOURCES = ("official", "trained", "quantized")
REPORT = "report.json"
SUMMARY = "summary.json"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Writes one agreement report (or, with ``config.reports``, the summary of many)."""
    config_validation.validate(config, "agreement")
    if config.get("reports"):
        return summarize(config, workdir)
    config = _resolve_run_defaults(config)
    qmodel, source, calibration_images = _quantized_model(config)
    calibrated = calibration_images is not None
    int_model = from_quantized(qmodel, rounding=config.rounding)
    model, variables = qmodel.model, qmodel.variables
    if config.snap_biases:
        model, variables = align.snap_biases(model, variables, int_model)
    alignment = align.rounding_alignment(int_model) if config.sim_rounding else None
    data = eval_input(config, config.eval_data, limit=config.limit)
    report = agreement.agreement_report(
        model,
        variables,
        int_model,
        data.make(),
        locate=config.locate,
        reorder_check=config.reorder_check,
        float64_check=config.float64_check,
        alignment=alignment,
    )
    report.update(
        model=source,
        recipe=config.recipe if calibrated else dataclasses.asdict(qmodel.recipe),
        zero_variance_scope=qmodel.recipe.zero_variance_scope,
        eval_data=config.eval_data,
        calibration_data=config.calibration_data if calibrated else None,
        image_size=config.image_size,
        label_space=config.label_space,
        run=io_utils.run_info(),
        snap_biases=config.snap_biases,
        sim_rounding=config.sim_rounding,
        rounding=str(int_model.rounding),
        calibration_images=calibration_images,
    )
    print(format_report(report))
    path = os.path.join(workdir, REPORT)
    io_utils.write_json(path, report)
    if config.plot:
        from qfsep_jax.analysis.plots import plot_top2_margins

        plot = os.path.join(workdir, "report_margins.png")
        plot_top2_margins(report["per_image"], plot, title=margin_title(report))
        log.info("wrote %s", plot)
    return report


def _resolve_run_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``image_size`` and ``label_space`` from the model's training run where they are unset."""
    kind, path = _source(config)
    run_config = common.run_config_of(path) if kind != "official" else None
    config = ml_collections.ConfigDict(config.to_dict())
    if config.image_size is None:
        config.image_size = run_config.image_size if run_config else 224
    if config.label_space is None:
        config.label_space = run_config.label_space if run_config else "imagenet1001"
    return config


def _source(config: ml_collections.ConfigDict) -> tuple[str, str]:
    if config.source == "official":
        return "official", ""
    kind, path = common.parse_source(config.source, ("trained", "quantized"))
    return kind, path


def _quantized_model(
    config: ml_collections.ConfigDict,
) -> tuple[QuantizedModel, str, int | None]:
    """``(quantized model, where it came from, calibration images or None for an export)``."""
    kind, path = _source(config)
    if kind == "quantized":
        return load_quantized(path), os.path.abspath(path), None
    recipe = ptq.recipe_by_name(config.recipe)
    if kind == "trained":
        model, variables = checkpointing.load_trained(checkpointing.load_run_config(path), path)
        source = os.path.abspath(path)
    else:
        model, variables, _ = common.load_official(config)
        source = config.model_path
    calib = common.calibration_input(config)
    return common.quantize(model, variables, recipe, config, calib), source, calib.num_examples


def _simulation_kind(report: dict) -> str:
    """Which simulation a report compared against: what it models of the integer arithmetic."""
    parts = [
        name
        for key, name in (("snap_biases", "int32 biases"), ("sim_rounding", "integer rounding"))
        if report.get(key)
    ]
    return " + ".join(parts) if parts else "plain"


def margin_title(report: dict) -> str:
    """The margin plot's title: model, quantization, simulation kind and the fine agreement."""
    where = os.path.join(*os.path.normpath(report["model"]).split(os.sep)[-3:])
    recipe = report["recipe"] if isinstance(report["recipe"], str) else "exported"
    return (
        f"{where} ({recipe}), {_simulation_kind(report)} simulation:\n"
        f"fine top-1 agrees on {100 * report['top1_agreement_fine']:.1f} %"
    )


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines a person reads: per-layer differences, top-1 agreements."""
    lines: list[str] = []
    for name, lsb in report["layerwise_max_lsb"].items():
        frac = 100 * report["layerwise_frac_differing"][name]
        lines.append(f"{name:22s} max {lsb} LSB, {frac:.3f}% of codes differ (same layer input)")
    lines.append(
        f"top-1: fake {report['top1_fake']:.2f}%, integer {report['top1_int']:.2f}%; "
        f"top-1 agreement {100 * report['top1_agreement']:.2f}% of {report['n']} images "
        f"(tie-aware {100 * report['top1_agreement_tie_aware']:.2f}%; simulation logit gaps of "
        f"the disagreeing images, in codes: {report['disagreement_logit_gaps']})"
    )
    lines.append(
        f"fine logit error (integer - simulation pre-quant): rms "
        f"{report['fine_logit_error_lsb']['rms']:.4f} LSB, max "
        f"{report['fine_logit_error_lsb']['max']:.4f} LSB; top-2 pair error rms "
        f"{report['top2_pair_error_lsb']['rms']:.4f} LSB, max "
        f"{report['top2_pair_error_lsb']['max']:.4f} LSB; images with a simulation top-2 gap "
        f"below t LSB: {report['top2_gap_lsb_below']}"
    )
    lines.append(
        f"fine logits: top-1 integer {report['top1_int_fine']:.2f}%, simulation (pre-quant) "
        f"{report['top1_fake_pre_quant']:.2f}%; top-1 agreement "
        f"{100 * report['top1_agreement_fine']:.2f}% (classifier alone, same input: "
        f"{100 * report['top1_agreement_fine_same_input']:.2f}%, max logit error "
        f"{report['fine_logit_error_same_input_lsb']:.2e} LSB)"
    )
    if "sim_reordered" in report:
        r = report["sim_reordered"]
        lines.append(
            f"simulation reordered (depthwise_impl={r['depthwise_impl']}): fine top-1 agreement "
            f"{100 * r['top1_agreement_fine_with_sim']:.2f}% with the simulation, "
            f"{100 * r['top1_agreement_fine_with_int']:.2f}% with the integer pass; logit "
            f"difference to the simulation rms {r['logit_difference_lsb_rms']:.4f} LSB"
        )
    if "sim_float64" in report:
        r = report["sim_float64"]
        lines.append(
            f"simulation in float64: fine top-1 agreement "
            f"{100 * r['top1_agreement_fine_with_sim']:.2f}% with the float32 simulation, "
            f"{100 * r['top1_agreement_fine_with_int']:.2f}% with the integer pass; logit "
            f"difference rms {r['logit_difference_lsb_rms']:.4f} LSB to the float32 simulation, "
            f"{r['int_logit_error_lsb_rms']:.4f} LSB to the integer pass"
        )
        worst = max(r["layerwise_frac_differing"], key=r["layerwise_frac_differing"].get)
        lines.append(
            f"simulation in float64, same layer input: max {max(r['layerwise_max_lsb'].values())} "
            f"LSB; worst layer {worst}, {100 * r['layerwise_frac_differing'][worst]:.4f}% of "
            f"codes differ"
        )
    for d in report["fine_disagreements"]:
        where = (
            f", culprit {d['culprit']} ({d['culprit_codes_differing']} codes differ)"
            if ("culprit" in d)
            else ""
        )
        lines.append(
            f"  image {d['image']}: integer top-1 {d['int_top1']}, simulation {d['sim_top1']}; "
            f"gap {d['sim_gap_lsb']:.4f} LSB (simulation), {d['int_gap_lsb']:.4f} LSB "
            f"(integer){where}"
        )
    return "\n".join(lines)


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (README tables)."""
    here = os.getcwd()
    if os.path.isabs(path) and os.path.commonpath([here, path]) == here:
        return os.path.relpath(path, here)
    return path


# Reports without a recorded ``zero_variance_scope`` ran this recipe name with the fix on every
# BN layer, the registered ``tf8_zero_variance_fix_all``; the name now means the depthwise fix.
_UNSCOPED_RECIPE_NAMES = {"tf8_zero_variance_fix": "tf8_zero_variance_fix_all"}


def summarize_reports(paths: list[str]) -> dict:
    """One row per :func:`agreement_report` JSON (as :func:`run` writes them), for the README table.

    Each row: the report's ``model`` (relative to the working directory where it lies below it),
    ``recipe`` (a name, or ``exported (QAT)``; a report without a recorded zero-variance scope
    under the name of the recipe that now does what it ran), ``label_space``,
    the integer pass's ``rounding``, the ``simulation`` (``plain``, or what it models of the
    integer arithmetic: ``int32 biases``, ``integer rounding``), ``n``, the three top-1
    agreements (8-bit codes, tie-aware, fine logits), the fine logit error rms (LSB), how many
    images have a simulation top-2 gap below 1 LSB, the largest
    fraction of a layer's codes that differ given the same input, and, where the report has
    them, the simulation's fine agreement with itself reordered and in float64, and the integer
    pass's with the float64 simulation (fine top-1, logit error rms, worst layer's fraction of
    differing codes).
    """
    rows = []
    for path in paths:
        r = io_utils.read_json(path)
        missing = [
            k for k in ("n", "top1_agreement_fine", "layerwise_frac_differing") if k not in r
        ]
        if missing:
            raise ValueError(f"{path} is not an agreement report (no {missing})")
        recipe = r.get("recipe")
        if isinstance(recipe, str) and "zero_variance_scope" not in r:
            recipe = _UNSCOPED_RECIPE_NAMES.get(recipe, recipe)
        rows.append(
            {
                "report": path,
                "model": _display_path(r.get("model", "official float graph")),
                "recipe": recipe if isinstance(recipe, str) else "exported (QAT)",
                "label_space": r.get("label_space", "imagenet1001"),
                "rounding": r.get("rounding", "conv=double,depthwise=double"),
                "simulation": _simulation_kind(r),
                "n": r["n"],
                "top1_agreement": r["top1_agreement"],
                "top1_agreement_tie_aware": r["top1_agreement_tie_aware"],
                "top1_agreement_fine": r["top1_agreement_fine"],
                "fine_logit_error_lsb_rms": r["fine_logit_error_lsb"]["rms"],
                "top2_gap_below_1_lsb": r["top2_gap_lsb_below"]["1.0"],
                "max_layer_frac_differing": max(r["layerwise_frac_differing"].values()),
                "sim_reordered_agreement_fine": r.get("sim_reordered", {}).get(
                    "top1_agreement_fine_with_sim"
                ),
                "sim_float64_agreement_fine": r.get("sim_float64", {}).get(
                    "top1_agreement_fine_with_sim"
                ),
                "int_vs_float64_agreement_fine": r.get("sim_float64", {}).get(
                    "top1_agreement_fine_with_int"
                ),
                "int_vs_float64_logit_error_lsb_rms": r.get("sim_float64", {}).get(
                    "int_logit_error_lsb_rms"
                ),
                "max_layer_frac_differing_float64": max(
                    r.get("sim_float64", {}).get("layerwise_frac_differing", {}).values(),
                    default=None,
                ),
                "run": r.get("run"),
            }
        )
    return {"rows": rows}


def summarize(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``workdir/summary.json`` from every report that ``config.reports`` (globs) names, in the
    order of the globs."""
    out = os.path.abspath(os.path.join(workdir, SUMMARY))
    paths: list[str] = []  # in the order of the patterns, each pattern's matches sorted
    for pattern in config.reports:
        for path in sorted(glob.glob(pattern)):
            if os.path.abspath(path) != out and path not in paths:
                paths.append(path)
    if not paths:
        raise FileNotFoundError(f"no agreement reports match {list(config.reports)}")
    summary = summarize_reports(paths)
    io_utils.write_json(out, summary)
    print(f"wrote {out} ({len(paths)} reports)")
    return summary
