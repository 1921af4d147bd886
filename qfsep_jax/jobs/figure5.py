"""Figure 5 at small scale: train the four core-layer variants, PTQ them, score and analyse.

    python launch/main.py --config configs/figure5.py --workdir results/figure5

Steps, per variant and seed, each skipped when its result file exists (rerun to resume; the
training step itself resumes from its newest checkpoint):

1. ``train``: ``qfsep_jax.train.train_and_evaluate`` → ``<variant>/seed<k>/train/`` (done when
   its ``results.json`` reports ``final_step == total_steps``);
2. ``evaluate``: TF8 post-training quantization, then float, fake-quant and integer-only top-1
   on the variant's eval data → ``<variant>/seed<k>/results.json``;
3. ``sqnr``: per-layer SQNR (fake-quant and integer-only) → ``<variant>/seed<k>/sqnr.json``;
4. ``ptq_rows`` (only with ``config.ptq_rows``, e.g. ``("tf8_zero_variance_fix", "per_channel")``):
   the same trained model through each further PTQ recipe, fake-quant and integer-only top-1 →
   ``<variant>/seed<k>/ptq_rows.json`` (a row already in the file is skipped; a zero-variance fix
   under another ``config.zero_variance_threshold`` than the default is its own row,
   ``<recipe>@<threshold>``, so that no threshold's result replaces another's);
5. ``summary`` (always rerun, cheap): ``<variant>/results.json`` (over seeds),
   ``summary.json`` (what ``tools/collect_results.py`` turns into the README table) and the
   plots ``figure5_accuracy.png``, ``figure5_sqnr.png`` (and ``figure5_sqnr_integer.png``).

A variant's training config is ``config.train_configs[variant]`` (composed in
``configs/figure5.py`` from the Imagenette training configs) with ``config.train_overrides``
applied and ``seed``/``data_dir`` set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from qfsep_jax import (
    checkpointing,
    config_validation,
    evaluation,
    io_utils,
    metrics_log,
    paper,
    ptq,
    train,
)
from qfsep_jax.analysis import alpha as alpha_lib
from qfsep_jax.analysis import curves as curves_lib
from qfsep_jax.analysis import sqnr as sqnr_lib
from qfsep_jax.data.input import eval_input
from qfsep_jax.jobs import common
from qfsep_jax.quantized import QuantizedModel

log = logging.getLogger(__name__)

# How each variant's core layer computes (for tables and plots).
VARIANT_LABELS = {
    "original": "DW→BN→ReLU6→PW→BN→ReLU6",
    "qf_relu6": "DW→PW→BN→ReLU6",
    "qf_relu": "DW→PW→BN→ReLU",
    "qf_relu_l2dw": "DW→PW→BN→ReLU, L2 on DW weights",
    "original_linear_dw": "DW→BN→PW→BN→ReLU6",
    "original_nobn_dw": "DW→ReLU6→PW→BN→ReLU6",
    "original_lr_half": "original, learning rate 0.025 (half)",
    "original_lr_double": "original, learning rate 0.1 (double)",
    "original_60ep": "original, 60 epochs",
}


# ---------------------------------------------------------------- configs


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where=""):
    """Sets nested fields of ``config`` in place; an unknown field is an error (a typo guard)."""
    for key, value in overrides.items():
        name = f"{where}.{key}" if where else key
        if key not in config:
            raise KeyError(f"train_overrides: the training config has no field {name!r}")
        if isinstance(value, Mapping):
            apply_overrides(config[key], value, name)
        else:
            config[key] = value
    return config


def variant_config(config: ml_collections.ConfigDict, variant: str, seed: int):
    """The training config of one run: the variant's file, the overrides, seed and data_dir."""
    if variant not in config.train_configs:
        raise KeyError(f"no training config for variant {variant!r} in config.train_configs")
    c = ml_collections.ConfigDict(config.train_configs[variant].to_dict())
    apply_overrides(c, config.train_overrides.to_dict())
    c.seed = int(seed)
    c.data_dir = config.data_dir
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Clear errors for a bad experiment config, before anything runs: its own fields and every
    run's training config, so that a bad override fails now, not after hours."""
    config_validation.validate(config, "figure5")
    for variant in config.variants:
        for seed in config.seeds:
            config_validation.validate(variant_config(config, variant, seed), "train")


