"""Depthwise convolution: XLA's grouped conv, shifted multiply-adds, or native CPU kernels.

XLA:CPU runs grouped convolutions (``feature_group_count == channels``), and above all their
backward pass, one to two orders of magnitude slower than the arithmetic needs; TPU and GPU run
them well. ``impl="shift"`` writes the depthwise conv as ``k*k`` shifted slices of the zero-padded
input times per-channel weights, which XLA fuses into one elementwise loop, and gives it a
custom VJP made of the same kind of loops:

* input gradient: the transposed conv. Stride 1: the upstream gradient padded and correlated
  with the flipped kernel (``k*k`` shifted multiply-adds). Stride > 1: each tap's contribution is
  the gradient dilated by the stride and shifted (one pad per tap), summed in one loop;
* kernel gradient: per tap, products of the shifted input and the gradient summed over
  ``4x4`` output blocks inside an elementwise loop, then one reduction over the stacked taps;
  on large inputs over batch chunks that stay in cache (:func:`_kernel_grad`).

The padded input is the saved residual (the activation is written once), and the kernel is
materialized before the loops (:func:`_materialize`) so that a fake-quantized kernel is not
recomputed per output element. :func:`direct_conv2d` applies the same shifted slices to the
3-channel stem conv (its forward pass; with ``native``, its kernel gradient is a C++ custom call
too).

``impl="native"`` runs 3x3 float32 depthwise layers on XLA:CPU as two C++ custom calls
(:mod:`qfsep_jax.models.native`, ``csrc/cpu_kernels.cc``): the forward pass reads the input
once (padding is a bounds check); the backward pass writes the input gradient as a gather and
sums the kernel gradient along each output row in registers (speed against the others:
``tools/bench_depthwise.py``, docs/performance.md). First-order gradients only (its backward pass is
itself a custom call); for higher-order derivatives use ``shift`` or ``lax``.

The same library holds batch norm's training sums (:func:`qfsep_jax.models.layers.native_bn_sums`,
used where the model's impl resolves to ``native``).

All implementations use TF "SAME" padding geometry (stride 2, even size: no row/column before,
one after) and agree up to float summation order. ``impl="auto"`` picks ``native`` on CPU where
it builds (else ``shift``, and ``shift`` for what ``native`` does not cover: other kernel sizes,
other dtypes) and ``lax`` elsewhere (GPU, TPU), see :func:`resolve_impl`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.models import native
from qfsep_jax.padding import same_padding

IMPLS = ("auto", "lax", "shift", "native")


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``backend`` (default: JAX's default backend).

    ``auto`` is ``native`` on CPU, where XLA's grouped convolution is slow (``shift`` where the
    native kernels cannot be built), and ``lax`` on GPU and TPU, where XLA's (cuDNN's) grouped
    convolution is fast.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown depthwise impl {impl!r}; choose from {IMPLS}")
    if impl == "auto":
        backend = backend or jax.default_backend()
        if backend != "cpu":
            return "lax"
        return "native" if native.available() else "shift"
    return impl


def native_supports(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether ``impl="native"`` covers this layer: float32 input and kernel, 3x3 kernel."""
    return x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and kernel.shape[:2] == (3, 3)


def native_applies(resolved: str, supported: bool, unsupported: str | None = None) -> bool:
    """Whether a layer runs a native kernel, given the resolved impl and whether it covers it.

    Raises where ``native`` cannot run: off CPU, or not built (with the reason); for a layer it
    does not cover, with the message ``unsupported`` if given (else the caller falls back).
    """
    if resolved != "native":
        return False
    if jax.default_backend() != "cpu":
        raise ValueError(f"impl 'native' runs on CPU only (backend: {jax.default_backend()})")
    if supported:
        if not native.available():
            raise RuntimeError(f"impl 'native' unavailable: {native.unavailable_reason()}")
        return True
    if unsupported is not None:
        raise ValueError(f"impl 'native' {unsupported}")
    return False


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
    """Depthwise conv of NHWC ``x`` with a ``(k, k, 1, C)`` kernel, TF "SAME" padding.

    Args:
      x: input ``[N, H, W, C]``.
      kernel: ``[kh, kw, 1, C]`` (HWIO with depth multiplier 1).
      stride: the same stride along both spatial axes.
      impl: ``auto``, ``lax`` (XLA grouped conv), ``shift`` (shifted multiply-adds) or
        ``native`` (C++ custom calls on CPU; float32, 3x3).

    Returns:
      ``[N, ceil(H / stride), ceil(W / stride), C]``.
    """
    requested, impl = impl, resolve_impl(impl)
    if x.ndim != 4:
        raise ValueError(f"depthwise conv needs NHWC input, got shape {x.shape}")
    channels = x.shape[-1]
    if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != channels:
        raise ValueError(
            f"depthwise kernel must have shape (k, k, 1, {channels}), got {kernel.shape}"
        )
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )
    # 'auto' takes 'shift' where 'native' does not cover the layer; asked for by name, it says so.
    unsupported = None
    if requested == "native":
        unsupported = (
            "covers float32 3x3 kernels only, got "
            f"{x.dtype}/{kernel.dtype} input/kernel with kernel shape {kernel.shape}"
        )
    if native_applies(impl, native_supports(x, kernel), unsupported):
        return _depthwise_native(x, kernel, stride)
    return _depthwise_shift(x, _materialize(kernel), stride, (x.shape[1], x.shape[2]))


