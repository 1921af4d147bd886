"""Profile: where one training step spends its time on CPU, per op kind and layer type.

    python tools/profile_train.py [--row small|large] [--mode float|qat] [--threads 1]
                                   [--steps 3] [--top 25] [--depthwise_impl auto]
                                   [--framework jax|torch] [--out F.json]

Times the same step as ``tools/benchlib.py`` (``qfsep_jax.train.train_step`` under pmap, one
CPU device, SGD momentum) inside ``jax.profiler.trace`` and attributes every executed XLA op
(fusion, library call) to its compiled HLO: the kind of work inside it (``dot``, ``reduce``,
``convolution``, elementwise ops such as ``pad``/``slice``/``floor``/``divide``), the direction
(``fwd``, or ``bwd`` for ops under autodiff's transpose) and the layer type (``depthwise``,
``pointwise``, ``Conv2d_0`` stem, ``Logits``, ``input_quant``, ``other``) from its source
op name. Prints the op time per step by category, with its share, and the top single ops.
``--threads 1`` (default) pins the process to one CPU, so that op times add up to the step
time; with more threads XLA runs ops partitioned or concurrently and the sum exceeds it.
Process-wide malloc tuning as in the benchmark (:func:`qfsep_jax.malloc_tuning.tune_malloc`).

On any thread count it also splits the wall time of the profiled steps among the ops: each
instant is shared equally by the XLA ops running then, and instants with none running are
"idle" (waiting between ops, dispatch, host code). These shares add up to the wall time, so
they say where the wall time goes when ops run partitioned or side by side. XLA:CPU's own dot
thunks (not the YNNPACK fusions) run asynchronously and are traced only at their launch: on
two threads the pointwise kernel gradients' work then lands in the shares of the ops running
alongside them, or in "idle" (the README's caveat).

``--framework torch`` times the benchmark's PyTorch step instead, with module hooks: the wall
time of each module's forward and backward pass (autograd runs them one after another, each
parallel inside), per module kind (Conv2d, BatchNorm2d, ReLU6, ...), direction and layer type
(depthwise, pointwise, stem from the conv's shape), plus the rest of the step (loss,
optimizer, autograd engine). See :func:`profile_torch` for why not ``torch.profiler``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

from qfsep_jax import malloc_tuning
from qfsep_jax.models import native
from tools import benchlib

# Ops whose presence inside a fusion names its kind (the rest are plain elementwise work).
MARKER_OPS = (
    "convolution",
    "dot",
    "reduce",
    "reduce-window",
    "pad",
    "slice",
    "transpose",
    "concatenate",
    "divide",
    "floor",
    "sqrt",
    "rsqrt",
    "select",
)
LAYER_TYPES = ("depthwise", "pointwise", "Conv2d_0", "Logits", "input_quant")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", default="small", choices=sorted(benchlib.ROWS))
    p.add_argument("--mode", default="float", choices=["float", "qat"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed and profiled steps each")
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="untimed steps first (compilation; the heap can still grow in a later step, "
        "seen as late as the ninth: one step with ~330k page faults)",
    )
    p.add_argument("--top", type=int, default=25, help="how many single ops to list")
    p.add_argument("--depthwise_impl", default="auto", help="auto | lax | shift | native")
    p.add_argument("--framework", default="jax", choices=["jax", "torch"])
    p.add_argument("--out", default="", help="also write the summary as JSON here")
    args = p.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--threads and --steps must be positive, --warmup not negative")
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
            target = re.search(r'custom_call_target="([^"]+)"', line)
            op_name = re.search(r'op_name="([^"]+)"', line)
            callee = calls.group(1) if calls else None
            inner = computations.get(callee, []) if callee else []
            ops = {o for o in re.findall(r"= \S+ ([\w\-]+)\(", "\n".join(inner))}
            names = re.findall(r'op_name="([^"]+)"', "\n".join(inner))
            kind = "+".join(sorted(ops & set(MARKER_OPS))) or m.group(4)
            if kind == "custom-call" and target and target.group(1) in BN_KERNEL_TARGETS:
                kind = "custom-call (BN sums)"
            out[m.group(2)] = {
                "shape": m.group(3),
                "opcode": m.group(4),
                "kind": kind,
                "op_name": op_name.group(1) if op_name else (names[-1] if names else ""),
            }
    return out


def category(info: dict) -> tuple[str, str, str]:
    """(kind, fwd|bwd, layer type) of one HLO instruction."""
    name = info["op_name"]
    direction = "bwd" if "transpose(" in name else "fwd"
    layer = next((t for t in LAYER_TYPES if t in name), "other")
    return info["kind"], direction, layer


# The native BN moments and gradient sums (BN's share, not their layer's conv).
BN_KERNEL_TARGETS = (native.CHANNEL_MOMENTS_TARGET, native.BN_GRAD_SUMS_TARGET)

STEM_CONV_KINDS = (
    "convolution",
    "custom-call",
    "pad",
    "slice",
    "pad+slice",
    "transpose",
)


def component(kind: str, layer: str) -> str:
    """The part of MobileNetV1's step a (kind, layer) category belongs to, for both frameworks.

    JAX categories come from XLA ops (:func:`category`), PyTorch ones from modules
    (:func:`torch_module_category`). With ``--depthwise_impl shift`` the depthwise loops are
    elementwise fusions and count as "BN, activations, elementwise"; with ``native`` and
    ``lax`` they are custom calls and convolutions.
    """
    if kind.startswith(("idle", "outside")):
        return "idle / outside ops"
    if layer == "pointwise" and kind in ("dot", "Conv2d"):
        return "pointwise conv"
    if layer == "depthwise" and kind in ("custom-call", "convolution", "Conv2d"):
        return "depthwise conv"
    # XLA's op_name of the stem's kernel-gradient convolution is empty (layer "other").
    if (layer == "Conv2d_0" and kind in (*STEM_CONV_KINDS, "Conv2d")) or kind == "convolution":
        return "stem conv"
    if layer in ("pointwise", "depthwise", "Conv2d_0") or kind in ("BatchNorm2d", "ReLU6"):
        # Also "custom-call (BN sums)", the native BN kernels.
        return "BN, activations, elementwise"
    return "other (classifier, loss, optimizer)"


def wall_shares(events: list[dict]) -> tuple[collections.Counter, float, float]:
    """Splits the wall time spanned by trace ``events`` (``ts``/``dur`` in us) among them.

    Every instant goes in equal parts to the events running then. Returns (us per event
    ``name``, idle us with none running, span us from the first start to the last end).
    """
    edges = []
    for e in events:
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        if end > start:
            edges += [(start, 1, e["name"]), (end, -1, e["name"])]
    shares: collections.Counter = collections.Counter()
    if not edges:
        return shares, 0.0, 0.0
    edges.sort(key=lambda t: (t[0], t[1]))  # at a tie, ends before starts
    running: collections.Counter = collections.Counter()
    idle, last = 0.0, edges[0][0]
    for ts, delta, name in edges:
        width, count = ts - last, sum(running.values())
        if count:
            for op, n in running.items():
                shares[op] += width * n / count
        else:
            idle += width
        running[name] += delta
        if not running[name]:
            del running[name]
        last = ts
    return shares, idle, edges[-1][0] - edges[0][0]


def torch_module_category(module) -> tuple[str, str] | None:
    """(kind, layer type) of one leaf module of the PyTorch MobileNetV1, else None (containers).

    Convolutions by their shape: 1x1 pointwise, one input channel per group depthwise, 3 input
    channels the stem.
    """
    from torch import nn

    if list(module.children()):
        return None
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):  # also torch.ao's QAT ConvBn2d (a Conv2d subclass)
        if module.kernel_size == (1, 1):
            return kind, "pointwise"
        if module.groups > 1 and module.groups == module.in_channels:
            return kind, "depthwise"
        return kind, "Conv2d_0" if module.in_channels == 3 else "other"
    return kind, "Logits" if isinstance(module, nn.Linear) else "-"


def time_steps(run, steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU ms of each of ``steps`` calls of ``run`` (unprofiled)."""
    wall, cpu = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - cpu_start) * 1e3)
    return wall, cpu


