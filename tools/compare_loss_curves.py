"""Loss curves of training runs side by side: a JSON of the curves and a PNG plot.

    python tools/compare_loss_curves.py --runs f32=/tmp/a,bf16=/tmp/b,f32_2dev=/tmp/c \
        --reference f32 --out results/bf16_smoke [--window 25]

Reads each run's ``metrics.jsonl`` (``train_loss`` per logged step) and writes
``<out>/loss_curves.json`` (per-step losses, moving averages over ``--window`` steps, and for
each run against ``--reference``: the mean and largest absolute per-step difference and the
largest difference of the moving averages) and ``<out>/loss_curves.png``. The runs must have
logged the same steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each ``window`` consecutive values (``len - window + 1`` of them)."""
    if not 1 <= window <= len(values):
        raise ValueError(f"window {window} must be in [1, {len(values)}]")
    c = np.cumsum(np.concatenate([[0.0], np.asarray(values, np.float64)]))
    return (c[window:] - c[:-window]) / window


def compare(curves: dict[str, dict[int, float]], reference: str, window: int) -> dict:
    """Differences of every run's curve from ``reference``'s (same logged steps required)."""
    if reference not in curves:
        raise ValueError(f"reference {reference!r} is not one of the runs {sorted(curves)}")
    steps = sorted(curves[reference])
    for name, curve in curves.items():
        if sorted(curve) != steps:
            raise ValueError(f"run {name!r} logged other steps than {reference!r}")
    ref = np.array([curves[reference][s] for s in steps])
    out = {"steps": steps, "window": window, "runs": {}}
    for name, curve in curves.items():
        loss = np.array([curve[s] for s in steps])
        row = {"train_loss": loss.tolist(), "moving_average": moving_average(loss, window).tolist()}
        if name != reference:
            diff = np.abs(loss - ref)
            ma = np.abs(moving_average(loss, window) - moving_average(ref, window))
            row.update(
                {
                    "mean_abs_diff": float(diff.mean()),
                    "max_abs_diff": float(diff.max()),
                    "max_abs_diff_moving_average": float(ma.max()),
                }
            )
        out["runs"][name] = row
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="comma list of name=workdir")
    p.add_argument("--reference", required=True, help="the run the others are compared with")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--title", default="training loss")
    args = p.parse_args(argv)

    from qfsep_jax.io_utils import run_info, save_figure, write_json
    from qfsep_jax.metrics_log import read_metrics

    runs = {}
    for item in args.runs.split(","):
        name, sep, workdir = item.partition("=")
        if not sep or not name or not workdir:
            p.error(f"--runs items are name=workdir, got {item!r}")
        records = read_metrics(workdir)
        if not records:
            p.error(f"no metrics in {workdir}")
        runs[name] = {s: float(r["train_loss"]) for s, r in records.items()}
    result = compare(runs, args.reference, args.window)
    result["workdirs"] = dict(item.split("=", 1) for item in args.runs.split(","))
    result["command"] = "python tools/compare_loss_curves.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result["run"] = run_info()
    write_json(os.path.join(args.out, "loss_curves.json"), result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = np.array(result["steps"])
    for name, row in result["runs"].items():
        (line,) = ax.plot(steps, row["train_loss"], lw=0.6, alpha=0.35)
        ma_steps = steps[args.window - 1 :]
        ax.plot(
            ma_steps,
            row["moving_average"],
            lw=1.8,
            color=line.get_color(),
            label=f"{name} ({args.window}-step mean)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(args.title)
    ax.legend()
    save_figure(fig, os.path.join(args.out, "loss_curves.png"))
    for name, row in result["runs"].items():
        if "max_abs_diff" in row:
            print(
                f"{name} vs {args.reference}: mean |diff| {row['mean_abs_diff']:.4f}, "
                f"max |diff| {row['max_abs_diff']:.4f}, max |diff| of {args.window}-step means "
                f"{row['max_abs_diff_moving_average']:.4f}"
            )
    return result


if __name__ == "__main__":
    main()
