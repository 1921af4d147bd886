"""Where the zero-variance depthwise-BN channels of trained original blocks come from.

    python tools/figure5_dead_channels.py --workdir results/figure5_sgd_lr0.4_nowarmup \\
        --config configs/figure5.py:sgd_lr0.4_nowarmup --variants original --seeds 0 \\
        --num_images 500

Not a test. A depthwise-BN channel has zero moving variance when its depthwise conv's output is
constant, and a depthwise conv sees one input channel only: the same channel of the layer
before (``Conv2d_0`` for ``Conv2d_1``, else the previous pointwise layer). This tool runs
``--num_images`` validation images through each trained float model (its newest checkpoint) and
counts, per depthwise layer, the zero-variance channels, the input channels that are dead (the
previous layer's ReLU6 output exactly 0 on every image and position) and how many of the
zero-variance channels have a dead input. It also counts the depthwise layer's own dead outputs
(after its BN and ReLU6). Writes ``<workdir>/dead_channels.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qfsep_jax import checkpointing, progress  # noqa: E402
from qfsep_jax.analysis import alpha as alpha_lib  # noqa: E402
from qfsep_jax.analysis import sqnr as sqnr_lib  # noqa: E402
from qfsep_jax.data.input import eval_input  # noqa: E402
from qfsep_jax.io_utils import run_info, write_json  # noqa: E402
from qfsep_jax.jobs import figure5  # noqa: E402

log = logging.getLogger("figure5_dead_channels")


def input_layer(depthwise_layer: str) -> str:
    """The layer whose output a depthwise layer reads: ``Conv2d_<k>_depthwise`` reads
    ``Conv2d_0`` for k = 1, else ``Conv2d_<k-1>_pointwise``."""
    k = int(depthwise_layer.split("_")[1])
    return "Conv2d_0" if k == 1 else f"Conv2d_{k - 1}_pointwise"


def channel_maxima(
    model, variables: Mapping[str, Any], batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per layer output (TF-slim name), the largest value of each channel over the real images
    of ``batches`` (padded images, ``mask`` 0, are left out) and every position."""

    @jax.jit
    def batch_maxima(variables, images, mask):
        _, inter = sqnr_lib.collect_intermediates(model, variables, images, "float")
        # Reduced on the device: only one value per channel comes back, not the activations.
        keep = mask.astype(bool)[:, None, None, None]
        return {
            name: jnp.max(jnp.where(keep, out, -jnp.inf), axis=(0, 1, 2))
            for name, out in inter.items()
        }

    maxima: dict[str, np.ndarray] = {}
    for batch in batches:
        mask = np.asarray(batch.get("mask", np.ones(len(batch["image"]))), np.float32)
        got = jax.device_get(batch_maxima(variables, batch["image"], mask))
        for name, m in got.items():
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima


def dead_channel_origins(
    variables: Mapping[str, Any], maxima: Mapping[str, np.ndarray], eps: float
) -> dict[str, dict[str, Any]]:
    """Per depthwise-BN layer: its zero-variance channels, its dead input channels (maximum
    ≤ 0) with their moving variance and α, the zero-variance channels whose input is dead, and
    its own dead output channels."""
    out = {}
    for layer, row in alpha_lib.bn_alphas(variables, eps=eps).items():
        zero_var = list(row["zero_variance"])
        dead_in = np.flatnonzero(maxima[input_layer(layer)] <= 0.0).tolist()
        dead_out = np.flatnonzero(maxima[layer] <= 0.0).tolist()
        out[layer] = {
            "zero_variance": zero_var,
            "dead_input": dead_in,
            # a channel that died late still has a moving variance above the zero threshold
            "dead_input_variance": [float(row["variance"][c]) for c in dead_in],
            "dead_input_alpha": [float(row["alpha"][c]) for c in dead_in],
            "zero_variance_with_dead_input": sorted(set(zero_var) & set(dead_in)),
            "dead_output": dead_out,
        }
    return out


def totals(layers: Mapping[str, Mapping[str, list]]) -> dict[str, int]:
    """Channel counts summed over the layers of :func:`dead_channel_origins`."""
    keys = ("zero_variance", "dead_input", "zero_variance_with_dead_input", "dead_output")
    return {k: sum(len(row[k]) for row in layers.values()) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a figure5 job's workdir")
    ap.add_argument("--config", default="configs/figure5.py", help="its config[:recipe]")
    ap.add_argument("--variants", default="original", help="comma-separated")
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--num_images", type=int, default=500, help="validation images to run")
    ap.add_argument("--data_dir", default="../shared/data")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from configs import figure5 as figure5_configs

    _, _, recipe = args.config.partition(":")
    config = figure5_configs.get_config(recipe or None)
    config.data_dir = args.data_dir
    rows = []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            train_dir = os.path.join(figure5.run_dir(args.workdir, variant, seed), "train")
            tc = figure5.variant_config(config, variant, seed)
            model, variables = checkpointing.load_trained(tc, train_dir)
            data = eval_input(tc, tc.eval_data, limit=args.num_images)
            batches = progress.bar(
                data.make(), total=data.num_batches, desc=f"{variant} seed {seed}"
            )
            layers = dead_channel_origins(
                variables, channel_maxima(model, variables, batches), model.bn_epsilon
            )
            row = {"variant": variant, "seed": seed, **totals(layers), "layers": layers}
            log.info("%s seed %d: %s", variant, seed, totals(layers))
            rows.append(row)
    out = os.path.join(args.workdir, "dead_channels.json")
    write_json(
        out,
        {
            "eval_data": tc.eval_data,
            "num_images": data.num_examples,
            "rows": rows,
            "run": run_info(),
        },
    )
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
