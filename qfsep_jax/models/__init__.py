"""MobileNetV1 models with the original and the quantization-friendly separable blocks."""

from qfsep_jax.models.layers import ActQuant, ConvLayer
from qfsep_jax.models.mobilenet_v1 import MobileNetV1, QFSeparableBlock, SeparableBlock
from qfsep_jax.models.names import layer_path, layer_paths, tfslim_name

__all__ = [
    "ActQuant",
    "ConvLayer",
    "MobileNetV1",
    "QFSeparableBlock",
    "SeparableBlock",
    "layer_path",
    "layer_paths",
    "tfslim_name",
]
