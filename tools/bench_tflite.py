"""Benchmark: LiteRT speed of exported QF and original-block MobileNets and the official file.

    python tools/bench_tflite.py [--width 0.25] [--image_size 128] [--num_classes 1001]
        [--qf QF.tflite --original ORIG.tflite] [--threads 1,2] [--out results/bench/tflite.json]

Three uint8 models, run in one process: a QF-block MobileNetV1 and an original-block one, both
exported by :func:`qfsep_jax.integer.to_tflite` at the same width, resolution and class count,
and the official ``mobilenet_v1_0.25_128_quant.tflite``. Without ``--qf``/``--original`` the two
are built here: random weights and BN statistics, TF8 post-training quantization on 8 random
images. Integer kernels take the same time whatever the weight values, so these time the
architectures; pass exported files (e.g. a QAT run's ``export_tflite`` output) to time those.
Each model runs in LiteRT with its built-in kernels (no delegate; what the integer pass is
bit-exact with) and with its default XNNPACK delegate, at every ``--threads`` count, batch 1.

Timing: every (model, engine, threads) gets its own interpreter; after a warm-up, ``--rounds``
rounds each time ``--invokes`` invocations of every configuration in turn, so that load from
other processes falls on all of them alike. Reported: images/s of the best round (and the median
round), and the ratios QF / original and QF / official per engine and thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

OFFICIAL = "../shared/data/models/mobilenet_v1_0.25_128_quant.tflite"


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--num_classes", type=int, default=1001)
    p.add_argument("--qf", default="", help="an exported QF-block .tflite (default: build one)")
    p.add_argument("--original", default="", help="an exported original-block .tflite")
    p.add_argument("--official", default=OFFICIAL)
    p.add_argument("--threads", default="1,2", help="LiteRT num_threads values")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--invokes", type=int, default=50, help="invocations per configuration/round")
    p.add_argument("--save_dir", default="", help="keep the built models here")
    p.add_argument("--out", default="", help="write the results as JSON here (atomically)")
    return p.parse_args(argv)


def build_exported(block: str, width: float, image_size: int, num_classes: int, path: str) -> str:
    """A random-weight MobileNetV1 of ``block``, TF8 post-training quantized, exported."""
    import numpy as np

    from qfsep_jax import integer, ptq
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1, random_variables

    model = MobileNetV1(
        num_classes=num_classes, width_multiplier=width, block=block, dropout_rate=0.0
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, image_size, image_size, 3)).astype(np.float32)
    variables = random_variables(model, image_size)
    qmodel = ptq.quantize_post_training(
        model, variables, ptq.recipe_by_name("tf8_per_tensor"), lambda: [{"image": images}], 1
    )
    integer.to_tflite(integer.from_quantized(qmodel), path, image_size)
    return path


def _interpreter(path: str, engine: str, threads: int):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = {
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "xnnpack": OpResolverType.AUTO,
    }[engine]
    it = Interpreter(model_path=path, num_threads=threads, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    return it


def main(argv=None) -> dict:
    args = _parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from qfsep_jax import io_utils
    from qfsep_jax.jobs.tflite_check import litert_version

    threads = [int(t) for t in args.threads.split(",")]
    folder = args.save_dir or tempfile.mkdtemp(prefix="bench_tflite_")
    models = {}
    for block in ("qf", "original"):
        given = getattr(args, block)
        if given:
            models[block] = given
        else:
            name = f"{block}_{args.width}_{args.image_size}_{args.num_classes}.tflite"
            models[block] = build_exported(
                block, args.width, args.image_size, args.num_classes, os.path.join(folder, name)
            )
    models["official"] = args.official
    configs = {}
    for model, path in models.items():
        for engine in ("builtin", "xnnpack"):
            for t in threads:
                it = _interpreter(path, engine, t)
                detail = it.get_input_details()[0]
                image = np.random.default_rng(0).integers(
                    np.iinfo(detail["dtype"]).min,
                    np.iinfo(detail["dtype"]).max + 1,
                    detail["shape"],
                    dtype=detail["dtype"],
                )
                it.set_tensor(detail["index"], image)
                configs[model, engine, t] = it
    shapes = {
        m: [int(d) for d in _interpreter(p, "builtin", 1).get_input_details()[0]["shape"]]
        for m, p in models.items()
    }
    print("models: " + ", ".join(f"{m} {shapes[m]} ({p})" for m, p in models.items()))
    print(f"machine: {os.cpu_count()} CPUs; LiteRT threads {threads}, batch 1")
    for it in configs.values():  # warm-up (XNNPACK packs its weights on the first run)
        for _ in range(5):
            it.invoke()
    load_before = os.getloadavg()
    rates: dict = {k: [] for k in configs}
    for r in range(args.rounds):
        for key, it in configs.items():
            start = time.perf_counter()
            for _ in range(args.invokes):
                it.invoke()
            rates[key].append(args.invokes / (time.perf_counter() - start))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for (model, engine, t), values in rates.items():
        rows.append(
            {
                "model": model,
                "engine": engine,
                "threads": t,
                "images_per_sec_best": max(values),
                "images_per_sec_median": statistics.median(values),
            }
        )
    best = {(r["model"], r["engine"], r["threads"]): r["images_per_sec_best"] for r in rows}
    ratios = []
    for engine in ("builtin", "xnnpack"):
        for t in threads:
            qf = best["qf", engine, t]
            ratios.append(
                {
                    "engine": engine,
                    "threads": t,
                    "qf_over_original": qf / best["original", engine, t],
                    "qf_over_official": qf / best["official", engine, t],
                }
            )
    print(f"{'model':10s} {'engine':8s} {'threads':>7s} {'img/s best':>11s} {'median':>9s}")
    for r in rows:
        print(
            f"{r['model']:10s} {r['engine']:8s} {r['threads']:7d} "
            f"{r['images_per_sec_best']:11.1f} {r['images_per_sec_median']:9.1f}"
        )
    print(f"load average (1/5/15 min) before {load_before}, after {os.getloadavg()}")
    for r in ratios:
        print(
            f"{r['engine']:8s} {r['threads']} thread(s): QF/original "
            f"{r['qf_over_original']:.3f}, QF/official {r['qf_over_official']:.3f}"
        )
    out = {
        "models": models,
        "input_shapes": shapes,
        "built": {m: not getattr(args, m) for m in ("qf", "original")},
        "width": args.width,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "batch": 1,
        "rounds": args.rounds,
        "invokes_per_round": args.invokes,
        "rows": rows,
        "ratios_best": ratios,
        # Other processes on the machine: 1/5/15-minute load averages around the timed rounds.
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "litert_version": litert_version(),
        "run": io_utils.run_info(),
    }
    if args.out:
        io_utils.write_json(os.path.abspath(args.out), out)
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
