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

Expected (trained 2026-11-27, PTQ and evaluation rerun 2026-11-28, seed 0, on the 2-core CPU
machine): about 20 min of training per variant when the machine is otherwise idle (~80 min for
all four, plus under a minute per variant for PTQ, evaluation and SQNR); top-1 float / 8-bit
fake-quant / 8-bit integer: original 70.75 / 63.85 / 64.08, qf_relu6 78.62 / 78.57 / 78.62,
qf_relu 77.63 / 77.78 / 77.48, qf_relu_l2dw 77.91 / 77.58 / 78.01 (README, Figure 5).

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
