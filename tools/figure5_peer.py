"""Independent peer for Figure 5: the same networks and recipe trained in PyTorch.

    pip install -r requirements-bench.txt   # torch (CPU wheel); not a project requirement
    python tools/figure5_peer.py --variants original,qf_relu6 --seeds 0 \\
        --workdir results/figure5_peer

Not a test. Only the model and the training loop are PyTorch; everything else is the
project's, so that the comparison isolates them:

* Recipe: read from the variant's JAX training config (``configs/imagenette_<variant>.py``:
  width, resolution, batch, epochs, label smoothing, weight decay, BN decay and epsilon,
  dropout), and the learning rate of every step is the JAX run's own schedule
  (:func:`qfsep_jax.train.learning_rate_schedule`). SGD with momentum (``p -= lr * buf``,
  ``buf = mu * buf + g``, as optax's), L2 ``coeff * sum(w^2) / 2`` on every kernel except
  depthwise ones, as :func:`qfsep_jax.train.weight_decay_loss` (torch's coupled
  ``weight_decay`` is that term's gradient).
* Images: the project's training stream (:mod:`qfsep_jax.data.train_input`) with the run's seed,
  so a seed sees the same crops in the same order as the JAX run of that seed; evaluation on
  :func:`qfsep_jax.data.eval_batches` (central crop 87.5 %).
* Model: MobileNetV1 with the JAX model's layer sequence (``original``: DW→BN→act→PW→BN→act;
  ``qf``: DW(+bias)→PW→BN→act; ``original_linear_dw``: DW→BN→PW→BN→act), TF "SAME" padding
  (a stride-2 layer pads one row/column at the bottom/right only), kernels initialised as the
  JAX model's (truncated normal, variance 2 / fan_in), BN scale 1 / offset 0, biases 0.
  The initial weights are torch's draws, not the JAX ones: a seed here is not the JAX seed's
  initialisation, only its data order.

Per epoch it logs the mean train loss and accuracy and (every ``--eval_every_epochs``) the val
top-1 to ``<workdir>/<variant>/seed<k>/metrics.jsonl``; it checkpoints every epoch (atomically)
and a rerun of the same command resumes. At the end each run writes ``results.json`` and the
script writes ``<workdir>/figure5_peer.json``: rows ``{variant, framework, seed, float_top1,
train_loss}`` (``train_loss``: the mean over the last epoch, cross entropy plus L2) for the
PyTorch runs and, where the figure5 job's ``--jax_workdir`` has a run of the same variant and
seed, the JAX row beside it; and ``figure5_peer_curves.png``, both frameworks' curves.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time

import numpy as np

from qfsep_jax import progress
from qfsep_jax.io_utils import read_json, run_info, write_atomic, write_json

log = logging.getLogger("figure5_peer")

# variant → (block, activation): the Figure 5 variants and the linear-depthwise ablation.
VARIANT_BLOCKS = {
    "original": ("original", "relu6"),
    "qf_relu6": ("qf", "relu6"),
    "qf_relu": ("qf", "relu"),
    "original_linear_dw": ("original_linear_dw", "relu6"),
}


def _jax_config(variant: str):
    """The variant's training config, as the figure5 job composes it (configs/figure5.py)."""
    from configs import figure5

    return figure5.get_config().train_configs[variant]


# Torch's memory formats for the peer's activations. Its CPU BatchNorm2d in channels_last
# computes float32 batch statistics about 50x less accurately than in the contiguous (NCHW)
# format (1e-4 against 2e-6 absolute after the first BN of a training batch, against float64),
# enough to change a step's gradients by 10-20 %; ``--check_steps`` measures it.
MEMORY_FORMATS = ("contiguous", "channels_last")


def _torch_format(name: str):
    import torch

    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {name!r}; choose from {MEMORY_FORMATS}")
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def to_torch_images(images: np.ndarray, memory_format: str):
    """NHWC float images (the project's batches) as an NCHW torch tensor in ``memory_format``."""
    import torch

    x = torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=_torch_format(memory_format))


