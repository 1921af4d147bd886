"""Export a quantized model to ``.tflite`` and check it bit-exactly in LiteRT.

Command:

    python launch/main.py --config configs/export_tflite.py --config.source=SOURCE --workdir W \
        [--config.limit=N]

``SOURCE``: ``ptq:RECIPE`` (the official float MobileNetV1 1.0/224 post-training quantized with a
Table 1 recipe, e.g. ``tf8_zero_variance_fix`` or ``int8_per_channel``; calibrated on the 1000
images of ``imagenet_calib1000``), ``quantized:DIR`` (a model saved by QAT or PTQ, e.g. a QAT
run's ``workdir/quantized_model``; evaluated on that run's own eval data, label space and image
size) or ``tflite:PATH`` (re-export an imported ``.tflite``, absolute or relative to
``data_dir``). Writes ``W/model.tflite`` and ``W/results.json``; the last output line is
``bit-exact: K/N`` and the exit status is non-zero unless K = N
(``qfsep_jax/jobs/export_tflite.py``).

Expected (measured 2026-12-03 on the 2-core Intel Xeon CPU machine, shared with other jobs; see
docs/deploy_tflite.md): ``bit-exact: 500/500`` on ``imagenet_val500`` for
``ptq:tf8_zero_variance_fix`` (top-1 58.4 % in both engines, 1 min 40 s with the calibration)
and ``ptq:int8_per_channel`` (65.0 %, 1 min 7 s); for
``tflite:models/mobilenet_v1_0.25_128_quant.tflite`` also ``identical to ...: 500/500`` (18 s);
``bit-exact: 3925/3925`` on Imagenette val for the QAT-trained QF model of
``results/export_tflite/qat_qf_relu_train`` (1 min 35 s). ``ptq:per_channel`` (uint8 per-channel
weights) is refused: TFLite's per-axis quantization is int8 only.
"""

import ml_collections
from ml_collections import config_dict

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.data_config()
    c.job = "export_tflite"
    c.source = config_dict.placeholder(str)  # ptq:RECIPE | quantized:DIR | tflite:PATH
    c.limit = config_dict.placeholder(int)  # check only the first N images
    # Data: empty / 0 = the source's own (imagenet_val500, imagenet1001, 224 px for ptq:; the
    # training run's eval_data, label_space, image_size for quantized:; the file's resolution).
    c.eval_data = ""
    c.label_space = ""
    c.image_size = 0
    # ptq: sources.
    c.model_path = "models/mobilenet_v1_1.0_224_retrained_graph.pb"  # relative to data_dir
    c.calibration_data = "folder:imagenet_calib1000"
    c.num_calibration_images = 1000
    c.zero_variance_threshold = 1e-10
    # The exported file.
    c.softmax = False  # append SOFTMAX after the logits (tflite: sources keep the file's own)
    # LiteRT.
    c.op_resolver = "builtin"  # builtin (LiteRT kernels, no XNNPACK) | reference
    c.rounding = ""  # "": the preset the resolver matches (litert_x86[_int8] or reference)
    c.num_threads = 1
    return c
