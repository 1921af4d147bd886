"""Shared base of the training configs (``job = "train"``, :mod:`qfsep_jax.train`).

Defaults are TF-slim's MobileNetV1 recipe (``mobilenet_v1_train.py`` / ``mobilenet_v1_arg_scope``)
at the paper's batch size 128: plain SGD, learning rate 0.045 decayed by 0.94 every 2.5 epochs
(staircase), L2 weight decay 4e-5 on conv/pointwise/classifier kernels and none on depthwise
kernels, BN decay 0.9997 and epsilon 0.001, dropout keep 0.999, inception crop + flip, eval central
crop 87.5 %, inputs scaled to [-1, 1]. Variants override fields; any field can be overridden on
the command line (``--config.batch_size=256``).
"""

import ml_collections
from ml_collections import config_dict

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.data_config()
    c.job = "train"
    c.seed = 0

    # Data. Specs: 'folder:<path under data_dir>' or 'tfds:<name>:<split>'.
    c.train_data = "folder:imagenette/train"
    c.eval_data = "folder:imagenette/val"
    c.label_space = "imagenette"
    c.num_classes = config_dict.placeholder(int)  # None: the label space's class count
    c.image_size = 224
    c.crop_area_range = (0.05, 1.0)  # TF-slim inception preprocessing
    c.crop_aspect_ratio_range = (0.75, 1.33)
    c.shuffle_buffer = 10_000  # streaming (tfds) sources only
    c.prefetch_batches = 2  # batches kept in flight on the devices
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 128  # global
    c.eval_limit = config_dict.placeholder(int)  # evaluate only the first N images (all processes)
    c.num_devices = config_dict.placeholder(int)  # single process: use the first N local devices

    # Model (MobileNetV1 attributes).
    c.model = ml_collections.ConfigDict()
    c.model.width_multiplier = 1.0
    c.model.block = "original"  # original | qf | a registered name (docs/extending.md)
    c.model.activation = "relu6"  # relu6 | relu | a registered name (docs/extending.md)
    c.model.depthwise_bias = True  # qf block only
    c.model.stem_stride = 2
    c.model.bn_momentum = 0.9997
    c.model.bn_epsilon = 1e-3
    c.model.depthwise_impl = "auto"
    # Mixed precision (qfsep_jax/precision.py): True = bfloat16 convolutions and activations with
    # float32 parameters, statistics, loss and quantization; None = bfloat16 on GPU/TPU, float32
    # on CPU. The run's config.json records the resolved value.
    c.half_precision = config_dict.placeholder(bool)
    # Initial weights: '' (random), 'checkpoint:<workdir of a float run>' or
    # 'tfslim:<.pb or TF1 checkpoint, relative to data_dir>' (its architecture replaces c.model's).
    c.init_from = ""

    # Optimization.
    c.optimizer = "sgd"  # sgd | momentum | rmsprop
    c.learning_rate = 0.045
    c.lr_schedule = "exponential"  # exponential | cosine | constant
    c.lr_decay_rate = 0.94
    c.lr_decay_epochs = 2.5
    c.lr_staircase = True
    c.warmup_epochs = 0.0
    c.momentum = 0.9  # momentum and rmsprop
    c.rmsprop_decay = 0.9
    c.rmsprop_epsilon = 1.0
    c.weight_decay = 4e-5
    c.depthwise_weight_decay = 0.0  # the paper's third change sets this > 0
    c.label_smoothing = 0.0
    c.dropout_rate = 0.001  # before the classifier; TF-slim: keep_prob 0.999
    c.num_epochs = 150.0
    c.total_steps = config_dict.placeholder(int)  # overrides num_epochs

    # Quantization-aware training.
    c.qat = ml_collections.ConfigDict()
    c.qat.enabled = False
    c.qat.scheme = "tf8"  # tf8 | int8
    c.qat.per_channel_weights = False
    c.qat.weight_bits = 8  # 2..8: fewer weight codes (stored in uint8/int8)
    c.qat.act_bits = 8  # 2..8: fewer activation codes; below 8 the TFLite export refuses
    c.qat.ema_decay = 0.999  # TF contrib.quantize's moving-average range decay
    c.qat.quant_delay_steps = 0  # fake-quantize from this step on (ranges are observed before)
    c.qat.bn_freeze_step = -1  # freeze BN statistics (correction-and-freeze) here; -1: never
    c.qat.integer = True  # at the end: score the exported model in the integer-only pass

    # Logging and checkpoints.
    c.log_every_steps = 100
    c.eval_every_steps = 0  # 0: evaluate at the end only; negative: never
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.halt_after_steps = config_dict.placeholder(int)  # stop (resumably) after this step

    # Multi-process (see qfsep_jax/distributed.py).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.mode = "auto"  # auto | on | off
    c.distributed.coordinator_address = ""  # empty: detected (TPU pod, SLURM, ...)
    c.distributed.num_processes = -1
    c.distributed.process_id = -1
    return c


