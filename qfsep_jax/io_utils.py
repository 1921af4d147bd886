"""Atomic file writes: a result is either complete on disk or absent."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _default_mode(path: str) -> int:
    """The existing file's mode, else 0o666 minus the umask (mkstemp would leave 0o600)."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def run_info() -> dict[str, Any]:
    """Where and when a result was measured: date, CPU, core count, devices and versions."""
    import datetime
    import platform

    import jax

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def write_json(path: str, obj: Any) -> None:
    """Atomically writes ``obj`` as indented JSON (non-finite floats rejected)."""
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str) -> Any:
    """Reads a JSON file with a clear error if it is missing or malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such JSON file: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
