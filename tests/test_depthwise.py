"""The depthwise implementations ('lax' grouped conv, 'shift' multiply-adds with a custom VJP,
'native' C++ custom calls on CPU) and the CPU lowering of the other convs (1×1 as matmul, the
RGB stem as multiply-adds) agree in outputs and gradients; with the fake-quant primitive; under
pmap; TF "SAME" geometry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qfsep_jax.models import depthwise, layers, native
from qfsep_jax.models.depthwise import depthwise_conv2d, direct_conv2d, resolve_impl
from qfsep_jax.models.layers import ConvLayer, activation_fn, batch_norm_train, conv2d
from qfsep_jax.padding import same_padding
from qfsep_jax.quant import QuantConfig
from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.numerics import UINT8

TOL = dict(rtol=2e-5, atol=2e-5)


def _impls(ks: int = 3) -> tuple[str, ...]:
    """The implementations to compare: 'native' covers 3x3 kernels, and must build here."""
    if ks != 3:
        return ("lax", "shift")
    assert native.available(), (
        f"native depthwise kernels did not build: {native.unavailable_reason()}"
    )
    return ("lax", "shift", "native")


def _np_depthwise_same(x, k, stride):
    """Reference: explicit TF "SAME" padding (before = total // 2), then a direct loop."""
    n, h, w, c = x.shape
    kh, kw = k.shape[:2]
    oh, ow = -(-h // stride), -(-w // stride)
    th = max((oh - 1) * stride + kh - h, 0)
    tw = max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (th // 2, th - th // 2), (tw // 2, tw - tw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, c), np.float64)
    for i in range(kh):
        for j in range(kw):
            tap = xp[
                :, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride
            ]
            out += tap * k[i, j, 0]
    return out


def _value_and_grads(fn, x, k, cot):
    """fn(x, k), and the gradients of sum(fn(x, k) * cot) w.r.t. x and k, jitted."""
    loss = lambda x, k: jnp.sum(fn(x, k) * cot)  # noqa: E731
    return jax.jit(lambda x, k: (fn(x, k), *jax.grad(loss, argnums=(0, 1))(x, k)))(x, k)


def _inputs(shape, kshape, stride, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(*shape).astype(np.float32)
    k = rs.randn(*kshape).astype(np.float32)
    oh, ow = -(-shape[1] // stride), -(-shape[2] // stride)
    cot = rs.randn(shape[0], oh, ow, kshape[-1]).astype(np.float32)
    return x, k, cot


# (batch, height, width, channels, kernel, stride): odd/even sizes, non-square, both strides,
# output sizes that are and are not multiples of the kernel-gradient block, a 5×5 kernel; for the
# native kernels' register blocking, channel counts around its 16- and 8-wide blocks (full
# blocks plus a remainder) and 1-3 px inputs (taps in the padding on both sides).
CASES = [
    (2, 8, 8, 3, 3, 1),
    (2, 7, 7, 3, 3, 1),
    (2, 8, 8, 3, 3, 2),
    (2, 7, 9, 4, 3, 2),
    (1, 13, 11, 5, 3, 1),
    (1, 9, 9, 2, 5, 2),
    (3, 1, 1, 2, 3, 2),
    (2, 6, 5, 16, 3, 1),
    (2, 5, 6, 27, 3, 2),
    (1, 4, 4, 8, 3, 1),
    (2, 7, 5, 13, 3, 1),
    (2, 6, 5, 35, 3, 2),
    (3, 2, 3, 17, 3, 1),
    (2, 3, 2, 33, 3, 2),
    (1, 1, 1, 16, 3, 1),
]


@pytest.mark.parametrize("n,h,w,c,ks,stride", CASES)
def test_implementations_agree_on_outputs_and_gradients(n, h, w, c, ks, stride):
    x, k, cot = _inputs((n, h, w, c), (ks, ks, 1, c), stride)
    impls = _impls(ks)
    got = {
        impl: _value_and_grads(functools.partial(_dw, stride=stride, impl=impl), x, k, cot)
        for impl in impls
    }
    ref = _np_depthwise_same(x, k, stride)
    for impl in impls:
        np.testing.assert_allclose(got[impl][0], ref, **TOL, err_msg=f"{impl} vs TF SAME")
        for name, a, b in zip(("output", "d/dx", "d/dkernel"), got["lax"], got[impl], strict=True):
            assert a.shape == b.shape, name
            np.testing.assert_allclose(b, a, **TOL, err_msg=f"{impl} {name}")


def test_native_is_deterministic_across_calls():
    # Images run on XLA's thread pool in any order; the kernel gradient is summed per image and
    # then over images in a fixed order, so repeated calls agree bit for bit.
    _impls()
    x, k, cot = _inputs((8, 12, 11, 40), (3, 3, 1, 40), 2, seed=9)
    fn = jax.jit(
        functools.partial(_value_and_grads, functools.partial(_dw, stride=2, impl="native"))
    )
    first = [np.asarray(a) for a in fn(x, k, cot)]
    for _ in range(5):
        for a, b in zip(first, fn(x, k, cot), strict=True):
            np.testing.assert_array_equal(np.asarray(b), a)


def _dw(x, k, stride, impl):
    return depthwise_conv2d(x, k, stride, impl=impl)


def test_tf_same_puts_the_odd_pad_after():
    # Stride 2 on an even size: 0 rows/columns before, 1 after (TF), not 1/0 (PyTorch-style).
    assert same_padding(8, 3, 2) == (0, 1)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(8, 3, 1) == (1, 1)
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 0, 0, 0] = 1.0  # only the first pixel is on; tap (0, 0) sees it at output (0, 0)
    k = np.zeros((3, 3, 1, 1), np.float32)
    k[0, 0, 0, 0] = 1.0
    for impl in _impls():
        out = np.asarray(depthwise_conv2d(x, k, 2, impl=impl))
        assert out[0, 0, 0, 0] == 1.0 and out.sum() == 1.0, impl


def test_kernel_gradient_in_batch_chunks(monkeypatch):
    # A tiny chunk budget forces the chunked loop (used for 224 px layers) on small shapes.
    x, k, cot = _inputs((6, 9, 8, 3), (3, 3, 1, 3), 2, seed=1)
    ref = _value_and_grads(functools.partial(_dw, stride=2, impl="lax"), x, k, cot)
    padded_image_bytes = (9 + 2) * (8 + 1) * 3 * 4  # SAME padding for stride 2: 2 rows, 1 col
    monkeypatch.setattr(depthwise, "_CHUNK_BYTES", 2 * padded_image_bytes)  # 2 images a chunk
    fn = functools.partial(_dw, stride=2, impl="shift")
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(fn(x, k) * cot), (0, 1)))(x, k)
    assert "scan" in str(jaxpr) or "while" in str(jaxpr)  # the chunked loop is tested
    got = _value_and_grads(fn, x, k, cot)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(b, a, **TOL)


@pytest.mark.parametrize("stride", [1, 2])
def test_under_the_fake_quant_primitive(stride):
    # QAT: fake-quantized input and kernel into the conv; gradients flow back through the
    # straight-through estimator into the input, the kernel and the input range.
    x, k, cot = _inputs((2, 8, 7, 4), (3, 3, 1, 4), stride, seed=2)
    x = 3.0 * x

    def qat_layer(impl, x, k, x_max):
        xq = fake_quant(x, -2.0, x_max, UINT8)  # some inputs clip below and above
        kq = fake_quant(k, jnp.min(k), jnp.max(k), UINT8)
        return jnp.sum(depthwise_conv2d(xq, kq, stride, impl=impl) * cot)

    got = {
        impl: jax.jit(jax.value_and_grad(functools.partial(qat_layer, impl), argnums=(0, 1, 2)))(
            x, k, 2.5
        )
        for impl in _impls()
    }
    la, lg = got["lax"]
    for impl in _impls()[1:]:
        sa, sg = got[impl]
        np.testing.assert_allclose(sa, la, rtol=1e-5, err_msg=impl)
        for name, a, b in zip(("d/dx", "d/dkernel", "d/dx_max"), lg, sg, strict=True):
            np.testing.assert_allclose(b, a, **TOL, err_msg=f"{impl} {name}")
        assert np.any(np.asarray(sg[0]) == 0) and np.any(np.asarray(sg[0]) != 0)  # STE clipped
        assert float(sg[2]) != 0.0  # the range gets a gradient


@pytest.mark.parametrize("quant_mode", ["qat", "float"])
def test_training_depthwise_layer_same_for_all_impls(quant_mode):
    # The model's QAT path (BN folded into a fake-quantized kernel, correction-and-freeze, EMA
    # activation range) and its float path (BN and ReLU6 with their own VJP; native BN sums
    # where the impl is native): forward, parameter gradients, BN statistics and ranges agree.
    rs = np.random.RandomState(3)
    x = jnp.asarray(rs.randn(4, 9, 9, 6).astype(np.float32))
    cot = jnp.asarray(rs.randn(4, 5, 5, 6).astype(np.float32))
    outs = {}
    for impl in _impls():
        layer = ConvLayer(
            features=6,
            stride=2,
            depthwise=True,
            quant=QuantConfig(observer="ema"),
            depthwise_impl=impl,
        )
        v = layer.init(jax.random.key(0), x)

        def loss(params, v=v, layer=layer):
            y, new = layer.apply(
                {**v, "params": params},
                x,
                train=True,
                quant_mode=quant_mode,
                mutable=["batch_stats", "quant_ranges", "intermediates"],
            )
            return jnp.sum(y * cot), (y, (new["batch_stats"], new.get("quant_ranges", {})))

        outs[impl] = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
    g_lax, (y_lax, r_lax) = outs["lax"]
    for impl in _impls()[1:]:
        g_sh, (y_sh, r_sh) = outs[impl]
        np.testing.assert_allclose(y_sh, y_lax, **TOL, err_msg=impl)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4, err_msg=impl)
        jax.tree.map(lambda a, b, close=close: close(b, a), g_lax, g_sh)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, **TOL), r_lax, r_sh)
        assert float(jnp.max(jnp.abs(g_sh["kernel"]))) > 0


