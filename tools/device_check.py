"""Device check: what of this project runs on the accelerator at hand, and how fast.

    tools/device_check.sh [--cpu] --out DIR [--sections tests,train,pmap,integer]
        [--modes float] [--tests FILE_OR_NODE,...] [--tests_timeout 300]

(``tools/device_check.sh`` sets the environment and a wall-clock limit, then runs this.)

Made for a short loan of one GPU (about ten minutes of the machine): a bare machine with this
repository as the working directory and ``requirements.txt`` installed; the shared data may be
absent, so everything here but the test subset uses synthetic inputs and models built in the
process. ``--cpu`` runs the same checks on the CPU in a CI-sized form (tiny model, a couple of
steps, one test).

Sections, each recorded with its status, duration and details (one failing does not stop the
others; the summary is rewritten after each, so a run cut short keeps what it finished):

* ``environment``: versions, backend and devices;
* ``tests``: a pytest subset that can run on an accelerator (models, fake quantization, QAT
  layers, mixed precision, folding, PTQ calibration, the integer pass's kernels); tests that
  need the shared data are reported as such when it is absent, not as failures;
* ``train``: training-step images/s, float32 against bfloat16 (``half_precision``), MobileNetV1
  1.0 at 224 px, ``pmap`` over all local devices, synthetic batch; reps interleave the two, the
  ratio is the median of the per-rep ratios;
* ``pmap``: one float32 training step pmapped over all local devices equals the same global
  batch on one device (loss, gradient norm; with one device only that it runs);
* ``integer``: a MobileNetV1 post-training quantized in-process (random weights, random
  calibration images), converted to the integer pass and run on the default device and on
  the CPU: every layer's codes must be bit-identical.

Writes ``summary.json`` and ``summary.txt`` to ``--out``; exits 1 if any section failed.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("tests", "train", "pmap", "integer")

# The accelerator test subset: files (or node ids) and a -k filter. Depthwise 'shift'/'native'
# and TFLite/LiteRT comparisons are CPU matters and stay out.
ACCELERATOR_TESTS = (
    "tests/test_models.py",
    "tests/test_fake_quant.py",
    "tests/test_train_qat.py",
    "tests/test_half_precision.py",
    "tests/test_fold_cle.py",
    "tests/test_ptq.py",
    "tests/test_integer.py",
)
ACCELERATOR_K = "not native and not shift and not table1"
# A test with light imports: the CI form checks the runner, the suite runs the tests anyway.
CPU_TESTS = ("tests/test_bench_input.py",)

# (width, image size, stem stride, per-device batch, warm-up steps, reps, steps per rep)
SIZES = {"accelerator": (1.0, 224, 2, 128, 2, 3, 10), "cpu": (0.25, 32, 1, 4, 1, 2, 1)}
INTPASS_SIZES = {"accelerator": (1.0, 224, 2, 16), "cpu": (0.25, 32, 1, 4)}
NUM_CLASSES = 1001


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for summary.json and summary.txt")
    p.add_argument("--cpu", action="store_true", help="CI-sized run on the CPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--modes", default="float", help="train section: comma list of float, qat")
    p.add_argument("--tests", default="", help="comma list of test files or node ids")
    p.add_argument("--tests_timeout", type=float, default=300.0, help="seconds for the tests")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("float", "qat") for m in modes):
        p.error(f"--modes must be a comma list of float, qat; got {args.modes!r}")
    args.sections, args.modes = sections, modes
    return args


class Report:
    """The sections' results, written to ``out`` (JSON and text) after every section."""

    def __init__(self, out: str, argv: list[str]):
        self.out = out
        self.data = {
            "command": "tools/device_check.sh " + " ".join(argv),
            "sections": {},
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        os.makedirs(out, exist_ok=True)

    def run(self, name: str, fn) -> None:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            details = fn()
            status = details.pop("status", "ok") if isinstance(details, dict) else "ok"
        except Exception as err:  # a failing section is reported, the next one still runs
            details = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-4000:],
            }
            status = "failed"
        self.data["sections"][name] = {
            "status": status,
            "seconds": round(time.perf_counter() - start, 1),
            **details,
        }
        print(f"   {status} ({self.data['sections'][name]['seconds']} s)", flush=True)
        self.write()

    def failed(self) -> list[str]:
        out = [f"section {n}" for n, s in self.data["sections"].items() if s["status"] == "failed"]
        tests = self.data["sections"].get("tests", {})
        out += [f"test {t}" for t in tests.get("failed", [])]
        return out

    def write(self) -> None:
        from qfsep_jax.io_utils import write_atomic, write_json

        self.data["failed"] = self.failed()
        self.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        write_json(os.path.join(self.out, "summary.json"), self.data)
        write_atomic(os.path.join(self.out, "summary.txt"), text_summary(self.data))


