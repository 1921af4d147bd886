"""The paper's Table 1 on its own float MobileNetV1 1.0/224, post-training quantized.

Command (the README's main command):

    python launch/main.py --config configs/reproduce_table1.py --workdir /tmp/table1

Evaluates the official TF-slim float model on the 500 ImageNet validation images of
``imagenet_val500`` (1001-way, central 87.5 % crop, resized to 224, [-1, 1]) in float and in 8-bit
simulation for each PTQ row, with activation ranges calibrated (min/max) on the 1000 images of
``imagenet_calib1000``. Writes ``workdir/results.json``.

Expected: about 2 minutes on the 2-core CPU machine when it runs alone (4 with a training job
sharing it); docs/table1.md says what the rows mean.
<!-- results:table1_expected -->
Expected (results/table1/results.json, measured 2026-12-03 23:06 UTC on Intel(R) Xeon(R)
Processor (2 cores)): top-1 % (fake-quant / integer-only) on 500 images: float 67.0, float_relu
54.0, tf8_per_tensor 5.8 / 5.6, tf8_zero_variance_fix 58.4 / 57.0, tf8_zero_variance_fix_all
58.4 / 57.0, per_channel 67.0 / 66.6, cle_per_tensor 52.4 / 52.8, tf8_dynamic_ranges 5.8.
<!-- /results:table1_expected -->
``configs/reproduce_table1.py:smoke`` is a one-minute check (20 images, rows float and
tf8_per_tensor); its numbers mean nothing.
"""

import ml_collections

from configs import base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The full run; ``configs/reproduce_table1.py:smoke`` shrinks it to a 1-minute check."""
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown variant {variant!r} of reproduce_table1 (use ':smoke')")
    c = base.data_config()
    c.job = "table1"
    c.model_path = "models/mobilenet_v1_1.0_224_retrained_graph.pb"  # relative to data_dir
    c.eval_data = "folder:imagenet_val500"
    c.calibration_data = "folder:imagenet_calib1000"
    c.num_calibration_images = 1000
    c.limit = ml_collections.config_dict.placeholder(int)  # evaluate only the first N images
    c.rows = (
        "float",
        "float_relu",  # the float model with ReLU6 → ReLU: the ceiling of cle_per_tensor
        "tf8_per_tensor",
        "tf8_zero_variance_fix",  # the paper's fix: depthwise layers only
        "tf8_zero_variance_fix_all",  # the fix on every BN layer (Conv2d_0, pointwise too)
        "per_channel",
        "cle_per_tensor",
        "tf8_dynamic_ranges",  # per-input activation ranges (no calibration), fake-quant only
    )
    c.observer = "minmax"  # minmax | ema | percentile
    c.zero_variance_threshold = 1e-10
    c.cle_iterations = 20
    c.depthwise_impl = "auto"
    c.integer = True  # also run each quantized row through the integer-only pass (int_top1)
    if variant == "smoke":
        c.limit = 20
        c.num_calibration_images = 20
        c.eval_batch_size = 20
        c.rows = ("float", "tf8_per_tensor")
    return c
