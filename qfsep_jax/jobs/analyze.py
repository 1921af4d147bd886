"""The paper's analysis of its float MobileNetV1: α per channel (Figure 3) and per-layer SQNR.

``run(config, workdir)`` (job ``analyze``, see ``configs/analyze_official.py``) writes into
``workdir``:

* ``alpha.json``: TF-slim layer → α per channel, for every BN after a depthwise conv;
  ``alpha_detail.json``: the same with γ, variances, flagged zero-variance channels, a per-layer
  summary and the comparison with the paper's Figure 3 values;
* ``sqnr.json``: pipeline → ``fake_quant`` | ``integer`` | ``uniform_estimate`` → layer → dB;
  ``sqnr_detail.json``: every statistic of every layer, with the definitions;
* ``ranges.json`` and ``ranges.md``: weight and activation range tables per pipeline;
* PNGs: ``alpha_Conv2d_1_depthwise.png`` (Figure 3), ``alpha_layers.png``,
  ``sqnr_fake_quant.png`` (Figure 4), ``sqnr_integer.png`` (when the integer pass exists);
* ``results.json``: the summary (what ``tools/collect_results.py`` turns into README tables).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import ml_collections

from qfsep_jax import config_validation, io_utils, paper
from qfsep_jax.analysis import alpha as alpha_lib
from qfsep_jax.analysis import ranges as ranges_lib
from qfsep_jax.analysis import sqnr as sqnr_lib
from qfsep_jax.data.input import eval_input
from qfsep_jax.jobs import common

log = logging.getLogger(__name__)


def analyze_alpha(variables: dict, eps: float, threshold: float, workdir: str, plots: bool) -> dict:
    """α per channel: writes alpha.json, alpha_detail.json and plots; returns the summary."""
    alphas = alpha_lib.bn_alphas(variables, eps, zero_variance_threshold=threshold)
    summary = alpha_lib.alpha_summary(alphas)
    comparison = None
    if paper.FIG3_LAYER in alphas:
        comparison = alpha_lib.compare_to_paper(alphas)
    io_utils.write_json(
        os.path.join(workdir, "alpha.json"), {k: v["alpha"] for k, v in alphas.items()}
    )
    io_utils.write_json(
        os.path.join(workdir, "alpha_detail.json"),
        {
            "bn_epsilon": eps,
            "zero_variance_threshold": threshold,
            "layers": alphas,
            "summary": summary,
            "paper_fig3_comparison": comparison,
        },
    )
    if plots and alphas:
        from qfsep_jax.analysis import plots as plots_lib

        first = next(iter(alphas))
        published = paper.FIG3_ALPHA if first == paper.FIG3_LAYER else None
        plots_lib.plot_alpha_channels(
            alphas[first]["alpha"],
            os.path.join(workdir, f"alpha_{first}.png"),
            zero_variance=alphas[first]["zero_variance"],
            paper=published,
            title=f"{first}: folded BN scale α per channel (red: zero variance)",
        )
        plots_lib.plot_alpha_layers(alphas, os.path.join(workdir, "alpha_layers.png"))
    if comparison is not None:
        comparison = {k: v for k, v in comparison.items() if k not in ("ours", "paper")}
    return {"summary": summary, "paper_fig3_comparison": comparison}


def _sqnr_table(measured: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """pipeline result → ``{measure: {layer: dB}}`` (the uniform estimate from the fake rows)."""
    out = {m: sqnr_lib.sqnr_curve(rows) for m, rows in measured.items()}
    out["uniform_estimate"] = sqnr_lib.sqnr_curve(measured["fake_quant"], "uniform_estimate_db")
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the analysis on the official float model; writes the files listed in the docstring."""
    config_validation.validate(config, "analyze")
    start = time.perf_counter()
    use_integer = config.integer
    integer_note = "" if use_integer else "disabled by config (integer=False)"
    model, variables, source = common.load_official(config)

    alpha_out = analyze_alpha(
        variables, model.bn_epsilon, config.zero_variance_threshold, workdir, config.plots
    )
    cmp = alpha_out["paper_fig3_comparison"]
    if cmp is not None:
        log.info(
            "alpha of %s vs paper Figure 3: max abs diff %.3g, max rel diff %.3g, "
            "matches to 4 decimals: %s",
            cmp["layer"],
            cmp["max_abs_diff"],
            cmp["max_rel_diff"],
            cmp["matches_4_decimals"],
        )

    calib = common.calibration_input(config)
    data = eval_input(
        config, config.sqnr_data, limit=config.num_sqnr_images, batch_size=config.sqnr_batch_size
    )
    log.info(
        "SQNR on %d images of %s; calibration on %d images of %s; integer pass: %s",
        data.num_examples,
        data.name,
        calib.num_examples,
        calib.name,
        "yes" if use_integer else integer_note,
    )

    detail, tables, range_tables, info, integer_skipped = {}, {}, {}, {}, {}
    for name in config.pipelines:
        recipe = common.recipe_with_observer(name, config)
        qmodel = common.quantize(model, variables, recipe, config, calib)
        integer_fn = None
        if use_integer and not recipe.dynamic_activation_ranges:
            try:
                integer_fn = sqnr_lib.integer_pass_fn(qmodel)
            except ValueError as err:  # e.g. the int32 accumulator bound check
                integer_skipped[name] = f"the integer pass cannot convert this model: {err}"
                log.warning("%s: no integer-only SQNR: %s", name, integer_skipped[name])
        measured = sqnr_lib.measure_sqnr(
            qmodel, data.make(), data.num_batches, integer_fn=integer_fn, desc=f"sqnr {name}"
        )
        detail[name] = measured
        tables[name] = _sqnr_table(measured)
        range_tables[name] = {
            "weights": ranges_lib.weight_range_table(
                qmodel.variables["params"], recipe.quant_config()
            ),
            "activations": ranges_lib.activation_range_table(
                qmodel.variables["quant_ranges"], recipe.quant_config()
            ),
        }
        info[name] = {"recipe": dataclasses.asdict(recipe), **_jsonable(qmodel.info)}
        fq = tables[name]["fake_quant"]
        log.info("%s: fake-quant SQNR %s", name, {k: round(v, 1) for k, v in fq.items()})
        jax.clear_caches()

    io_utils.write_json(os.path.join(workdir, "sqnr.json"), tables)
    io_utils.write_json(
        os.path.join(workdir, "sqnr_detail.json"),
        {"definition": sqnr_lib.SQNR_DEFINITION, "pipelines": detail},
    )
    io_utils.write_json(os.path.join(workdir, "ranges.json"), range_tables)
    io_utils.write_atomic(os.path.join(workdir, "ranges.md"), _ranges_markdown(range_tables))
    if config.plots:
        _plot_sqnr(tables, workdir)

    results = {
        "job": "analyze",
        "model": source,
        "sqnr_data": data.name,
        "num_sqnr_images": data.num_examples,
        "calibration_data": calib.name,
        # What decoded (corrupt files skipped), not what was asked for; 0: no pipeline calibrated.
        "num_calibration_images": max(
            [i["calibration_images"] for i in info.values() if "calibration_images" in i],
            default=0,
        ),
        "observer": config.observer,
        "image_size": config.image_size,
        "crop_fraction": config.crop_fraction,
        "sqnr_definition": sqnr_lib.SQNR_DEFINITION,
        "integer_sqnr": use_integer,
        "integer_note": integer_note,
        "integer_skipped": integer_skipped,
        "alpha": alpha_out,
        "pipelines": info,
        "sqnr": tables,
        "paper_fig4_original_db": paper.FIG4_SQNR["original"],
        "seconds": round(time.perf_counter() - start, 1),
        "run": io_utils.run_info(),
    }
    io_utils.write_json(os.path.join(workdir, "results.json"), results)
    print(format_summary(results))
    return results