def test_under_pmap():
    # Eight replicas (conftest: 8 host devices) of the same conv and its gradients.
    ndev = jax.local_device_count()
    assert ndev >= 2, "conftest should provide several host devices"
    x, k, cot = _inputs((ndev * 2, 8, 8, 3), (3, 3, 1, 3), 2, seed=4)
    xs = x.reshape(ndev, 2, 8, 8, 3)
    cs = cot.reshape(ndev, 2, 4, 4, 3)

    def per_device(impl, x, k, cot):
        y = depthwise_conv2d(x, k, 2, impl=impl)
        dx, dk = jax.grad(lambda x, k: jnp.sum(depthwise_conv2d(x, k, 2, impl=impl) * cot), (0, 1))(
            x, k
        )
        return y, dx, jax.lax.psum(dk, "d")

    results = {
        impl: jax.pmap(functools.partial(per_device, impl), axis_name="d", in_axes=(0, None, 0))(
            xs, k, cs
        )
        for impl in _impls()
    }
    ref = _value_and_grads(functools.partial(_dw, stride=2, impl="lax"), x, k, cot)
    for impl, (y, dx, dk) in results.items():
        np.testing.assert_allclose(y.reshape(ref[0].shape), ref[0], **TOL, err_msg=impl)
        np.testing.assert_allclose(dx.reshape(ref[1].shape), ref[1], **TOL, err_msg=impl)
        for d in range(ndev):  # the psum-ed kernel gradient is the full-batch one everywhere
            np.testing.assert_allclose(dk[d], ref[2], **TOL, err_msg=impl)