def run_dir(workdir: str, variant: str, seed: int) -> str:
    return os.path.join(workdir, variant, f"seed{seed}")


# ---------------------------------------------------------------- steps


def train_done(train_dir: str) -> bool:
    """Whether a training workdir holds a finished run (final_step == total_steps)."""
    path = os.path.join(train_dir, "results.json")
    if not os.path.isfile(path):
        return False
    r = io_utils.read_json(path)
    return r.get("final_step") is not None and r.get("final_step") == r.get("total_steps")


def step_train(train_config, train_dir: str) -> dict:
    """Trains (or resumes) one variant; returns the training summary."""
    return train.train_and_evaluate(train_config, train_dir)


def quantize_trained(train_config, train_dir: str, config) -> tuple[QuantizedModel, Any, dict]:
    """The trained model post-training quantized per ``config``: ``(qmodel, float model, vars)``.

    The float model and variables come from the newest checkpoint of ``train_dir``.
    """
    model, variables = checkpointing.load_trained(train_config, train_dir)
    return quantize(model, variables, train_config, config, config.ptq_recipe), model, variables


def quantize(model, variables, train_config, config, recipe: str) -> QuantizedModel:
    """A trained float model post-training quantized with the PTQ recipe named ``recipe``,
    calibrated on ``config``'s calibration data (a fix recipe uses ``config``'s
    ``zero_variance_threshold``)."""
    calib = eval_input(train_config, config.calibration_data, limit=config.num_calibration_images)
    qmodel = common.quantize(model, variables, ptq.recipe_by_name(recipe), config, calib)
    qmodel.info.update(
        {"calibration_data": calib.name, "num_calibration_images": calib.num_examples}
    )
    return qmodel


def step_evaluate(train_config, qmodel, model, variables, config) -> dict:
    """Float, fake-quant and (if available) integer-only top-1/top-5 on the eval data."""
    data = eval_input(train_config, train_config.eval_data, limit=config.eval_limit)
    float_scores = evaluation.evaluate(
        ptq.float_logits_fn(model, variables), data.make(), data.num_batches, desc="float"
    )
    quantized = common.score_quantized(
        qmodel, data, integer_pass=config.integer, desc=config.ptq_recipe
    )
    return {
        "eval_data": data.name,
        "float": float_scores,
        **quantized,
        # recorded here, not only in the summary: the checkpoints do not outlive the machine
        **depthwise_bn_stats(variables),
        "ptq_recipe": dataclasses.asdict(qmodel.recipe),
        "calibration_data": qmodel.info["calibration_data"],
        "num_calibration_images": qmodel.info["num_calibration_images"],
    }


def step_ptq_rows(train_config, train_dir: str, config, done: Mapping[str, Any]) -> dict:
    """Each recipe of ``config.ptq_rows`` not yet in ``done``: the trained model quantized with
    it, scored in fake-quant (and integer-only with ``config.integer``) on the eval data.

    Tells whether another PTQ pipeline recovers what ``config.ptq_recipe`` loses, e.g. the
    paper's zero-variance fix: if it does, the loss comes from the dead channels it fixes.
    Returns the new rows, ``{row key: {"fake_quant": ..., "integer": ..., ...}}`` (keys from
    :func:`ptq_row_key`).
    """
    data = eval_input(train_config, train_config.eval_data, limit=config.eval_limit)
    model, variables = checkpointing.load_trained(train_config, train_dir)
    rows = {}
    for name in config.ptq_rows:
        key = ptq_row_key(name, config)
        if key in done:
            continue
        # Calibrated again per recipe: a recipe that changes the folded weights (the fix)
        # changes the activation ranges too.
        qmodel = quantize(model, variables, train_config, config, name)
        row = {
            "recipe": dataclasses.asdict(qmodel.recipe),
            **common.score_quantized(qmodel, data, integer_pass=config.integer, desc=name),
        }
        fixed = qmodel.info.get("zero_variance_channels")
        if fixed is not None:  # {layer path: channel indices} the recipe's fix changed
            row["zero_variance_threshold"] = qmodel.info["zero_variance_threshold"]
            row["zero_variance_fixed"] = {k: v for k, v in fixed.items() if v}
        rows[key] = row
        jax.clear_caches()
    return rows