def profile_torch(args: argparse.Namespace) -> dict:
    """Wall time per module kind and direction of the benchmark's PyTorch step.

    torch.profiler slowed this step by up to 2x on two pinned CPUs (1.05-2.0x in four quick
    checks; its own thread competes with the two OpenMP threads), most of all in batch norm and
    ReLU6; module hooks cost two clock reads
    per module and direction. Forward: from a module's forward pre-hook to its forward hook.
    Backward: from its full-backward pre-hook to its full-backward hook (autograd runs this
    chain of modules one after another on the calling thread). The stem's input needs no
    gradient, so its backward hooks fire before its kernel gradient, which then counts as
    outside modules.
    """
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    run = benchlib.torch_runner(args.row, args.mode, args.threads)
    model = run.model
    for _ in range(args.warmup):
        run()
    wall_ms, cpu_ms = time_steps(run, args.steps)

    per_cat: collections.Counter = collections.Counter()
    started: dict = {}
    handles = []

    def timer(cat, direction, begin):
        def hook(module, *_):
            now = time.perf_counter()
            if begin:
                started[(id(module), direction)] = now
            else:
                then = started.pop((id(module), direction), None)
                if then is not None:
                    per_cat[(cat[0], direction, cat[1])] += (now - then) * 1e3 / args.steps

        return hook

    for module in model.modules():
        cat = torch_module_category(module)
        if cat is None:
            continue
        handles += [
            module.register_forward_pre_hook(timer(cat, "fwd", True)),
            module.register_forward_hook(timer(cat, "fwd", False)),
            module.register_full_backward_pre_hook(timer(cat, "bwd", True)),
            module.register_full_backward_hook(timer(cat, "bwd", False)),
        ]
    run()  # the hooks' first call
    per_cat.clear()
    timed_ms = statistics.mean(time_steps(run, args.steps)[0])
    for handle in handles:
        handle.remove()
    per_cat[("outside modules (loss, optimizer, autograd)", "-", "-")] = max(
        timed_ms - sum(per_cat.values()), 0.0
    )
    return {
        "framework": f"torch {torch.__version__}",
        "wall_ms": wall_ms,
        "cpu_ms": cpu_ms,
        "profiled_wall_ms": timed_ms,
        "by_category": per_cat,
        "wall_by_component": _components(per_cat),
    }


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