@pytest.mark.parametrize("h,ks,stride", [(8, 3, 1), (8, 3, 2), (9, 3, 2), (7, 5, 2), (6, 1, 2)])
def test_regular_conv_lowerings_match_lax(h, ks, stride):
    x, _, cot = _inputs((2, h, h + 1, 3), (ks, ks, 1, 5), stride, seed=5)
    k = np.random.RandomState(6).randn(ks, ks, 3, 5).astype(np.float32)
    ref = _value_and_grads(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        k,
        cot,
    )
    impls = {
        f"conv2d {impl}": functools.partial(conv2d, stride=stride, impl=impl)
        for impl in ("shift", "native")
    }
    if ks > 1:
        impls["direct"] = functools.partial(direct_conv2d, stride=stride)
    for name, fn in impls.items():
        got = _value_and_grads(lambda x, k, fn=fn: fn(x, k), x, k, cot)
        for what, a, b in zip(("output", "d/dx", "d/dkernel"), ref, got, strict=True):
            np.testing.assert_allclose(b, a, **TOL, err_msg=f"{name} {what}")
        # Under autodiff the forward rule runs (a custom VJP's own forward, with residuals).
        fwd_out = jax.jit(lambda x, k, fn=fn: jax.vjp(fn, x, k)[0])(x, k)
        np.testing.assert_allclose(fwd_out, ref[0], **TOL, err_msg=f"{name} forward rule")