def torch_mobilenet(config, num_classes: int, memory_format: str = "contiguous"):
    """The JAX MobileNetV1 of ``config.model`` as a torch module (NCHW, in ``memory_format``)."""
    import torch
    from torch import nn

    from qfsep_jax.models.mobilenet_v1 import BLOCK_SPECS, scaled_depth

    m = config.model
    act_cls = {"relu6": nn.ReLU6, "relu": nn.ReLU}[m.activation]
    bn_kw = dict(eps=m.bn_epsilon, momentum=1.0 - m.bn_momentum)

    def conv(cin, cout, k, stride, depthwise=False, bias=False):
        layers = []
        if stride == 2 and k == 3:
            # TF "SAME" on an even input: the one padding row/column goes after, not before.
            layers.append(nn.ZeroPad2d((0, 1, 0, 1)))
            pad = 0
        else:
            pad = k // 2
        c = nn.Conv2d(cin, cout, k, stride, pad, groups=cin if depthwise else 1, bias=bias)
        c.is_depthwise = depthwise
        layers.append(c)
        return layers

    def bn_act(c, act=True):
        return [nn.BatchNorm2d(c, **bn_kw)] + ([act_cls()] if act else [])

    c = scaled_depth(32, m.width_multiplier, 8)
    layers = conv(3, c, 3, m.stem_stride) + bn_act(c)
    for depth, stride in BLOCK_SPECS:
        d = scaled_depth(depth, m.width_multiplier, 8)
        if m.block == "original":
            layers += conv(c, c, 3, stride, depthwise=True) + bn_act(c)
        elif m.block == "original_linear_dw":
            layers += conv(c, c, 3, stride, depthwise=True) + bn_act(c, act=False)
        elif m.block == "qf":
            layers += conv(c, c, 3, stride, depthwise=True, bias=m.depthwise_bias)
        else:
            raise ValueError(f"no PyTorch peer for block {m.block!r}")
        layers += conv(c, d, 1, 1) + bn_act(d)
        c = d
    logits = nn.Conv2d(c, num_classes, 1, bias=True)
    logits.is_depthwise = False
    layers += [nn.AdaptiveAvgPool2d(1), nn.Dropout(config.dropout_rate), logits, nn.Flatten()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.weight[0].numel()  # in/groups × k × k, as flax's fan_in
                std = math.sqrt(2.0 / fan_in) / 0.87962566103423978  # flax's truncation factor
                nn.init.trunc_normal_(mod.weight, std=std, a=-2 * std, b=2 * std)
                if mod.bias is not None:
                    mod.bias.zero_()
    return model.to(memory_format=_torch_format(memory_format))


def _param_groups(model, config):
    import torch

    decayed, depthwise, rest = [], [], []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            (depthwise if mod.is_depthwise else decayed).append(mod.weight)
            if mod.bias is not None:
                rest.append(mod.bias)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            rest += [mod.weight, mod.bias]
    return [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": depthwise, "weight_decay": config.depthwise_weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def _l2_term(groups) -> float:
    total = 0.0
    for g in groups:
        if g["weight_decay"]:
            squares = sum(float((p.detach() ** 2).sum()) for p in g["params"])
            total += g["weight_decay"] * 0.5 * squares
    return total


def evaluate(
    model, config, data_dir: str, show_progress: bool, memory_format: str = "contiguous"
) -> float:
    """Top-1 % of ``model`` on the config's eval data (the project's eval preprocessing)."""
    import torch

    from qfsep_jax import data

    ev = data.eval_batches(
        config.eval_data,
        data_dir,
        image_size=config.image_size,
        batch_size=config.eval_batch_size,
        label_space=config.label_space,
    )
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for b in progress.bar(ev.make(), show_progress, total=ev.num_batches, desc="eval"):
            pred = model(to_torch_images(b["image"], memory_format)).argmax(1).numpy()
            mask = np.asarray(b["mask"]).astype(bool)
            correct += int((pred[mask] == np.asarray(b["label"])[mask]).sum())
            total += int(mask.sum())
    model.train()
    return 100.0 * correct / total


def _save_checkpoint(path: str, model, opt, epoch: int, history: list) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "history": history},
        buf,
    )
    write_atomic(path, buf.getvalue())


