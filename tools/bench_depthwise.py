"""Benchmark: the depthwise implementations against each other, per layer and per training step.

    python tools/bench_depthwise.py [--impls shift,native] [--threads 2] [--reps 7]
                                     [--steps_rows large,small] [--modes float,qat]
                                     [--out results/bench/depthwise.json]

Not a test. One process, both (or all) implementations compiled side by side and timed in
interleaved reps, so that they see the same machine load (this machine's timings move by
10-25 % between processes, more than the differences measured here):

* per layer: every depthwise layer shape of MobileNetV1 1.0/224 at batch 32 (forward, and
  forward plus the input and kernel gradients through ``jax.vjp``), best of ``--reps``; and
  its RGB stem conv (``layers.conv2d`` with the same ``impl``: forward, and forward plus the
  kernel gradient, which is all the stem's backward pass computes in training);
* per step: the project's training step (``tools/benchlib.py``'s rows and modes) with each
  implementation, median over reps of the per-rep time ratio to the first implementation.
  The impl is the model's ``depthwise_impl``, so with ``native`` the step also runs the stem's
  native kernel gradient and BN's native training sums (``shift`` uses XLA's for both).

``lax`` (XLA's grouped conv) can be added to ``--impls``; on CPU it is one to two orders of
magnitude slower and makes the run long. Prints a table and ends with one line per step row,
``step: <row> <mode> <impl> <ms> ms (x<speedup> vs <first impl>)``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

from qfsep_jax import malloc_tuning
from tools import benchlib

# (input H = W, channels, stride) of MobileNetV1 1.0/224's depthwise layers, in order.
LAYERS_1_0_224 = (
    (112, 32, 1),
    (112, 64, 2),
    (56, 128, 1),
    (56, 128, 2),
    (28, 256, 1),
    (28, 256, 2),
    (14, 512, 1),
    (14, 512, 1),
    (14, 512, 1),
    (14, 512, 1),
    (14, 512, 1),
    (14, 512, 2),
    (7, 1024, 1),
)
BATCH = 32


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default="shift,native", help="comma list of lax, shift, native")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps_rows", default="large,small", help="step rows ('' to skip)")
    p.add_argument("--modes", default="float,qat")
    p.add_argument("--out", default="", help="also write the results as JSON here (atomically)")
    args = p.parse_args(argv)
    impls = args.impls.split(",")
    bad = [i for i in impls if i not in ("lax", "shift", "native")]
    if bad or len(impls) < 2:
        p.error(f"--impls needs two or more of lax, shift, native (got {args.impls!r})")
    for row in filter(None, args.steps_rows.split(",")):
        if row not in benchlib.ROWS:
            p.error(f"unknown row {row!r}; choose from {sorted(benchlib.ROWS)}")
    if args.threads < 1 or args.reps < 1:
        p.error("--threads and --reps must be positive")
    return args


def _best_ms(fns: dict, reps: int) -> dict[str, float]:
    """Each zero-argument ``fn`` called once (compilation), then its best of interleaved reps."""
    for fn in fns.values():
        fn()
    return {name: min(t) * 1e3 for name, t in _interleaved(fns, reps).items()}


def _interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument ``fn``, rep by rep in turn."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _layer_fns(impl: str, x, k, g, stride: int) -> dict:
    """Zero-argument callables: ``impl``'s forward, and its forward plus both gradients."""
    import jax

    from qfsep_jax.models.depthwise import depthwise_conv2d

    conv = lambda x, k: depthwise_conv2d(x, k, stride, impl=impl)  # noqa: E731
    fwd = jax.jit(conv)
    bwd = jax.jit(lambda x, k, g: jax.vjp(conv, x, k)[1](g))
    return {
        f"{impl} fwd": lambda: jax.block_until_ready(fwd(x, k)),
        f"{impl} fwd+bwd": lambda: jax.block_until_ready(bwd(x, k, g)),
    }


