"""Screens training recipes for the Figure 5 collapse: dead depthwise channels after a few epochs.

    python tools/figure5_recipe_screen.py --recipes today,sgd_lr0.1,sgd_lr0.4_nowarmup \\
        --epochs 5 --workdir results/figure5_recipe_screen

Not a test. The paper blames the original block's 8-bit collapse on depthwise-BN channels with
zero variance (a dead input channel makes the depthwise output constant, so the folded
α = γ/√(σ²+ε) explodes). Such channels die early, at the peak learning rate, and stay dead (a
dead ReLU6 passes no gradient to its BN), so a few epochs of a recipe's own schedule show
whether it kills more channels than today's, for a fraction of a full run's cost.

Each recipe (a ``configs/figure5.py`` recipe name, or ``today`` for the default) trains the
``original`` block with the full 30-epoch schedule and stops resumably after ``--epochs``
(``halt_after_steps``), in ``<workdir>/<recipe>/original/seed<k>/train``: the figure5 job's
layout, so that

    python launch/main.py --config configs/figure5.py:<recipe> \\
        --workdir <workdir>/<recipe> --config.variants='("original",)'

continues the promising ones to 30 epochs. The screen then counts, from the halted checkpoint,
the zero-variance channels, the channels whose moving variance is below BN's epsilon (the early
sign of a dead channel) and the largest α of every depthwise BN, and writes
``<workdir>/screen.json`` (one row per recipe and seed) and ``screen.png`` (below-epsilon
channels per layer and recipe).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qfsep_jax import checkpointing, metrics_log, train  # noqa: E402
from qfsep_jax.analysis import alpha as alpha_lib  # noqa: E402
from qfsep_jax.io_utils import run_info, write_atomic, write_json  # noqa: E402
from qfsep_jax.jobs import figure5  # noqa: E402

log = logging.getLogger("figure5_recipe_screen")

TODAY = "today"


def recipe_config(recipe: str, data_dir: str):
    """The figure5 config of ``recipe`` (``today``: the default recipe)."""
    from configs import figure5 as figure5_configs

    c = figure5_configs.get_config(None if recipe == TODAY else recipe)
    c.data_dir = data_dir
    return c


def screen_one(recipe: str, seed: int, epochs: float, workdir: str, data_dir: str) -> dict:
    """Trains ``original`` under ``recipe`` for ``epochs`` (resumable) and counts dead channels."""
    config = recipe_config(recipe, data_dir)
    tc = figure5.variant_config(config, "original", seed)
    steps_per_epoch = tc.checkpoint_every_steps  # one epoch in the Imagenette configs
    halt = max(1, int(round(epochs * steps_per_epoch)))
    tc.halt_after_steps = halt
    tc.checkpoint_every_steps = min(tc.checkpoint_every_steps, halt)
    run = figure5.run_dir(os.path.join(workdir, recipe), "original", seed)
    train_dir = os.path.join(run, "train")
    train.train_and_evaluate(tc, train_dir)
    variables = checkpointing.load_variables(train_dir)
    variables = {k: variables[k] for k in ("params", "batch_stats")}
    eps = tc.model.bn_epsilon
    alphas = alpha_lib.bn_alphas(variables, eps=eps)
    # A dead channel's moving variance decays by the BN decay per step, so it takes thousands
    # of steps to pass the zero-variance threshold; below BN's epsilon its α is already set by
    # epsilon alone, which a short screen does show.
    below_eps = {name: int((np.asarray(r["variance"]) < eps).sum()) for name, r in alphas.items()}
    metrics = metrics_log.read_metrics(train_dir)
    return {
        "recipe": recipe,
        "seed": seed,
        "epochs": halt / steps_per_epoch,
        "step": halt,
        "overrides": config.train_overrides.to_dict(),
        **figure5.depthwise_bn_stats(variables),  # zero_variance_channels, max_depthwise_alpha
        "below_epsilon_channels": sum(below_eps.values()),
        "below_epsilon_per_layer": below_eps,
        "zero_variance_per_layer": {name: len(r["zero_variance"]) for name, r in alphas.items()},
        "last_train_loss": metrics.get(halt, {}).get("train_loss"),
    }


def plot(rows: list[dict], path: str) -> None:
    """Below-epsilon channels per depthwise layer, one bar group per recipe."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(rows[0]["below_epsilon_per_layer"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        counts = [r["below_epsilon_per_layer"].get(name, 0) for name in layers]
        label = f"{r['recipe']} s{r['seed']} ({r['below_epsilon_channels']} total)"
        ax.bar(np.arange(len(layers)) + i * width, counts, width, label=label)
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2)
    ax.set_xticklabels([name.split("/")[0].replace("Conv2d_", "dw") for name in layers])
    ax.set_ylabel("DW-BN channels, moving variance < BN epsilon")
    ax.set_title(f"original block after {rows[0]['epochs']:g} epochs of each recipe")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=TODAY, help="comma list of figure5 recipes or 'today'")
    p.add_argument("--seeds", default="0", help="comma list")
    p.add_argument("--epochs", type=float, default=5.0, help="epochs of each 30-epoch schedule")
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--workdir", default="results/figure5_recipe_screen")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"data directory {args.data_dir!r} does not exist (see --data_dir)")
    recipes = [r for r in args.recipes.split(",") if r]
    for r in recipes:
        recipe_config(r, args.data_dir)  # an unknown recipe fails before any training
    rows = []
    out = os.path.join(args.workdir, "screen.json")
    for recipe in recipes:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = screen_one(recipe, seed, args.epochs, args.workdir, args.data_dir)
            log.info(
                "%s seed %d after %g epochs: %d zero-variance channels, max alpha %.1f",
                recipe,
                seed,
                row["epochs"],
                row["zero_variance_channels"],
                row["max_depthwise_alpha"],
            )
            rows.append(row)
            # Written after every recipe: an interrupted screen keeps what it measured.
            write_json(out, {"rows": rows, "command": sys.argv, "run": run_info()})
    plot(rows, os.path.join(args.workdir, "screen.png"))
    for r in rows:
        print(
            f"{r['recipe']:>22} seed {r['seed']}: {r['zero_variance_channels']:3d} "
            f"zero-variance channels, {r['below_epsilon_channels']:3d} below epsilon, "
            f"max alpha {r['max_depthwise_alpha']:.1f}"
        )


if __name__ == "__main__":
    main()
