"""What the training benchmarks and the profile share: the benchmark rows, thread pinning, and one
training step of each framework (the project's own JAX step; a PyTorch MobileNetV1 peer).

The PyTorch side needs ``requirements-bench.txt`` (imported only when asked for).
"""

from __future__ import annotations

import functools
import os

ROWS = {
    # name: (width multiplier, input size, stem stride, batch)
    "small": (0.5, 32, 1, 128),
    "large": (1.0, 224, 2, 32),
}
NUM_CLASSES = 1001
LEARNING_RATE = 0.01
MOMENTUM = 0.9


def pin_threads(threads: int) -> list[int]:
    """Pins this process to ``threads`` of its allowed CPUs (before jax/torch start)."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"--threads {threads}: only {len(allowed)} CPUs available")
    cpus = allowed[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


# ---------------------------------------------------------------------------------------------
# JAX: the project's train step.


def train_step_for(
    width: float, stem: int, mode: str, devices, depthwise_impl: str = "auto", dtype=None
):
    """The project's pmapped train step on ``devices`` for a MobileNetV1 of ``width`` (float or
    TF8 QAT ``mode``, compute ``dtype``): ``(step, model, tx)``. SGD momentum at a constant
    learning rate; what the benchmarks and the device check time."""
    import optax

    from qfsep_jax import train
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1
    from qfsep_jax.quant.scheme import QuantConfig

    qat = mode == "qat"
    quant = QuantConfig(scheme="tf8", observer="ema", ema_decay=0.999) if qat else None
    model = MobileNetV1(
        num_classes=NUM_CLASSES,
        width_multiplier=width,
        stem_stride=stem,
        quant=quant,
        depthwise_impl=depthwise_impl,
        axis_name=train.AXIS,
        dtype=dtype,
    )
    schedule = optax.constant_schedule(LEARNING_RATE)
    tx = optax.sgd(schedule, momentum=MOMENTUM)
    step_config = train.StepConfig(num_classes=NUM_CLASSES, qat=qat)
    step = train.pmap_step(
        functools.partial(
            train.train_step, model=model, tx=tx, schedule=schedule, step_config=step_config
        ),
        devices=devices,
    )
    return step, model, tx


def jax_step(row: str, mode: str, depthwise_impl: str):
    """The project's pmapped train step for a row and mode, with its initial state and batch.

    Returns ``(step, state, batch)``; ``step(state, batch) -> (state, metrics)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qfsep_jax import train

    width, size, stem, batch = ROWS[row]
    step, model, tx = train_step_for(width, stem, mode, jax.local_devices()[:1], depthwise_impl)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)
    )
    variables = jax.tree.map(np.asarray, dict(variables))
    rs = np.random.RandomState(0)
    batch_arrays = {
        "image": rs.uniform(-1, 1, (1, batch, size, size, 3)).astype(np.float32),
        "label": rs.randint(0, NUM_CLASSES, (1, batch)).astype(np.int32),
    }
    state = train.create_train_state(variables, tx, seed=0)
    return step, state, jax.device_put(batch_arrays)


def jax_runner(row: str, mode: str, depthwise_impl: str):
    """A zero-argument callable running one JAX train step (state carried inside)."""
    import numpy as np

    step, state, batch_arrays = jax_step(row, mode, depthwise_impl)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch_arrays)
        loss = float(metrics["train_loss"][0])  # blocks until the step is done
        if not np.isfinite(loss):
            raise FloatingPointError(f"JAX {row}/{mode}: non-finite loss {loss}")

    return run


# ---------------------------------------------------------------------------------------------
# PyTorch: the same architecture.


def torch_mobilenet(width: float, stem_stride: int, qat: bool):
    """MobileNetV1 as a ``torch.nn.Sequential`` (TF-slim depths, ReLU6, dropout 0.001)."""
    import torch.ao.quantization as tq
    from torch import nn

    def depth(d):
        return max(int(d * width), 8)

    layers = [tq.QuantStub()] if qat else []
    fuse = []

    def conv_bn_relu6(cin, cout, k, stride, groups=1):
        i = len(layers)
        layers.extend(
            [
                nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout, eps=1e-3),
                nn.ReLU6(),
            ]
        )
        fuse.append([str(i), str(i + 1)])

    c = depth(32)
    conv_bn_relu6(3, c, 3, stem_stride)
    from qfsep_jax.models.mobilenet_v1 import BLOCK_SPECS

    for d, s in BLOCK_SPECS:
        conv_bn_relu6(c, c, 3, s, groups=c)
        conv_bn_relu6(c, depth(d), 1, 1)
        c = depth(d)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Dropout(0.001), nn.Flatten(), nn.Linear(c, NUM_CLASSES)]
    if qat:
        layers.append(tq.DeQuantStub())
    model = nn.Sequential(*layers)
    if not qat:
        return model
    model.train()
    model = tq.fuse_modules_qat(model, fuse)
    import torch

    model.qconfig = tq.QConfig(
        activation=tq.FakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        ),
        weight=tq.FakeQuantize.with_args(
            observer=tq.MinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_affine,
        ),
    )
    tq.prepare_qat(model, inplace=True)
    # One activation fake-quant per layer, after ReLU6 (as the JAX model): drop ConvBn2d's own.
    for module in model:
        if isinstance(module, torch.ao.nn.intrinsic.qat.ConvBn2d):
            module.activation_post_process = nn.Identity()
    return model


def torch_runner(row: str, mode: str, threads: int):
    """A zero-argument callable running one PyTorch train step."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    width, size, stem, batch = ROWS[row]
    torch.manual_seed(0)
    model = torch_mobilenet(width, stem, mode == "qat").to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    x = torch.rand(batch, 3, size, size).mul_(2).sub_(1).to(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"torch {row}/{mode}: non-finite loss {loss.item()}")

    run.model = model  # for profile_train.py's module hooks
    return run


# ---------------------------------------------------------------------------------------------