def text_summary(data: dict) -> str:
    """A short human-readable form of the summary."""
    lines = [
        f"device check: {data['command']}",
        f"started {data['started']}, last written {data.get('finished', '')}",
    ]
    env = data["sections"].get("environment", {})
    if env:
        lines.append(
            f"jax {env.get('jax')} backend {env.get('backend')}: "
            f"{env.get('device_count')} x {env.get('device_kind')}"
        )
    for name, s in data["sections"].items():
        lines.append(f"[{s['status']}] {name} ({s['seconds']} s)")
        if name == "tests" and "counts" in s:
            lines.append(f"    {s['counts']}")
        if name == "train" and "rows" in s:
            for row in s["rows"]:
                lines.append(
                    f"    {row['mode']}: float32 {row['float32_images_per_sec']:.0f} "
                    f"img/s, bfloat16 {row['bfloat16_images_per_sec']:.0f} img/s, "
                    f"bf16/f32 {row['ratio_bf16_over_f32']:.2f} "
                    f"({row['setting']})"
                )
        if name == "integer" and "bit_exact" in s:
            lines.append(
                f"    bit-exact {s['bit_exact']} on {s['layers']} layers; "
                f"{s['device']}: {s['device_images_per_sec']:.0f} img/s, "
                f"cpu: {s['cpu_images_per_sec']:.0f} img/s"
            )
        if name == "pmap" and "note" in s:
            lines.append(f"    {s['note']}")
        if "error" in s:
            lines.append(f"    {s['error']}")
    failed = data.get("failed", [])
    lines.append("failed: " + (", ".join(failed) if failed else "nothing"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Sections.


def environment() -> dict:
    import jax
    import jaxlib

    from qfsep_jax.io_utils import run_info

    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
        "devices": [str(d) for d in devices],
        "python": platform.python_version(),
        "run": run_info(),
    }


def parse_junit(path: str) -> dict[str, dict]:
    """``{node id: {"outcome", "message"}}`` from a pytest JUnit XML file."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node = f"{module}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "")[:500]
                break
        if outcome in ("failed", "error") and "shared data missing" in message:
            outcome = "needs data"
        results[node] = {"outcome": outcome, "message": message}
    return results


_VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_verbose(output: str) -> dict[str, dict]:
    """Outcomes from ``pytest -v`` lines, for a run cut short before its JUnit file."""
    results = {}
    for line in output.splitlines():
        m = _VERBOSE_LINE.match(line)
        if m:
            results[m.group(1)] = {"outcome": m.group(2).lower(), "message": ""}
    return results


def run_tests(targets: list[str], k: str | None, timeout: float, out: str) -> dict:
    junit = os.path.join(out, "tests_junit.xml")
    if os.path.exists(junit):
        os.remove(junit)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-rfE",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *targets,
    ]
    if k:
        cmd += ["-k", k]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_FORCE_GPU_ALLOW_GROWTH="true")
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        output, timed_out = proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        timed_out = True
    with open(os.path.join(out, "tests_output.txt"), "w") as f:
        f.write(output)
    results = parse_junit(junit) if os.path.exists(junit) else parse_verbose(output)
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    failed = sorted(n for n, r in results.items() if r["outcome"] in ("failed", "error"))
    details = {
        "command": " ".join(cmd[1:]),
        "counts": counts,
        "failed": failed,
        "needs_data": sorted(n for n, r in results.items() if r["outcome"] == "needs data"),
        "messages": {n: results[n]["message"] for n in failed},
        "timed_out": timed_out,
    }
    if not results:
        details["status"] = "failed"
        details["error"] = "no test results (see tests_output.txt)"
    elif timed_out:
        details["status"] = "failed"
        details["error"] = f"the tests ran past {timeout:.0f} s; results of those that finished"
    elif failed:
        details["status"] = "failed"
    return details


# Compiled steps and initial variables, shared by the sections (compiling dominates a CPU run).
_CACHE: dict = {}


def _initial_variables(width: float, size: int, stem: int, qat: bool) -> dict:
    """Random initial variables of MobileNetV1 (float32 whatever the compute dtype)."""
    import jax
    import numpy as np

    from qfsep_jax.models.mobilenet_v1 import MobileNetV1
    from qfsep_jax.quant.scheme import QuantConfig

    key = ("variables", width, size, stem, qat)
    if key not in _CACHE:
        quant = QuantConfig(scheme="tf8", observer="ema", ema_decay=0.999) if qat else None
        model = MobileNetV1(
            num_classes=NUM_CLASSES, width_multiplier=width, stem_stride=stem, quant=quant
        )
        variables = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(0), np.zeros((1, size, size, 3), np.float32)
        )
        _CACHE[key] = jax.tree.map(np.asarray, dict(variables))
    return _CACHE[key]


def _train_setup(mode: str, dtype, size_key: str, devices):
    """A pmapped train step, its initial replicated state and a synthetic global batch."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from qfsep_jax import train
    from qfsep_jax.data.train_input import device_mesh
    from tools.benchlib import train_step_for

    width, size, stem, per_device, *_ = SIZES[size_key]
    qat = mode == "qat"
    key = ("step", mode, dtype, size_key, tuple(devices))
    if key not in _CACHE:
        _CACHE[key] = train_step_for(width, stem, mode, devices, dtype=dtype)
    step, _, tx = _CACHE[key]
    state = train.create_train_state(_initial_variables(width, size, stem, qat), tx, seed=0)
    # Laid out as the step returns it, so that the second call does not compile again.
    state = jax.device_put(state, NamedSharding(device_mesh(devices), PartitionSpec()))
    n = len(devices)
    rs = np.random.RandomState(0)
    batch = {
        "image": rs.uniform(-1, 1, (n, per_device, size, size, 3)).astype(np.float32),
        "label": rs.randint(0, NUM_CLASSES, (n, per_device)).astype(np.int32),
    }
    sharding = NamedSharding(device_mesh(devices), PartitionSpec("batch"))
    return step, state, jax.device_put(batch, sharding)


def train_throughput(modes: list[str], size_key: str) -> dict:
    import jax
    import numpy as np

    devices = jax.local_devices()
    width, size, stem, per_device, warmup, reps, steps = SIZES[size_key]
    rows = []
    for mode in modes:
        runners = {}
        for name, dtype in (("float32", None), ("bfloat16", "bfloat16")):
            step, state, batch = _train_setup(mode, dtype, size_key, devices)
            holder = {"state": state}

            def run(k, step=step, batch=batch, holder=holder, name=name, mode=mode):
                for _ in range(k):
                    holder["state"], metrics = step(holder["state"], batch)
                loss = float(np.asarray(metrics["train_loss"])[0])  # waits for the steps
                if not np.isfinite(loss):
                    raise FloatingPointError(f"{mode}/{name}: non-finite loss {loss}")
                return loss

            t0 = time.perf_counter()
            run(warmup)
            runners[name] = (run, time.perf_counter() - t0)
        rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        images = steps * per_device * len(devices)
        for _ in range(reps):
            for name, (run, _) in runners.items():
                t0 = time.perf_counter()
                run(steps)
                rates[name].append(images / (time.perf_counter() - t0))
        ratios = [b / f for b, f in zip(rates["bfloat16"], rates["float32"], strict=True)]
        rows.append(
            {
                "mode": mode,
                "setting": (
                    f"width {width}, {size} px, batch {per_device} x {len(devices)} devices, "
                    f"{reps} reps x {steps} steps after {warmup} warm-up"
                ),
                "float32_images_per_sec": statistics.median(rates["float32"]),
                "bfloat16_images_per_sec": statistics.median(rates["bfloat16"]),
                "ratio_bf16_over_f32": statistics.median(ratios),
                "per_rep": rates,
                "warmup_seconds": {k: round(v[1], 1) for k, v in runners.items()},
            }
        )
    return {"rows": rows}


def pmap_check(size_key: str) -> dict:
    """One float32 step: all local devices vs one device, the same global batch."""
    import jax
    import numpy as np

    devices = jax.local_devices()
    n = len(devices)
    step_n, state_n, batch_n = _train_setup("float", None, size_key, devices)
    _, metrics_n = step_n(state_n, batch_n)
    loss_n = float(np.asarray(metrics_n["train_loss"])[0])
    if not np.isfinite(loss_n):
        raise FloatingPointError(f"non-finite loss {loss_n} on {n} devices")
    if n == 1:
        note = "1 device: the pmapped step ran; the n-vs-1 comparison needs 2+"
        return {"devices": 1, "loss": loss_n, "note": note}
    step_1, state_1, _ = _train_setup("float", None, size_key, devices[:1])
    whole = jax.tree.map(lambda a: np.asarray(a).reshape((1, -1) + a.shape[2:]), batch_n)
    _, metrics_1 = step_1(state_1, whole)
    out = {"devices": n}
    for key in ("train_loss", "grad_norm"):
        a, b = float(np.asarray(metrics_n[key])[0]), float(np.asarray(metrics_1[key])[0])
        out[key] = {f"{n}_devices": a, "1_device": b, "relative_difference": abs(a - b) / abs(b)}
    worst = max(out[k]["relative_difference"] for k in ("train_loss", "grad_norm"))
    out["note"] = f"{n} devices vs 1: largest relative difference {worst:.2e} (limit 1e-3)"
    if worst > 1e-3:
        out["status"] = "failed"
    return out


def integer_check(size_key: str) -> dict:
    """PTQ in-process, the integer pass on the default device and on the CPU, bit for bit."""
    import jax
    import numpy as np

    from qfsep_jax import integer, ptq
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1

    width, size, stem, batch = INTPASS_SIZES[size_key]
    model = MobileNetV1(
        num_classes=NUM_CLASSES, width_multiplier=width, stem_stride=stem, dropout_rate=0.0
    )
    rs = np.random.RandomState(0)
    variables = dict(_initial_variables(width, size, stem, qat=False))
    # Moving statistics other than the initial 0 / 1, so that folding changes the weights.
    variables["batch_stats"] = jax.tree.map(
        lambda a: (
            rs.uniform(0.5, 2.0, a.shape)
            if a.ndim and np.all(a == 1)
            else rs.normal(0.0, 0.1, a.shape)
        ).astype(np.float32),
        variables["batch_stats"],
    )
    calib = [
        {"image": rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)} for _ in range(2)
    ]
    recipe = ptq.recipe_by_name("tf8_per_tensor")
    quantized = ptq.quantize_post_training(model, variables, recipe, lambda: iter(calib), 2)
    int_model = integer.from_quantized(quantized)
    images = rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    q = np.asarray(integer.quantize_input(int_model, images))
    results, rates = {}, {}
    cpu = jax.devices("cpu")[0]
    for where, device in (("device", jax.devices()[0]), ("cpu", cpu)):
        with jax.default_device(device):
            model_here = jax.device_put(int_model, device)
            codes = jax.device_put(q, device)
            out = integer.run(model_here, codes, return_intermediates=True)  # compiles
            jax.block_until_ready(out)
            t0 = time.perf_counter()
            out = integer.run(model_here, codes, return_intermediates=True)
            jax.block_until_ready(out)
            rates[where] = batch / (time.perf_counter() - t0)
        results[where] = {k: np.asarray(v) for k, v in out[1].items()}
        results[where]["__logits__"] = np.asarray(out[0])
    differing = {
        k: int(np.sum(results["device"][k] != results["cpu"][k]))
        for k in results["cpu"]
        if not np.array_equal(results["device"][k], results["cpu"][k])
    }
    details = {
        "model": f"MobileNetV1 {width}/{size} (random weights and BN statistics, tf8 "
        f"per-tensor PTQ on random images), batch {batch}",
        "device": str(jax.devices()[0]),
        "layers": len(int_model.layer_names),
        "bit_exact": not differing,
        "differing_codes": differing,
        "device_images_per_sec": rates["device"],
        "cpu_images_per_sec": rates["cpu"],
    }
    if differing:
        details["status"] = "failed"
    return details


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    sys.path.insert(0, REPO)
    report = Report(args.out, argv)
    size_key = "cpu" if args.cpu else "accelerator"
    # The tests run first, in their own process, before this one takes the accelerator.
    if "tests" in args.sections:
        if args.tests:
            targets, k = args.tests.split(","), None
        elif args.cpu:
            targets, k = list(CPU_TESTS), None
        else:
            targets, k = list(ACCELERATOR_TESTS), ACCELERATOR_K
        report.run("tests", lambda: run_tests(targets, k, args.tests_timeout, args.out))
    report.run("environment", environment)
    env = report.data["sections"]["environment"]
    if not args.cpu and env.get("backend") == "cpu":
        env["status"] = "failed"
        env["error"] = "no accelerator: JAX's default backend is the CPU (use --cpu for CI)"
        report.write()
    if "train" in args.sections:
        report.run("train", lambda: train_throughput(args.modes, size_key))
    if "pmap" in args.sections:
        report.run("pmap", lambda: pmap_check(size_key))
    if "integer" in args.sections:
        report.run("integer", lambda: integer_check(size_key))
    report.write()
    print(text_summary(report.data), end="")
    print(f"written: {os.path.join(args.out, 'summary.json')}, summary.txt")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
