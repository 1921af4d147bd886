"""tools/bench_train.py: combining the results of several processes (the benchmark is a script)."""

import pytest

from tools import bench_train


def _row(jax_rate, torch_rate, paired, mode="float"):
    return {
        "row": "large",
        "mode": mode,
        "width": 1.0,
        "image_size": 224,
        "stem_stride": 2,
        "batch": 32,
        "best_images_per_sec": {"jax": jax_rate, "torch": torch_rate},
        "paired_median_ratio": paired,
    }


def test_combine_processes_takes_medians_per_row():
    runs = [
        [_row(50.0, 60.0, 0.85), _row(28.0, 28.0, 1.0, "qat")],
        [_row(54.0, 52.0, 1.02), _row(27.0, 30.0, 0.9, "qat")],
        [_row(52.0, 55.0, 0.95), _row(29.0, 26.0, 1.1, "qat")],
    ]
    float_row, qat_row = bench_train.combine_processes(runs)
    assert float_row["best_images_per_sec"] == {"jax": 52.0, "torch": 55.0}
    assert float_row["ratio_per_process"] == pytest.approx([50 / 60, 54 / 52, 52 / 55])
    # The median of the per-process ratios, not the ratio of the medians (52 / 55).
    assert float_row["ratio_median_over_processes"] == pytest.approx(52 / 55)
    assert float_row["paired_median_ratio"] == 0.95
    assert qat_row["mode"] == "qat" and qat_row["ratio_median_over_processes"] == 1.0
    with pytest.raises(ValueError):  # processes that measured different rows
        bench_train.combine_processes([runs[0], runs[1][:1]])