def native_stem_supports(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether the native stem kernel gradient covers this conv: float32, 3x3, 1-4 channels in."""
    return native_supports(x, kernel) and 1 <= kernel.shape[2] <= 4


def direct_conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "shift") -> jax.Array:
    """A regular NHWC conv with few input channels (the RGB stem), TF "SAME" padding.

    Forward: ``kh*kw*Cin`` shifted slices of the padded input, each broadcast over the output
    channels and multiplied by a kernel row, in one elementwise loop (3-5x faster on XLA:CPU than
    its convolution for 3 input channels). Backward, over the padded input (the saved residual)
    as a VALID conv: the kernel gradient in a C++ custom call where ``impl`` resolves to
    ``native`` and it covers the conv (:func:`native_stem_supports`; XLA:CPU's convolution gains
    little from a second thread there), else XLA's convolution; the input gradient through XLA's
    convolution (the stem does not need it, and XLA drops it).
    """
    kh, kw, cin, _ = kernel.shape
    if x.ndim != 4 or x.shape[-1] != cin:
        raise ValueError(f"conv kernel {kernel.shape} expects NHWC input with {cin} channels")
    # Other kernel sizes, channel counts and dtypes take XLA's convolution, even where
    # ``native`` is asked for by name (it names the depthwise layers' implementation).
    use_native = native_applies(resolve_impl(impl), native_stem_supports(x, kernel))
    return _direct_conv(x, _materialize(kernel), stride, (x.shape[1], x.shape[2]), use_native)


def _valid_conv(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """XLA's conv of an already SAME-padded ``xp`` (no further padding)."""
    return jax.lax.conv_general_dilated(
        xp, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _direct_conv(
    x: jax.Array, kernel: jax.Array, stride: int, in_hw: tuple, use_native: bool
) -> jax.Array:
    del in_hw, use_native  # for the backward pass
    # Materialized: each input value feeds kh*kw*Cout products, so an elementwise producer (the
    # input fake-quant in QAT) fused into this loop would be recomputed that many times.
    return _direct_taps(_materialize(_pad_same(x, *kernel.shape[:2], stride)), kernel, stride)


def _direct_fwd(x, kernel, stride, in_hw, use_native):
    del in_hw, use_native
    # Under autodiff the padded input is the residual, which XLA writes once anyway; the
    # reduction in _materialize is not needed then, and on two threads XLA:CPU runs it slowly
    # (a 3-wide minor dimension: 31 ms of a 1.0/224 batch-32 step).
    xp = _pad_same(x, *kernel.shape[:2], stride)
    return _direct_taps(xp, kernel, stride), (xp, kernel)


def _direct_taps(xp: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The conv over the padded ``xp``: one elementwise loop of ``kh*kw*Cin`` broadcast products."""
    kh, kw, cin, _ = kernel.shape
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    acc = None
    for i in range(kh):
        for j in range(kw):
            tap = _tap(xp, i, j, out_h, out_w, stride)
            for c in range(cin):
                term = tap[..., c : c + 1] * kernel[i, j, c]
                acc = term if acc is None else acc + term
    return acc


def _direct_bwd(stride, in_hw, use_native, residuals, g):
    xp, kernel = residuals
    kh, kw, _, _ = kernel.shape
    h, w = in_hw
    (pt, _), (pl, _) = same_padding(h, kh, stride), same_padding(w, kw, stride)
    # The same conv as a VALID one over the padded input; the input gradient (which the stem
    # does not need, so XLA drops it) is cropped back to the unpadded input.
    if use_native:
        _, vjp = jax.vjp(lambda xp: _valid_conv(xp, kernel, stride), xp)
        (dxp,) = vjp(g)
        dk = jax.ffi.ffi_call(
            native.STEM_KERNEL_GRAD_TARGET,
            jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
            vmap_method="sequential",
        )(xp, g.astype(jnp.float32), stride=np.int64(stride))
    else:
        _, vjp = jax.vjp(lambda xp, k: _valid_conv(xp, k, stride), xp, kernel)
        dxp, dk = vjp(g)
    return dxp[:, pt : pt + h, pl : pl + w, :], dk


_direct_conv.defvjp(_direct_fwd, _direct_bwd)


def _materialize(v: jax.Array) -> jax.Array:
    """``v`` unchanged (``v + 0``), computed once instead of inside every consumer's loop.

    XLA:CPU fuses cheap elementwise producers into their consumers; a fake-quantized kernel
    (round, clamp, rescale of ``k*k*C`` values) used through a broadcast would be recomputed
    for every output element of the depthwise loop. A reduction is never fused into an
    elementwise consumer, so this exact identity makes XLA write the kernel once
    (``optimization_barrier`` is dropped by XLA:CPU).
    """
    return jnp.sum(jnp.stack([v, jnp.zeros_like(v)]), axis=0)


def _taps_valid(xp: jax.Array, k: jax.Array, out_h: int, out_w: int, stride: int) -> jax.Array:
    """``sum_ij xp[:, h*s + i, w*s + j, :] * k[i, j]`` over an already padded ``xp``."""
    kh, kw = k.shape[0], k.shape[1]
    acc = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, out_h, out_w, stride) * k[i, j]
            acc = term if acc is None else acc + term
    return acc


def _tap(xp: jax.Array, i: int, j: int, out_h: int, out_w: int, stride: int) -> jax.Array:
    """The ``(i, j)`` tap of every output position: ``xp[:, h*s + i, w*s + j, :]``."""
    return jax.lax.slice(
        xp,
        (0, i, j, 0),
        (xp.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, xp.shape[3]),
        (1, stride, stride, 1),
    )


def _pad_same(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    _, h, w, _ = x.shape
    ph, pw = same_padding(h, kh, stride), same_padding(w, kw, stride)
    return jnp.pad(x, ((0, 0), ph, pw, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int, in_hw: tuple) -> jax.Array:
    return _shift_fwd(x, kernel, stride, in_hw)[0]


def _shift_fwd(x, kernel, stride, in_hw):
    h, w = in_hw
    kh, kw = kernel.shape[0], kernel.shape[1]
    xp = _pad_same(x, kh, kw, stride)
    out = _taps_valid(xp, kernel[:, :, 0, :], -(-h // stride), -(-w // stride), stride)
    # The padded input is the residual: the forward loop reads it anyway, so the activation is
    # written to memory once (padded) rather than twice (padded and plain).
    return out, (xp, kernel)


def _shift_bwd(stride, in_hw, residuals, g):
    xp, kernel = residuals
    h, w = in_hw
    k = kernel[:, :, 0, :]
    kh, kw = k.shape[0], k.shape[1]
    out_h, out_w = g.shape[1], g.shape[2]
    (pt, _), (pl, _) = same_padding(h, kh, stride), same_padding(w, kw, stride)
    zero = jnp.zeros((), g.dtype)
    # Input gradient = the transposed conv. Pads below may be negative (a crop) where the SAME
    # padding left input positions unused.
    if stride == 1:
        # Pad g once, then a valid correlation with the flipped kernel: one loop over taps.
        lo_h, lo_w = kh - 1 - pt, kw - 1 - pl
        gd = jax.lax.pad(g, zero, ((0, 0, 0), (lo_h, pt, 0), (lo_w, pl, 0), (0, 0, 0)))
        dx = _taps_valid(gd, k[::-1, ::-1], h, w, 1)
    else:
        # Tap (i, j) sends g[q] to input row q*s + i - pt: g dilated by the stride and shifted,
        # one pad per tap, all fused into one loop (writing the dilated g first and correlating
        # it would move s*s times more data; measured 1.5-1.8x slower).
        dx = None
        for i in range(kh):
            for j in range(kw):
                lo_h, lo_w = i - pt, j - pl
                hi_h = h - (out_h - 1) * stride - 1 - lo_h
                hi_w = w - (out_w - 1) * stride - 1 - lo_w
                pads = ((0, 0, 0), (lo_h, hi_h, stride - 1), (lo_w, hi_w, stride - 1), (0, 0, 0))
                term = jax.lax.pad(g, zero, pads) * k[i, j]
                dx = term if dx is None else dx + term
    dk = _kernel_grad_chunked(xp, g, kh, kw, stride)
    return dx.astype(xp.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


def _kernel_grad_chunked(xp: jax.Array, g: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """:func:`_kernel_grad` summed over batch chunks of about ``_CHUNK_BYTES`` of input.

    The per-tap loops each read the whole input and gradient; over a chunk that fits in the
    cache the nine reads hit the cache instead of memory (2x faster on 224 px layers).
    """
    n = xp.shape[0]
    per_image = xp.size // n * xp.dtype.itemsize
    chunk = max([d for d in range(1, n + 1) if n % d == 0 and d * per_image <= _CHUNK_BYTES] or [1])
    if chunk == n:
        return _kernel_grad(xp, g, kh, kw, stride)

    def body(i, acc):
        xs = jax.lax.dynamic_slice_in_dim(xp, i * chunk, chunk, 0)
        gs = jax.lax.dynamic_slice_in_dim(g, i * chunk, chunk, 0)
        return acc + _kernel_grad(xs, gs, kh, kw, stride)

    zeros = jnp.zeros((kh * kw, xp.shape[-1]), jnp.promote_types(xp.dtype, g.dtype))
    return jax.lax.fori_loop(0, n // chunk, body, zeros)


def _kernel_grad(xp: jax.Array, g: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """``dk[i, j, c] = sum_{n,h,w} xp[n, h*s + i, w*s + j, c] * g[n, h, w, c]``, as ``[kh*kw, C]``.

    ``xp`` is the SAME-padded input. Nine plain reductions would each materialize a shifted copy
    of the input (XLA:CPU does not fuse slices into its reductions). Instead an elementwise loop
    per tap sums the tap's products over ``_BLOCK x _BLOCK`` output blocks (strided slices added
    together), writing ``[N, H/B, W/B, C]``, and one reduction over the stacked taps finishes:
    memory traffic for the reduction drops ``B*B``-fold. ``g`` is zero-padded to whole blocks
    (and the input with it), which adds nothing to the sums.
    """
    n, out_h, out_w, c = g.shape
    bh, bw = min(_BLOCK, out_h), min(_BLOCK, out_w)
    nh, nw = -(-out_h // bh), -(-out_w // bw)
    g = jnp.pad(g, ((0, 0), (0, nh * bh - out_h), (0, nw * bw - out_w), (0, 0)))
    # The input rows/columns that the padded g reaches: (n*b - 1)*s + k.
    need_h, need_w = (nh * bh - 1) * stride + kh, (nw * bw - 1) * stride + kw
    xp = jnp.pad(
        xp, ((0, 0), (0, max(need_h - xp.shape[1], 0)), (0, max(need_w - xp.shape[2], 0)), (0, 0))
    )
    sums = []
    for i in range(kh):
        for j in range(kw):
            acc = None
            for a in range(bh):
                for b in range(bw):
                    xs = jax.lax.slice(
                        xp,
                        (0, a * stride + i, b * stride + j, 0),
                        (
                            n,
                            a * stride + i + (nh - 1) * bh * stride + 1,
                            b * stride + j + (nw - 1) * bw * stride + 1,
                            c,
                        ),
                        (1, bh * stride, bw * stride, 1),
                    )
                    gs = jax.lax.slice(
                        g,
                        (0, a, b, 0),
                        (n, a + (nh - 1) * bh + 1, b + (nw - 1) * bw + 1, c),
                        (1, bh, bw, 1),
                    )
                    term = xs * gs
                    acc = term if acc is None else acc + term
            sums.append(acc)
    return jnp.sum(jnp.stack(sums, axis=3), axis=(0, 1, 2))


# Output block (per spatial axis) over which the kernel gradient sums inside one elementwise loop.
_BLOCK = 4
# Input bytes per batch chunk of the kernel gradient (a few MB: stays in L2/L3 across the taps).
_CHUNK_BYTES = 4 << 20


_depthwise_shift.defvjp(_shift_fwd, _shift_bwd)


def _native_attrs(in_hw: tuple, stride: int) -> dict:
    (pt, _), (pl, _) = same_padding(in_hw[0], 3, stride), same_padding(in_hw[1], 3, stride)
    return {"stride": np.int64(stride), "pad_top": np.int64(pt), "pad_left": np.int64(pl)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_native(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return _native_fwd(x, kernel, stride)[0]


def _native_fwd(x, kernel, stride):
    n, h, w, c = x.shape
    out = jax.ShapeDtypeStruct((n, -(-h // stride), -(-w // stride), c), x.dtype)
    y = jax.ffi.ffi_call(native.FORWARD_TARGET, out, vmap_method="sequential")(
        x, kernel.reshape(3, 3, c), **_native_attrs((h, w), stride)
    )
    return y, (x, kernel)


def _native_bwd(stride, residuals, g):
    x, kernel = residuals
    c = x.shape[-1]
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((3, 3, c), x.dtype))
    dx, dk = jax.ffi.ffi_call(native.BACKWARD_TARGET, shapes, vmap_method="sequential")(
        x, kernel.reshape(3, 3, c), g.astype(x.dtype), **_native_attrs(x.shape[1:3], stride)
    )
    return dx, dk.reshape(kernel.shape)


_depthwise_native.defvjp(_native_fwd, _native_bwd)
