"""ImageNet, MobileNetV1 1.0/224, core layer proposed 3: DW→PW→BN→ReLU + L2 on DW weights.

The depthwise L2 coefficient is not reported by the paper: [choice] 4e-5, as for the other kernels.

TF-slim recipe at the paper's batch size 128 (see configs/train_base.py): plain SGD, learning
rate 0.045 decayed by 0.94 every 2.5 epochs, weight decay 4e-5, 150 epochs ([choice]), inception
crop + flip, eval central crop 87.5 %, 1001 classes. Data: tfds ``imagenet2012`` prepared from
the ILSVRC2012 tars in ``manual_dir``. ``:pod`` is the TPU-pod-sized version (global batch 4096,
momentum 0.9 at the linearly scaled rate 0.144, 5 warmup epochs, same decay).

Commands (README has the multi-host details):

    # one host, all its GPUs (the global batch of 128 is split over them)
    python launch/main.py --config configs/imagenet_qf_relu_l2dw.py \\
        --workdir /shared/runs/imagenet_qf_relu_l2dw \\
        --config.manual_dir=/data/imagenet --config.tfds_data_dir=/data/tfds
    # TPU pod slice: the same command on every host
    python launch/main.py --config configs/imagenet_qf_relu_l2dw.py:pod \\
        --workdir /shared/runs/imagenet_qf_relu_l2dw_pod \\
        --config.tfds_data_dir=/data/tfds --config.distributed.mode=on

Expected (the paper's results table, ImageNet val top-1): float 70.77 %, 8-bit post-training
68.03 %. Not run in this project (no accelerator); time not measured.
"""

import ml_collections

from configs import train_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return train_base.imagenet_config("qf_relu_l2dw", arg)
