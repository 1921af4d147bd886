"""MobileNetV1 with the original and the quantization-friendly separable blocks.

Layer names follow TF-slim (``Conv2d_0``, ``Conv2d_{i}`` blocks with ``depthwise`` and
``pointwise`` layers, ``Logits``), so that imported checkpoints and analysis outputs share keys:
the TF-slim name of ``("Conv2d_1", "depthwise")`` is ``Conv2d_1_depthwise``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.models.activations import Activation, get_activation
from qfsep_jax.models.layers import ActQuant, ConvLayer, _check_mode, _where
from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.numerics import IntRange
from qfsep_jax.quant.scheme import INPUT_NAME, QuantConfig

# (output depth, stride) of the 13 separable blocks (paper's Table 2, last block stride 1).
BLOCK_SPECS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


class SeparableBlockBase(nn.Module):
    """The base class of MobileNetV1's 13 separable blocks, built-in and user-defined.

    A block class subclasses this and is given to ``MobileNetV1(block=...)`` directly or by a
    name registered with :func:`register_block`. :class:`MobileNetV1` builds block ``i`` as
    ``cls(features, stride=..., activation=..., depthwise_bias=..., name=f"Conv2d_{i}",
    bn_folded=..., bn_momentum=..., bn_epsilon=..., quant=..., axis_name=...,
    depthwise_impl=...)`` (the attributes below) and calls it as
    ``block(x, train=..., quant_mode=..., bn_frozen=..., quant_active=...)`` on NHWC ``x``; it
    returns NHWC activations with ``features`` channels.

    A block must build every layer with weights from :class:`ConvLayer` through
    ``self._layer(name, features=..., kernel_size=..., stride=..., depthwise=..., use_bn=...,
    use_bias=..., activation=...)``, which hands down the model-wide attributes (BN folding,
    quantization scheme, pmap axis, depthwise implementation) and pass every layer the
    ``__call__`` keywords: that is what makes PTQ, QAT, BN folding and the integer pass work.
    The layers must form a chain (each takes the previous one's output, nothing computed in
    between: the integer pass follows the chain of ``ConvLayer`` calls and refuses anything
    else), and the last one must be called ``pointwise`` (the model re-rounds the global pool
    on its output grid). Named ``depthwise`` and ``pointwise``, the layers get the TF-slim
    names ``Conv2d_{i}_depthwise``/``Conv2d_{i}_pointwise`` that analysis tables and
    :func:`~qfsep_jax.models.names.layer_path` use. ``activation`` is a registered name or an
    :class:`~qfsep_jax.models.activations.Activation`; pass it on to the layers.
    """

    features: int
    stride: int = 1
    activation: str | Activation = "relu6"
    depthwise_bias: bool = True
    bn_folded: bool = False
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-3
    quant: QuantConfig | None = None
    axis_name: str | None = None
    depthwise_impl: str = "auto"

    def _layer(self, name: str, **kw) -> ConvLayer:
        """A :class:`ConvLayer` called ``name`` with the block's model-wide attributes and
        ``kw`` (``features``, ``kernel_size``, ``stride``, ``depthwise``, ``use_bn``,
        ``use_bias``, ``activation``, ``quantize_output``)."""
        common = dict(
            bn_folded=self.bn_folded,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            quant=self.quant,
            axis_name=self.axis_name,
            depthwise_impl=self.depthwise_impl,
        )
        return ConvLayer(name=name, **common, **kw)


class SeparableBlock(SeparableBlockBase):
    """The original block: DW 3×3 → BN → act → PW 1×1 → BN → act."""

    def _depthwise_activation(self):
        return self.activation

    @nn.compact
    def __call__(self, x, train=False, quant_mode="float", bn_frozen=False, quant_active=True):
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        x = self._layer(
            "depthwise",
            features=x.shape[-1],
            kernel_size=3,
            stride=self.stride,
            depthwise=True,
            activation=self._depthwise_activation(),
        )(x, **kw)
        return self._layer(
            "pointwise", features=self.features, kernel_size=1, activation=self.activation
        )(x, **kw)


class QFSeparableBlock(SeparableBlockBase):
    """The quantization-friendly block: DW 3×3 (+ optional bias) → PW 1×1 → BN → act.

    The depthwise output has no BN and no activation; it is still quantized (it is a tensor of
    the 8-bit pipeline).
    """

    def _depthwise_activation(self):
        return "none"

    @nn.compact
    def __call__(self, x, train=False, quant_mode="float", bn_frozen=False, quant_active=True):
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        x = self._layer(
            "depthwise",
            features=x.shape[-1],
            kernel_size=3,
            stride=self.stride,
            depthwise=True,
            use_bn=False,
            use_bias=self.depthwise_bias,
            activation=self._depthwise_activation(),
        )(x, **kw)
        return self._layer(
            "pointwise", features=self.features, kernel_size=1, activation=self.activation
        )(x, **kw)


class LinearDepthwiseBlock(SeparableBlock):
    """The original block without the depthwise activation: DW 3×3 → BN → PW 1×1 → BN → act.

    An ablation between the two blocks: it keeps the depthwise BN (and its zero-variance
    channels) but, like the QF block, feeds the depthwise output to the pointwise conv linearly.
    """

    def _depthwise_activation(self):
        return "none"


class ActivatedDepthwiseBlock(QFSeparableBlock):
    """The original block without the depthwise BN: DW 3×3 (+ bias) → act → PW 1×1 → BN → act.

    The other ablation between the two blocks: it keeps the depthwise activation but, like the
    QF block, has no depthwise BN (so no zero-variance channels to fold).
    """

    def _depthwise_activation(self):
        return self.activation


_BLOCKS: dict[str, type[SeparableBlockBase]] = {
    "original": SeparableBlock,
    "qf": QFSeparableBlock,
    "original_linear_dw": LinearDepthwiseBlock,
    "original_nobn_dw": ActivatedDepthwiseBlock,
}


def block_names() -> tuple[str, ...]:
    """The registered block names (``original``, ``qf``, then the user's), in order."""
    return tuple(_BLOCKS)


def register_block(name: str, cls: type[SeparableBlockBase]) -> type[SeparableBlockBase]:
    """Registers block class ``cls`` under ``name`` (for configs and saved models); returns it.

    Raises TypeError if ``name`` is not a non-empty string or ``cls`` not a subclass of
    :class:`SeparableBlockBase`, ValueError if the name is taken.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_block: name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, SeparableBlockBase)):
        raise TypeError(
            f"register_block({name!r}, ...): {cls!r} is not a subclass of SeparableBlockBase"
        )
    if name in _BLOCKS:
        raise ValueError(
            f"block name {name!r} is already registered (to {_BLOCKS[name].__qualname__}); "
            f"registered: {block_names()}"
        )
    _BLOCKS[name] = cls
    return cls


def unregister_block(name: str) -> None:
    """Removes a user-registered block name (``original`` and ``qf`` stay)."""
    if name in ("original", "qf"):
        raise ValueError(f"block {name!r} is built in and cannot be unregistered")
    if name not in _BLOCKS:
        raise ValueError(f"block {name!r} is not registered (registered: {block_names()})")
    del _BLOCKS[name]


def block_class(block: str | type[SeparableBlockBase]) -> type[SeparableBlockBase]:
    """The block class for a registered name, or ``block`` itself if it is a block class."""
    if isinstance(block, type) and issubclass(block, SeparableBlockBase):
        return block
    if isinstance(block, str) and block in _BLOCKS:
        return _BLOCKS[block]
    raise ValueError(
        f"unknown block {block!r}: give a registered name {block_names()} or a subclass of "
        "SeparableBlockBase (register a name with register_block)"
    )


def block_name(block: str | type[SeparableBlockBase]) -> str:
    """The registered name of a block (name or class), as saved models and configs hold it.

    Raises ValueError for a class that is not registered (register it under a name in the
    saving and the loading process).
    """
    cls = block_class(block)
    if isinstance(block, str):
        return block
    for name, registered in _BLOCKS.items():
        if registered is cls:
            return name
    raise ValueError(
        f"block class {cls.__module__}.{cls.__qualname__} is not registered; call "
        "register_block(name, cls) (where the model is saved and where it is loaded) so that "
        "it can be saved by name"
    )


def scaled_depth(depth: int, width_multiplier: float, min_depth: int = 8) -> int:
    """TF-slim's channel count for a width multiplier: max(int(d * width), min_depth)."""
    return max(int(depth * width_multiplier), min_depth)


class MobileNetV1(nn.Module):
    """MobileNetV1 for any input size (global average pool before the 1×1 classifier).

    Attributes:
      num_classes: classifier outputs (1001 for TF-slim ImageNet checkpoints).
      width_multiplier: TF-slim depth multiplier.
      block: a registered block name (``original``; ``qf``, the paper's quantization-friendly
        block; see :func:`register_block`) or a :class:`SeparableBlockBase` subclass.
      activation: a registered activation name (``relu6``, ``relu``, ``none``, ``hard_swish``,
        see :mod:`qfsep_jax.models.activations`) or an
        :class:`~qfsep_jax.models.activations.Activation`, used by every layer but the
        classifier.
      depthwise_bias: whether the ``qf`` block's depthwise conv has a bias.
      dropout_rate: dropout before the classifier (TF-slim: keep_prob 0.999).
      stem_stride: stride of ``Conv2d_0`` (1 for 32 px inputs).
      bn_folded: the variables hold folded kernels and biases (after PTQ folding).
      quant: the quantization scheme; needed by every ``quant_mode`` but ``float``.
      axis_name: pmap axis for cross-replica BN statistics and range observers.
      depthwise_impl: ``auto``, ``lax``, ``shift`` or ``native`` (see
        :mod:`qfsep_jax.models.depthwise`); ``auto`` is ``native`` on CPU (``shift`` where it
        cannot be built), ``lax`` on GPU/TPU. It also picks the stem conv's
        lowering (:func:`~qfsep_jax.models.layers.conv2d`) and, where it resolves to
        ``native``, BN's training sums in C++ (:func:`~qfsep_jax.models.layers.native_bn_sums`).
      dtype: the compute dtype of the convolutions and activations (``"bfloat16"`` for mixed
        precision), ``None`` for the input's dtype. Parameters, BN statistics, quantization
        ranges and codes stay float32 (:mod:`qfsep_jax.precision`); the input quantizer sees
        the float32 images, and the global pool, its re-quantization and the classifier (0.2 %
        of the multiply-adds) run in float32, so the logits are float32. In bfloat16, ``auto``
        is ``lax`` on every backend (XLA's convolutions accumulate in float32, the shifted
        multiply-adds would sum in bfloat16) with XLA's BN sums; ``native`` by name raises (its
        kernels are float32), ``shift`` by name sums its taps in bfloat16.
    """

    num_classes: int = 1001
    width_multiplier: float = 1.0
    min_depth: int = 8
    block: str | type[SeparableBlockBase] = "original"
    activation: str | Activation = "relu6"
    depthwise_bias: bool = True
    dropout_rate: float = 0.001
    stem_stride: int = 2
    bn_folded: bool = False
    bn_momentum: float = 0.9997
    bn_epsilon: float = 1e-3
    quant: QuantConfig | None = None
    axis_name: str | None = None
    depthwise_impl: str = "auto"
    dtype: str | None = None

    def __post_init__(self) -> None:
        block_class(self.block)  # clear errors at construction for a bad block or activation
        get_activation(self.activation)
        super().__post_init__()

    def pool_int_range(self) -> IntRange:
        """The code range of the pooled tensor: the last conv's output range (its bits)."""
        return self.quant.for_layer(f"Conv2d_{len(BLOCK_SPECS)}_pointwise").act_int_range

    def _requantize_pool(
        self, pooled: jax.Array, lo: jax.Array, hi: jax.Array, window: int
    ) -> jax.Array:
        """The pooled means rounded to the last layer's output grid ``[lo, hi]``.

        TFLite's integer average pool keeps its input's scale and zero point, so the simulation
        re-rounds there. ``window`` (values averaged per output) is for callers that intercept
        this method to model the integer pool's tie rule
        (:func:`qfsep_jax.integer.align.aligned`).
        """
        del window
        return fake_quant(pooled, lo, hi, self.pool_int_range())

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        train: bool = False,
        quant_mode: str = "float",
        bn_frozen=False,
        quant_active=True,
    ) -> jax.Array:
        """Logits ``[batch, num_classes]`` for NHWC float images scaled to [-1, 1]."""
        _check_mode(quant_mode, self.quant)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
        kw = dict(
            train=train, quant_mode=quant_mode, bn_frozen=bn_frozen, quant_active=quant_active
        )
        common = dict(
            bn_folded=self.bn_folded,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            quant=self.quant,
            axis_name=self.axis_name,
            depthwise_impl=self.depthwise_impl,
        )
        input_quant = None if self.quant is None else self.quant.for_layer(INPUT_NAME)
        x = ActQuant(input_quant, self.axis_name, name="input_quant")(
            images, quant_mode, train, quant_active
        )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = ConvLayer(
            scaled_depth(32, self.width_multiplier, self.min_depth),
            kernel_size=3,
            stride=self.stem_stride,
            activation=self.activation,
            name="Conv2d_0",
            **common,
        )(x, **kw)
        block_cls = block_class(self.block)
        blk = None
        for i, (depth, stride) in enumerate(BLOCK_SPECS, start=1):
            blk = block_cls(
                scaled_depth(depth, self.width_multiplier, self.min_depth),
                stride=stride,
                activation=self.activation,
                depthwise_bias=self.depthwise_bias,
                name=f"Conv2d_{i}",
                **common,
            )
            x = blk(x, **kw)
        window = x.shape[1] * x.shape[2]
        last_out = x
        x = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.promote_types(x.dtype, jnp.float32))
        if quant_mode in ("fake", "qat") and not self.is_initializing():
            # TFLite's integer average pool keeps the input's (scale, zero point): re-round.
            if self.quant.dynamic_activation_ranges:
                # Each image's own grid: the range of the last layer's quantized output.
                axes = tuple(range(1, last_out.ndim))
                lo = jax.lax.stop_gradient(jnp.min(last_out, axis=axes).astype(jnp.float32))
                hi = jax.lax.stop_gradient(jnp.max(last_out, axis=axes).astype(jnp.float32))
                pooled_q = fake_quant(x, lo, hi, self.pool_int_range(), axis=0)
            else:
                ranges = blk.variables["quant_ranges"]
                if "act_quant" not in ranges.get("pointwise", {}):
                    raise ValueError(
                        f"block {block_cls.__qualname__}: its last layer must be a ConvLayer "
                        "named 'pointwise' with an output quantizer (the pool re-rounds on its "
                        "grid)"
                    )
                last = ranges["pointwise"]["act_quant"]
                pooled_q = self._requantize_pool(x, last["min"], last["max"], window)
            pooled_q = x + jax.lax.stop_gradient(pooled_q - x) if train else pooled_q
            x = _where(quant_active, pooled_q, x)  # no rounding during a QAT quant delay
        if train and self.dropout_rate > 0 and not self.is_initializing():
            if not self.has_rng("dropout"):
                raise ValueError(
                    f"train=True with dropout_rate={self.dropout_rate} needs a dropout RNG: "
                    "pass rngs={'dropout': key} to apply, or build the model with dropout_rate=0"
                )
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = ConvLayer(
            self.num_classes,
            kernel_size=1,
            use_bn=False,
            use_bias=True,
            activation="none",
            name="Logits",
            **common,
        )(x, **kw)
        return jnp.reshape(x, (x.shape[0], self.num_classes))


def random_variables(model: MobileNetV1, image_size: int, seed: int = 0) -> dict:
    """Random ``params`` and ``batch_stats`` for ``model``, without compiling ``model.init``.

    He-normal kernels; normal (std 0.2) biases, BN offsets and moving means; uniform [0.5, 1.5]
    BN scales and moving variances. Unlike a fresh initialisation (BN mean 0, variance 1), BN
    folding then changes every channel: for tests and benchmarks of quantized models.
    """
    rng = np.random.default_rng(seed)
    shape = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), shape)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if "mean" in name or "bias" in name:
            return rng.normal(0, 0.2, leaf.shape).astype(np.float32)
        return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)  # BN scales, variances

    return jax.tree_util.tree_map_with_path(
        fill, {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
    )
