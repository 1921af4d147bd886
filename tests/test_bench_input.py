"""tools/bench_input.py and tools/compare_loss_curves.py: the arithmetic (the measurements are
scripts, not tests)."""

import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_input = _load("bench_input")
curves = _load("compare_loss_curves")


def test_cores_needed_is_host_images_per_second_over_the_per_core_rate():
    assert bench_input.cores_needed(5000, 4, 1250) == 16
    rows = bench_input.cores_table(1000.0, [2000])
    assert {r["host"] for r in rows} == set(bench_input.HOSTS)
    for r in rows:
        assert r["cores_needed"] == r["chips"] * 2
    with pytest.raises(ValueError, match="positive"):
        bench_input.cores_needed(5000, 4, 0)


def test_summary_takes_medians_over_reps_and_the_table_prints_them():
    reps = [{"images_per_sec": v, "images_per_cpu_sec": 2 * v} for v in (10.0, 30.0, 20.0)]
    s = bench_input.summarize({"train pipeline": reps})["train pipeline"]
    assert s["images_per_sec"] == 20.0 and s["images_per_cpu_sec"] == 40.0
    result = {
        "image_sets": {
            "x": {
                "rates": {
                    "train pipeline": s,
                    "fused/whole (median of per-rep ratios)": {
                        "images_per_sec": 1.234,
                        "images_per_cpu_sec": 1.5,
                    },
                }
            }
        },
        "cores_basis": "x",
        "per_core": 40.0,
        "cores_needed": bench_input.cores_table(40.0, [400]),
    }
    table = bench_input.markdown(result)
    assert "| x | train pipeline | 20 | 40 |" in table
    assert "| x | fused/whole (median of per-rep ratios) | 1.23 | 1.50 |" in table
    assert "| TPU v4 host | 4 | 400 | 1600 | 40 | ? |" in table


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench_input._parse(["--chip_rates", "fast"])
    with pytest.raises(SystemExit):
        bench_input._parse(["--threads", "0"])


def test_loss_curves_are_compared_step_by_step():
    ref = {1: 2.0, 2: 1.0, 3: 3.0, 4: 2.0}
    other = {1: 2.5, 2: 1.0, 3: 2.0, 4: 2.0}
    out = curves.compare({"a": ref, "b": other}, "a", window=2)
    np.testing.assert_allclose(out["runs"]["a"]["moving_average"], [1.5, 2.0, 2.5])
    b = out["runs"]["b"]
    assert b["max_abs_diff"] == 1.0 and b["mean_abs_diff"] == pytest.approx(1.5 / 4)
    assert b["max_abs_diff_moving_average"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="other steps"):
        curves.compare({"a": ref, "b": {1: 1.0}}, "a", 2)
    with pytest.raises(ValueError, match="reference"):
        curves.compare({"a": ref}, "c", 2)
