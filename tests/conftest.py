"""Shared fixtures. Tests that need the shared data fail (never skip) when it is missing."""

import os

# Eight fake CPU devices for the pmap tests; set before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("QFSEP_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))
FLOAT_GRAPH = "models/mobilenet_v1_1.0_224_retrained_graph.pb"
TFLITE_MODEL = "models/mobilenet_v1_0.25_128_quant.tflite"


def require(path: str) -> str:
    """Absolute path of ``path`` under the shared data dir; fails the test if it is missing."""
    full = os.path.normpath(os.path.join(DATA_DIR, path))
    if not os.path.exists(full):
        pytest.fail(
            f"shared data missing: {full}. Point QFSEP_DATA_DIR at the project's data folder "
            "(default ../shared/data).",
            pytrace=False,
        )
    return full


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The shared data folder (``QFSEP_DATA_DIR``, default ``../shared/data``)."""
    return require(".")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache shared by the session's training tests (same executables).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("compile_cache")``.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.getbasetemp() / "jax_cache"))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()
