"""Benchmark: the jitted integer-only pass vs the float pass vs LiteRT, same model and inputs.

    python tools/bench_integer.py [--model M.tflite] [--batch_sizes 1,50] [--threads 0]
                                   [--out results.json]

The model is a uint8 MobileNetV1-family ``.tflite`` (default: the official 0.25/128). The float
pass is this project's BN-folded float MobileNetV1 with the model's dequantized weights (same
network, float32, the CPU-fast depthwise implementation). LiteRT runs its built-in kernels
(no XNNPACK delegate, the ones the integer pass is bit-exact with) and, for reference, its
default XNNPACK path; the official models have a fixed batch-1 RESHAPE, so LiteRT runs a batch
as that many batch-1 invocations. ``--threads 0`` (default) lets XLA use every core and gives
LiteRT ``os.cpu_count()`` threads; ``--threads 1`` pins both to one thread (XLA flags are set
before jax is imported). Prints images/s per engine and batch size, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/data/models/mobilenet_v1_0.25_128_quant.tflite")
    p.add_argument("--batch_sizes", default="1,50")
    p.add_argument("--threads", type=int, default=0, help="0: all cores; 1: single thread")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (best is reported)")
    p.add_argument("--out", default="", help="also write the results as JSON here (atomically)")
    return p.parse_args()


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    args = _parse()
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from qfsep_jax import integer, io_utils
    from qfsep_jax.integer.convert import float_variables
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1

    threads = args.threads or os.cpu_count()
    int_model = integer.from_tflite(args.model, rounding="litert_x86")
    kwargs, fvars = float_variables(int_model)
    float_model = MobileNetV1(**kwargs)
    first = int_model.layers[0]
    size_probe = Interpreter(model_path=args.model)
    shape = tuple(int(d) for d in size_probe.get_input_details()[0]["shape"][1:])
    print(f"model {args.model}: input {shape}, {len(int_model.layers)} layers")
    print(
        f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()}), "
        f"threads: {'XLA default (all cores)' if args.threads == 0 else 1}, "
        f"LiteRT num_threads={threads}"
    )

    float_apply = jax.jit(lambda v, x: float_model.apply(v, x))
    interpreters = {
        "litert_builtin": Interpreter(
            model_path=args.model,
            num_threads=threads,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        ),
        "litert_xnnpack": Interpreter(model_path=args.model, num_threads=threads),
    }
    for it in interpreters.values():
        it.allocate_tensors()

    rng = np.random.default_rng(0)
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        q = rng.integers(0, 256, (bs, *shape), dtype=np.uint8)
        q_dev = jax.device_put(q)
        x_float = jax.device_put(
            np.float32(first.input_scale) * (q.astype(np.float32) - first.input_zero_point)
        )
        times = {
            "int_pass": _best(
                lambda q_dev=q_dev: integer.run(int_model, q_dev).block_until_ready(),
                args.repeats,
            ),
            "float_pass": _best(
                lambda x=x_float: float_apply(fvars, x).block_until_ready(), args.repeats
            ),
        }
        for name, it in interpreters.items():
            index = it.get_input_details()[0]["index"]

            def litert(it=it, index=index, q=q):
                for i in range(len(q)):
                    it.set_tensor(index, q[i : i + 1])
                    it.invoke()

            times[name] = _best(litert, max(1, args.repeats // 2))
        ips = {k: bs / v for k, v in times.items()}
        rows.append((bs, ips))
        print(f"batch {bs:4d}: " + "  ".join(f"{k} {v:9.1f} img/s" for k, v in ips.items()))
        print(
            f"            int/float {ips['int_pass'] / ips['float_pass']:.2f}x   "
            f"int/litert_builtin {ips['int_pass'] / ips['litert_builtin']:.2f}x   "
            f"int/litert_xnnpack {ips['int_pass'] / ips['litert_xnnpack']:.2f}x"
        )
    if args.out:
        io_utils.write_json(
            os.path.abspath(args.out),
            {
                "model": args.model,
                "input_shape": list(shape),
                "threads": "XLA default (all cores)" if args.threads == 0 else 1,
                "litert_num_threads": threads,
                "images_per_sec": {str(bs): ips for bs, ips in rows},
                "run": io_utils.run_info(),
            },
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
