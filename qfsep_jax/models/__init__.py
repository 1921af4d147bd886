"""MobileNetV1 models with the original and the quantization-friendly separable blocks."""

from qfsep_jax.models.activations import Activation, get_activation, register_activation
from qfsep_jax.models.layers import ActQuant, ConvLayer
from qfsep_jax.models.mobilenet_v1 import (
    MobileNetV1,
    QFSeparableBlock,
    SeparableBlock,
    SeparableBlockBase,
    register_block,
)
from qfsep_jax.models.names import layer_path, layer_paths, tfslim_name

__all__ = [
    "ActQuant",
    "Activation",
    "ConvLayer",
    "MobileNetV1",
    "QFSeparableBlock",
    "SeparableBlock",
    "SeparableBlockBase",
    "get_activation",
    "layer_path",
    "layer_paths",
    "register_activation",
    "register_block",
    "tfslim_name",
]
