"""Per-layer SQNR of a quantized pipeline against its float model, with the uniform-noise estimate.

Definitions (the paper's Section 3, made precise here):

* For one image and one layer output ``x`` (float reference) and ``x_q`` (the quantized pipeline's
  output of the same layer, dequantized), ``signal = mean(x²)`` and ``noise = mean((x_q - x)²)``
  over all elements of that image's tensor.
* **Measured SQNR** of a layer = the mean over images of the per-image ``10·log10(signal/noise)``
  in dB (``sqnr_db``). The ratio of sums ``10·log10(Σ signal / Σ noise)`` is reported beside it
  (``sqnr_db_ratio_of_sums``), with the standard deviation over images (``sqnr_db_std``).
* The error is **accumulated**: both passes run the whole network from the same float image, so a
  layer's noise includes everything quantized before it.
* **Uniform-noise estimate** (the paper's formula): with the layer's activation quantizer range
  ``[x_min, x_max]`` (nudged to contain 0, so ``Δ = (x_max - x_min) / (2^b - 1)``) and
  ``E[n²] = Δ²/12``, per image ``10·log10(12·mean(x²)/Δ²)`` = ``58.92 − 10·log10((x_max −
  x_min)² / E[x²])`` for ``b = 8``, averaged over images in dB like the measured value. It models
  the local rounding noise of that one quantizer only (no accumulation, no clipping).
* The float reference of a quantized model is **the same folded network in float** (its
  ``"calibrate"`` pass: folded weights, no rounding), so the SQNR isolates quantization noise
  even where the PTQ recipe changed the float function (zero-variance fix, CLE's ReLU6 → ReLU).

Layers are keyed by TF-slim name (``Conv2d_1_depthwise``) in network order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax import progress as progress_lib
from qfsep_jax.models.names import layer_paths, tfslim_name
from qfsep_jax.quant.numerics import UINT8, IntRange, qparams
from qfsep_jax.quant.scheme import QuantConfig, layer_act_range
from qfsep_jax.tree_utils import find_nodes

SQNR_DEFINITION = (
    "sqnr_db: mean over images of per-image 10*log10(mean(x^2)/mean((x_q-x)^2)) per layer output, "
    "x = the same folded network in float, x_q = the quantized pipeline, error accumulated "
    "through the network; sqnr_db_ratio_of_sums: 10*log10(sum signal / sum noise); "
    "uniform_estimate_db: mean over images of 10*log10(12*mean(x^2)/Delta^2), Delta = the layer's "
    "activation quantizer step (= 58.92 - 10*log10((x_max-x_min)^2/E[x^2]) at 8 bit)"
)

Intermediates = dict[str, jax.Array]


def uniform_noise_constant(int_range: IntRange = UINT8) -> float:
    """``10·log10(12·(2^b − 1)²)``: the 58.92 dB of the paper's 8-bit formula."""
    return 10.0 * math.log10(12.0 * float(int_range.qmax - int_range.qmin) ** 2)


def flatten_intermediates(tree: Mapping[str, Any]) -> Intermediates:
    """The sown ``intermediates/.../out`` values of a model, keyed by TF-slim layer name."""
    found: Intermediates = {}
    for path, node in find_nodes(tree, lambda n: isinstance(n.get("out"), tuple)):
        if len(node["out"]) != 1:
            raise ValueError(
                f"layer {tfslim_name(path)} sowed {len(node['out'])} outputs; apply the model "
                "once per collection (one call per forward pass)"
            )
        found[tfslim_name(path)] = node["out"][0]
    return found


def collect_intermediates(model, variables: Mapping, images: jax.Array, quant_mode: str):
    """Runs ``model`` on ``images`` and returns ``(logits, {tfslim layer name: output})``.

    ``quant_mode="calibrate"`` is the float forward of a quantized (folded) model: its observer
    updates are discarded. ``"fake"`` is the 8-bit simulation. Pure: usable inside ``jit``.
    """
    mutable = ["intermediates"] + (["quant_ranges"] if quant_mode == "calibrate" else [])
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    logits, state = model.apply(variables, images, quant_mode=quant_mode, mutable=mutable)
    return logits, flatten_intermediates(state["intermediates"])