# The paper's four core layers (Sheng et al. 2018, Table 3 / section 5). The L2 coefficient on
# depthwise weights is not reported; [choice] the same 4e-5 as the other kernels.
VARIANTS = {
    "original": dict(block="original", activation="relu6", depthwise_weight_decay=0.0),
    "qf_relu6": dict(block="qf", activation="relu6", depthwise_weight_decay=0.0),
    "qf_relu": dict(block="qf", activation="relu", depthwise_weight_decay=0.0),
    "qf_relu_l2dw": dict(block="qf", activation="relu", depthwise_weight_decay=4e-5),
}
IMAGENET_TRAIN_IMAGES = 1_281_167


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sets the core-layer fields of one of :data:`VARIANTS`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    c.variant = variant
    c.model.block = v["block"]
    c.model.activation = v["activation"]
    c.depthwise_weight_decay = v["depthwise_weight_decay"]
    return c


def imagenet_config(variant: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet2012 (tfds ``imagenet2012`` from ``manual_dir``), TF-slim recipe at batch 128.

    ``arg``: None (batch 128, the paper's setting, e.g. one 8-GPU host) or ``"pod"`` (global
    batch 4096 for a TPU pod slice: SGD momentum 0.9 at the linearly scaled equivalent of
    TF-slim's learning rate, 5 warmup epochs, the same 0.94-per-2.5-epochs decay).
    """
    c = apply_variant(get_config(), variant)
    c.train_data = "tfds:imagenet2012:train"
    c.eval_data = "tfds:imagenet2012:validation"
    c.label_space = "imagenet1001"  # tfds's wnids → TF-slim's 1001 classes (0 = background)
    c.image_size = 224
    c.batch_size = 128
    c.eval_batch_size = 200
    c.num_epochs = 150.0  # [choice] not reported by the paper
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
    c.log_every_steps = 100
    c.eval_every_steps = 5 * steps_per_epoch
    c.checkpoint_every_steps = 5000
    if arg == "pod":
        c.batch_size = 4096
        c.eval_batch_size = 1024
        c.optimizer = "momentum"
        # Plain SGD at 0.045 ~ momentum 0.9 at 0.0045 (batch 128), scaled by 4096 / 128.
        c.learning_rate = 0.0045 * c.batch_size / 128
        c.warmup_epochs = 5.0
        c.shuffle_buffer = 50_000
        c.eval_every_steps = 5 * (IMAGENET_TRAIN_IMAGES // c.batch_size)
        c.checkpoint_every_steps = 1000
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use nothing or 'pod'")
    return c


# Measured on the shared 2-core CPU machine (other jobs running, load ~4), 128 px, width 0.5,
# batch 64, depthwise 'shift': ~110 images/s (original block), ~130 images/s (qf block).
def imagenette_config(variant: str) -> ml_collections.ConfigDict:
    """Imagenette at small scale for CPU: width 0.5, 128 px, batch 64, 30 epochs, cosine."""
    c = apply_variant(get_config(), variant)
    c.train_data = "folder:imagenette/train"
    c.eval_data = "folder:imagenette/val"
    c.label_space = "imagenette"
    c.image_size = 128
    c.crop_area_range = (0.08, 1.0)  # [choice] small data: the usual inception crop range
    c.model.width_multiplier = 0.5
    # [choice] TF-slim's BN decay 0.9997 averages over ~3,300 steps: in a 4,410-step run the
    # moving statistics would still be mostly their initial values at evaluation time.
    c.model.bn_momentum = 0.99
    c.batch_size = 64
    c.eval_batch_size = 125
    c.optimizer = "momentum"
    c.learning_rate = 0.05
    c.lr_schedule = "cosine"
    c.warmup_epochs = 1.0
    c.label_smoothing = 0.1
    c.num_epochs = 30.0
    steps_per_epoch = 9469 // c.batch_size
    c.log_every_steps = 50
    c.eval_every_steps = 5 * steps_per_epoch
    c.checkpoint_every_steps = steps_per_epoch
    return c