def stem_row(impls: list[str], reps: int) -> dict:
    """Forward and forward + kernel-gradient milliseconds of the 1.0/224 stem per impl."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qfsep_jax.models.layers import conv2d

    rs = np.random.RandomState(1)
    size, cin, cout, stride = 224, 3, 32, 2
    x = jnp.asarray(rs.randn(BATCH, size, size, cin).astype(np.float32))
    k = jnp.asarray(rs.randn(3, 3, cin, cout).astype(np.float32))
    g = jnp.asarray(rs.randn(BATCH, size // stride, size // stride, cout).astype(np.float32))
    fns = {}
    for impl in impls:
        conv = functools.partial(conv2d, stride=stride, impl=impl)
        fwd = jax.jit(conv)
        bwd = jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g))
        fns[f"{impl} fwd"] = lambda f=fwd: jax.block_until_ready(f(x, k))
        fns[f"{impl} fwd+bwd"] = lambda f=bwd: jax.block_until_ready(f(x, k, g))
    ms = _best_ms(fns, reps)
    return {"input": [BATCH, size, size, cin], "out_channels": cout, "stride": stride, "ms": ms}


def layer_table(impls: list[str], reps: int) -> list[dict]:
    """Forward and forward+backward milliseconds of each layer shape and implementation."""
    import jax.numpy as jnp
    import numpy as np

    rows = []
    rs = np.random.RandomState(0)
    for size, channels, stride in LAYERS_1_0_224:
        x = jnp.asarray(rs.randn(BATCH, size, size, channels).astype(np.float32))
        k = jnp.asarray(rs.randn(3, 3, 1, channels).astype(np.float32))
        out = -(-size // stride)
        g = jnp.asarray(rs.randn(BATCH, out, out, channels).astype(np.float32))
        fns = {}
        for impl in impls:
            fns.update(_layer_fns(impl, x, k, g, stride))
        ms = _best_ms(fns, reps)
        rows.append({"input": [BATCH, size, size, channels], "stride": stride, "ms": ms})
    return rows


def step_table(impls: list[str], rows: list[str], modes: list[str], reps: int) -> list[dict]:
    """Training-step milliseconds per implementation, and per-rep ratios to the first one."""
    out = []
    for row in rows:
        for mode in modes:
            runners = {impl: benchlib.jax_runner(row, mode, impl) for impl in impls}
            for run in runners.values():
                run()
                run()  # compile and warm up
            times = _interleaved(runners, reps)
            first = impls[0]
            out.append(
                {
                    "row": row,
                    "mode": mode,
                    "ms_best": {i: min(t) * 1e3 for i, t in times.items()},
                    "speedup_vs_first_median": {
                        i: statistics.median(a / b for a, b in zip(times[first], t, strict=True))
                        for i, t in times.items()
                    },
                }
            )
            del runners
    return out


def main(argv=None) -> None:
    args = _parse(argv)
    cpus = benchlib.pin_threads(args.threads)
    malloc_tuning.tune_malloc()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    impls = args.impls.split(",")
    print(f"# jax {jax.__version__}; CPUs {cpus}; impls {impls}; {args.reps} reps", flush=True)
    layers = layer_table(impls, args.reps)
    names = [f"{i} {w}" for w in ("fwd", "fwd+bwd") for i in impls]
    print("input, stride | " + " | ".join(f"{n} ms" for n in names))
    for r in layers:
        print(f"{r['input']}, {r['stride']} | " + " | ".join(f"{r['ms'][n]:.2f}" for n in names))
    totals = {n: sum(r["ms"][n] for r in layers) for n in names}
    print("sum | " + " | ".join(f"{totals[n]:.1f}" for n in names), flush=True)
    stem = stem_row(impls, args.reps)
    label = f"stem {stem['input']} -> {stem['out_channels']}, {stem['stride']}"
    print(f"{label} (bwd: kernel gradient) | " + " | ".join(f"{stem['ms'][n]:.2f}" for n in names))
    rows = [r for r in args.steps_rows.split(",") if r]
    steps = step_table(impls, rows, args.modes.split(","), args.reps)
    for s in steps:
        for impl in impls:
            print(
                f"step: {s['row']} {s['mode']} {impl} {s['ms_best'][impl]:.0f} ms "
                f"(x{s['speedup_vs_first_median'][impl]:.3f} vs {impls[0]})"
            )
    if args.out:
        from qfsep_jax import io_utils

        io_utils.write_json(
            os.path.abspath(args.out),
            {
                "jax": jax.__version__,
                "cpus": sorted(cpus),
                "reps": args.reps,
                "impls": impls,
                "layers": layers,
                "layer_totals_ms": totals,
                "stem": stem,
                "steps": steps,
                "run": io_utils.run_info(),
            },
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
