"""Fault injection: kill training with SIGKILL at random steps, resume, compare bit for bit.

    python tools/fault_injection.py --kills 10 --workdir /tmp/fault_injection \
        --out results/fault_injection/results.json

Not a test (``tests/test_train.py`` keeps a one-kill version). It trains one run uninterrupted
(the reference) and the same run in another workdir while killing it ``--kills`` times with
SIGKILL, each time restarting the same command, which resumes from the newest checkpoint. The
kill steps are drawn at random (distinct, ascending); for each, it waits until the run has
logged that step, then waits a random delay and kills the process. Half of the kills aim at an
asynchronous checkpoint save: the step is a checkpoint step and the delay short (under 30 ms),
so the kill lands while Orbax writes the checkpoint in its background thread (the kill record
says whether the kill left a partial save, an ``*.orbax-checkpoint-tmp*`` folder).

Then it compares the two runs: every logged training metric of every step (losses, accuracy,
gradient norm, learning rate, corrupt-image count; not the timings), the final evaluation
(``results.json``) and every array of the final checkpoint must be equal bit for bit. The result
goes to ``--out`` (JSON, written atomically); the exit status is 0 only when ``--kills`` kills
happened and everything is equal.

The run is ``--config`` (default ``configs/smoke.py``: MobileNetV1 0.25 at 32 px on Imagenette)
with dropout on (``--dropout``), asynchronous checkpoints every ``--checkpoint_every`` steps,
``--devices`` fake CPU devices, and any ``--config.<field>=<value>`` given after ``--``. The
child processes share a persistent compilation cache, so restarts compile nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("steps_per_sec", "images_per_sec")
PARTIAL_SAVE = ".orbax-checkpoint-tmp"


def train_command(config: str, workdir: str, overrides: list[str]) -> list[str]:
    """The ``launch/main.py`` command line of one training run."""
    return [
        sys.executable,
        os.path.join(REPO, "launch", "main.py"),
        "--config",
        config,
        "--workdir",
        workdir,
        *overrides,
    ]


def child_env(cache_dir: str, devices: int | None = None) -> dict[str, str]:
    """The environment of a training process: this repo first, a shared compilation cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoints' steps (Orbax renames a step folder into place when complete)."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def partial_saves(workdir: str) -> list[str]:
    """Orbax's temporary folders of saves that did not finish."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if PARTIAL_SAVE in n)


def _last_logged_step(path: str, offset: int) -> int | None:
    """The step of the last complete line appended to ``metrics.jsonl`` after ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")[:-1]  # the part after the last newline may be torn
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return None


def run_and_kill(
    cmd: list[str],
    workdir: str,
    env: dict[str, str],
    at_step: int,
    delay_s: float,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Starts ``cmd``; once it has logged ``at_step`` (in this process), waits ``delay_s`` and
    sends SIGKILL. Returns what happened (``killed`` is False if the run ended first)."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    offset = os.path.getsize(metrics) if os.path.isfile(metrics) else 0
    before, partial_before = checkpoint_steps(workdir), set(partial_saves(workdir))
    log_path = workdir.rstrip("/") + ".log"  # the processes' output, appended
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=REPO)
    start = time.monotonic()
    logged = None
    try:
        while proc.poll() is None:
            logged = _last_logged_step(metrics, offset)
            if logged is not None and logged >= at_step:
                time.sleep(delay_s)
                break
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{cmd} did not reach step {at_step} in {timeout_s:.0f}s")
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"training failed (rc {proc.returncode}); see {log_path}")
    return {
        "target_step": at_step,
        "delay_ms": round(1000 * delay_s, 1),
        "killed": killed,
        "last_logged_step": _last_logged_step(metrics, offset),
        "checkpoints_before": before,
        "checkpoints_after": checkpoint_steps(workdir),
        "partial_save_left": sorted(set(partial_saves(workdir)) - partial_before),
        "seconds": round(time.monotonic() - start, 1),
    }


def run_to_end(cmd: list[str], env: dict[str, str], timeout_s: float = 1800.0) -> float:
    """Runs ``cmd`` to completion (it must succeed); returns its wall time in seconds."""
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, cwd=REPO, timeout=timeout_s)
    if proc.returncode != 0:
        tail = proc.stderr.decode()[-3000:]
        raise RuntimeError(f"training failed (rc {proc.returncode}):\n{tail}")
    return time.monotonic() - start


def _final_state(workdir: str) -> dict[str, Any]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    step = checkpoint_steps(workdir)[-1]
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def compare_runs(reference: str, other: str) -> dict[str, Any]:
    """Bit-for-bit comparison of two finished runs: metrics per step, results, final state."""
    import numpy as np

    from qfsep_jax.metrics_log import read_metrics

    mismatches: list[str] = []
    ref_m, got_m = read_metrics(reference), read_metrics(other)
    if sorted(ref_m) != sorted(got_m):
        mismatches.append(f"logged steps differ: {sorted(ref_m)} vs {sorted(got_m)}")
    compared = 0
    for step in sorted(set(ref_m) & set(got_m)):
        for key in sorted(set(ref_m[step]) | set(got_m[step])):
            if key in TIMING_KEYS:
                continue
            a, b = ref_m[step].get(key), got_m[step].get(key)
            compared += 1
            if a != b:
                mismatches.append(f"step {step} {key}: {a!r} vs {b!r}")
    with open(os.path.join(reference, "results.json")) as f:
        ref_r = json.load(f)
    with open(os.path.join(other, "results.json")) as f:
        got_r = json.load(f)
    final_keys = sorted(
        k for k in ref_r if k.startswith("eval_") or k in ("train_loss", "final_step", "error")
    )
    for key in final_keys:
        if ref_r.get(key) != got_r.get(key):
            mismatches.append(f"results.json {key}: {ref_r.get(key)!r} vs {got_r.get(key)!r}")
    ref_s, got_s = _final_state(reference), _final_state(other)
    if sorted(ref_s) != sorted(got_s):
        mismatches.append("final checkpoints hold different arrays")
    arrays = 0
    for key in sorted(set(ref_s) & set(got_s)):
        arrays += 1
        a, b = ref_s[key], got_s[key]
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            diff = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
            mismatches.append(f"final state {key}: max abs diff {diff:.3g}")
    return {
        "bit_exact": not mismatches,
        "metric_values_compared": compared,
        "final_metrics": {k: ref_r[k] for k in final_keys},
        "final_state_arrays_compared": arrays,
        "mismatches": mismatches[:20],
    }


