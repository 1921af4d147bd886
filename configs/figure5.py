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
Expected (results/figure5/summary.json, measured 2026-12-04 13:40 UTC on Intel(R) Xeon(R)
Processor (2 cores)): original top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std
over 3 seeds): 69.77 ± 1.84 / 59.80 ± 9.97 / 59.80 ± 10.10; qf_relu6 top-1 % (float / 8-bit
fake-quant / 8-bit integer, mean ± std over 3 seeds): 77.55 ± 0.91 / 77.44 ± 0.95 / 77.56 ±
0.86; qf_relu top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std over 3 seeds): 77.06
± 0.90 / 77.09 ± 1.11 / 77.07 ± 0.90; qf_relu_l2dw top-1 % (float / 8-bit fake-quant / 8-bit
integer, mean ± std over 3 seeds): 77.66 ± 0.25 / 77.65 ± 0.27 / 77.79 ± 0.31.
<!-- /results:figure5_expected -->

``configs/figure5.py:tfslim_rmsprop`` trains every variant with TF-slim's RMSProp recipe
instead (``RECIPES`` below), the first recipe of the search for a small-scale collapse:

    python launch/main.py --config configs/figure5.py:tfslim_rmsprop \\
        --workdir results/figure5_tfslim_rmsprop

``configs/figure5.py:sgd_lr0.4_nowarmup`` (eight times the learning rate, no warmup) is the
recipe under which the original block collapses in TF8 PTQ, as in the paper, and the QF blocks
do not (docs/figure5.md, "A recipe for the collapse"); 12–15 min of training per variant and
seed on the 2-core CPU machine when it runs alone. The original block, also through the paper's
zero-variance fix and per-channel weights (``ptq_rows`` needs the checkpoints, so it runs where
they were trained), then the three QF blocks and the summary over all four:

    python launch/main.py --config configs/figure5.py:sgd_lr0.4_nowarmup \\
        --workdir results/figure5_sgd_lr0.4_nowarmup --config.variants='("original",)' \\
        --config.seeds='(0,1,2)' \\
        --config.ptq_rows='("tf8_zero_variance_fix","tf8_zero_variance_fix_all","per_channel")'
    python launch/main.py --config configs/figure5.py:sgd_lr0.4_nowarmup \\
        --workdir results/figure5_sgd_lr0.4_nowarmup --config.seeds='(0,1,2)'

<!-- results:figure5_sgd_lr0.4_nowarmup_expected -->
Expected (results/figure5_sgd_lr0.4_nowarmup/summary.json, measured 2026-12-04 18:01 UTC on AMD
EPYC (2 cores)): original top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std over 3
seeds): 65.20 ± 2.96 / 9.66 ± 0.40 / 9.38 ± 0.40; qf_relu6 top-1 % (float / 8-bit fake-quant /
8-bit integer, mean ± std over 3 seeds): 65.69 ± 4.16 / 65.50 ± 4.07 / 65.60 ± 3.95; qf_relu
top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std over 3 seeds): 70.49 ± 1.89 /
70.44 ± 1.98 / 70.44 ± 1.99; qf_relu_l2dw top-1 % (float / 8-bit fake-quant / 8-bit integer,
mean ± std over 3 seeds): 69.10 ± 2.20 / 68.96 ± 2.12 / 69.11 ± 2.10.
<!-- /results:figure5_sgd_lr0.4_nowarmup_expected -->

``configs/figure5.py:sgd_lr0.1`` and ``:sgd_lr0.2`` are today's recipe at twice and four times
its learning rate (``--workdir results/figure5_sgd_lr0.2``, about 20 min per variant and seed).
Ablations of the original block (``ABLATIONS``) run as variants of the default config:

    python launch/main.py --config configs/figure5.py --workdir results/figure5_ablations \\
        --config.variants='("original_linear_dw","original_nobn_dw","original_lr_double")'

