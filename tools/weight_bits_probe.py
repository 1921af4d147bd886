"""Why per-tensor weights collapse below 8 bits on the paper's float MobileNetV1.

    python tools/weight_bits_probe.py [--bits 8,6,4] [--calib_images 64] [--sqnr_images 16]
                                      [--out results/table1_bits/probe.json]

For the ``tf8_per_tensor`` and ``tf8_zero_variance_fix`` recipes at each weight bit width
(activations 8 bits): how many depthwise channels that are nonzero in float quantize to all-zero
weights (their range below half a step of the layer's per-tensor grid), and the per-layer
fake-quant SQNR (:func:`qfsep_jax.analysis.sqnr.measure_sqnr`) of the zero-variance-fix model on
the first ``--sqnr_images`` images of ``imagenet_val500`` at 224 px, calibrated (min/max) on the
first ``--calib_images`` of ``imagenet_calib1000``. Prints one line per case; ``--out`` also
writes them as JSON (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from qfsep_jax import io_utils, ptq  # noqa: E402
from qfsep_jax.analysis import sqnr  # noqa: E402
from qfsep_jax.data.input import eval_input  # noqa: E402
from qfsep_jax.importers.tfslim import load_tfslim  # noqa: E402
from qfsep_jax.models.names import layer_paths, tfslim_name  # noqa: E402
from qfsep_jax.quant.numerics import qparams, quantize  # noqa: E402
from qfsep_jax.quant.scheme import QuantConfig, weight_range  # noqa: E402
from qfsep_jax.tree_utils import subtree  # noqa: E402

MODEL = "models/mobilenet_v1_1.0_224_retrained_graph.pb"
RECIPES = ("tf8_per_tensor", "tf8_zero_variance_fix")


def dead_depthwise_channels(params: dict, bits: int) -> dict[str, int]:
    """Per depthwise layer: channels nonzero in float whose per-tensor codes are all zero."""
    quant = QuantConfig(weight_bits=bits)
    out = {}
    for path in layer_paths(params):
        if path[-1] != "depthwise":
            continue
        w = np.asarray(subtree(params, path)["kernel"], np.float32)
        lo, hi = weight_range(w, quant)
        scale, zp = qparams(lo, hi, quant.weight_int_range)
        codes = np.asarray(quantize(w, scale, zp, quant.weight_int_range))
        codes, flat = codes.reshape(-1, w.shape[-1]), w.reshape(-1, w.shape[-1])
        dead = np.all(codes == int(zp), axis=0) & np.any(flat != 0, axis=0)
        out[tfslim_name(path)] = int(dead.sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--bits", default="8,6,4")
    p.add_argument("--calib_images", type=int, default=64)
    p.add_argument("--sqnr_images", type=int, default=16)
    p.add_argument("--out", default="")
    args = p.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    imported = load_tfslim(os.path.join(args.data_dir, MODEL))
    model, variables = imported.model(dropout_rate=0.0), imported.variables
    config = base.data_config()
    config.data_dir, config.image_size, config.eval_batch_size = args.data_dir, 224, 16
    calib = eval_input(config, "folder:imagenet_calib1000", limit=args.calib_images)
    data = eval_input(config, "folder:imagenet_val500", limit=args.sqnr_images)
    result: dict = {"dead_depthwise_channels": {}, "sqnr_db": {}, "run": io_utils.run_info()}
    for name in RECIPES:
        recipe = ptq.recipe_by_name(name)
        _, folded, _ = ptq.prepare_folded(model, variables, recipe)
        total = sum(
            np.asarray(subtree(folded["params"], p)["kernel"]).shape[-1]
            for p in layer_paths(folded["params"])
            if p[-1] == "depthwise"
        )
        for b in bits:
            dead = dead_depthwise_channels(folded["params"], b)
            worst = max(dead, key=dead.get)
            result["dead_depthwise_channels"][f"{name}_w{b}"] = {"total": total, **dead}
            print(
                f"{name} W{b}: {sum(dead.values())} of {total} depthwise channels "
                f"quantize to all-zero weights; most in {worst} ({dead[worst]})"
            )
    qmodel = ptq.quantize_post_training(
        model,
        variables,
        ptq.recipe_by_name("tf8_zero_variance_fix"),
        calib.make,
        calib.num_batches,
    )
    for b in bits:
        measured = sqnr.measure_sqnr(qmodel.with_bits(b, 8), data.make(), data.num_batches)
        per_layer = {k: v["sqnr_db"] for k, v in measured["fake_quant"].items()}
        result["sqnr_db"][f"tf8_zero_variance_fix_w{b}a8"] = per_layer
        shown = {k: per_layer[k] for k in ("Conv2d_1_depthwise", "Conv2d_13_pointwise", "Logits")}
        print(
            f"tf8_zero_variance_fix W{b}A8 SQNR dB:",
            {k: None if v is None else round(v, 1) for k, v in shown.items()},
        )
    if args.out:
        io_utils.write_json(args.out, result)


if __name__ == "__main__":
    main()