def kill_schedule(
    kills: int, total_steps: int, checkpoint_every: int, rng: random.Random
) -> list[tuple[int, bool]]:
    """``kills`` distinct steps in ``[1, total_steps)``, ascending, each with whether it aims at
    an asynchronous save: half of them are checkpoint steps (killed a few ms after the step is
    logged, while its checkpoint is written), the others any other step."""
    saves = [s for s in range(1, total_steps) if s % checkpoint_every == 0]
    others = [s for s in range(1, total_steps) if s % checkpoint_every]
    n_saves = min(len(saves), (kills + 1) // 2)
    n_others = kills - n_saves
    if n_others > len(others):
        raise ValueError(f"{kills} kills do not fit in {total_steps} steps")
    chosen = [(s, True) for s in rng.sample(saves, n_saves)]
    chosen += [(s, False) for s in rng.sample(others, n_others)]
    return sorted(chosen)


def inject(
    cmd: list[str],
    workdir: str,
    env: dict[str, str],
    kills: int,
    total_steps: int,
    checkpoint_every: int,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Kills the run in ``workdir`` at each step of :func:`kill_schedule`, then lets it finish.

    A restart resumes from the newest checkpoint, which is at or before the previous kill's
    step, so every scheduled step is reached again."""
    log: list[dict[str, Any]] = []
    for step, during_save in kill_schedule(kills, total_steps, checkpoint_every, rng):
        delay = rng.uniform(0.0, 0.03) if during_save else rng.uniform(0.0, 0.2)
        record = run_and_kill(cmd, workdir, env, step, delay)
        record["aimed_at_a_save"] = during_save
        log.append(record)
        print(json.dumps(record), flush=True)
    run_to_end(cmd, env)
    return log


def main(argv: list[str] | None = None) -> int:
    """Runs the reference, the killed run and the comparison; writes ``--out``; 0 if bit-exact."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="scratch folder (emptied first)")
    parser.add_argument("--out", required=True, help="the JSON result")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "smoke.py"))
    parser.add_argument("--total_steps", type=int, default=40)
    parser.add_argument("--checkpoint_every", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--devices", type=int, default=2, help="fake CPU devices per process")
    parser.add_argument("--seed", type=int, default=0, help="of the kill schedule")
    args, extra = parser.parse_known_args(argv)
    sys.path.insert(0, REPO)  # this checkout's qfsep_jax, also when run as a script
    if args.kills < 1 or args.total_steps < 2 or args.checkpoint_every < 1:
        parser.error("need --kills >= 1, --total_steps >= 2, --checkpoint_every >= 1")
    extra = [a for a in extra if a != "--"]
    overrides = [
        f"--config.total_steps={args.total_steps}",
        f"--config.checkpoint_every_steps={args.checkpoint_every}",
        f"--config.dropout_rate={args.dropout}",
        "--config.async_checkpoints=True",
        "--config.keep_checkpoints=3",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=0",
        *extra,
    ]
    shutil.rmtree(args.workdir, ignore_errors=True)
    cache = os.path.join(args.workdir, "jax_cache")
    env = child_env(cache, args.devices)
    ref_dir, faulted_dir = (os.path.join(args.workdir, n) for n in ("reference", "faulted"))
    start = time.monotonic()
    ref_seconds = run_to_end(train_command(args.config, ref_dir, overrides), env)
    print(f"reference run: {ref_seconds:.0f}s", flush=True)
    log = inject(
        train_command(args.config, faulted_dir, overrides),
        faulted_dir,
        env,
        args.kills,
        args.total_steps,
        args.checkpoint_every,
        random.Random(args.seed),
    )
    comparison = compare_runs(ref_dir, faulted_dir)
    killed = [k for k in log if k["killed"]]
    from qfsep_jax.io_utils import run_info, write_json

    result = {
        "command": " ".join([os.path.relpath(sys.argv[0], REPO), *(argv or sys.argv[1:])]),
        "kills": len(killed),
        "kills_requested": args.kills,
        "kills_leaving_a_partial_save": sum(bool(k["partial_save_left"]) for k in killed),
        "kill_steps": [k["last_logged_step"] for k in killed],
        **comparison,
        "train_overrides": overrides,
        "config": os.path.relpath(args.config, REPO),
        "devices_per_process": args.devices,
        "reference_seconds": round(ref_seconds, 1),
        "seconds": round(time.monotonic() - start, 1),
        "kill_log": log,
        "run": run_info(),
    }
    write_json(args.out, result)
    print(
        f"{len(killed)} kills ({result['kills_leaving_a_partial_save']} left a partial save); "
        f"bit-exact: {comparison['bit_exact']}",
        flush=True,
    )
    for m in comparison["mismatches"]:
        print("  mismatch:", m)
    return 0 if comparison["bit_exact"] and len(killed) == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
