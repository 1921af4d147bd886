"""Process-level settings: XLA:CPU tuning flags."""

import os

from qfsep_jax import runtime

VECTOR = "--xla_cpu_prefer_vector_width"


def test_avx512_cpus_get_512_bit_vectors_and_user_flags_win(tmp_path):
    avx512 = {"sse2", "avx2", "avx512f", "avx512bw"}
    assert runtime.tuned_xla_flags("", avx512) == f"{VECTOR}=512"
    forced = "--xla_force_host_platform_device_count=8"
    assert runtime.tuned_xla_flags(forced, avx512) == f"{forced} {VECTOR}=512"
    assert runtime.tuned_xla_flags("", {"sse2", "avx2"}) == ""  # no AVX-512: XLA's default
    mine = f"{VECTOR}=256"
    assert runtime.tuned_xla_flags(mine, avx512) == mine  # the user's setting is kept
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f\nbugs\t\t: none\n")
    assert runtime.cpu_feature_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512f"}
    assert runtime.cpu_feature_flags(str(tmp_path / "missing")) == set()


def test_the_test_process_runs_with_the_tuning():
    # conftest applies it before JAX starts, as launch/main.py does for training jobs.
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=8" in flags
    if "avx512f" in runtime.cpu_feature_flags():
        assert f"{VECTOR}=512" in flags
