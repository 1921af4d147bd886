"""Imagenette, MobileNetV1 0.5/128, core layer proposed 3: DW→PW→BN→ReLU + L2 on DW weights.

The depthwise L2 coefficient is not reported by the paper: [choice] 4e-5, as for the other kernels.

The small-scale, CPU-sized counterpart of configs/imagenet_qf_relu_l2dw.py for the four-variant
comparison (the paper's Figure 5 at small scale, configs/figure5.py): width 0.5, 128 px,
batch 64, SGD momentum 0.9, learning rate 0.05 with 1 warmup epoch then cosine, label smoothing
0.1, weight decay 4e-5, BN decay 0.99, 30 epochs (4410 steps), evaluation on the 3,925
validation images every 5 epochs, checkpoints every epoch (a restart in the same workdir
resumes). The float model then goes through PTQ, or QAT with configs/qat_imagenette.py:qf_relu_l2dw.

Command:

    python launch/main.py --config configs/imagenette_qf_relu_l2dw.py \\
        --workdir /tmp/imagenette_qf_relu_l2dw

Expected time on the 2-core CPU machine: about 270-280 training images/s when it runs alone
(about 20 min for the 30 epochs plus evaluation), 90-220 while other jobs share the machine.
Expected accuracy (the figure5 job, TF8 per-tensor PTQ):
<!-- results:figure5_expected_qf_relu_l2dw -->
Expected (results/figure5/summary.json, measured 2026-12-04 13:40 UTC on Intel(R) Xeon(R)
Processor (2 cores)): qf_relu_l2dw top-1 % (float / 8-bit fake-quant / 8-bit integer, mean ± std
over 3 seeds): 77.66 ± 0.25 / 77.65 ± 0.27 / 77.79 ± 0.31.
<!-- /results:figure5_expected_qf_relu_l2dw -->
See docs/figure5.md.
"""

import ml_collections

from configs import train_base


def get_config() -> ml_collections.ConfigDict:
    return train_base.imagenette_config("qf_relu_l2dw")
