"""The paper's analysis (Figures 3 and 4) on its own float MobileNetV1 1.0/224.

Command:

    python launch/main.py --config configs/analyze_official.py --workdir /tmp/analyze

Writes ``alpha.json`` (α per channel of every BN after a depthwise conv, by TF-slim layer name),
``sqnr.json`` (pipeline → measure → layer → dB), range tables, PNG plots and ``results.json``
(the summary ``tools/collect_results.py`` reads).

SQNR images: the paper averages over 1000 ImageNet val images, one per class. The data here has
no such set: ``imagenet_calib1000`` is one image per class but consists of (likely) training
images and is what calibrates the activation ranges, so measuring on it would hide clipping.
The default is therefore the first ``num_sqnr_images`` of the 500 real val images of
``imagenet_val500`` (10 classes), held out from calibration; ``--config.sqnr_data`` and
``--config.num_sqnr_images`` change it. Quick run: ``--config.num_sqnr_images=20
--config.num_calibration_images=100``.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.data_config()
    c.job = "analyze"
    c.model_path = "models/mobilenet_v1_1.0_224_retrained_graph.pb"  # relative to data_dir
    c.pipelines = (  # ptq.RECIPES names
        "tf8_per_tensor",
        "tf8_zero_variance_fix",  # the paper's fix, on the depthwise layers
        "tf8_zero_variance_fix_all",  # the same fix on every BN layer
        "per_channel",
    )
    c.calibration_data = "folder:imagenet_calib1000"
    c.num_calibration_images = 1000
    c.sqnr_data = "folder:imagenet_val500"
    c.num_sqnr_images = 200
    c.sqnr_batch_size = 20
    c.observer = "minmax"  # minmax | ema | percentile
    c.zero_variance_threshold = 1e-10  # flags α channels and drives the zero-variance fix
    c.integer = True  # also measure the integer-only pass's SQNR
    c.plots = True
    c.depthwise_impl = "auto"
    return c