def test_pointwise_is_a_matmul_with_conv_gradients():
    x, _, cot = _inputs((2, 5, 6, 7), (1, 1, 1, 4), 1, seed=7)
    k = np.random.RandomState(8).randn(1, 1, 7, 4).astype(np.float32)
    ref = _value_and_grads(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        k,
        cot,
    )
    for impl in ("lax", "shift"):
        got = _value_and_grads(functools.partial(conv2d, stride=1, impl=impl), x, k, cot)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_allclose(b, a, **TOL)
    lowered = jax.jit(lambda x, k: conv2d(x, k, 1)).lower(x, k).as_text()
    assert "dot_general" in lowered and "convolution" not in lowered


@pytest.mark.parametrize(
    "shape,cout,stride",
    [
        ((2, 9, 9, 3), 32, 2),  # the MobileNet stem at odd size
        ((2, 8, 8, 3), 16, 1),  # 0.5-width stem, stride 1
        ((1, 10, 7, 3), 24, 2),  # one 16-wide and one 8-wide block, even/odd sizes
        ((2, 6, 6, 1), 5, 1),  # single-channel blocks, grayscale input
        ((1, 7, 8, 2), 13, 2),
        ((1, 5, 5, 4), 8, 2),
        ((1, 1, 1, 3), 9, 2),  # a 1x1 input
    ],
)
def test_native_stem_kernel_gradient_matches_lax(shape, cout, stride):
    _impls()
    x, _, cot = _inputs(shape, (3, 3, 1, cout), stride, seed=11)
    k = np.random.RandomState(12).randn(3, 3, shape[-1], cout).astype(np.float32)
    ref = _value_and_grads(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        k,
        cot,
    )
    fn = functools.partial(direct_conv2d, stride=stride, impl="native")
    assert "ffi_call" in str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(fn(x, k))))(k))
    got = _value_and_grads(fn, x, k, cot)
    for what, a, b in zip(("output", "d/dx", "d/dkernel"), ref, got, strict=True):
        np.testing.assert_allclose(b, a, **TOL, err_msg=what)
    again = _value_and_grads(fn, x, k, cot)[2]  # fixed summation order: the same bits
    np.testing.assert_array_equal(again, got[2])


def test_native_kernel_gradients_of_an_empty_batch_are_zero():
    _impls()
    x = jnp.zeros((0, 8, 8, 3))
    k, kd = jnp.ones((3, 3, 3, 16)), jnp.ones((3, 3, 1, 3))
    stem = jax.grad(lambda k: jnp.sum(direct_conv2d(x, k, 2, impl="native")))(k)
    dw = jax.grad(lambda k: jnp.sum(depthwise_conv2d(x, k, 1, impl="native")))(kd)
    np.testing.assert_array_equal(stem, np.zeros(k.shape))
    np.testing.assert_array_equal(dw, np.zeros(kd.shape))