def ptq_row_key(name: str, config) -> str:
    """The ``ptq_rows.json`` key of the PTQ recipe ``name`` under ``config``: the name, or
    ``<name>@<threshold>`` for a zero-variance fix under a non-default variance threshold."""
    threshold = config.zero_variance_threshold
    if ptq.recipe_by_name(name).zero_variance_fix and threshold != ptq.ZERO_VARIANCE_THRESHOLD:
        return f"{name}@{threshold:g}"
    return name


def step_sqnr(train_config, qmodel, config) -> dict:
    """Per-layer SQNR (fake-quant, integer-only where available) on the first val images."""
    data = eval_input(
        train_config,
        train_config.eval_data,
        limit=config.num_sqnr_images,
        batch_size=config.sqnr_batch_size,
    )
    integer_fn, integer_error = None, None
    if config.integer:
        try:
            integer_fn = sqnr_lib.integer_pass_fn(qmodel)
        except ValueError as err:  # e.g. the int32 accumulator bound check
            integer_error = str(err)
    measured = sqnr_lib.measure_sqnr(
        qmodel, data.make(), data.num_batches, integer_fn=integer_fn, desc="sqnr"
    )
    out = {
        "definition": sqnr_lib.SQNR_DEFINITION,
        "sqnr_data": data.name,
        "num_images": data.num_examples,
        **measured,
    }
    if integer_error:
        out["integer_error"] = integer_error
    return out


# ---------------------------------------------------------------- summary


def _stats(values: list[float]) -> dict[str, Any] | None:
    """Mean, population std, count and the values (None when there are none)."""
    if not values:
        return None
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size), "values": a.tolist()}


def _curve_stats(curves: list[Mapping[str, float]]) -> tuple[dict, dict]:
    """Per-layer mean and std over seeds of ``{layer: dB}`` curves (layers of the first)."""
    if not curves:
        return {}, {}
    mean, std = {}, {}
    for layer in curves[0]:
        vals = [c[layer] for c in curves if c.get(layer) is not None]
        if vals:
            mean[layer], std[layer] = float(np.mean(vals)), float(np.std(vals))
    return mean, std


def _summarize_ptq_rows(runs: Mapping[int, Mapping[str, Any]], main_recipe: str) -> dict | None:
    """Over the seeds that have ``ptq_rows``: float top-1 and, per PTQ recipe (the main one
    included), fake-quant and integer-only top-1, so that every column shares its seeds."""
    seeds = [s for s, r in runs.items() if r.get("ptq_rows")]
    if not seeds:
        return None
    rows: dict[str, dict[str, list[float]]] = {}
    for s in seeds:
        res = runs[s]["results"]
        for name, row in {main_recipe: res, **runs[s]["ptq_rows"]}.items():
            into = rows.setdefault(name, {"fake_quant": [], "integer": []})
            into["fake_quant"].append(row["fake_quant"]["top1"])
            if row.get("integer"):
                into["integer"].append(row["integer"]["top1"])
    return {
        "seeds": sorted(seeds),
        "float_top1": _stats([runs[s]["results"]["float"]["top1"] for s in seeds]),
        "recipes": {
            name: {kind: _stats(vals) for kind, vals in row.items()} for name, row in rows.items()
        },
    }