def _print_categories(title: str, per_cat: collections.Counter, total: float) -> None:
    print(f"{'ms/step':>8} {'share':>6}  {title}")
    rest = 0.0
    for (kind, direction, layer), ms in per_cat.most_common():
        if ms < 0.005 * total:
            rest += ms
            continue
        print(f"{ms:8.1f} {100 * ms / total:5.1f}%  {kind} / {direction} / {layer}")
    print(f"{rest:8.1f} {100 * rest / total:5.1f}%  (categories under 0.5% each)")


def _components(per_cat: collections.Counter) -> dict[str, float]:
    out: collections.Counter = collections.Counter()
    for (kind, _, layer), ms in per_cat.items():
        out[component(kind, layer)] += ms
    return dict(out.most_common())


def _category_list(per_cat: collections.Counter) -> list[dict]:
    return [
        {"kind": k, "direction": d, "layer": lt, "ms": ms}
        for (k, d, lt), ms in per_cat.most_common()
    ]


def profile_jax(args: argparse.Namespace) -> dict:
    """Op time and wall-time shares per category of the project's JAX train step."""
    import jax

    from qfsep_jax.models.depthwise import resolve_impl

    step, state, batch = benchlib.jax_step(args.row, args.mode, args.depthwise_impl)
    instructions = hlo_instructions(step.lower(state, batch).compile().as_text())
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    for _ in range(args.warmup):
        run()
    wall_ms, cpu_ms = time_steps(run, args.steps)
    events = [e for e in profile_events(run, args.steps) if e["name"] in instructions]

    per_op: collections.Counter = collections.Counter()
    for e in events:
        per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.steps  # us -> ms per step
    per_cat: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        per_cat[category(instructions[name])] += ms
    shares, idle_us, span_us = wall_shares(events)
    # Every step runs the same ops, so the time-sorted events split into equal runs per step.
    events.sort(key=lambda e: e["ts"])
    per_step = len(events) // args.steps
    step_spans_ms = [
        wall_shares(events[k * per_step : (k + 1) * per_step])[2] / 1e3 for k in range(args.steps)
    ]
    wall_cat: collections.Counter = collections.Counter()
    for name, us in shares.items():
        wall_cat[category(instructions[name])] += us / 1e3 / args.steps
    wall_cat[("idle (no XLA op running)", "-", "-")] = idle_us / 1e3 / args.steps
    return {
        "framework": f"jax {jax.__version__}",
        "wall_ms": wall_ms,
        "cpu_ms": cpu_ms,
        "profiled_wall_ms": span_us / 1e3 / args.steps,
        "op_ms": sum(per_op.values()),
        "n_ops": len(per_op),
        "step_spans_ms": step_spans_ms,
        "depthwise_impl": args.depthwise_impl,
        "depthwise_impl_resolved": resolve_impl(args.depthwise_impl),
        "by_category": per_cat,
        "wall_by_category": wall_cat,
        "wall_by_component": _components(wall_cat),
        "top_ops": [
            {"name": n, "ms": ms, **{k: instructions[n][k] for k in ("kind", "shape", "op_name")}}
            for n, ms in per_op.most_common(args.top)
        ],
    }