def test_auto_picks_per_backend_and_bad_input_is_rejected(monkeypatch):
    assert resolve_impl("auto", "cpu") == "native" and native.available()
    assert resolve_impl("auto", "gpu") == "lax"
    assert resolve_impl("auto", "tpu") == "lax"
    assert resolve_impl("lax", "cpu") == "lax" and resolve_impl("shift", "gpu") == "shift"
    assert resolve_impl("auto") == ("native" if jax.default_backend() == "cpu" else "lax")
    with pytest.raises(ValueError, match="unknown depthwise impl"):
        resolve_impl("fft")
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(k, k, 1, 3\)"):
        depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), 1, impl="shift")
    with pytest.raises(ValueError, match="NHWC"):
        depthwise_conv2d(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 1, 3)), 1)
    with pytest.raises(ValueError, match="stride"):
        depthwise_conv2d(x, jnp.zeros((3, 3, 1, 3)), 0)
    with pytest.raises(ValueError, match="expects NHWC input with 2 channels"):
        direct_conv2d(x, jnp.zeros((3, 3, 2, 5)), 1)
    # 'native' covers float32 3x3 only; asked for by name it says so, 'auto' takes 'shift'.
    k5 = jnp.ones((5, 5, 1, 3))
    with pytest.raises(ValueError, match="float32 3x3 kernels only"):
        depthwise_conv2d(x, k5, 1, impl="native")
    xb, kb = x.astype(jnp.bfloat16), jnp.ones((3, 3, 1, 3), jnp.bfloat16)
    with pytest.raises(ValueError, match="float32 3x3 kernels only"):
        depthwise_conv2d(xb, kb, 1, impl="native")
    for xi, ki in ((x, k5), (xb, kb)):
        jaxpr = str(jax.make_jaxpr(lambda a, b: depthwise_conv2d(a, b, 1))(xi, ki))
        assert "ffi_call" not in jaxpr and "custom_vjp" in jaxpr  # the shift path
    # The stem's native kernel gradient covers float32 3x3 with 1-4 input channels; other stems
    # take XLA's convolution, 'native' asked for by name included (it names the depthwise impl).
    x5 = jnp.zeros((1, 4, 4, 5))
    for xi, ki in ((x5, jnp.ones((3, 3, 5, 8))), (xb, jnp.ones((3, 3, 3, 8), jnp.bfloat16))):
        for impl in ("auto", "native"):
            grad = jax.grad(lambda b, a=xi, i=impl: jnp.sum(direct_conv2d(a, b, 2, impl=i)))
            assert "ffi_call" not in str(jax.make_jaxpr(grad)(ki))
    k3 = jnp.ones((3, 3, 1, 3))
    assert "ffi_call" in str(jax.make_jaxpr(lambda a, b: depthwise_conv2d(a, b, 1))(x, k3))
    # Where the kernels cannot be built, 'auto' falls back to 'shift' on CPU.
    monkeypatch.setattr(native, "available", lambda: False)
    assert resolve_impl("auto", "cpu") == "shift"


def test_native_kernels_reject_inconsistent_shapes():
    # depthwise.py never passes these; the custom call checks its operands itself and says what
    # is wrong instead of reading out of bounds.
    _impls()
    call = lambda k, out: jax.ffi.ffi_call(native.FORWARD_TARGET, out)(  # noqa: E731
        jnp.zeros((1, 4, 4, 3)), k, stride=np.int64(1), pad_top=np.int64(1), pad_left=np.int64(1)
    )
    out = jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)
    with pytest.raises(Exception, match="only 3x3 kernels"):
        jax.block_until_ready(call(jnp.zeros((5, 5, 3)), out))
    with pytest.raises(Exception, match="channel or batch sizes disagree"):
        jax.block_until_ready(call(jnp.zeros((3, 3, 4)), out))
    with pytest.raises(Exception, match="larger than the padded input"):
        jax.block_until_ready(
            call(jnp.zeros((3, 3, 3)), jax.ShapeDtypeStruct((1, 6, 4, 3), jnp.float32))
        )
    # The stem's kernel gradient: padded input [N, HP, WP, C], output gradient [N, OH, OW, CO].
    stem = lambda xp, g, dk, stride=2: jax.ffi.ffi_call(  # noqa: E731
        native.STEM_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(dk, jnp.float32)
    )(jnp.zeros(xp), jnp.zeros(g), stride=np.int64(stride))
    jax.block_until_ready(stem((1, 9, 9, 3), (1, 4, 4, 8), (3, 3, 3, 8)))  # consistent: runs
    with pytest.raises(Exception, match="shapes disagree"):
        jax.block_until_ready(stem((1, 9, 9, 3), (1, 4, 4, 8), (3, 3, 3, 7)))
    with pytest.raises(Exception, match="1 to 4 input channels"):
        jax.block_until_ready(stem((1, 9, 9, 5), (1, 4, 4, 8), (3, 3, 5, 8)))
    with pytest.raises(Exception, match="does not match the output size and stride"):
        jax.block_until_ready(stem((1, 9, 9, 3), (1, 5, 4, 8), (3, 3, 3, 8)))
    with pytest.raises(Exception, match="does not match the output size and stride"):
        jax.block_until_ready(stem((1, 11, 9, 3), (1, 4, 4, 8), (3, 3, 3, 8)))


