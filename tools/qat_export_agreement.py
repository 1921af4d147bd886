"""How a QAT model exported after a few steps agrees with its integer-only pass.

    python tools/qat_export_agreement.py [--blocks original,qf] [--steps 0,1,3,10]
        [--image_size 32] [--out results/qat_export_agreement/results.json]

Trains a tiny MobileNetV1 (width 0.25, stem stride 1, 10 classes, TF8 per-tensor, EMA ranges
with TF's decay 0.999, no BN freeze, no quant delay) from a random initialization with the
project's QAT step (:func:`qfsep_jax.train.train_step`, SGD with momentum, learning rate 0.01) on
the first ``--train_images`` Imagenette training images, and after each step count in ``--steps``
exports it (:func:`qfsep_jax.quantized.from_qat`), converts it
(:func:`qfsep_jax.integer.from_quantized`) and compares on the first ``--eval_images`` Imagenette
validation images (TF-slim eval preprocessing):

* ``qat_vs_export_max_abs``: the QAT model's inference pass (``quant_mode="qat"``,
  ``train=False``) against the export's ``fake`` pass, largest |logit difference|;
* ``layerwise_max_lsb``: per layer, the largest |integer code - simulation code| with both fed
  the integer pass's layer input (:func:`qfsep_jax.analysis.agreement.layerwise_agreement`);
* ``end_to_end``: both passes run freely
  (:func:`~qfsep_jax.analysis.agreement.end_to_end_agreement`): top-1 agreement on 8-bit
  logit codes and on fine logits, the largest per-layer code difference;
* ``aligned_end_to_end``: the same against the simulation aligned with the integer arithmetic
  (int32 biases, TFLite's double rounding: :mod:`qfsep_jax.integer.align`), which leaves far
  fewer 1-LSB differences per layer: how much of the end-to-end spread is amplification;
* ``max_layer_gain_lsb``: per layer, ``max_c M_c * sum |q_w - Z_w|``, the most a 1-LSB change of
  every input code can move an output code.

A step count of 0 exports the untrained model: its ranges were never observed, which
``from_qat`` refuses (the error is recorded). Writes ``--out`` atomically and prints a summary.

``--run DIR`` instead compares the newest checkpoint of a QAT training run (e.g.
``configs/qat_tfslim.py:smoke``, 3 steps) the same way, on the first ``--eval_images`` images of
the run's own eval data.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from qfsep_jax import integer, train  # noqa: E402
from qfsep_jax import quantized as quantized_lib  # noqa: E402
from qfsep_jax.analysis import agreement  # noqa: E402
from qfsep_jax.integer import align  # noqa: E402
from qfsep_jax.io_utils import write_json  # noqa: E402
from qfsep_jax.models.mobilenet_v1 import MobileNetV1  # noqa: E402
from qfsep_jax.quant.scheme import QuantConfig  # noqa: E402

NUM_CLASSES = 10


def tiny_qat_model(block: str, quant: QuantConfig | None = None) -> MobileNetV1:
    """The QAT model of these checks: width 0.25, stem stride 1, 10 classes, EMA ranges."""
    return MobileNetV1(
        num_classes=NUM_CLASSES,
        width_multiplier=0.25,
        block=block,
        dropout_rate=0.0,
        stem_stride=1,
        quant=quant or QuantConfig(observer="ema", ema_decay=0.999),
        axis_name=train.AXIS,
        depthwise_impl="lax",
    )


def qat_states(
    model: MobileNetV1, images: np.ndarray, labels: np.ndarray, steps: list[int], seed: int = 0
):
    """Yields ``(step count, model variables)`` after each count in ``steps`` of QAT training.

    Every step trains on the same batch ``images``/``labels`` with SGD (momentum 0.9, learning
    rate 0.01) from a random initialization; count 0 is the initialization itself.
    """
    size = images.shape[1]
    init = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(seed), jnp.zeros((1, size, size, 3), jnp.float32)
    )
    schedule = optax.constant_schedule(0.01)
    tx = optax.sgd(schedule, momentum=0.9)
    state = train.create_train_state(jax.tree.map(np.asarray, init), tx, seed)
    step_config = train.StepConfig(num_classes=NUM_CLASSES, qat=True)
    step = train.pmap_step(
        functools.partial(
            train.train_step, model=model, tx=tx, schedule=schedule, step_config=step_config
        ),
        jax.local_devices()[:1],
    )
    batch = {"image": images[None], "label": labels[None].astype(np.int32)}
    done = 0
    for target in sorted(steps):
        while done < target:
            # Host arrays in every call: one compilation (device arrays would make a second).
            state = jax.device_get(step(state, batch)[0])
            done += 1
        yield target, train.model_variables(state)


def qat_vs_export(model: MobileNetV1, variables: dict, exported, images) -> float:
    """Largest |logit difference| of the QAT inference pass and the export's ``fake`` pass."""
    inference = model.clone(axis_name=None)
    qat = jax.jit(lambda v, x: inference.apply(v, x, train=False, quant_mode="qat"))
    fake = jax.jit(lambda v, x: exported.model.apply(v, x, quant_mode="fake"))
    return float(jnp.max(jnp.abs(qat(variables, images) - fake(exported.variables, images))))


def layer_gains(int_model) -> dict[str, float]:
    """Per conv layer: ``max_c M_c * sum |q_w - Z_w|`` (output LSBs per input LSB, worst case)."""
    gains = {}
    for layer in int_model.layers:
        if layer.weight is None:
            continue
        m = np.asarray(layer.multiplier, np.float64) * 2.0 ** np.asarray(layer.shift, np.float64)
        w = np.asarray(layer.weight, np.int64) - np.asarray(layer.weight_zero_point, np.int64)
        total = np.abs(w.reshape(-1, w.shape[-1])).sum(axis=0)
        gains[layer.name] = float(np.max(m / 2**31 * total))
    return gains