def summarize_variant(
    variant: str, runs: Mapping[int, Mapping[str, Any]], main_recipe: str = "tf8_per_tensor"
) -> dict[str, Any]:
    """Over the seeds of one variant: top-1 statistics and mean SQNR curves.

    ``runs`` maps seed → ``{"results": evaluate-step output, "sqnr": sqnr-step output | None,
    "ptq_rows": the ptq_rows step's rows (optional)}``; ``main_recipe`` names the PTQ recipe of
    the evaluate step.
    """
    info = {
        "label": VARIANT_LABELS.get(variant, variant),
        "paper": paper.FIG5_TOP1.get(variant, {}),
    }

    def top1(kind):
        return [r["results"][kind]["top1"] for r in runs.values() if r["results"].get(kind)]

    zero_var = [r["zero_variance_channels"] for r in runs.values() if "zero_variance_channels" in r]
    max_alpha = [
        r["results"]["max_depthwise_alpha"]
        for r in runs.values()
        if "max_depthwise_alpha" in r["results"]
    ]
    fq = [sqnr_lib.sqnr_curve(r["sqnr"]["fake_quant"]) for r in runs.values() if r.get("sqnr")]
    it = [
        sqnr_lib.sqnr_curve(r["sqnr"]["integer"])
        for r in runs.values()
        if r.get("sqnr") and "integer" in r["sqnr"]
    ]
    fq_mean, fq_std = _curve_stats(fq)
    it_mean, it_std = _curve_stats(it)
    return {
        "variant": variant,
        "label": info["label"],
        "paper": info["paper"],
        "seeds": sorted(runs),
        "num_seeds": len(runs),
        "float_top1": _stats(top1("float")),
        "fake_quant_top1": _stats(top1("fake_quant")),
        "integer_top1": _stats(top1("integer")),
        # per seed; None where the block has no BN after its depthwise conv
        "zero_variance_channels": zero_var,
        "max_depthwise_alpha": max_alpha,
        "ptq_rows": _summarize_ptq_rows(runs, main_recipe),
        "sqnr_fake_quant": fq_mean,
        "sqnr_fake_quant_std": fq_std,
        "sqnr_integer": it_mean,
        "sqnr_integer_std": it_std,
    }


def describe(config, workdir: str) -> str:
    """One sentence on the recipe, read from the first variant's resolved training config."""
    first = config.variants[0]
    tc = variant_config(config, first, config.seeds[0])
    steps = tc.get("total_steps")
    length = f"{steps} steps" if steps else f"{tc.num_epochs:g} epochs"
    return (
        f"Trained from scratch on {tc.train_data} ({length}, batch {tc.batch_size}, "
        f"{tc.optimizer} lr {tc.learning_rate:g}, width {tc.model.width_multiplier:g}, "
        f"{tc.image_size} px), evaluated on {tc.eval_data}"
        + (f" (first {config.eval_limit} images)" if config.eval_limit else "")
        + f"; PTQ recipe `{config.ptq_recipe}`, calibration on {config.num_calibration_images} "
        f"images of {config.calibration_data}; seeds {list(config.seeds)}. "
        "Paper columns: ImageNet2012, full MobileNetV1 1.0/224."
    )


