"""Integer-only pass vs fake-quant simulation of one quantized model: a JSON report and a plot.

Command (the official float graph after ``tf8_zero_variance_fix`` PTQ, plain simulation):

    python launch/main.py --config configs/agreement.py --workdir results/agreement/tf8_zvf

Other models: ``--config.source=trained:DIR --config.recipe=tf8_per_tensor`` (a training run's
newest checkpoint, PTQ'd), ``--config.source=quantized:DIR`` (an exported model, e.g. a QAT run's
``quantized_model``). ``--config.snap_biases --config.sim_rounding`` compare against the
simulation aligned with the integer arithmetic (int32 biases, TFLite's double rounding). The
README's table comes from ``configs/agreement.py:summary`` over the reports in
``results/agreement``. About 4 minutes per report at 224 px with all checks on the 2-core CPU
machine (500 images of ``imagenet_val500``).
"""

import ml_collections

from configs import base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """One report; ``:summary`` collects reports; ``:smoke`` is a seconds-long check."""
    if variant not in ("", "summary", "smoke"):
        raise ValueError(f"unknown variant {variant!r} of agreement (use '', ':summary', ':smoke')")
    c = base.data_config()
    c.job = "agreement"
    c.source = "official"  # official | trained:DIR | quantized:DIR
    c.recipe = "tf8_zero_variance_fix"  # PTQ recipe for official / trained sources
    c.model_path = "models/mobilenet_v1_1.0_224_retrained_graph.pb"  # relative to data_dir
    c.calibration_data = "folder:imagenet_calib1000"
    c.num_calibration_images = 1000
    c.eval_data = "folder:imagenet_val500"
    c.limit = ml_collections.config_dict.placeholder(int)  # None: every eval image
    # None: the training run's (trained/quantized sources), else 224 px and imagenet1001
    c.image_size = ml_collections.config_dict.placeholder(int)
    c.label_space = ml_collections.config_dict.placeholder(str)
    c.rounding = "reference"  # requantization rounding: integer.ROUNDING_PRESETS
    c.snap_biases = False  # simulation with the integer model's int32 biases
    c.sim_rounding = False  # simulation with the integer model's requantization rounding
    c.locate = True  # attribute each top-1 disagreement to a layer
    c.reorder_check = True  # the simulation against itself in another float32 summation order
    c.float64_check = True  # the simulation in float64
    c.plot = True
    c.depthwise_impl = "auto"
    c.reports = ()  # with :summary: globs of report JSONs to collect into workdir/summary.json
    if variant == "summary":
        tags = ["qat_tfslim", "per_channel", "tf8_zero_variance_fix", "qat_imagenette_original"]
        variants = ("original", "qf_relu6", "qf_relu_l2dw", "qf_relu")
        tags += [f"figure5_{v}_seed{seed}" for v in variants for seed in (0, 1)]
        c.reports = tuple(
            f"results/agreement/{tag}{kind}/report.json"
            for kind in ("", "_modelled")
            for tag in tags
        )
    if variant == "smoke":
        c.limit = 8
        c.num_calibration_images = 8
        c.eval_batch_size = 8
        c.image_size = 96
        c.locate = c.reorder_check = c.float64_check = False
    return c
