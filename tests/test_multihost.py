"""Multi-process training on localhost: 2 processes x 4 fake CPU devices (gloo collectives).

Both processes run ``train_and_evaluate`` with ``jax.distributed.initialize`` (the config's
``distributed`` block) on the smoke config; the run must equal a single process with 8 devices:
same per-step losses, same evaluation (every image counted once although the processes hold
17 and 16 of the 33 images, so one of them evaluates a padding-only batch).
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import smoke
from qfsep_jax import checkpointing, train
from qfsep_jax.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# See tests/test_train.py: the smoke network's training is chaotic at larger learning rates.
LR = 1e-6
OVERRIDES = dict(
    total_steps=STEPS, learning_rate=LR, eval_limit=33, eval_batch_size=16, eval_every_steps=0
)

WORKER = textwrap.dedent(
    """
    import sys
    from configs import smoke
    from qfsep_jax import train

    process_id, port, workdir, data_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    c = smoke.get_config()
    c.data_dir = data_dir
    for key, value in {overrides!r}.items():
        c[key] = value
    c.distributed.mode = "on"
    c.distributed.coordinator_address = "localhost:" + port
    c.distributed.num_processes = 2
    c.distributed.process_id = process_id
    summary = train.train_and_evaluate(c, workdir)
    import jax
    print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
          jax.local_device_count(), summary["eval_images"], flush=True)
    """
)


pytestmark = pytest.mark.usefixtures("compile_cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(data_dir, tmp_path):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(overrides=OVERRIDES))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(multi), data_dir],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{out[-4000:]}"
    results = sorted(
        line.split()[1:]
        for out in outputs
        for line in out.splitlines()
        if line.startswith("RESULT")
    )
    # process index, process count, global devices, local devices, evaluated images
    assert results == [["0", "2", "8", "4", "33"], ["1", "2", "8", "4", "33"]]

    # The same run in this process on 8 devices.
    assert jax.local_device_count() >= 8
    c = smoke.get_config()
    c.data_dir = data_dir
    for key, value in OVERRIDES.items():
        c[key] = value
    c.num_devices = 8
    train.train_and_evaluate(c, str(single))

    m_multi, m_single = read_metrics(str(multi)), read_metrics(str(single))
    assert sorted(m_multi) == sorted(m_single) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [m_multi[s]["train_loss"] for s in m_multi],
        [m_single[s]["train_loss"] for s in m_single],
        rtol=1e-4,
    )
    last_multi, last_single = m_multi[STEPS], m_single[STEPS]
    assert last_multi["eval_images"] == last_single["eval_images"] == 33
    assert last_multi["eval_top1"] == last_single["eval_top1"]
    assert last_multi["eval_top5"] == last_single["eval_top5"]
    # Both processes took part in the checkpoint (Orbax finalizes only after all of them).
    ckpt = checkpointing.Checkpointer(str(multi / "checkpoints"))
    assert ckpt.all_steps() == [STEPS]
    ckpt.close()
