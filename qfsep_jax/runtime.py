"""Process-level settings for long CPU jobs."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os


def tune_malloc() -> bool:
    """Keeps freed memory in glibc's heap instead of returning it to the OS.

    XLA:CPU allocates each step's temporaries afresh (1.35 GB for a MobileNetV1 1.0/224 batch-32
    training step). With glibc's defaults, blocks above the mmap threshold are mmap-ed and
    unmapped again and the heap top is trimmed, so every step page-faults all that memory
    (measured: 330k faults, a third of the step time). No mmap, no trimming, one arena and a
    256 MiB growth step make freed blocks reusable. Returns False (and changes nothing) where
    the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logging.info("tune_malloc: no glibc mallopt here; allocator left as it is")
        return False
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
    return bool(
        mallopt(m_arena_max, 1)
        and mallopt(m_mmap_max, 0)
        and mallopt(m_trim_threshold, -1)  # -1: never trim (mallopt(3))
        and mallopt(m_top_pad, 1 << 28)
    )


# XLA:CPU settings this project turns on where the CPU has the feature they need.
_XLA_CPU_TUNING = (
    # 512-bit vectors in XLA's own loop code (elementwise, BN, the shifted depthwise loops).
    # XLA prefers 256 bits, which spares older Intel cores their AVX-512 clock drop; on the AMD
    # EPYC the README's numbers come from, 512 bits made a training step 6-11 % faster.
    ("avx512f", "--xla_cpu_prefer_vector_width", "512"),
)


def cpu_feature_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (``avx512f``, ...) from ``/proc/cpuinfo``; empty where unreadable."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def tuned_xla_flags(xla_flags: str, cpu_features: set[str]) -> str:
    """``xla_flags`` plus the XLA:CPU settings of :data:`_XLA_CPU_TUNING` that ``cpu_features``
    allow. A setting already present in ``xla_flags`` is left as the user gave it."""
    given = {flag.split("=", 1)[0] for flag in xla_flags.split()}
    extra = [
        f"{name}={value}"
        for feature, name, value in _XLA_CPU_TUNING
        if feature in cpu_features and name not in given
    ]
    return " ".join([xla_flags, *extra]).strip()


def tune_xla_cpu() -> str:
    """Sets this process's ``XLA_FLAGS`` to :func:`tuned_xla_flags` and returns it.

    Call it before JAX creates its CPU backend (before the first computation): XLA reads the
    variable once. It changes code generation only (float results may differ in the last bits,
    as with any compiler setting); the training entry points call it.
    """
    flags = tuned_xla_flags(os.environ.get("XLA_FLAGS", ""), cpu_feature_flags())
    os.environ["XLA_FLAGS"] = flags
    logging.info("XLA_FLAGS=%s", flags)
    return flags