def test_native_build_errors_are_specific_and_leave_no_partial_library(tmp_path, monkeypatch):
    monkeypatch.setenv("QFSEP_JAX_CACHE", str(tmp_path))
    with pytest.raises(native.NativeBuildError, match="no C\\+\\+ compiler 'no-such-cxx'"):
        native.build(compiler="no-such-cxx")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", str(broken))
    with pytest.raises(native.NativeBuildError, match="compiling .*broken.cc failed"):
        native.build()
    assert not list((tmp_path / "native").iterdir())  # no half-written library left behind


def _bn_reference(y, gamma, beta, eps, axis_name):
    """Training BN as plain jnp (autodiff gives the reference gradients)."""
    mean = jnp.mean(y, axis=(0, 1, 2))
    mean_sq = jnp.mean(jnp.square(y), axis=(0, 1, 2))
    if axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    return (y - mean) * (gamma * jax.lax.rsqrt(var + eps)) + beta, mean, var


def _bn_loss(bn, axis_name, activation, y, gamma, beta, cot, cm, cv):
    # The activation after BN as in the model; the moments feed the loss too (as running
    # statistics do not, but their cotangents must be handled).
    out, mean, var = bn(y, gamma, beta, 1e-3, axis_name, activation)
    return jnp.sum(out * cot) + jnp.sum(mean * cm) + jnp.sum(var * cv)


def _bn_ref_act(y, gamma, beta, eps, axis_name, activation):
    out, mean, var = _bn_reference(y, gamma, beta, eps, axis_name)
    return activation_fn(activation, out), mean, var


def _bn_inputs(shape, seed):
    rs = np.random.RandomState(seed)
    y = (rs.randn(*shape) * 2 + 1).astype(np.float32)
    c = shape[-1]
    gamma = (rs.rand(c) + 0.5).astype(np.float32)
    beta = rs.randn(c).astype(np.float32)
    # Two constant channels (var clamps to 0: the max's tie) whose output is beta exactly, put
    # on the activations' ties: 0 (relu, relu6) and 6 (relu6).
    y[..., 0], beta[0] = 0.5, 0.0
    y[..., 1], beta[1] = -1.25, 6.0
    cot = rs.randn(*shape).astype(np.float32)
    return y, gamma, beta, cot, rs.randn(c).astype(np.float32), rs.randn(c).astype(np.float32)


BN_CASES = [(a, n) for a in ("none", "relu", "relu6") for n in (False, True)]


def _bn_vjp(native_sums):
    return lambda *a: batch_norm_train(*a, native_sums=native_sums)


@pytest.mark.parametrize("activation, native_sums", BN_CASES)
def test_batch_norm_vjp_equals_autodiff(activation, native_sums):
    # Two chunks of the native sums' rows (512) and a partial one; 70 channels: a 64-wide block
    # and single channels (the float64 test below, 24 channels: the 16- and 8-wide blocks).
    y, gamma, beta, cot, cm, cv = _bn_inputs((3, 19, 20, 70), seed=9)
    grads = {
        name: jax.jit(
            jax.value_and_grad(functools.partial(_bn_loss, bn, None, activation), argnums=(0, 1, 2))
        )(y, gamma, beta, cot, cm, cv)
        for name, bn in (("ref", _bn_ref_act), ("vjp", _bn_vjp(native_sums)))
    }
    np.testing.assert_allclose(grads["vjp"][0], grads["ref"][0], rtol=1e-6)
    for name, a, b in zip(
        ("d/dy", "d/dgamma", "d/dbeta"), grads["ref"][1], grads["vjp"][1], strict=True
    ):
        # atol: a constant channel's d/dgamma is inv * (sum(g*y) - mean * sum(g)), rounding of
        # sums of size ~50 scaled by 1/sqrt(eps) = 32 (exactly 0 only where both sums round alike).
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3, err_msg=name)
    outs = jax.jit(lambda *a: batch_norm_train(*a, 1e-3, None, activation, native_sums))(
        y, gamma, beta
    )
    refs = jax.jit(lambda *a: _bn_ref_act(*a, 1e-3, None, activation))(y, gamma, beta)
    for a, b in zip(refs, outs, strict=True):
        if native_sums:  # the moments summed in another order
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(b, a)  # the same forward arithmetic


