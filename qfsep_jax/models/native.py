"""The native XLA:CPU kernels of ``csrc/cpu_kernels.cc``: build, load, register.

The 3x3 depthwise conv (forward, backward), the RGB stem conv's kernel gradient, and batch
norm's per-channel sums for training (moments; gradient sums through the activation).

The C++ source is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``)
against the XLA FFI headers that ship with jaxlib, into a per-user cache
(``$QFSEP_JAX_CACHE``, else ``~/.cache/qfsep_jax``), named by a hash of the source, the jaxlib
version, the compiler flags and the CPU, so that a changed source or another machine builds
anew. The library is written to a temporary name and renamed into place (concurrent builds
cannot leave a half-written file). Where no compiler works, :func:`available` is False, says
why once in the log, and ``depthwise_impl="auto"`` falls back to the shifted multiply-adds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_kernels.cc")
FORWARD_TARGET = "qfsep_depthwise3x3_forward"
BACKWARD_TARGET = "qfsep_depthwise3x3_backward"
STEM_KERNEL_GRAD_TARGET = "qfsep_stem3x3_kernel_grad"
CHANNEL_MOMENTS_TARGET = "qfsep_channel_moments"
BN_GRAD_SUMS_TARGET = "qfsep_bn_grad_sums"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded here."""


def cache_dir() -> str:
    """Where built libraries are kept: ``$QFSEP_JAX_CACHE`` or ``~/.cache/qfsep_jax``."""
    root = os.environ.get("QFSEP_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "qfsep_jax"
    )
    return os.path.join(root, "native")


def _cpu_signature() -> str:
    """The CPU model and feature flags (``-march=native`` code is only valid on such a CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str | None = None) -> str:
    """Compiles the kernels (if not cached yet) and returns the shared library's path.

    Raises:
      NativeBuildError: no compiler, or compilation failed (with the compiler's message).
    """
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                jaxlib.__version__.encode(),
                " ".join((compiler, *_FLAGS)).encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:16]
    out_dir = cache_dir()
    path = os.path.join(out_dir, f"cpu_kernels_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NativeBuildError(
                f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("built native CPU kernels: %s", path)
    return path


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels once per process; the reason if that failed."""
    try:
        lib = ctypes.cdll.LoadLibrary(build())
        for target, symbol in (
            (FORWARD_TARGET, lib.QfsepDepthwiseForward),
            (BACKWARD_TARGET, lib.QfsepDepthwiseBackward),
            (STEM_KERNEL_GRAD_TARGET, lib.QfsepStemKernelGrad),
            (CHANNEL_MOMENTS_TARGET, lib.QfsepChannelMoments),
            (BN_GRAD_SUMS_TARGET, lib.QfsepBnGradSums),
        ):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except (NativeBuildError, OSError, AttributeError) as e:
        log.warning(
            "native CPU kernels unavailable (depthwise: shifted multiply-adds; BN: XLA): %s", e
        )
        return str(e)
    return None


def available() -> bool:
    """Whether the native kernels are built and registered (builds them on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()
