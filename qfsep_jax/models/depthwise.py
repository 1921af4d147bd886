"""Depthwise 3×3 convolution: XLA's grouped conv, or shifted multiply-adds.

XLA:CPU runs grouped convolutions (and above all their backward pass) slowly, while TPU and GPU
run them well. ``impl="shift"`` writes the depthwise conv as k*k shifted slices of the padded
input times per-channel weights, which XLA fuses into elementwise loops. Both use TF "SAME"
padding geometry and are numerically equivalent up to float summation order.
``impl="auto"`` picks ``shift`` on CPU and ``lax`` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "lax", "shift")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_impl(impl: str) -> str:
    """Maps ``auto`` to the implementation that is fast on the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise impl {impl!r}; choose from {IMPLS}")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "lax"
    return impl


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
    """Depthwise conv of NHWC ``x`` with a ``(k, k, 1, C)`` kernel, TF "SAME" padding."""
    impl = resolve_impl(impl)
    channels = x.shape[-1]
    if kernel.shape[2] != 1 or kernel.shape[3] != channels:
        raise ValueError(
            f"depthwise kernel must have shape (k, k, 1, {channels}), got {kernel.shape}"
        )
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )
    return _depthwise_shift(x, kernel, stride)


def _depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    kh, kw = kernel.shape[0], kernel.shape[1]
    _, h, w, _ = x.shape
    ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    out_h, out_w = -(-h // stride), -(-w // stride)
    acc = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (
                    xp.shape[0],
                    i + (out_h - 1) * stride + 1,
                    j + (out_w - 1) * stride + 1,
                    xp.shape[3],
                ),
                (1, stride, stride, 1),
            )
            term = tap * kernel[i, j, 0]
            acc = term if acc is None else acc + term
    return acc