def test_native_bn_sums_match_float64_and_are_deterministic():
    # The gradient sums through relu6 (ties included) against float64, and the same bits on
    # every call (fixed chunks, summed in order), also for an empty batch.
    y, gamma, beta, cot, _, _ = _bn_inputs((4, 33, 17, 24), seed=3)
    mean = y.mean(axis=(0, 1, 2))
    alpha = gamma * 0.7
    z = (y.astype(np.float64) - mean) * alpha + beta
    w = np.where((z > 0) & (z < 6), 1.0, np.where((z == 0) | (z == 6), 0.5, 0.0))
    params = jnp.stack([mean, alpha, beta])
    sums = jax.jit(
        lambda g, y: layers._channel_sums(
            native.BN_GRAD_SUMS_TARGET, g, y, params, activation=np.int64(2)
        )
    )
    s0, s1 = sums(cot, y)
    np.testing.assert_allclose(s0, (cot * w).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(s1, (cot * w * y).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-3)
    for a, b in zip((s0, s1), sums(cot, y), strict=True):
        np.testing.assert_array_equal(a, b)
    m0, m1 = jax.jit(layers._native_moments)(y)
    np.testing.assert_allclose(m0, y.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m1, (y.astype(np.float64) ** 2).mean(axis=(0, 1, 2)), rtol=1e-6)
    empty = np.zeros((0, 3, 3, 24), np.float32)
    for a in sums(empty, empty):
        np.testing.assert_array_equal(a, 0.0)


def test_native_bn_sums_reject_inconsistent_shapes():
    _impls()
    call = lambda g, y, p, out=(2, 4), act=2: jax.ffi.ffi_call(  # noqa: E731
        native.BN_GRAD_SUMS_TARGET, jax.ShapeDtypeStruct(out, jnp.float32)
    )(jnp.zeros(g), jnp.zeros(y), jnp.zeros(p), activation=np.int64(act))
    jax.block_until_ready(call((2, 3, 4), (2, 3, 4), (3, 4)))  # consistent: runs
    with pytest.raises(Exception, match="g and y shapes differ"):
        jax.block_until_ready(call((2, 3, 5), (2, 3, 4), (3, 4)))
    with pytest.raises(Exception, match=r"expected params \[3, C\]"):
        jax.block_until_ready(call((2, 3, 4), (2, 3, 4), (2, 4)))
    with pytest.raises(Exception, match=r"a \[2, C\] result"):
        jax.block_until_ready(call((2, 3, 4), (2, 3, 4), (3, 4), out=(2, 5)))
    with pytest.raises(Exception, match="unknown activation code"):
        jax.block_until_ready(call((2, 3, 4), (2, 3, 4), (3, 4), act=7))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        batch_norm_train(jnp.zeros((1, 2, 2, 4)), jnp.ones(4), jnp.zeros(4), 1e-3, None, "gelu")


@pytest.mark.parametrize("native_sums", [False, True])
def test_batch_norm_vjp_under_pmap(native_sums):
    # Moments over all devices; the backward psum is the transpose of the forward pmean.
    ndev = jax.local_device_count()
    y, gamma, beta, cot, cm, cv = _bn_inputs((ndev * 2, 3, 4, 5), seed=10)
    split = lambda a: a.reshape(ndev, 2, *a.shape[1:])  # noqa: E731
    res = {}
    for name, bn in (("ref", _bn_ref_act), ("vjp", _bn_vjp(native_sums))):
        fn = jax.grad(functools.partial(_bn_loss, bn, "d", "relu6"), argnums=(0, 1, 2))
        res[name] = jax.pmap(fn, axis_name="d", in_axes=(0, None, None, 0, None, None))(
            split(y), gamma, beta, split(cot), cm, cv
        )
    for name, a, b in zip(("d/dy", "d/dgamma", "d/dbeta"), res["ref"], res["vjp"], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