def depthwise_bn_stats(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Over the BNs after depthwise convs: zero-variance channels and the largest folded α.

    Both are ``None`` for a block without such BN. The count depends on the moving variances
    only, not on the epsilon passed for α.
    """
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    summary = alpha_lib.alpha_summary(alpha_lib.bn_alphas(variables, eps=1e-3))
    if not summary:
        return {"zero_variance_channels": None, "max_depthwise_alpha": None}
    return {
        "zero_variance_channels": int(sum(s["zero_variance_channels"] for s in summary.values())),
        "max_depthwise_alpha": float(max(s["alpha_max"] for s in summary.values())),
    }


def zero_variance_channels(train_dir: str) -> int | None:
    """The zero-variance count (:func:`depthwise_bn_stats`) of ``train_dir``'s newest checkpoint."""
    return depthwise_bn_stats(checkpointing.load_variables(train_dir))["zero_variance_channels"]


def step_summary(config, workdir: str) -> dict[str, Any]:
    """Collects every finished run into ``summary.json`` and the plots."""
    variants: dict[str, Any] = {}
    for variant in config.variants:
        runs = {}
        for seed in config.seeds:
            d = run_dir(workdir, variant, seed)
            res = os.path.join(d, "results.json")
            if not os.path.isfile(res):
                continue
            sq = os.path.join(d, "sqnr.json")
            runs[seed] = {
                "results": io_utils.read_json(res),
                "sqnr": io_utils.read_json(sq) if os.path.isfile(sq) else None,
            }
            rows = os.path.join(d, "ptq_rows.json")
            if os.path.isfile(rows):
                runs[seed]["ptq_rows"] = io_utils.read_json(rows)["rows"]
            if "zero_variance_channels" in runs[seed]["results"]:
                runs[seed]["zero_variance_channels"] = runs[seed]["results"][
                    "zero_variance_channels"
                ]
            elif os.path.isdir(os.path.join(d, "train", "checkpoints")):
                runs[seed]["zero_variance_channels"] = zero_variance_channels(
                    os.path.join(d, "train")
                )
        if not runs:
            log.warning("summary: no finished run of %s yet", variant)
            continue
        variants[variant] = summarize_variant(variant, runs, config.ptq_recipe)
        io_utils.write_json(os.path.join(workdir, variant, "results.json"), variants[variant])
    summary = {
        "job": "figure5",
        "description": describe(config, workdir),
        "variants": variants,
        "sqnr": {v: s["sqnr_fake_quant"] for v, s in variants.items() if s["sqnr_fake_quant"]},
        "sqnr_integer": {v: s["sqnr_integer"] for v, s in variants.items() if s["sqnr_integer"]},
        "config": config.to_dict(),
        "run": io_utils.run_info(),
    }
    io_utils.write_json(os.path.join(workdir, "summary.json"), summary)
    if variants:
        _plot(variants, workdir)
        curves = training_curves(config, workdir)
        if curves:
            from qfsep_jax.analysis import plots

            plots.plot_training_curves(
                curves,
                os.path.join(workdir, "figure5_curves.png"),
                title="Figure 5 runs: " + describe(config, workdir).split(", evaluated")[0],
            )
    return summary


def training_curves(config, workdir: str) -> dict[str, dict[str, list]]:
    """``{"<variant> seed<k>": per-epoch curves}`` of every run whose ``metrics.jsonl`` exists."""
    out = {}
    for variant in config.variants:
        for seed in config.seeds:
            train_dir = os.path.join(run_dir(workdir, variant, seed), "train")
            metrics = os.path.join(train_dir, "metrics.jsonl")
            results = os.path.join(train_dir, "results.json")
            if not (os.path.isfile(metrics) and os.path.isfile(results)):
                continue
            tc = variant_config(config, variant, seed)
            total = io_utils.read_json(results).get("total_steps")
            if not total:
                continue
            steps_per_epoch = max(1, round(total / tc.num_epochs))
            out[f"{variant} seed{seed}"] = curves_lib.per_epoch(
                metrics_log.read_metrics(train_dir).values(), steps_per_epoch
            )
    return out


def _plot(variants: Mapping[str, Any], workdir: str) -> None:
    from qfsep_jax.analysis import plots

    table, spreads = {}, {}
    for v, s in variants.items():
        table[v], spreads[v] = {}, {}
        for key, label in (
            ("float_top1", "float"),
            ("fake_quant_top1", "8-bit fake-quant"),
            ("integer_top1", "8-bit integer"),
        ):
            if s[key]:
                table[v][label], spreads[v][label] = s[key]["mean"], s[key]["std"]
    plots.plot_accuracy(
        table,
        os.path.join(workdir, "figure5_accuracy.png"),
        spreads,
        title="Imagenette val top-1 by core layer (TF8 post-training quantization)",
    )
    for key, name in (
        ("sqnr_fake_quant", "figure5_sqnr"),
        ("sqnr_integer", "figure5_sqnr_integer"),
    ):
        curves = {v: s[key] for v, s in variants.items() if s[key]}
        if curves:
            plots.plot_sqnr(
                curves,
                os.path.join(workdir, f"{name}.png"),
                spreads={v: variants[v][key + "_std"] for v in curves},
                title=f"per-layer SQNR by core layer ({key.split('_', 1)[1].replace('_', '-')})",
            )


# ---------------------------------------------------------------- driver


def _run_ptq_rows(train_config, train_dir: str, run: str, config, key: str) -> str:
    """The ``ptq_rows`` step of one run: adds the missing rows to ``ptq_rows.json``."""
    path = os.path.join(run, "ptq_rows.json")
    done = io_utils.read_json(path)["rows"] if os.path.isfile(path) else {}
    if all(ptq_row_key(name, config) in done for name in config.ptq_rows):
        return "skipped"
    if not (
        train_done(train_dir)
        and os.path.isdir(os.path.join(train_dir, checkpointing.CHECKPOINT_DIR))
    ):
        raise RuntimeError(
            f"{key}: step 'ptq_rows' needs a finished training run with its checkpoints "
            f"in {train_dir}"
        )
    new = step_ptq_rows(train_config, train_dir, config, done)
    for name, row in new.items():
        log.info(
            "%s: %s top-1 fake-quant %.2f, integer %s",
            key,
            name,
            row["fake_quant"]["top1"],
            "-" if row["integer"] is None else f"{row['integer']['top1']:.2f}",
        )
    io_utils.write_json(path, {"eval_data": train_config.eval_data, "rows": {**done, **new}})
    return "ran"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the configured steps; returns ``{"actions": {...}, "summary": {...} | None}``.

    ``actions`` maps ``"<variant>/seed<k>/<step>"`` to ``"ran"`` or ``"skipped"``.
    """
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    actions: dict[str, str] = {}
    for variant in config.variants:
        for seed in config.seeds:
            d = run_dir(workdir, variant, seed)
            tc = variant_config(config, variant, seed)
            train_dir = os.path.join(d, "train")
            key = f"{variant}/seed{seed}"
            results_exist = all(
                os.path.isfile(os.path.join(d, f)) for f in ("results.json", "sqnr.json")
            )
            if "train" in config.steps:
                # A run whose results exist needs no training (its checkpoints may be gone).
                if results_exist or train_done(train_dir):
                    actions[f"{key}/train"] = "skipped"
                else:
                    start = time.perf_counter()
                    step_train(tc, train_dir)
                    actions[f"{key}/train"] = "ran"
                    log.info("%s: trained in %.0fs", key, time.perf_counter() - start)
            qmodel = None
            for step, filename in (("evaluate", "results.json"), ("sqnr", "sqnr.json")):
                if step not in config.steps:
                    continue
                path = os.path.join(d, filename)
                if os.path.isfile(path):
                    actions[f"{key}/{step}"] = "skipped"
                    continue
                if not train_done(train_dir):
                    raise RuntimeError(f"{key}: step {step!r} needs a finished training run")
                if qmodel is None:
                    qmodel, model, variables = quantize_trained(tc, train_dir, config)
                if step == "evaluate":
                    out = step_evaluate(tc, qmodel, model, variables, config)
                    out.update({"variant": variant, "seed": seed})
                    log.info(
                        "%s: top-1 float %.2f, fake-quant %.2f, integer %s",
                        key,
                        out["float"]["top1"],
                        out["fake_quant"]["top1"],
                        "-" if out["integer"] is None else f"{out['integer']['top1']:.2f}",
                    )
                else:
                    out = step_sqnr(tc, qmodel, config)
                io_utils.write_json(path, out)
                actions[f"{key}/{step}"] = "ran"
            if "ptq_rows" in config.steps and config.ptq_rows:
                actions[f"{key}/ptq_rows"] = _run_ptq_rows(tc, train_dir, d, config, key)
            jax.clear_caches()
    summary = step_summary(config, workdir) if "summary" in config.steps else None
    for key, action in actions.items():
        log.info("%s: %s", key, action)
    if summary:
        print(format_summary(summary))
    return {"actions": actions, "summary": summary}


def format_summary(summary: Mapping[str, Any]) -> str:
    """One line per variant: mean ± std top-1 in float, fake-quant and integer-only."""
    lines = []
    for v, s in summary["variants"].items():
        cells = [
            f"{k} {s[k]['mean']:.2f}±{s[k]['std']:.2f}"
            for k in ("float_top1", "fake_quant_top1", "integer_top1")
            if s[k]
        ]
        lines.append(f"{v:12s} " + ", ".join(cells))
    return "\n".join(lines)