def train_one(variant: str, seed: int, args) -> dict:
    """Trains one variant and seed in PyTorch (resuming from its checkpoint); returns the row."""
    import torch
    import torch.nn.functional as F

    from qfsep_jax import checkpointing
    from qfsep_jax import train as jax_train
    from qfsep_jax.data import sources, train_input

    config = _jax_config(variant)
    config.seed = seed
    if args.epochs:
        config.num_epochs = args.epochs
    workdir = os.path.join(args.workdir, variant, f"seed{seed}")
    os.makedirs(workdir, exist_ok=True)
    result_path = os.path.join(workdir, "results.json")
    if os.path.exists(result_path):
        log.info("%s seed %d: finished already (%s)", variant, seed, result_path)
        return read_json(result_path)

    torch.manual_seed(seed)
    source = sources.make_source(config.train_data, args.data_dir, label_space=config.label_space)
    num_classes = checkpointing.num_classes_of(config)
    steps_per_epoch = source.num_examples // config.batch_size
    total_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
    schedule = jax_train.learning_rate_schedule(config, steps_per_epoch, total_steps)
    lrs = np.asarray([float(schedule(s)) for s in range(total_steps)])

    model = torch_mobilenet(config, num_classes, args.memory_format)
    groups = _param_groups(model, config)
    opt = torch.optim.SGD(groups, lr=float(lrs[0]), momentum=config.momentum)
    ckpt_path = os.path.join(workdir, "checkpoint.pt")
    start_epoch, history = 0, []
    if os.path.exists(ckpt_path):
        try:
            ckpt = torch.load(ckpt_path, weights_only=False)
        except Exception as err:  # noqa: BLE001 — any unreadable file gets the same message
            raise ValueError(
                f"{ckpt_path} is not a readable checkpoint ({err}); move it away"
            ) from err
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log.info("%s seed %d: resuming after epoch %d", variant, seed, start_epoch)
    num_epochs = int(math.ceil(total_steps / steps_per_epoch))
    stream = train_input.TrainStream(
        seed=seed,
        global_batch=config.batch_size,
        image_size=config.image_size,
        area_range=tuple(config.crop_area_range),
        aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
        num_classes=num_classes,
    )
    batches = train_input.train_batches(source, stream, start_epoch * steps_per_epoch)
    model.train()
    for epoch in range(start_epoch, num_epochs):
        t0 = time.time()
        losses, accs = [], []
        first = epoch * steps_per_epoch
        last = min(total_steps, first + steps_per_epoch)
        for step in progress.bar(range(first, last), args.progress, desc=f"epoch {epoch + 1}"):
            b = next(batches)
            x = to_torch_images(b["image"], args.memory_format)
            y = torch.from_numpy(np.asarray(b["label"]).astype(np.int64))
            for g in opt.param_groups:
                g["lr"] = float(lrs[step])
            logits = model(x)
            ce = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            ce.backward()
            opt.step()
            if not torch.isfinite(ce):
                raise FloatingPointError(
                    f"{variant} seed {seed}: non-finite loss {float(ce)} at step {step}; the "
                    f"checkpoint of epoch {epoch} in {workdir} is kept"
                )
            losses.append(ce.item())
            accs.append(float((logits.argmax(1) == y).float().mean()))
        seconds = time.time() - t0
        row = {
            "epoch": epoch + 1,
            "step": last,
            "cross_entropy": float(np.mean(losses)),
            "weight_decay_loss": _l2_term(groups),
            "train_accuracy": float(np.mean(accs)),
            "images_per_sec": (last - first) * config.batch_size / seconds,
            "steps_per_sec": (last - first) / seconds,
        }
        row["train_loss"] = row["cross_entropy"] + row["weight_decay_loss"]
        if (epoch + 1) % args.eval_every_epochs == 0 or epoch + 1 == num_epochs:
            row["eval_top1"] = evaluate(
                model, config, args.data_dir, args.progress, args.memory_format
            )
        history.append(row)
        log.info(
            "%s seed %d epoch %d: loss %.4f, train acc %.3f, %s%.1f img/s, %.2f steps/s",
            variant,
            seed,
            epoch + 1,
            row["train_loss"],
            row["train_accuracy"],
            f"val top-1 {row['eval_top1']:.2f} %, " if "eval_top1" in row else "",
            row["images_per_sec"],
            row["steps_per_sec"],
        )
        _save_checkpoint(ckpt_path, model, opt, epoch + 1, history)
        write_atomic(
            os.path.join(workdir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history)
        )
    result = {
        "variant": variant,
        "framework": "pytorch",
        "seed": seed,
        "float_top1": history[-1]["eval_top1"],
        "train_loss": history[-1]["train_loss"],
        "epochs": num_epochs,
        "steps": total_steps,
        "eval_data": config.eval_data,
        "torch": torch.__version__,
        "memory_format": args.memory_format,
        "threads": torch.get_num_threads(),
        "run": run_info(),
    }
    write_json(result_path, result)
    os.remove(ckpt_path)  # the result exists; the checkpoint is 15 MB of nothing new
    return result


