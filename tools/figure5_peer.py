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


def torch_mobilenet(config, num_classes: int):
    """The JAX MobileNetV1 of ``config.model`` as a torch module (NCHW, channels-last memory)."""
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
    return model.to(memory_format=torch.channels_last)


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


def evaluate(model, config, data_dir: str, show_progress: bool) -> float:
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
            x = torch.from_numpy(np.array(b["image"])).permute(0, 3, 1, 2)
            pred = model(x.contiguous(memory_format=torch.channels_last)).argmax(1).numpy()
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

    model = torch_mobilenet(config, num_classes)
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
            x = torch.from_numpy(np.array(b["image"])).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last)
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
            row["eval_top1"] = evaluate(model, config, args.data_dir, args.progress)
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
        "threads": torch.get_num_threads(),
        "run": run_info(),
    }
    write_json(result_path, result)
    os.remove(ckpt_path)  # the result exists; the checkpoint is 15 MB of nothing new
    return result


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