def per_image_power(
    reference: Mapping[str, jax.Array], test: Mapping[str, jax.Array]
) -> dict[str, dict[str, jax.Array]]:
    """Per-image ``signal = mean(ref²)`` and ``noise = mean((test − ref)²)`` for every layer.

    Both dicts must hold the same layer names; a test tensor whose shape differs from the
    reference but has as many elements per image (e.g. logits ``[B, C]`` vs ``[B, 1, 1, C]``) is
    reshaped. Returns ``{layer: {"signal": [B], "noise": [B]}}`` (float32). Pure.
    """
    missing = sorted(set(reference) - set(test))
    extra = sorted(set(test) - set(reference))
    if missing or extra:
        raise ValueError(
            f"layer outputs do not line up: missing in the quantized pass {missing}, "
            f"not in the float reference {extra}"
        )
    out = {}
    for name, ref in reference.items():
        ref = jnp.asarray(ref, jnp.float32)
        tst = jnp.asarray(test[name], jnp.float32)
        if tst.shape != ref.shape:
            if tst.size != ref.size or tst.shape[0] != ref.shape[0]:
                raise ValueError(
                    f"layer {name}: quantized output shape {tst.shape} does not match the float "
                    f"reference {ref.shape}"
                )
            tst = jnp.reshape(tst, ref.shape)
        axes = tuple(range(1, ref.ndim))
        out[name] = {
            "signal": jnp.mean(jnp.square(ref), axis=axes),
            "noise": jnp.mean(jnp.square(tst - ref), axis=axes),
        }
    return out


def activation_steps(
    quant_ranges: Mapping[str, Any], int_range: IntRange | QuantConfig = UINT8
) -> dict[str, float]:
    """Quantization step Δ of every layer's output quantizer (``.../act_quant``) by TF-slim name.

    Layers without a finite calibrated range (dynamic-range models) are left out. ``int_range``:
    one code range for all, or a :class:`QuantConfig` whose per-layer bits give each layer's.
    """
    steps: dict[str, float] = {}
    for path, node in find_nodes(quant_ranges, lambda n: isinstance(n.get("act_quant"), Mapping)):
        lo, hi = np.asarray(node["act_quant"]["min"]), np.asarray(node["act_quant"]["max"])
        if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
            name = tfslim_name(path)
            scale, _ = qparams(lo, hi, layer_act_range(int_range, name))
            steps[name] = float(scale)
    return steps


@dataclasses.dataclass
class SQNRStats:
    """Per-image powers gathered over a data set: ``{layer: {"signal": [N], "noise": [N]}}``."""

    layers: list[str]
    power: dict[str, dict[str, np.ndarray]]

    @classmethod
    def empty(cls, layers: list[str]) -> SQNRStats:
        return cls(list(layers), {n: {"signal": np.zeros(0), "noise": np.zeros(0)} for n in layers})

    def add(self, batch_power: Mapping[str, Mapping[str, Any]], valid: int) -> SQNRStats:
        """A new stats object with the first ``valid`` images of a batch appended."""
        power = {}
        for name in self.layers:
            power[name] = {
                k: np.concatenate(
                    [self.power[name][k], np.asarray(batch_power[name][k], np.float64)[:valid]]
                )
                for k in ("signal", "noise")
            }
        return SQNRStats(self.layers, power)

    @property
    def num_images(self) -> int:
        return len(self.power[self.layers[0]]["signal"]) if self.layers else 0