``configs/figure5.py:tiny`` is the test-scale version (1 training step at 32 px, width 0.25, a
few images): it checks the pipeline, its numbers mean nothing.
"""

import importlib

import ml_collections

from configs import train_base

VARIANTS = tuple(train_base.VARIANTS)  # original, qf_relu6, qf_relu, qf_relu_l2dw

# Other training recipes for every variant (``configs/figure5.py:<name>``), searched for one
# under which the original block grows dead depthwise channels and collapses in TF8 PTQ.
RECIPES = {
    # The paper's own setup, TF-slim's MobileNetV1 recipe: RMSProp (decay 0.9, momentum 0.9,
    # epsilon 1.0), learning rate 0.045 decayed by 0.94 every 2.5 epochs, no warmup; the rest
    # (30 epochs, batch 64, weight decay 4e-5, label smoothing 0.1) as the Imagenette configs.
    "tfslim_rmsprop": {
        "optimizer": "rmsprop",
        "learning_rate": 0.045,
        "lr_schedule": "exponential",
        "lr_decay_rate": 0.94,
        "lr_decay_epochs": 2.5,
        "lr_staircase": True,
        "warmup_epochs": 0.0,
    },
    # Today's SGD recipe at twice and four times its peak learning rate (0.05): the original
    # block's TF8 drop grows with the learning rate (original_lr_double below).
    "sgd_lr0.1": {"learning_rate": 0.1},
    "sgd_lr0.2": {"learning_rate": 0.2},
    # Harsher starts, screened for dead channels with tools/figure5_recipe_screen.py: eight
    # times the learning rate without warmup, ten times the weight decay (with BN, a larger
    # decay raises the effective learning rate of the scale-invariant kernels), and width 1.0
    # (twice the channels that can die, as in the official model).
    "sgd_lr0.4_nowarmup": {"learning_rate": 0.4, "warmup_epochs": 0.0},
    "sgd_lr0.2_wd4e-4": {"learning_rate": 0.2, "weight_decay": 4e-4},
    "width1.0_sgd_lr0.1": {"learning_rate": 0.1, "model": {"width_multiplier": 1.0}},
}

# Ablations of the original block that separate the causes of its float gap
# (``--config.variants='("original_linear_dw",)' --workdir results/figure5_ablations``): the
# variant whose training config they start from, and the fields they change.
ABLATIONS = {
    # DW→BN→PW→BN→ReLU6: the original without the ReLU6 after its depthwise BN.
    "original_linear_dw": ("original", {"model": {"block": "original_linear_dw"}}),
    # DW(+bias)→ReLU6→PW→BN→ReLU6: the original without its depthwise BN (the QF block with a
    # depthwise ReLU6).
    "original_nobn_dw": ("original", {"model": {"block": "original_nobn_dw"}}),
    # The original at half and twice today's peak learning rate.
    "original_lr_half": ("original", {"learning_rate": 0.025}),
    "original_lr_double": ("original", {"learning_rate": 0.1}),
    # The original trained twice as long.
    "original_60ep": ("original", {"num_epochs": 60.0}),
}


def _ablation_config(name: str) -> ml_collections.ConfigDict:
    base, fields = ABLATIONS[name]
    c = importlib.import_module(f"configs.imagenette_{base}").get_config()
    c.update(fields)  # nested dicts update nested fields
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "figure5"
    c.data_dir = "../shared/data"
    c.variants = VARIANTS
    # variant → its training config (configs/imagenette_<variant>.py, or an ablation's)
    c.train_configs = ml_collections.ConfigDict(
        {v: importlib.import_module(f"configs.imagenette_{v}").get_config() for v in VARIANTS}
        | {name: _ablation_config(name) for name in ABLATIONS}
    )
    c.seeds = (0,)
    # Nested fields set on every training config. Val top-1 after every epoch (at each
    # checkpoint), for the training curves (figure5_curves.png); evaluation does not change
    # training.
    every_epoch = c.train_configs[VARIANTS[0]].checkpoint_every_steps
    c.train_overrides = ml_collections.ConfigDict({"eval_every_steps": every_epoch})
    c.steps = ("train", "evaluate", "sqnr", "ptq_rows", "summary")
    c.ptq_recipe = "tf8_per_tensor"
    # Further PTQ recipes scored on every trained model (the ptq_rows step), e.g.
    # --config.ptq_rows='("tf8_zero_variance_fix","per_channel")': does the paper's
    # zero-variance fix, or per-channel weights, recover what ptq_recipe loses?
    c.ptq_rows = ()
    # BN channels with moving variance at most this count as zero-variance for the fix recipes
    # (the paper's fix; the default of qfsep_jax.ptq). Another value makes its own rows,
    # "<recipe>@<threshold>".
    c.zero_variance_threshold = 1e-10
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
    elif arg in RECIPES:
        c.train_overrides.update(RECIPES[arg])
    elif arg:
        raise ValueError(
            f"unknown figure5 config variant {arg!r}; use '', 'tiny' or one of {sorted(RECIPES)}"
        )
    return c
