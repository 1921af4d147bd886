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

Expected time on the 2-core CPU machine: 90-220 training images/s measured while other jobs
shared it (110 for the original block, 130 for qf at load ~4), i.e. 45-100 s an epoch, about
45 min for the 30 epochs plus evaluation and about 3 h for all four variants one after the other.
Expected accuracy: not measured here; a 300-step check of qf_relu (``--config.total_steps=300``,
so 2 epochs with the whole cosine) reached 36.4 % top-1 on the first 500 validation images.
"""

import ml_collections

from configs import train_base


def get_config() -> ml_collections.ConfigDict:
    return train_base.imagenette_config("qf_relu6")