def compare(model: MobileNetV1, variables: dict, images: np.ndarray) -> dict[str, Any]:
    """Exports one QAT state and compares the passes (see the module docstring)."""
    try:
        exported = quantized_lib.from_qat(model, variables)
    except ValueError as err:
        return {"export_error": str(err)}
    int_model = integer.from_quantized(exported)
    qmodel, qvars = exported.model, exported.variables
    layerwise = agreement.layerwise_agreement(qmodel, qvars, int_model, images)
    e2e = agreement.end_to_end_agreement(qmodel, qvars, int_model, images)
    snapped_model, snapped = align.snap_biases(qmodel, qvars, int_model)
    alignment = align.rounding_alignment(int_model)
    aligned_lw = agreement.layerwise_agreement(
        snapped_model, snapped, int_model, images, alignment=alignment
    )
    aligned = agreement.end_to_end_agreement(
        snapped_model, snapped, int_model, images, alignment=alignment
    )

    def summary(result: dict) -> dict[str, Any]:
        layers = result["layers"]
        return {
            "top1_agreement": result["top1_agreement"],
            "top1_agreement_fine": result["top1_agreement_fine"],
            "max_lsb": max(v["max_lsb"] for v in layers.values()),
            "max_lsb_per_layer": {k: v["max_lsb"] for k, v in layers.items()},
            "max_frac_differing": max(v["frac_differing"] for v in layers.values()),
        }

    return {
        "qat_vs_export_max_abs": qat_vs_export(model, variables, exported, images),
        "layerwise_max_lsb": {k: v["max_lsb"] for k, v in layerwise.items()},
        "layerwise_max_frac_differing": max(v["frac_differing"] for v in layerwise.values()),
        "aligned_layerwise_max_frac_differing": max(
            v["frac_differing"] for v in aligned_lw.values()
        ),
        "end_to_end": summary(e2e),
        "aligned_end_to_end": summary(aligned),
        "max_layer_gain_lsb": layer_gains(int_model),
    }


def _images(data_dir: str, split: str, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of an Imagenette split, TF-slim eval preprocessing."""
    from qfsep_jax.data import pipeline, preprocess, sources

    source = sources.folder_source(data_dir, f"imagenette/{split}", "imagenette")
    prep = functools.partial(preprocess.eval_preprocess, image_size=size, crop_fraction=0.875)
    batch = next(iter(pipeline.batches(source, prep, count, limit=count)))
    return np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32)


def compare_run(workdir: str, count: int) -> dict[str, Any]:
    """:func:`compare` for the newest checkpoint of the QAT training run in ``workdir``."""
    from qfsep_jax import checkpointing
    from qfsep_jax.data.input import eval_input

    config = checkpointing.load_run_config(workdir)
    model, _ = checkpointing.model_from_config(config, checkpointing.num_classes_of(config))
    variables = checkpointing.load_variables(workdir)
    batch = next(iter(eval_input(config, config.eval_data, limit=count, batch_size=count).make()))
    images = np.asarray(batch["image"][: int(batch["mask"].sum())], np.float32)
    row = {"run": workdir, "eval_data": config.eval_data, "images": len(images)}
    return {**row, **compare(model, variables, images)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="original,qf")
    p.add_argument("--steps", default="0,1,3,10")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--train_images", type=int, default=16)
    p.add_argument("--eval_images", type=int, default=64)
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--out", default="results/qat_export_agreement/results.json")
    p.add_argument("--run", default="", help="compare this QAT run's newest checkpoint instead")
    args = p.parse_args()
    start = time.time()
    if args.run:
        row = compare_run(args.run, args.eval_images)
        print({k: v for k, v in row.items() if not isinstance(v, dict)})
        _write(args, [row], start, data=f"{row['eval_data']} (first {row['images']})")
        return
    train_x, train_y = _images(args.data_dir, "train", args.train_images, args.image_size)
    eval_x, _ = _images(args.data_dir, "val", args.eval_images, args.image_size)
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for block in args.blocks.split(","):
        model = tiny_qat_model(block)
        for count, variables in qat_states(model, train_x, train_y, steps):
            row = {"block": block, "steps": count, **compare(model, variables, eval_x)}
            rows.append(row)
            if "export_error" in row:
                print(f"{block:8s} steps {count:2d}: export refused: {row['export_error']}")
                continue
            e2e, al = row["end_to_end"], row["aligned_end_to_end"]
            print(
                f"{block:8s} steps {count:2d}: qat vs export {row['qat_vs_export_max_abs']:.3g}; "
                f"layerwise max {max(row['layerwise_max_lsb'].values())} LSB; end to end max "
                f"{e2e['max_lsb']} LSB, top-1 {e2e['top1_agreement']:.3f} (fine "
                f"{e2e['top1_agreement_fine']:.3f}); aligned sim end to end max {al['max_lsb']}"
                f" LSB, top-1 fine {al['top1_agreement_fine']:.3f}",
                flush=True,
            )
    data = (
        f"imagenette/train (first {args.train_images}), imagenette/val (first "
        f"{args.eval_images}), {args.image_size} px"
    )
    _write(args, rows, start, data)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write(args: argparse.Namespace, rows: list[dict], start: float, data: str) -> None:
    out = {
        "command": "python " + " ".join(sys.argv),
        "data": data,
        "run": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _cpu_name(),
            "cores": os.cpu_count(),
            "jax": jax.__version__,
            "seconds": round(time.time() - start, 1),
        },
        "rows": rows,
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