def main(argv=None) -> None:
    args = _parse(argv)
    cpus = benchlib.pin_threads(args.threads)
    malloc_tuning.tune_malloc()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = profile_torch(args) if args.framework == "torch" else profile_jax(args)
    width, size, stem, bsz = benchlib.ROWS[args.row]
    print(
        f"# {result['framework']}: {args.row} (w={width} px={size} stem={stem} batch={bsz}) "
        f"{args.mode}, CPUs {cpus}: unprofiled steps "
        f"{', '.join(f'{ms:.0f}' for ms in result['wall_ms'])} ms wall, median CPU "
        f"{statistics.median(result['cpu_ms']):.0f} ms; profiled {result['profiled_wall_ms']:.0f} "
        "ms per step"
    )
    if args.framework == "torch":
        _print_categories(
            "module kind / direction / layer (wall time between its hooks)",
            result["by_category"],
            result["profiled_wall_ms"],
        )
    else:
        spans = ", ".join(f"{ms:.0f}" for ms in result["step_spans_ms"])
        print(
            f"# op time: {result['op_ms']:.0f} ms/step in {result['n_ops']} XLA ops "
            f"(depthwise_impl={args.depthwise_impl}); profiled steps {spans} ms"
        )
        _print_categories("kind / direction / layer", result["by_category"], result["op_ms"])
        print("# wall time per step, each instant shared among the ops running then")
        _print_categories(
            "kind / direction / layer", result["wall_by_category"], result["profiled_wall_ms"]
        )
        print(f"# top {args.top} ops (op time)")
        for op in result["top_ops"]:
            print(
                f"{op['ms']:8.2f} ms  {op['name']:30s} {op['kind']:28s} "
                f"{op['shape'][:34]:34s} {op['op_name'][-70:]}"
            )
    print("# wall time per step by component")
    for name, ms in result["wall_by_component"].items():
        print(f"{ms:8.1f} {100 * ms / result['profiled_wall_ms']:5.1f}%  {name}")
    if args.out:
        from qfsep_jax.io_utils import write_json

        record = {
            "row": args.row,
            "mode": args.mode,
            "cpus": cpus,
            "steps": args.steps,
            "warmup": args.warmup,
            "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
        for key, value in result.items():
            record[key] = _category_list(value) if key.endswith("by_category") else value
        write_json(args.out, record)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
