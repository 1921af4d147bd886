"""Quantization-aware fine-tuning of the official TF-slim float MobileNetV1 1.0/224 (imported).

Starts from ``models/mobilenet_v1_1.0_224_retrained_graph.pb`` (its architecture: original
block, ReLU6, 1001 classes) and fine-tunes in QAT mode on the Imagenette training images with
their ImageNet labels (``imagenet1001`` label space), then evaluates 1001-way on the 500 real
ImageNet validation images of ``imagenet_val500`` (the paper's float model gets 67.0 % there in
float and 5.8 % after TF8 per-tensor PTQ, see configs/reproduce_table1.py). TF8 per-tensor fake
quantization of folded weights and activations; BN frozen from the start (the pretrained moving
statistics, [choice]: 10 classes of data would re-estimate them badly); EMA ranges (decay 0.99);
quant delay 0; momentum 0.9 at a constant 1e-4 ([choice]; TF-slim fine-tunes with 1e-4);
1 epoch at batch 32 (295 steps). Ends by exporting the quantized model for the integer-only
pass (``workdir/quantized_model``).

Commands:

    python launch/main.py --config configs/qat_tfslim.py --workdir /tmp/qat_tfslim
    python launch/main.py --config configs/qat_tfslim.py:smoke --workdir /tmp/qat_tfslim_smoke

Expected: about 7 min on the 2-core CPU machine (about 26 training images/s once compiled);
the smoke run takes about a minute.
<!-- results:qat_tfslim_expected -->
Expected (results/qat_tfslim/results.json, measured 2026-11-28 06:03 UTC on AMD EPYC (2 cores)):
After 295 QAT steps: top-1 93.40 % in the QAT model's fake-quant inference, 93.60 % in the
integer-only pass, on 500 images.
<!-- /results:qat_tfslim_expected -->
These are not ImageNet accuracies: the fine-tuning sees only the 10 classes that imagenet_val500
holds, so the 1001-way classifier learns to prefer them (the float model gets 67.0 % on the same
images), and one epoch of fine-tuning amplifies last-bit arithmetic changes by about ±3 points.
What the run is for: a QAT-trained model with the official architecture and 1001 classes for
the agreement job (``--config.source=quantized:results/qat_tfslim/quantized_model``).
"""

import ml_collections

from configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = train_base.get_config()
    c.init_from = "tfslim:models/mobilenet_v1_1.0_224_retrained_graph.pb"
    c.train_data = "folder:imagenette/train"
    c.eval_data = "folder:imagenet_val500"
    c.label_space = "imagenet1001"
    c.image_size = 224
    c.batch_size = 32
    c.eval_batch_size = 50
    c.dropout_rate = 0.0
    c.optimizer = "momentum"
    c.learning_rate = 1e-4
    c.lr_schedule = "constant"
    c.num_epochs = 1.0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.qat.enabled = True
    c.qat.scheme = "tf8"
    c.qat.ema_decay = 0.99
    c.qat.quant_delay_steps = 0
    c.qat.bn_freeze_step = 0
    if arg == "smoke":
        c.batch_size = 8
        c.eval_batch_size = 10
        c.eval_limit = 20
        c.total_steps = 3
        c.log_every_steps = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use nothing or 'smoke'")
    return c
