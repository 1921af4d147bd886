"""The paper's analysis tools: per-layer SQNR, folded BN scales α, range tables and plots.

* :mod:`~qfsep_jax.analysis.sqnr`: per-layer SQNR of a quantized pipeline (fake-quant and
  integer-only) against its float network, with the uniform-noise estimate (Figure 4).
* :mod:`~qfsep_jax.analysis.alpha`: α per channel of the BN layers after depthwise convs,
  zero-variance channels flagged, comparison with the paper's Figure 3.
* :mod:`~qfsep_jax.analysis.ranges`: weight and activation range tables per layer.
* :mod:`~qfsep_jax.analysis.agreement`: the integer-only pass against the fake-quant simulation,
  layer by layer and end to end.
* :mod:`~qfsep_jax.analysis.plots`: PNGs shaped like the paper's Figures 3, 4 and 5 (imported on
  demand, it loads matplotlib).
"""

from qfsep_jax.analysis.agreement import (
    agreement_report,
    end_to_end_agreement,
    layerwise_agreement,
    locate_disagreements,
)
from qfsep_jax.analysis.alpha import alpha_summary, bn_alphas, compare_to_paper
from qfsep_jax.analysis.ranges import activation_range_table, weight_range_table
from qfsep_jax.analysis.sqnr import (
    SQNR_DEFINITION,
    integer_pass_fn,
    measure_sqnr,
    per_image_power,
    sqnr_curve,
    summarize,
    uniform_noise_constant,
)

__all__ = [
    "SQNR_DEFINITION",
    "activation_range_table",
    "agreement_report",
    "alpha_summary",
    "bn_alphas",
    "compare_to_paper",
    "end_to_end_agreement",
    "integer_pass_fn",
    "layerwise_agreement",
    "locate_disagreements",
    "measure_sqnr",
    "per_image_power",
    "sqnr_curve",
    "summarize",
    "uniform_noise_constant",
    "weight_range_table",
]