def _db(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(num / den)


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def summarize(
    stats: SQNRStats, steps: Mapping[str, float] | None = None
) -> dict[str, dict[str, float | None]]:
    """Per-layer SQNR summary (see the module docstring for the definitions).

    Returns ``{layer: {"sqnr_db", "sqnr_db_ratio_of_sums", "sqnr_db_std", ["uniform_estimate_db"],
    "num_images"}}`` in network order. A layer with zero noise on some image (an exact pass) has
    infinite SQNR, written as ``None`` (JSON null).
    """
    if stats.num_images == 0:
        raise ValueError("no images were measured")
    out = {}
    for name in stats.layers:
        sig, noise = stats.power[name]["signal"], stats.power[name]["noise"]
        per_image = _db(sig, noise)
        with np.errstate(invalid="ignore"):  # inf - inf in the std of an exact pass
            std = np.std(per_image)
        row: dict[str, float | None] = {
            "sqnr_db": _finite_or_none(np.mean(per_image)),
            "sqnr_db_ratio_of_sums": _finite_or_none(_db(sig.sum(), noise.sum())),
            "sqnr_db_std": _finite_or_none(std),
        }
        if steps is not None and name in steps:
            est = _db(12.0 * sig, np.full_like(sig, steps[name] ** 2))
            row["uniform_estimate_db"] = _finite_or_none(np.mean(est))
        row["num_images"] = int(len(sig))
        out[name] = row
    return out


def model_layer_names(variables: Mapping[str, Any]) -> list[str]:
    """TF-slim names of a model's conv layers in network order."""
    return [tfslim_name(p) for p in layer_paths(variables["params"])]


IntegerFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def measure_sqnr(
    qmodel,
    batches: Iterable[Mapping[str, np.ndarray]],
    total: int | None = None,
    integer_fn: IntegerFn | None = None,
    desc: str = "sqnr",
    progress: bool = True,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per-layer SQNR of a :class:`~qfsep_jax.quantized.QuantizedModel` over masked image batches.

    Args:
      qmodel: the PTQ result (folded model, variables with ``quant_ranges``).
      batches: ``{"image", ["mask"]}`` float batches (padded images with mask 0 are dropped).
      total: number of batches, for the progress bar.
      integer_fn: optional float images → ``{tfslim layer: dequantized output}`` of the
        integer-only pass (float arrays); measured against the same float reference.
      desc: progress-bar label.
      progress: show the progress bar.

    Returns:
      ``{"fake_quant": summary, ["integer": summary]}`` with :func:`summarize` summaries; the
      uniform-noise estimate is in every layer row.
    """
    model, variables = qmodel.model, qmodel.variables
    layers = model_layer_names(variables)

    @jax.jit
    def step(v, images, integer_out):
        # One float reference pass serves both comparisons; only per-image powers leave the jit.
        _, ref = collect_intermediates(model, v, images, "calibrate")
        _, fq = collect_intermediates(model, v, images, "fake")
        out = {"fake_quant": per_image_power(ref, fq)}
        if integer_out is not None:
            out["integer"] = per_image_power(ref, integer_out)
        return out

    fake = SQNRStats.empty(layers)
    integer = SQNRStats.empty(layers) if integer_fn is not None else None
    for batch in progress_lib.bar(batches, progress, total=total, desc=desc, unit="batch"):
        images = batch["image"]
        valid = int(np.sum(batch["mask"])) if "mask" in batch else len(images)
        if valid == 0:
            continue
        integer_out = None
        if integer is not None:
            integer_out = {k: jnp.asarray(v, jnp.float32) for k, v in integer_fn(images).items()}
        powers = step(variables, images, integer_out)
        fake = fake.add(powers["fake_quant"], valid)
        if integer is not None:
            integer = integer.add(powers["integer"], valid)
    quant = model.quant
    steps = activation_steps(variables["quant_ranges"], quant)
    result = {"fake_quant": summarize(fake, steps)}
    if integer is not None:
        result["integer"] = summarize(integer, steps)
    return result


def sqnr_curve(summary: Mapping[str, Mapping[str, Any]], key: str = "sqnr_db") -> dict[str, float]:
    """``{layer: value}`` of one column of a :func:`summarize` result (None dropped)."""
    return {k: v[key] for k, v in summary.items() if v.get(key) is not None}


def integer_pass_fn(qmodel) -> IntegerFn:
    """Float images → ``{tfslim layer: dequantized output}`` of the integer-only pass.

    Uses :mod:`qfsep_jax.integer` (imported here: it is optional for the fake-quant analysis).
    """
    from qfsep_jax import integer

    int_model = integer.from_quantized(qmodel)
    quantize_input = jax.jit(lambda images: integer.quantize_input(int_model, images))

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        _, codes = integer.run(int_model, quantize_input(images), return_intermediates=True)
        # The average pool has no float counterpart among the sown layer outputs.
        codes = {k: v for k, v in codes.items() if k != integer.POOL_NAME}
        return integer.dequantize_intermediates(int_model, codes)

    return run
