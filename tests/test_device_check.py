"""tools/device_check.sh: its CI-sized CPU form runs every section; the test-report parsing."""

import importlib.util
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "device_check", os.path.join(REPO, "tools", "device_check.py")
)
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)


def test_cpu_form_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = tmp_path / "out"
    cmd = [os.path.join(REPO, "tools", "device_check.sh"), "--cpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert set(sections) == {"tests", "environment", "train", "pmap", "integer"}
    assert all(s["status"] == "ok" for s in sections.values()), sections
    assert summary["failed"] == []
    assert sections["tests"]["counts"]["passed"] >= 1
    (row,) = sections["train"]["rows"]
    assert row["float32_images_per_sec"] > 0 and row["bfloat16_images_per_sec"] > 0
    assert sections["pmap"]["devices"] == 2  # the script's two CPU devices, compared with one
    assert sections["integer"]["bit_exact"] is True and sections["integer"]["layers"] == 29
    text = (out / "summary.txt").read_text()
    assert "failed: nothing" in text and "bit-exact True" in text


def test_junit_failures_for_missing_data_are_not_counted_as_failures(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" />'
        '<testcase classname="tests.test_a" name="test_bad[1]"><failure message="assert 1 == 2"/>'
        "</testcase>"
        '<testcase classname="tests.test_b" name="test_data"><failure message="Failed: shared '
        'data missing: /x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="why"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = device_check.parse_junit(str(xml))
    assert {k: v["outcome"] for k, v in got.items()} == {
        "tests/test_a.py::test_ok": "passed",
        "tests/test_a.py::test_bad[1]": "failed",
        "tests/test_b.py::test_data": "needs data",
        "tests/test_b.py::test_skip": "skipped",
    }
    lines = "tests/test_a.py::test_ok PASSED [ 50%]\ntests/test_a.py::test_x[2] FAILED [100%]\n"
    assert device_check.parse_verbose(lines) == {
        "tests/test_a.py::test_ok": {"outcome": "passed", "message": ""},
        "tests/test_a.py::test_x[2]": {"outcome": "failed", "message": ""},
    }
