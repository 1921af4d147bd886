"""Quantization-aware fine-tuning of an Imagenette float run (configs/imagenette_<variant>.py).

``configs/qat_imagenette.py:<variant>`` (``original``, ``qf_relu6``, ``qf_relu``,
``qf_relu_l2dw``) starts from the newest checkpoint of ``/tmp/imagenette_<variant>`` (override
with ``--config.init_from=checkpoint:<workdir>``) and fine-tunes for 5 epochs in QAT mode: TF8
(uint8, per-tensor) fake quantization of the BN-folded weights and of every activation with the
shared straight-through primitive, BN folding simulated by correction-and-freeze (BN statistics
frozen after 2 epochs), EMA activation ranges (decay 0.99: [choice] for the short run; TF's
contrib.quantize uses 0.999), quantization from the first step (quant delay 0, as TF-slim does
when fine-tuning). The run ends by exporting the BN-folded quantized model that the integer-only
pass converts (``workdir/quantized_model``; ``qfsep_jax.quantized.load_quantized``).

Command (after the float run):

    python launch/main.py --config configs/qat_imagenette.py:qf_relu \
        --workdir /tmp/qat_imagenette_qf_relu

Expected (variant ``original`` from the Figure 5 checkpoint,
``--config.init_from=checkpoint:results/figure5/original/seed0/train --config.eval_every_steps=0``;
about 6 min on the 2-core CPU machine; TF8 post-training quantization of the same float model
gives 63.85 %, see docs/training.md; other variants: not measured):
<!-- results:qat_expected -->
Expected (results/qat_imagenette_original_eval/results.json, measured 2026-11-28 05:56 UTC on
AMD EPYC (2 cores)): After 735 QAT steps: top-1 70.55 % in the QAT model's fake-quant inference,
70.78 % in the integer-only pass, on 3925 images.
<!-- /results:qat_expected -->
"""

import ml_collections

from configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "qf_relu"
    c = train_base.imagenette_config(variant)
    c.init_from = f"checkpoint:/tmp/imagenette_{variant}"
    c.qat.enabled = True
    c.qat.scheme = "tf8"
    c.qat.ema_decay = 0.99
    c.qat.quant_delay_steps = 0
    steps_per_epoch = 9469 // c.batch_size
    c.qat.bn_freeze_step = 2 * steps_per_epoch
    c.num_epochs = 5.0
    c.learning_rate = 0.005
    c.warmup_epochs = 0.0
    c.lr_schedule = "cosine"
    c.eval_every_steps = steps_per_epoch
    return c