def _jsonable(info: dict) -> dict:
    """PTQ info with numpy scalars turned into Python numbers."""
    return jax.tree.map(lambda v: v.item() if hasattr(v, "item") else v, info)


def _ranges_markdown(range_tables: dict) -> str:
    parts = []
    for name, t in range_tables.items():
        parts.append(f"## {name}: weights (after folding)\n")
        parts.append(
            ranges_lib.format_markdown(
                t["weights"],
                ["min", "max", "abs_max_channel_median", "max_over_median", "step_max"],
            )
        )
        parts.append(f"\n\n## {name}: activations\n")
        parts.append(
            ranges_lib.format_markdown(t["activations"], ["min", "max", "scale", "zero_point"])
        )
        parts.append("\n\n")
    return "".join(parts)


def _plot_sqnr(tables: dict, workdir: str) -> None:
    from qfsep_jax.analysis import plots as plots_lib

    plots_lib.plot_sqnr(
        {n: t["fake_quant"] for n, t in tables.items()},
        os.path.join(workdir, "sqnr_fake_quant.png"),
        estimates={n: t["uniform_estimate"] for n, t in tables.items()},
        title="per-layer SQNR, fake-quant (solid) and uniform-noise estimate (dashed)",
    )
    integer = {n: t["integer"] for n, t in tables.items() if "integer" in t}
    if integer:
        plots_lib.plot_sqnr(
            integer,
            os.path.join(workdir, "sqnr_integer.png"),
            title="per-layer SQNR, integer-only pass",
        )


def format_summary(results: dict) -> str:
    """A short text report: α comparison and the SQNR at the paper's Figure 4 layers."""
    lines = []
    cmp = results["alpha"]["paper_fig3_comparison"]
    if cmp is not None:
        lines.append(
            f"alpha {cmp['layer']} vs paper Fig. 3 ({cmp['channels']} channels): max abs diff "
            f"{cmp['max_abs_diff']:.2e}, max rel diff {cmp['max_rel_diff']:.2e}, "
            f"matches to 4 decimals: {cmp['matches_4_decimals']}"
        )
    zero = {
        k: v["zero_variance_channels"]
        for k, v in results["alpha"]["summary"].items()
        if v["zero_variance_channels"]
    }
    lines.append(f"zero-variance channels per depthwise BN: {zero}")
    lines.append(f"SQNR (dB), {results['num_sqnr_images']} images of {results['sqnr_data']}:")
    names = list(results["sqnr"])
    header = f"{'layer':22s} {'paper':>6s} " + " ".join(f"{n[:24]:>24s}" for n in names)
    lines.append(header)
    for layer, paper_db in paper.FIG4_SQNR["original"].items():
        cells = []
        for n in names:
            t = results["sqnr"][n]
            fq = t["fake_quant"].get(layer)
            it = t.get("integer", {}).get(layer)
            text = "-" if fq is None else f"{fq:.1f}"
            if it is not None:
                text += f" / {it:.1f}"
            cells.append(f"{text:>24s}")  # fake-quant / integer
        lines.append(f"{layer:22s} {paper_db:6.0f} " + " ".join(cells))
    if not results["integer_sqnr"]:
        lines.append(f"integer-only SQNR not measured: {results['integer_note']}")
    for name, why in results["integer_skipped"].items():
        lines.append(f"{name}: integer-only SQNR not measured: {why}")
    return "\n".join(lines)
