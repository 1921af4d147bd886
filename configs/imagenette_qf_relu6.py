"""Imagenette (10 classes), MobileNetV1 0.5/128, core layer proposed 1: DW→PW→BN→ReLU6.

The small-scale, CPU-sized counterpart of configs/imagenet_qf_relu6.py for the four-variant
comparison (the paper's Figure 5 at small scale, configs/figure5.py): width 0.5, 128 px,
batch 64, SGD momentum 0.9, learning rate 0.05 with 1 warmup epoch then cosine, label smoothing
0.1, weight decay 4e-5, BN decay 0.99, 30 epochs (4410 steps), evaluation on the 3,925
validation images every 5 epochs, checkpoints every epoch (a restart in the same workdir
resumes). The float model then goes through PTQ, or QAT with configs/qat_imagenette.py:qf_relu6.

Command:

    python launch/main.py --config configs/imagenette_qf_relu6.py \\
        --workdir /tmp/imagenette_qf_relu6

Expected time on the 2-core CPU machine: about 270-280 training images/s when it runs alone
(about 20 min for the 30 epochs plus evaluation), 90-220 while other jobs share the machine.
Expected accuracy (the figure5 job, TF8 per-tensor PTQ):
<!-- results:figure5_expected_qf_relu6 -->
Expected (results/figure5/summary.json, measured 2026-12-04 13:40 UTC on Intel(R) Xeon(R)
Processor (2 cores)): qf_relu6 top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std
over 3 seeds): 77.55 ± 0.91 / 77.44 ± 0.95 / 77.56 ± 0.86.
<!-- /results:figure5_expected_qf_relu6 -->
See docs/figure5.md.
"""

import ml_collections

from configs import train_base


def get_config() -> ml_collections.ConfigDict:
    return train_base.imagenette_config("qf_relu6")
