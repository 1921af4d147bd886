"""Table 1: float vs 8-bit post-training quantization of an imported TF-slim MobileNetV1."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os

import jax
import ml_collections

from qfsep_jax import config_validation, evaluation, io_utils, paper, ptq
from qfsep_jax.data.input import eval_input
from qfsep_jax.jobs import common

log = logging.getLogger(__name__)


def format_table(rows: list[dict]) -> str:
    """The results as a text table with the published numbers beside them."""
    lines = [
        f"{'row':36s} {'top1':>7s} {'top5':>7s} {'int_top1':>8s} {'n':>5s}   paper top1",
        "-" * 90,
    ]
    for r in rows:
        published = paper.TABLE1_TOP1.get(r["name"])
        ptext = f"{published[0]:6.2f} ({published[1]})" if published else "-"
        itext = f"{r['int_top1']:8.2f}" if "int_top1" in r else f"{'-':>8s}"
        lines.append(
            f"{r['name']:36s} {r['top1']:7.2f} {r['top5']:7.2f} {itext} {r['n']:5d}   {ptext}"
        )
    return "\n".join(lines)


def bit_widths(config: ml_collections.ConfigDict) -> list[tuple[int, int]] | None:
    """The ``(weight_bits, act_bits)`` pairs a config lists (``config.weight_bits`` ×
    ``config.act_bits``, either defaulting to ``(8,)``), or None when it sets neither."""
    weight_bits, act_bits = config.get("weight_bits"), config.get("act_bits")
    if weight_bits is None and act_bits is None:
        return None
    return list(itertools.product(tuple(weight_bits or (8,)), tuple(act_bits or (8,))))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates every row of ``config.rows``; writes ``workdir/results.json`` atomically.

    With ``config.integer``, each statically quantized row also gets ``int_top1``: the
    top-1 of the integer-only pass (:func:`qfsep_jax.integer.logits_fn`) on its *fine logits*,
    the classifier's int32 accumulators requantized onto one grid 2^16 finer than the 8-bit
    logit codes (integer ops only). The 8-bit codes tie often (1001 classes on 256 codes), and
    top-1 among tied codes would be the lowest class index, i.e. arbitrary. The row's ``top1``
    is the simulation's, on its own (8-bit fake-quantized) logits.

    With ``config.weight_bits`` and/or ``config.act_bits`` (tuples of bit widths, see
    :func:`bit_widths`), every quantized row is evaluated at each ``(weight, activation)`` pair
    and named ``<recipe>_w<b>a<b>``, e.g. ``tf8_per_tensor_w4a8``; one calibration per recipe
    serves all pairs (:meth:`~qfsep_jax.quantized.QuantizedModel.with_bits`).
    """
    config_validation.validate(config, "table1")
    model, variables, source = common.load_official(config)
    evaluate_data = eval_input(config, config.eval_data, limit=config.limit)
    calib = common.calibration_input(config)
    log.info(
        "eval %s: %d images; calibration %s: %d images",
        evaluate_data.name,
        evaluate_data.num_examples,
        calib.name,
        calib.num_examples,
    )

    def score(logits_fn, name):
        return evaluation.evaluate(
            logits_fn, evaluate_data.make(), evaluate_data.num_batches, desc=name
        )

    def quantized_row(qmodel, name):
        # The integer pass sees the same preprocessed images, quantized with the model's input
        # qparams; its top-1 is on the fine logits (see the docstring), not on tied 8-bit codes.
        scores = common.score_quantized(
            qmodel, evaluate_data, integer_pass=config.integer, desc=name
        )
        row = {"name": name, **scores["fake_quant"], "recipe": dataclasses.asdict(qmodel.recipe)}
        if scores["integer"] is not None:
            row["int_top1"] = scores["integer"]["top1"]
        if "integer_error" in scores:
            row["integer_error"] = scores["integer_error"]
        if "zero_variance_channels" in qmodel.info:
            row["zero_variance_scope"] = qmodel.info["zero_variance_scope"]
            row["zero_variance_channels"] = qmodel.info["zero_variance_channels"]
        return row

    def log_row(row):
        log.info("%s: top1 %.2f top5 %.2f (n=%d)", row["name"], row["top1"], row["top5"], row["n"])

    bits = bit_widths(config)
    rows, calibrated = [], {}
    for name in config.rows:
        if name == "float":
            result = score(ptq.float_logits_fn(model, variables), name)
            rows.append({"name": name, **result})
            log_row(rows[-1])
        elif name == "float_relu":
            relu_model = model.clone(activation="relu")
            result = score(ptq.float_logits_fn(relu_model, variables), name)
            rows.append({"name": name, **result})
            log_row(rows[-1])
        else:
            recipe = common.recipe_with_observer(name, config)
            qmodel = common.quantize(model, variables, recipe, config, calib)
            if "calibration_images" in qmodel.info:  # what decoded, not what was asked for
                calibrated = {
                    "num_calibration_images": qmodel.info["calibration_images"],
                    "calibration_skipped_corrupt": qmodel.info["calibration_skipped_corrupt"],
                }
            if bits is None:
                rows.append(quantized_row(qmodel, name))
                log_row(rows[-1])
            for w_bits, a_bits in bits or ():
                row_name = f"{name}_w{w_bits}a{a_bits}"
                rows.append(quantized_row(qmodel.with_bits(w_bits, a_bits), row_name))
                log_row(rows[-1])
                jax.clear_caches()
        jax.clear_caches()
    out = {
        "rows": rows,
        "model": source,
        "eval_data": evaluate_data.name,
        "calibration_data": calib.name,
        "num_calibration_images": 0,  # no row calibrated
        **calibrated,
        "bit_widths": bits,  # (weight, activation) pairs; None: 8-bit rows under recipe names
        "crop_fraction": config.crop_fraction,
        "image_size": config.image_size,
        "run": io_utils.run_info(),
    }
    io_utils.write_json(os.path.join(workdir, "results.json"), out)
    print(format_table(rows))
    return out