def _jax_layer_names(num_blocks: int) -> list[str]:
    """The JAX model's conv layers in the torch model's order (stem, blocks, logits)."""
    names = ["Conv2d_0"]
    for i in range(1, num_blocks + 1):
        names += [f"Conv2d_{i}/depthwise", f"Conv2d_{i}/pointwise"]
    return names + ["Logits"]


def load_jax_variables(model, variables: dict) -> None:
    """Copies the JAX model's ``variables`` (params and batch_stats) into the torch ``model``.

    Kernels go from HWIO (depthwise: HW1C) to torch's OIHW (depthwise: C1HW); BN scale, offset,
    mean and variance to the BatchNorm2d that follows the conv. Raises ValueError on a shape
    mismatch.
    """
    import torch

    from qfsep_jax.models.mobilenet_v1 import BLOCK_SPECS

    def node(tree, name):
        for part in name.split("/"):
            tree = tree[part]
        return tree

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    names = _jax_layer_names(len(BLOCK_SPECS))
    if len(convs) != len(names):
        raise ValueError(f"torch model has {len(convs)} convs, the JAX one {len(names)}")
    mods = list(model.modules())
    with torch.no_grad():
        for conv, name in zip(convs, names, strict=True):
            p = node(variables["params"], name)
            kernel = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
            if kernel.shape != conv.weight.shape:
                raise ValueError(f"{name}: kernel {tuple(kernel.shape)} vs {conv.weight.shape}")
            conv.weight.copy_(kernel)
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"])))
            if "bn_scale" in p:
                bn = next(
                    m for m in mods[mods.index(conv) :] if isinstance(m, torch.nn.BatchNorm2d)
                )
                stats = node(variables["batch_stats"], name)
                bn.weight.copy_(torch.from_numpy(np.asarray(p["bn_scale"])))
                bn.bias.copy_(torch.from_numpy(np.asarray(p["bn_bias"])))
                bn.running_mean.copy_(torch.from_numpy(np.asarray(stats["bn_mean"])))
                bn.running_var.copy_(torch.from_numpy(np.asarray(stats["bn_var"])))


def _kernel_grads_torch(model) -> list[np.ndarray]:
    """The conv kernels' gradients of ``model``, in layer order, as HWIO float64 arrays."""
    import torch

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return [c.weight.grad.double().numpy().transpose(2, 3, 1, 0) for c in convs]


