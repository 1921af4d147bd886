"""Bit-exactness of the JAX integer-only pass against LiteRT, tensor by tensor.

    python launch/main.py --config configs/tflite_check.py --workdir /tmp/tflite_check

Default: the official uint8 MobileNetV1 0.25/128 on the 500 images of ``imagenet_val500``
(TF-slim eval preprocessing in uint8 mode at the model's 128 px). Other models:
``--config.model=PATH.tflite`` (absolute, or relative to ``data_dir``), with
``--config.head=HEAD.tflite`` for split backbone + head models; ``--config.limit=N`` checks the
first N images. Writes ``workdir/results.json``; the last output line is ``bit-exact: K/N`` and
the exit status is non-zero unless every image is bit-exact.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.data_config()
    c.job = "tflite_check"
    c.model = "models/mobilenet_v1_0.25_128_quant.tflite"  # relative to data_dir, or absolute
    c.head = ""  # optional head .tflite whose input is the model's output
    c.eval_data = "folder:imagenet_val500"
    c.limit = ml_collections.config_dict.placeholder(int)  # check only the first N images
    c.image_size = 0  # 0: the model's input resolution
    c.op_resolver = "builtin"  # builtin (LiteRT kernels, no XNNPACK) | reference | xnnpack
    c.rounding = "auto"  # auto | reference | litert_x86 | single | conv=<rule>,depthwise=<rule>
    c.num_threads = 1  # LiteRT threads
    return c
