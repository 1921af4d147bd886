"""Profile: where one JAX training step spends its time on CPU, per op kind and layer type.

    python launch/profile_train.py [--row small|large] [--mode float|qat] [--threads 1]
                                   [--steps 3] [--top 25] [--depthwise_impl auto] [--out F.json]

Times the same step as ``launch/bench_train.py`` (``qfsep_jax.train.train_step`` under pmap, one
CPU device, SGD momentum) inside ``jax.profiler.trace`` and attributes every executed XLA op
(fusion, library call) to its compiled HLO: the kind of work inside it (``dot``, ``reduce``,
``convolution``, elementwise ops such as ``pad``/``slice``/``floor``/``divide``), the direction
(``fwd``, or ``bwd`` for ops under autodiff's transpose) and the layer type (``depthwise``,
``pointwise``, ``Conv2d_0`` stem, ``Logits``, ``input_quant``, ``other``) from its source
op name. Prints the op time per step by category, with its share, and the top single ops.
``--threads 1`` (default) pins the process to one CPU, so that op times add up to the step
time; with more threads XLA runs ops partitioned or concurrently and the sum exceeds it.
Process-wide malloc tuning as in the benchmark (:func:`qfsep_jax.runtime.tune_malloc`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import bench_train  # same folder: the benchmark's rows, step and malloc tuning

from qfsep_jax import runtime

# Ops whose presence inside a fusion names its kind (the rest are plain elementwise work).
MARKER_OPS = (
    "convolution", "dot", "reduce", "reduce-window", "pad", "slice", "transpose",
    "concatenate", "divide", "floor", "sqrt", "rsqrt", "select",
)  # fmt: skip
LAYER_TYPES = ("depthwise", "pointwise", "Conv2d_0", "Logits", "input_quant")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", default="small", choices=sorted(bench_train.ROWS))
    p.add_argument("--mode", default="float", choices=["float", "qat"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up)")
    p.add_argument("--top", type=int, default=25, help="how many single ops to list")
    p.add_argument("--depthwise_impl", default="auto", help="auto | lax | shift | native")
    p.add_argument("--out", default="", help="also write the summary as JSON here")
    args = p.parse_args(argv)
    if args.threads < 1 or args.steps < 1:
        p.error("--threads and --steps must be positive")
    return args


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """Every instruction of a compiled HLO module: name -> {shape, opcode, calls, op_name}."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if head:
            current = head.group(2)
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current:
            computations[current].append(line)
    out = {}
    for body in computations.values():
        for line in body:
            # Shapes are one array or a tuple "(f32[..], f32[..])" (multi-output ops).
            m = re.match(r"\s*(ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\(", line)
            if not m:
                continue
            calls = re.search(r"calls=%([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]+)"', line)
            callee = calls.group(1) if calls else None
            inner = computations.get(callee, []) if callee else []
            ops = {o for o in re.findall(r"= \S+ ([\w\-]+)\(", "\n".join(inner))}
            names = re.findall(r'op_name="([^"]+)"', "\n".join(inner))
            out[m.group(2)] = {
                "shape": m.group(3),
                "opcode": m.group(4),
                "kind": "+".join(sorted(ops & set(MARKER_OPS))) or m.group(4),
                "op_name": op_name.group(1) if op_name else (names[-1] if names else ""),
            }
    return out


def category(info: dict) -> tuple[str, str, str]:
    """(kind, fwd|bwd, layer type) of one HLO instruction."""
    name = info["op_name"]
    direction = "bwd" if "transpose(" in name else "fwd"
    layer = next((t for t in LAYER_TYPES if t in name), "other")
    return info["kind"], direction, layer


def profile_events(fn, steps: int) -> list[dict]:
    """Complete ('X') events of ``steps`` calls of ``fn`` under ``jax.profiler.trace``."""
    import jax

    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(steps):
                fn()
        (trace,) = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def main(argv=None) -> None:
    args = _parse(argv)
    cpus = bench_train.pin_threads(args.threads)
    runtime.tune_malloc()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    step, state, batch = bench_train.jax_step(args.row, args.mode, args.depthwise_impl)
    instructions = hlo_instructions(step.lower(state, batch).compile().as_text())
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    run()
    run()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        run()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    cpu_ms = (time.process_time() - cpu_start) / args.steps * 1e3
    events = profile_events(run, args.steps)

    per_op = collections.Counter()
    for e in events:
        if e["name"] in instructions:
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.steps  # us -> ms per step
    per_cat = collections.Counter()
    for name, ms in per_op.items():
        per_cat[category(instructions[name])] += ms
    total = sum(per_op.values())
    width, size, stem, bsz = bench_train.ROWS[args.row]
    print(
        f"# {args.row} (w={width} px={size} stem={stem} batch={bsz}) {args.mode}, CPUs {cpus}, "
        f"depthwise_impl={args.depthwise_impl}: step {wall_ms:.0f} ms wall, {cpu_ms:.0f} ms CPU "
        f"(unprofiled); profiled XLA ops {total:.0f} ms/step in {len(per_op)} ops"
    )
    print(f"{'ms/step':>8} {'share':>6}  kind / direction / layer")
    rest = 0.0
    for (kind, direction, layer), ms in per_cat.most_common():
        if ms < 0.005 * total:
            rest += ms
            continue
        print(f"{ms:8.1f} {100 * ms / total:5.1f}%  {kind} / {direction} / {layer}")
    print(f"{rest:8.1f} {100 * rest / total:5.1f}%  (categories under 0.5% each)")
    print(f"# top {args.top} ops")
    for name, ms in per_op.most_common(args.top):
        info = instructions[name]
        print(f"{ms:8.2f} ms  {name:30s} {info['kind']:28s} {info['shape'][:34]:34s} "
              f"{info['op_name'][-70:]}")  # fmt: skip
    if args.out:
        from qfsep_jax.io_utils import write_json
        from qfsep_jax.models.depthwise import resolve_impl

        write_json(
            args.out,
            {
                "row": args.row, "mode": args.mode, "cpus": cpus, "wall_ms": wall_ms,
                "cpu_ms": cpu_ms, "op_ms": total, "depthwise_impl": args.depthwise_impl,
                "depthwise_impl_resolved": resolve_impl(args.depthwise_impl),
                "by_category": [
                    {"kind": k, "direction": d, "layer": lt, "ms": ms}
                    for (k, d, lt), ms in per_cat.most_common()
                ],
            },
        )  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
