"""Figure 5 at small scale: the four core-layer designs trained on Imagenette, then TF8 PTQ.

Command (resumable: rerun the same command after an interruption):

    python launch/main.py --config configs/figure5.py --workdir results/figure5

Each variant trains with its own config (``train_configs``, the Imagenette training configs;
the training recipe is documented there), with ``train_overrides`` applied on top and the seed
set per run. Then each trained model is post-training quantized (``ptq_recipe``, TF8 per-tensor;
activation ranges calibrated on the first ``num_calibration_images`` training images, eval
preprocessing) and evaluated in float, 8-bit fake-quant and 8-bit integer-only on the variant's
``eval_data`` (Imagenette val), and its per-layer SQNR is measured on the first
``num_sqnr_images`` val images. ``--config.seeds='(0,1)'`` adds seeds.

Expected time: about 20 min of training per variant and seed on the 2-core CPU machine when it
runs alone, plus under a minute per variant for PTQ, evaluation and SQNR. Expected result:
<!-- results:figure5_expected -->
Expected (results/figure5/summary.json, measured 2026-11-28 06:50 UTC on AMD EPYC (2 cores)):
original top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std over 2 seeds): 71.06 ±
0.31 / 66.66 ± 2.82 / 66.78 ± 2.70; qf_relu6 top-1 % (float / 8-bit fake-quant / 8-bit integer,
mean ± std over 2 seeds): 78.11 ± 0.51 / 78.03 ± 0.55 / 78.09 ± 0.54; qf_relu top-1 % (float /
8-bit fake-quant / 8-bit integer, mean ± std over 2 seeds): 77.69 ± 0.06 / 77.87 ± 0.09 / 77.69
± 0.22; qf_relu_l2dw top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std over 2
seeds): 77.83 ± 0.08 / 77.80 ± 0.22 / 78.01 ± 0.00.
<!-- /results:figure5_expected -->

``configs/figure5.py:tiny`` is the test-scale version (1 training step at 32 px, width 0.25, a
few images): it checks the pipeline, its numbers mean nothing.
"""

import importlib

import ml_collections

from configs import train_base

VARIANTS = tuple(train_base.VARIANTS)  # original, qf_relu6, qf_relu, qf_relu_l2dw


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "figure5"
    c.data_dir = "../shared/data"
    c.variants = VARIANTS
    # variant → its training config (configs/imagenette_<variant>.py)
    c.train_configs = ml_collections.ConfigDict(
        {v: importlib.import_module(f"configs.imagenette_{v}").get_config() for v in VARIANTS}
    )
    c.seeds = (0,)
    c.train_overrides = ml_collections.ConfigDict()  # nested fields set on every training config
    c.steps = ("train", "evaluate", "sqnr", "summary")
    c.ptq_recipe = "tf8_per_tensor"
    c.calibration_data = "folder:imagenette/train"
    c.num_calibration_images = 500
    c.eval_limit = ml_collections.config_dict.placeholder(int)  # None: all 3,925 val images
    c.num_sqnr_images = 200
    c.sqnr_batch_size = 25
    c.integer = True  # also evaluate (and measure SQNR of) the integer-only pass

    if arg == "tiny":
        c.variants = ("original", "qf_relu_l2dw")
        c.train_overrides = ml_collections.ConfigDict(
            {
                "image_size": 32,
                "batch_size": 8,
                "eval_batch_size": 8,
                "eval_limit": 8,
                "eval_every_steps": -1,
                "total_steps": 1,
                "num_devices": 1,
                "log_every_steps": 1,
                "async_checkpoints": False,
                "dropout_rate": 0.0,
                "model": {"width_multiplier": 0.25, "stem_stride": 1},
            }
        )
        c.num_calibration_images = 8
        c.eval_limit = 8
        c.num_sqnr_images = 4
        c.sqnr_batch_size = 4
    elif arg:
        raise ValueError(f"unknown figure5 config variant {arg!r}; use '' or 'tiny'")
    return c
