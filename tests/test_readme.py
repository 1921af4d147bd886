"""The README's "Library usage" block runs as written (from the repository root)."""

import os
import re
import subprocess
import sys

from conftest import FLOAT_GRAPH, REPO, require


def _usage_block() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("\n## Library usage\n", 1)
    assert len(section) == 2, "README has no '## Library usage' section"
    body = section[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, "the Library usage section has no ```python block"
    return match.group(1)


def test_readme_library_usage_block_runs():
    require(FLOAT_GRAPH)
    code = _usage_block()
    for call in ("load_official(", "ptq.quantize(", "weight_bits=4", "integer.run(", "sqnr_curve("):
        assert call in code, f"the usage block no longer shows {call}"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("integer-only top-1") for line in lines), result.stdout
    # The paper's block and the custom one: integer pass within 1 LSB of the simulation.
    for block in ("qf", "NoDepthwiseAct"):
        line = next(x for x in lines if x.startswith(f"{block} max LSB"))
        assert int(line.rsplit(":", 1)[1]) <= 1, result.stdout
