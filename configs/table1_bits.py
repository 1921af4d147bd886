"""Table 1's recipes on the official float MobileNetV1 1.0/224 at W8A8, W6A8 and W4A8.

Command:

    python launch/main.py --config configs/table1_bits.py --workdir /tmp/table1_bits

The Table 1 setup (``configs/reproduce_table1.py``: the paper's float TF-slim graph, the 500
images of ``imagenet_val500`` at 224 px, activation ranges calibrated with min/max on the 1000
images of ``imagenet_calib1000``) with the four weight recipes per-tensor and per-channel, each
with and without the zero-variance fix, at 8-, 6- and 4-bit weights and 8-bit activations: rows
``<recipe>_w<bits>a8``, fake-quant top-1 and integer-only top-1 (``int_top1``). One calibration
per recipe serves its three bit widths. Writes ``workdir/results.json``; docs/bit_widths.md has
the table.

Time: 9 minutes on the 2-core Intel Xeon machine while the test suite ran beside it
(2026-12-03); not measured alone.
``configs/table1_bits.py:smoke`` (20 images, one recipe) checks the pipeline in about a minute
and a half; its numbers mean nothing.
"""

import ml_collections

from configs import reproduce_table1


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The full run; ``:smoke`` shrinks it to 20 images and one recipe."""
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown variant {variant!r} of table1_bits (use ':smoke')")
    c = reproduce_table1.get_config()
    c.rows = (
        "float",
        "tf8_per_tensor",
        "tf8_zero_variance_fix",
        "per_channel",
        "tf8_zero_variance_fix_per_channel",
    )
    c.weight_bits = (8, 6, 4)  # every quantized row at each (weight, activation) pair
    c.act_bits = (8,)
    if variant == "smoke":
        c.limit = 20
        c.num_calibration_images = 20
        c.eval_batch_size = 20
        c.rows = ("float", "tf8_zero_variance_fix")
    return c