def _relative(a: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Relative difference ``||a - ref|| / ||ref||`` over all arrays, and the largest per array."""
    num = math.sqrt(sum(float(np.sum((x - r) ** 2)) for x, r in zip(a, ref, strict=True)))
    den = math.sqrt(sum(float(np.sum(r**2)) for r in ref))
    per = [
        float(np.linalg.norm(x - r) / (np.linalg.norm(r) or 1.0))
        for x, r in zip(a, ref, strict=True)
    ]
    return {"all": num / den, "max_per_layer": max(per)}


def check_steps(variant: str, num_steps: int, args) -> dict:
    """How closely the peer computes the JAX training step, in each torch memory format.

    From the same initial weights (the JAX model's) on the same batches, with no dropout and a
    constant peak learning rate:

    * ``gradient_error_vs_float64``: the first step's kernel gradients (cross entropy, BN on
      batch statistics) of JAX and of the peer in float32, against the peer in float64;
    * per memory format, the loss of each of ``num_steps`` steps in both frameworks and the
      relative difference of the total update ``||dW_jax - dW_torch|| / ||dW_jax||`` (and of
      the BN moving statistics), per tensor.
    """
    import functools

    import jax
    import torch
    import torch.nn.functional as F

    from qfsep_jax import checkpointing
    from qfsep_jax import train as jax_train
    from qfsep_jax.data import sources, train_input
    from qfsep_jax.models.mobilenet_v1 import BLOCK_SPECS

    config = _jax_config(variant)
    config.dropout_rate = 0.0
    config.lr_schedule, config.warmup_epochs = "constant", 0.0
    num_classes = checkpointing.num_classes_of(config)
    model, variables = jax_train.create_model_and_variables(config, num_classes)
    schedule = jax_train.learning_rate_schedule(config, 1, num_steps)
    tx = jax_train.make_optimizer(config, schedule)
    step_config = jax_train.StepConfig(
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        weight_decay=config.weight_decay,
        depthwise_weight_decay=config.depthwise_weight_decay,
    )
    source = sources.make_source(config.train_data, args.data_dir, label_space=config.label_space)
    stream = train_input.TrainStream(
        seed=config.seed,
        global_batch=config.batch_size,
        image_size=config.image_size,
        area_range=tuple(config.crop_area_range),
        aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
        num_classes=num_classes,
    )
    batches = train_input.train_batches(source, stream, 0)
    batches = [
        (np.asarray(b["image"], np.float32), np.asarray(b["label"]))
        for b in (next(batches) for _ in range(num_steps))
    ]

    # The first step's gradients: JAX float32, torch float64 (the reference) and float32.
    image, label = batches[0]
    plain = model.clone(axis_name=None)

    def ce_loss(params):
        logits, _ = plain.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            image,
            train=True,
            mutable=["batch_stats"],
        )
        return jax_train.cross_entropy_loss(logits, label, num_classes, config.label_smoothing)

    jax_grads = jax.grad(ce_loss)(variables["params"])
    names = _jax_layer_names(len(BLOCK_SPECS))

    def node(tree, name):
        for part in name.split("/"):
            tree = tree[part]
        return tree

    jax_kernel_grads = [np.asarray(node(jax_grads, n)["kernel"], np.float64) for n in names]
    labels_t = torch.from_numpy(label.astype(np.int64))

    def torch_grads(memory_format: str, dtype) -> list[np.ndarray]:
        net = torch_mobilenet(config, num_classes, memory_format)
        load_jax_variables(net, variables)
        net = net.to(dtype)
        net.train()
        logits = net(to_torch_images(image, memory_format).to(dtype))
        F.cross_entropy(logits, labels_t, label_smoothing=config.label_smoothing).backward()
        return _kernel_grads_torch(net)

    reference = torch_grads("contiguous", torch.float64)
    gradient_error = {"jax": _relative(jax_kernel_grads, reference)}
    for fmt in MEMORY_FORMATS:
        gradient_error[f"pytorch_{fmt}"] = _relative(torch_grads(fmt, torch.float32), reference)

    # num_steps full training steps in both frameworks.
    state = jax_train.create_train_state(variables, tx, config.seed)
    step = jax_train.pmap_step(
        functools.partial(
            jax_train.train_step, model=model, tx=tx, schedule=schedule, step_config=step_config
        ),
        devices=jax.local_devices()[:1],
    )
    jax_losses = []
    for image, label in batches:
        state, metrics = step(state, {"image": image[None], "label": label[None]})
        jax_losses.append(float(metrics["train_loss"][0]))
    after = {"params": jax.device_get(state.params), "batch_stats": state.batch_stats}
    mirror = torch_mobilenet(config, num_classes)
    load_jax_variables(mirror, jax.device_get(after))  # JAX's result in torch's layout
    start = torch_mobilenet(config, num_classes)
    load_jax_variables(start, variables)
    start_sd, jax_sd = start.state_dict(), mirror.state_dict()
    formats = {}
    for fmt in MEMORY_FORMATS:
        peer = torch_mobilenet(config, num_classes, fmt)
        load_jax_variables(peer, variables)
        groups = _param_groups(peer, config)
        opt = torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
        peer.train()
        losses = []
        for (image, label), jax_loss in zip(batches, jax_losses, strict=True):
            logits = peer(to_torch_images(image, fmt))
            ce = F.cross_entropy(
                logits,
                torch.from_numpy(label.astype(np.int64)),
                label_smoothing=config.label_smoothing,
            )
            l2 = _l2_term(groups)
            opt.zero_grad(set_to_none=True)
            ce.backward()
            opt.step()
            losses.append({"jax": jax_loss, "pytorch": float(ce.detach()) + l2})
        tensors = []
        torch_sd = peer.state_dict()
        for key, ref in jax_sd.items():
            if key.endswith("num_batches_tracked"):
                continue
            ref, got = ref.double(), torch_sd[key].double()
            if key.endswith(("running_mean", "running_var")):
                diff = torch.linalg.vector_norm(got - ref) / (torch.linalg.vector_norm(ref) or 1)
            else:
                base = start_sd[key].double()
                d_jax = ref - base
                diff = torch.linalg.vector_norm(got - base - d_jax) / (
                    torch.linalg.vector_norm(d_jax) or 1
                )
            tensors.append({"tensor": key, "relative_difference": float(diff)})
        formats[fmt] = {
            "losses": losses,
            "max_relative_update_difference": max(
                t["relative_difference"] for t in tensors if "running" not in t["tensor"]
            ),
            "max_relative_bn_stat_difference": max(
                t["relative_difference"] for t in tensors if "running" in t["tensor"]
            ),
            "tensors": tensors,
        }
    return {
        "variant": variant,
        "steps": num_steps,
        "learning_rate": config.learning_rate,
        "layers_in_order": names,
        "gradient_error_vs_float64": gradient_error,
        "memory_formats": formats,
    }


def jax_runs(workdir: str, variants: list[str], seeds: list[int]) -> dict[tuple[str, int], dict]:
    """The figure5 job's runs in ``workdir`` for these variants and seeds: row and curves."""
    from qfsep_jax import metrics_log
    from qfsep_jax.analysis import curves

    out = {}
    for v in variants:
        for seed in seeds:
            d = os.path.join(workdir, v, f"seed{seed}")
            if not os.path.isfile(os.path.join(d, "results.json")):
                continue
            r = read_json(os.path.join(d, "results.json"))
            row = {
                "variant": v,
                "framework": "jax",
                "seed": seed,
                "float_top1": r["float"]["top1"],
                "train_loss": None,
                "source": os.path.join(d, "results.json"),
            }
            curve = None
            train_dir = os.path.join(d, "train")
            if os.path.isfile(os.path.join(train_dir, "metrics.jsonl")):
                config = _jax_config(v)
                total = read_json(os.path.join(train_dir, "results.json"))["total_steps"]
                curve = curves.per_epoch(
                    metrics_log.read_metrics(train_dir).values(),
                    max(1, round(total / config.num_epochs)),
                )
                row["train_loss"] = curve["train_loss"][-1]
            out[(v, seed)] = {"row": row, "curve": curve}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="original,qf_relu6", help=f"of {sorted(VARIANT_BLOCKS)}")
    p.add_argument("--seeds", default="0", help="comma list")
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--workdir", default="results/figure5_peer")
    p.add_argument("--epochs", type=float, default=0.0, help="0: the JAX config's (30)")
    p.add_argument("--eval_every_epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--jax_workdir",
        default="results/figure5",
        help="the figure5 job's workdir whose runs of the same variants and seeds go beside",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--memory_format",
        default="contiguous",
        choices=MEMORY_FORMATS,
        help="torch activation layout for training (channels_last: faster, less accurate BN)",
    )
    p.add_argument(
        "--check_steps",
        type=int,
        default=0,
        help="instead of training: run this many steps of both frameworks from the same weights "
        "on the same batches and write figure5_peer_step_check.json",
    )
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"data directory {args.data_dir!r} does not exist (--data_dir)")
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "PyTorch is not installed: pip install -r requirements-bench.txt"
        ) from None
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANT_BLOCKS:
            raise SystemExit(f"unknown variant {v!r}; choose from {sorted(VARIANT_BLOCKS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.check_steps:
        checks = [check_steps(v, args.check_steps, args) for v in variants]
        path = os.path.join(args.workdir, "figure5_peer_step_check.json")
        command = " ".join(["python", "tools/figure5_peer.py", *argv_used])
        write_json(path, {"checks": checks, "command": command, "run": run_info()})
        for c in checks:
            errors = ", ".join(
                f"{k} {v['all']:.1e} (layer max {v['max_per_layer']:.1e})"
                for k, v in c["gradient_error_vs_float64"].items()
            )
            print(f"{c['variant']}: first-step kernel gradients against float64: {errors}")
            for fmt, f in c["memory_formats"].items():
                print(
                    f"  pytorch {fmt}, {c['steps']} steps at lr {c['learning_rate']}: max "
                    f"relative update difference to JAX {f['max_relative_update_difference']:.1e}"
                    f", BN statistics {f['max_relative_bn_stat_difference']:.1e}; loss per step "
                    "(jax/pytorch) "
                    + ", ".join(f"{r['jax']:.5f}/{r['pytorch']:.5f}" for r in f["losses"])
                )
        print(f"wrote {path}")
        return
    results = [train_one(v, s, args) for v in variants for s in seeds]
    keys = ("variant", "framework", "seed", "float_top1", "train_loss")
    rows = [{k: r[k] for k in keys} for r in results]
    jax = jax_runs(args.jax_workdir, variants, seeds)
    rows += [j["row"] for j in jax.values()]
    write_json(
        os.path.join(args.workdir, "figure5_peer.json"),
        {
            "rows": rows,
            "command": " ".join(["python", "tools/figure5_peer.py", *argv_used]),
            "memory_format": args.memory_format,
            "run": run_info(),
        },
    )
    _plot(args, variants, seeds, jax)
    for r in rows:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        print(
            f"{r['variant']:20s} {r['framework']:8s} seed {r['seed']}: "
            f"float top-1 {r['float_top1']:.2f} %, final-epoch train loss {loss}"
        )


def _plot(args, variants: list[str], seeds: list[int], jax: dict) -> None:
    from qfsep_jax.analysis import curves, plots

    lines = {}
    for v in variants:
        for seed in seeds:
            if (v, seed) in jax and jax[(v, seed)]["curve"]:
                lines[f"{v} jax seed{seed}"] = jax[(v, seed)]["curve"]
            metrics = os.path.join(args.workdir, v, f"seed{seed}", "metrics.jsonl")
            if os.path.isfile(metrics):
                rows = [json.loads(line) for line in open(metrics) if line.strip()]
                lines[f"{v} pytorch seed{seed}"] = curves.per_epoch(rows, 1)
    if lines:
        plots.plot_training_curves(
            lines,
            os.path.join(args.workdir, "figure5_peer_curves.png"),
            title="JAX (this project) against the PyTorch peer, same recipe and images",
        )


if __name__ == "__main__":
    main()
