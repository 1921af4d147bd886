"""Benchmark: training throughput of JAX (this project's train step) vs PyTorch, same MobileNetV1.

    python tools/bench_train.py [--rows small,large] [--modes float,qat] [--threads 2]
                                 [--steps 3] [--reps 5] [--depthwise_impl auto]
                                 [--frameworks jax,torch] [--no-malloc_tune] [--omp_passive]
                                 [--processes 1] [--out results.json]

Not a test. One process times both frameworks, interleaved rep by rep so that both see the same
machine load, for each row (width multiplier, input size, stem stride, batch) and mode:

* ``small``: width 0.5, 32 px, stem stride 1, batch 128; ``large``: width 1.0, 224 px, batch 32.
* JAX: :func:`qfsep_jax.train.train_step` under :func:`qfsep_jax.train.pmap_step` on one CPU
  device, SGD with momentum 0.9, 1001 classes; ``float`` trains the float model (BN in batch
  statistics), ``qat`` the QAT model (``quant_mode="qat"``: tf8 per-tensor fake quantization of
  weights and activations, BN folding by correction-and-freeze, EMA activation ranges).
* PyTorch (``requirements-bench.txt``): the same layer sequence (conv/BN/ReLU6, depthwise with
  ``groups=C``, average pool, dropout 0.001, 1001-way classifier), channels-last, SGD with
  momentum 0.9. ``qat`` is torch's eager-mode QAT: ``fuse_modules_qat`` (ConvBn2d) and
  ``prepare_qat`` with per-tensor affine fake quantization (uint8 activations with moving-average
  min/max, int8 weights with min/max), one activation fake-quant per layer after ReLU6 (the
  redundant one that ``prepare_qat`` puts between ConvBn2d and ReLU6 is removed). Padding is
  torch's symmetric padding; TF "SAME" differs only in where a stride-2 layer's pad goes.
* ``XLA_FLAGS`` as set in the environment (printed and recorded; none by default).
* Both run with ``--threads`` threads: the process is pinned to that many CPUs before either
  framework starts (XLA sizes its thread pool from the affinity mask) and torch gets
  ``set_num_threads``. ``--malloc_tune`` (default on) keeps freed memory in glibc's heap
  (see :func:`qfsep_jax.malloc_tuning.tune_malloc`); it applies to both frameworks, which share
  the process.
  ``--omp_passive`` lets torch's idle OpenMP threads sleep: use it only on a busy machine,
  where spinning threads make torch's 2-thread numbers collapse, and say so.

Warm-up (compilation and two steps) is excluded. Each rep times ``--steps`` steps; the best rep
gives images/s and ``ratio`` (the median rep's images/s is printed too, with the process CPU time
per step, which other processes on the machine disturb less, and page faults per step). The
median over reps of each rep's JAX/PyTorch ratio, the two timed back to back, is printed beside
``ratio``: it is less sensitive to load that changes between reps. The last lines read
``train img/s: jax=… torch=… ratio=… (median of per-rep ratios …)  [row]``, one per row and mode.

``--processes K`` runs the whole benchmark in K fresh processes one after another and reports
the median over them: of each framework's images/s, of the ratio and of the median per-rep
ratio (each process's figures are printed and kept in the JSON). On this machine a process of
either framework sometimes runs all its steps 15-25 % slower than another (its CPU time per step
rises with it), which no number of reps inside one process averages out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from qfsep_jax import malloc_tuning
from tools.benchlib import ROWS, jax_runner, pin_threads, torch_runner


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="small,large", help=f"comma list of {sorted(ROWS)}")
    p.add_argument("--modes", default="float,qat", help="comma list of float, qat")
    p.add_argument("--frameworks", default="jax,torch", help="comma list of jax, torch")
    p.add_argument("--threads", type=int, default=2, help="CPUs for both frameworks")
    p.add_argument("--steps", type=int, default=3, help="timed steps per rep")
    p.add_argument("--reps", type=int, default=7, help="reps per framework")
    p.add_argument("--depthwise_impl", default="auto", help="auto | lax | shift | native")
    p.add_argument(
        "--malloc_tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep freed memory in glibc's heap (both frameworks)",
    )
    p.add_argument("--out", default="", help="also write the results as JSON here (atomically)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the benchmark in this many fresh processes and report medians over them",
    )
    p.add_argument(
        "--omp_passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for torch: idle OpenMP threads sleep instead of spinning "
        "(off by default; on a busy machine torch's spinning threads collapse its throughput)",
    )
    args = p.parse_args(argv)
    for name in args.rows.split(","):
        if name not in ROWS:
            p.error(f"unknown row {name!r}; choose from {sorted(ROWS)}")
    for mode in args.modes.split(","):
        if mode not in ("float", "qat"):
            p.error(f"unknown mode {mode!r}; choose from float, qat")
    for fw in args.frameworks.split(","):
        if fw not in ("jax", "torch"):
            p.error(f"unknown framework {fw!r}; choose from jax, torch")
    if args.threads < 1 or args.steps < 1 or args.reps < 1 or args.processes < 1:
        p.error("--threads, --steps, --reps and --processes must be positive")
    return args


def row_label(record: dict) -> str:
    """``w=… px=… stem=… batch=… mode`` of a row record."""
    return (
        f"w={record['width']} px={record['image_size']} stem={record['stem_stride']} "
        f"batch={record['batch']} {record['mode']}"
    )


def _summary_line(jax_rate, torch_rate, ratio, paired, label: str, extra: str = "") -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    paired_text = "n/a" if paired is None else f"{paired:.2f}"
    return (
        f"train img/s: jax={fmt(jax_rate)} torch={fmt(torch_rate)} ratio={ratio:.2f} "
        f"(median of per-rep ratios {paired_text}{extra})  [{label}]"
    )


def combine_processes(rows_per_process: list[list[dict]]) -> list[dict]:
    """Per row and mode, medians over processes of their ``rows`` records (same order in each).

    Each framework's best images/s, the JAX/PyTorch ratio of the best reps, and the median
    per-rep ratio, with the per-process ratios kept.
    """
    records = []
    for per in zip(*rows_per_process, strict=True):
        first = per[0]
        best = {
            fw: statistics.median(r["best_images_per_sec"][fw] for r in per)
            for fw in first["best_images_per_sec"]
        }
        ratios = [
            r["best_images_per_sec"]["jax"] / r["best_images_per_sec"]["torch"]
            for r in per
            if {"jax", "torch"} <= set(r["best_images_per_sec"])
        ]
        paired = [r["paired_median_ratio"] for r in per if r["paired_median_ratio"] is not None]
        keys = ("row", "mode", "width", "image_size", "stem_stride", "batch")
        records.append(
            {
                **{key: first[key] for key in keys},
                "best_images_per_sec": best,
                "ratio_per_process": ratios,
                "ratio_median_over_processes": statistics.median(ratios) if ratios else None,
                "paired_median_ratio": statistics.median(paired) if paired else None,
                "paired_median_ratio_per_process": paired,
            }
        )
    return records


def run_processes(args: argparse.Namespace, argv: list[str]) -> None:
    """``--processes K``: K fresh runs of this script, then medians over them (module doc)."""
    import subprocess
    import tempfile

    child_argv, skip = [], False
    for a in argv:  # the same options, less --processes and --out
        if skip:
            skip = False
        elif a in ("--processes", "--out"):
            skip = True
        elif not a.startswith(("--processes=", "--out=")):
            child_argv.append(a)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = os.path.join(tmp, f"process{i}.json")
            print(f"# process {i + 1} of {args.processes}", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), *child_argv, "--out", out]
            if subprocess.run(cmd, check=False).returncode != 0:
                raise SystemExit(f"bench_train: process {i + 1} failed ({' '.join(cmd)})")
            with open(out, encoding="utf-8") as f:
                runs.append(json.load(f))
    records = combine_processes([run["rows"] for run in runs])
    print(f"# summary over {args.processes} processes (medians; best rep within each)")
    for record in records:
        ratio = record["ratio_median_over_processes"]
        print(
            _summary_line(
                record["best_images_per_sec"].get("jax"),
                record["best_images_per_sec"].get("torch"),
                float("nan") if ratio is None else ratio,
                record["paired_median_ratio"],
                row_label(record),
                f"; ratio per process {', '.join(f'{r:.2f}' for r in record['ratio_per_process'])}",
            )
        )
    if args.out:
        from qfsep_jax import io_utils

        combined = {key: runs[0][key] for key in runs[0] if key not in ("rows", "run")}
        combined.update(
            processes=args.processes,
            rows=records,
            run=io_utils.run_info(),
            per_process=[run["rows"] for run in runs],
        )
        io_utils.write_json(os.path.abspath(args.out), combined)
    sys.stdout.flush()


def main(argv=None) -> None:
    args = _parse(argv)
    if args.processes > 1:
        return run_processes(args, list(sys.argv[1:] if argv is None else argv))
    cpus = pin_threads(args.threads)
    if args.malloc_tune and not malloc_tuning.tune_malloc():
        raise SystemExit("mallopt failed: run with --no-malloc_tune on this libc")
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch's OpenMP runtime starts
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    frameworks = args.frameworks.split(",")
    versions = [f"jax {jax.__version__} ({jax.default_backend()})"]
    if "torch" in frameworks:
        import torch

        versions.append(f"torch {torch.__version__}")
    print(
        f"# {', '.join(versions)}; CPUs {cpus}; malloc_tune={args.malloc_tune}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}; "
        f"depthwise_impl={args.depthwise_impl}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"{args.steps} steps x {args.reps} reps",
        flush=True,
    )
    results = []
    records = []
    for row in args.rows.split(","):
        width, size, stem, batch = ROWS[row]
        for mode in args.modes.split(","):
            label = row_label(
                {
                    "width": width,
                    "image_size": size,
                    "stem_stride": stem,
                    "batch": batch,
                    "mode": mode,
                }
            )
            runners = {}
            for fw in frameworks:
                start = time.perf_counter()
                if fw == "jax":
                    run = jax_runner(row, mode, args.depthwise_impl)
                else:
                    run = torch_runner(row, mode, args.threads)
                run()
                run()  # warm-up: compilation (JAX), allocator and oneDNN caches (both)
                runners[fw] = run
                print(f"  {label} {fw}: warm-up {time.perf_counter() - start:.1f}s", flush=True)
            rates = {fw: [] for fw in frameworks}
            cpu_ms = {fw: [] for fw in frameworks}
            faults = {fw: [] for fw in frameworks}
            for _ in range(args.reps):
                for fw, run in runners.items():  # interleaved: both see the same load
                    flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for _ in range(args.steps):
                        run()
                    rates[fw].append(batch * args.steps / (time.perf_counter() - start))
                    cpu_ms[fw].append((time.process_time() - cpu_start) / args.steps * 1e3)
                    flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt
                    faults[fw].append(flt / args.steps)
            best = {fw: max(r) for fw, r in rates.items()}
            for fw in frameworks:
                # CPU time per step is less sensitive to other processes than wall time (it
                # still includes cache interference, and torch's OpenMP spin-waits).
                print(
                    f"  {label} {fw}: best {best[fw]:.1f} img/s, "
                    f"median {statistics.median(rates[fw]):.1f} img/s, "
                    f"CPU {min(cpu_ms[fw]):.0f} ms/step (min), "
                    f"{min(faults[fw]):.0f} page faults/step (min)",
                    flush=True,
                )
            # Each rep's JAX/torch ratio, the two timed back to back: robust to load that drifts
            # between reps, where best-of-reps keeps whichever framework met the quietest moment.
            paired = (
                statistics.median(j / t for j, t in zip(rates["jax"], rates["torch"], strict=True))
                if {"jax", "torch"} <= set(rates)
                else None
            )
            results.append((label, best, paired))
            records.append(
                {
                    "row": row,
                    "mode": mode,
                    "width": width,
                    "image_size": size,
                    "stem_stride": stem,
                    "batch": batch,
                    "best_images_per_sec": best,
                    "paired_median_ratio": paired,
                    "median_images_per_sec": {fw: statistics.median(r) for fw, r in rates.items()},
                    "cpu_ms_per_step_min": {fw: min(c) for fw, c in cpu_ms.items()},
                }
            )
            del runners
    print("# summary (best rep, images/s)")
    for label, best, paired in results:
        jax_rate, torch_rate = best.get("jax"), best.get("torch")
        ratio = jax_rate / torch_rate if jax_rate and torch_rate else float("nan")
        print(_summary_line(jax_rate, torch_rate, ratio, paired, label))
    if args.out:
        from qfsep_jax import io_utils

        io_utils.write_json(
            os.path.abspath(args.out),
            {
                "versions": versions,
                "threads": args.threads,
                "cpus": sorted(cpus),
                "steps": args.steps,
                "reps": args.reps,
                "depthwise_impl": args.depthwise_impl,
                "malloc_tune": args.malloc_tune,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "rows": records,
                "run": io_utils.run_info(),
            },
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
