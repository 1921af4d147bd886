"""How far bfloat16 moves gradients, per layer and for the whole MobileNetV1 at initialisation.

    python tools/bf16_sensitivity.py [--widths 0.25,1.0] [--batches 8,32] [--size 32]

Not a test; the numbers behind the tolerances of ``tests/test_half_precision.py``:

* per layer kind (activation ``none``; and one with ReLU6): the relative L2 difference between
  the bfloat16 and the float32 gradients of ``sum(y * r)`` (``r`` fixed random) with respect to
  the input and every parameter, on an input that bfloat16 represents exactly;
* whole model (cross entropy, training mode, random initialisation, random images): the
  relative difference of the float32 gradient when the input is perturbed by 2**-9 relative
  (bfloat16's rounding, random signs), and of the bfloat16 gradient, both against float32.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MUTABLE = ["batch_stats", "quant_ranges"]


def rel(a, b) -> float:
    """Relative L2 difference of two pytrees (``|a - b| / |b|``)."""
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(
        float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
        for x, y in zip(la, lb, strict=True)
    )
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return float(np.sqrt(num / den))


def layer_rows() -> list[tuple[str, dict]]:
    import jax
    import jax.numpy as jnp

    from qfsep_jax.models.layers import ConvLayer
    from qfsep_jax.quant.scheme import QuantConfig

    qc = QuantConfig(observer="ema", ema_decay=0.9)
    cases = [
        ("conv 3x3 s2 + BN", dict(features=16, kernel_size=3, stride=2), 8, {}),
        ("depthwise + BN", dict(features=16, kernel_size=3, depthwise=True), 16, {}),
        (
            "QF depthwise + bias",
            dict(features=16, kernel_size=3, depthwise=True, use_bn=False, use_bias=True),
            16,
            {},
        ),
        (
            "pointwise + BN, QAT correction",
            dict(features=24, kernel_size=1),
            16,
            dict(quant_mode="qat", quant_active=False),
        ),
        (
            "depthwise, QAT frozen BN",
            dict(features=16, kernel_size=3, depthwise=True),
            16,
            dict(quant_mode="qat", quant_active=False, bn_frozen=True),
        ),
        (
            "conv 3x3 s2 + BN + ReLU6",
            dict(features=16, kernel_size=3, stride=2, activation="relu6"),
            8,
            {},
        ),
    ]
    rows = []
    for name, attrs, cin, kw in cases:
        attrs = {"activation": "none", **attrs}
        layer = ConvLayer(**attrs, bn_momentum=0.0, quant=qc if kw else None)
        x = np.random.RandomState(0).normal(size=(4, 12, 12, cin)).astype(np.float32)
        x = jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
        v = layer.init(jax.random.key(0), x)
        shape = jax.eval_shape(
            lambda v=v, layer=layer, kw=kw, x=x: layer.apply(
                v, x, train=True, mutable=MUTABLE, **kw
            )[0]
        ).shape
        r = jnp.asarray(np.random.RandomState(1).normal(size=shape).astype(np.float32))
        grads = {}
        for dtype in (jnp.float32, jnp.bfloat16):

            def loss(p, xx, dtype=dtype, layer=layer, v=v, kw=kw, r=r):
                y, _ = layer.apply(
                    {**v, "params": p}, xx.astype(dtype), train=True, mutable=MUTABLE, **kw
                )
                return jnp.sum(y.astype(jnp.float32) * r)

            grads[dtype] = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
        (p16, x16), (p32, x32) = grads[jnp.bfloat16], grads[jnp.float32]
        rows.append((name, {"input": rel(x16, x32), **{k: rel(p16[k], p32[k]) for k in p32}}))
    return rows


def model_row(width: float, batch: int, size: int) -> dict:
    import jax
    import jax.numpy as jnp

    from qfsep_jax import train
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
    y = jnp.asarray(rs.randint(0, 10, batch))

    def grads(dtype, images):
        m = MobileNetV1(
            num_classes=10, width_multiplier=width, stem_stride=1, dropout_rate=0.0, dtype=dtype
        )
        v = m.init(jax.random.key(0), x)

        def loss(p):
            logits, _ = m.apply({**v, "params": p}, images, train=True, mutable=["batch_stats"])
            return train.cross_entropy_loss(logits, y, 10)

        return jax.jit(jax.grad(loss))(v["params"])

    g32 = grads(None, x)
    signs = jnp.asarray(rs.choice([-1.0, 1.0], x.shape), jnp.float32)
    perturbed = grads(None, x * (1 + 2.0**-9 * signs))
    g16 = grads("bfloat16", x)
    return {"float32, input perturbed 2**-9": rel(perturbed, g32), "bfloat16": rel(g16, g32)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="0.25,1.0")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)
    from qfsep_jax.io_utils import run_info

    print(run_info())
    print("per layer: relative difference of the bfloat16 gradients from float32's")
    for name, row in layer_rows():
        print(f"  {name:32s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    print(
        f"whole MobileNetV1 ({args.size} px, random init, training mode): relative difference "
        "of the gradient from float32's"
    )
    for width in (float(w) for w in args.widths.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            row = model_row(width, batch, args.size)
            print(
                f"  width {width} batch {batch}: "
                + "  ".join(f"{k} {v:.3f}" for k, v in row.items())
            )


if __name__ == "__main__":
    main()
