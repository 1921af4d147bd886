"""How the integer pass and the fake-quant simulation of the same model agree.

Two views, both running the model's own ``fake`` forward pass (no re-implementation):

* :func:`layerwise_agreement`: every layer of the simulation is fed exactly the integer pass's
  input to that layer (a Flax method interceptor replaces each ``ConvLayer``'s input and output
  by the dequantized integer codes), so a difference measures that layer's arithmetic alone.
  Expected: at most 1 LSB. The simulation adds the float bias unrounded, accumulates in float32
  and multiplies by the exact ``S_in S_w / S_out``; the integer pass rounds the bias to int32 and
  the multiplier to 31 bits and rounds twice. Results differ only when the exact value sits
  within that error of a rounding boundary (a .5 tie), by one code; the double rounding's part
  of it reaches ``2**-(r+1)`` LSB for a right shift ``r`` (a quarter of all codes for ``r = 1``).
* :func:`end_to_end_agreement`: both passes run freely; per-layer differences then accumulate
  through the network, and the top-1 agreement on the logits is what remains of them.

Top-1 is compared two ways. On the 8-bit logit codes (TFLite's output): 1001 classes on 256 codes
often tie, ``argmax`` takes the lowest tied index, and a 1-LSB difference flips it. On the fine
logits: the integer pass's classifier accumulators on the grid ``S_out / 2**16``
(:func:`~qfsep_jax.integer.run` with ``fine_logits=True``, integer ops only) against the
simulation's float logits before its output fake-quant (the same quantity in float32). The fine
comparison is the meaningful one (8-bit ties are broken identically by both passes, which hides
sub-LSB differences, or arbitrarily). What it leaves: the per-layer 1-LSB differences (TFLite's
double rounding, the int32 bias, float32 sums) are amplified end to end, since a 1-LSB change of
one input can move a depthwise output by several LSBs; the two passes' logits then differ by a
fraction of an LSB (``fine_logit_error_lsb``), and images whose top-2 logits are that close
flip. :func:`locate_disagreements` attributes each such image to a layer. The same amplification
acts on float32 summation order alone: ``agreement_report(..., reorder_check=True)`` measures how
well the simulation agrees with itself run through the other depthwise implementation: a
reference for how well any other arithmetic can be expected to agree with it.
``float64_check=True`` runs the simulation in float64 as well (end to end and layer by layer),
which separates the float32 simulation's own rounding from the integer arithmetic's.

Which simulation: by default the plain one (what PTQ evaluates and QAT trains with). Given
:func:`~qfsep_jax.integer.align.snap_biases` (variables with int32-grid biases) and an
``alignment`` (:func:`~qfsep_jax.integer.align.rounding_alignment`: TFLite's two roundings are one
rounding with a moved threshold; in float64 also the 31-bit multiplier), the simulation also
models the integer pass's arithmetic; what then separates the two passes is float32 rounding, and
in float64 nothing: that simulation gives the integer pass's codes in every layer. The job
``configs/agreement.py`` (:mod:`qfsep_jax.jobs.agreement`) runs this on a model and writes the
report.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.integer import inference
from qfsep_jax.integer.align import Alignment, aligned
from qfsep_jax.integer.types import POOL_NAME, IntModel
from qfsep_jax.models.depthwise import resolve_impl
from qfsep_jax.models.layers import ActQuant, ConvLayer
from qfsep_jax.models.names import layer_path, tfslim_name
from qfsep_jax.quant.fold import folded
from qfsep_jax.quant.numerics import round_half_away_from_zero
from qfsep_jax.tree_utils import subtree

TOP2_GAP_THRESHOLDS = (0.25, 0.5, 1.0, 2.0, 4.0)


# --------------------------------------------------------------------------------------------
# The simulation's forward passes, fed or watched through Flax method interceptors.
# --------------------------------------------------------------------------------------------


_CACHE: dict = {}


def _cached(key, make):
    """One jitted function per model (a new closure per call would recompile every batch)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _pre_quant_path(int_model: IntModel) -> tuple[str, ...]:
    """Module path of the classifier's output quantizer (its input: the pre-quant logits)."""
    return layer_path(int_model.layer_names[-1]) + ("act_quant",)


@contextlib.contextmanager
def _captured_pre_quant(pre_quant_path: tuple[str, ...]) -> Iterator[list[jax.Array]]:
    """Collects the input of the quantizer at ``pre_quant_path`` (the pre-quant logits).

    Enter it outside :func:`~qfsep_jax.integer.align.aligned`: outer interceptors run first, so
    it sees the value before any alignment moves it.
    """
    captured: list[jax.Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, ActQuant) and tuple(context.module.path) == pre_quant_path:
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield captured


def _is_conv_call(context) -> bool:
    return isinstance(context.module, ConvLayer) and context.method_name == "__call__"


def _make_layerwise_fn(model, prev_name: dict, pre_quant_path: tuple[str, ...]):
    @jax.jit
    def fake_given_int_inputs(variables, alignment, images, deq, deq_input):
        fake: dict[str, jax.Array] = {}

        def feed_int_inputs(next_fun, args, kwargs, context):
            if not _is_conv_call(context):
                return next_fun(*args, **kwargs)
            name = tfslim_name(tuple(context.module.path))
            before = prev_name[name]
            if before == POOL_NAME:
                fake[before] = args[0]  # the simulation's pool of the int pass's codes
            x_int = deq_input if before is None else deq[before]
            fake[name] = next_fun(x_int, *args[1:], **kwargs)
            return deq[name]

        with _captured_pre_quant(pre_quant_path) as pre, aligned(alignment):
            with nn.intercept_methods(feed_int_inputs):
                model.apply(variables, images, quant_mode="fake")
        return fake, jnp.reshape(pre[-1], (images.shape[0], -1))

    return fake_given_int_inputs


def _layerwise_outputs(model, variables, alignment, int_model, images, deq, deq_input, dtype):
    """The simulation's layer outputs given the int pass's layer inputs, and its classifier's
    pre-quant logits ``[N, classes]`` given the int pass's pooled codes."""
    names = int_model.layer_names
    prev_name = {n: (names[i - 1] if i else None) for i, n in enumerate(names)}
    path = _pre_quant_path(int_model)
    fn = _cached(
        ("layerwise", model, tuple(names)), lambda: _make_layerwise_fn(model, prev_name, path)
    )
    return fn(variables, alignment, jnp.asarray(images, dtype), deq, deq_input)


def _sim_logits(model, variables, alignment, int_model: IntModel, images, dtype=jnp.float32):
    """The simulation's logits (on its 8-bit grid), its pre-quant logits ``[N, classes]`` and
    its sown intermediates."""
    pre_quant_path = _pre_quant_path(int_model)

    def make():
        @jax.jit
        def apply(v, alignment, x):
            with _captured_pre_quant(pre_quant_path) as pre, aligned(alignment):
                out, state = model.apply(v, x, quant_mode="fake", mutable=["intermediates"])
            return out, jnp.reshape(pre[-1], out.shape), state

        return apply

    apply = _cached(("e2e", model, pre_quant_path), make)
    return apply(variables, alignment, jnp.asarray(images, dtype))


def _float64_tree(tree) -> Any:
    """Every float leaf of a pytree as a float64 array (cast once; ``None`` stays ``None``)."""
    if tree is None:
        return None
    with jax.enable_x64(True):
        return jax.tree_util.tree_map(_to_float64, tree)


def _to_float64(leaf):
    leaf = jnp.asarray(leaf)
    return leaf.astype(jnp.float64) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf


# --------------------------------------------------------------------------------------------
# Layer by layer and end to end.
# --------------------------------------------------------------------------------------------


def _layer_code_differences(
    model, variables, alignment, int_model: IntModel, images, q, ints, float64: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``|integer codes - simulation codes|`` of every layer given identical layer inputs, and
    the simulation classifier's pre-quant logits on the integer pass's pooled codes (float64).

    ``q``, ``ints``: the integer pass's input codes and intermediates. ``float64``: computed
    under x64 from the exactly dequantized codes (``variables`` and ``alignment`` cast with
    :func:`_float64_tree`).
    """
    params = inference.output_qparams(int_model)
    dtype = jnp.float64 if float64 else jnp.float32
    with jax.enable_x64(float64):
        deq = inference.dequantize_intermediates(int_model, ints, dtype)
        deq_input = inference.dequantize_codes(
            q, int_model.input_scale, int_model.input_zero_point, dtype
        )
        if float64:
            images = deq_input  # the input quantizer gives back exactly the codes q
        fake, pre_same = _layerwise_outputs(
            model, variables, alignment, int_model, images, deq, deq_input, dtype
        )
        codes = {n: inference.round_codes(fake[n], *params[n], dtype) for n in fake}
        diffs = {n: np.abs(np.asarray(ints[n], np.int32) - codes[n]) for n in int_model.layer_names}
        return diffs, np.asarray(pre_same, np.float64)


def layerwise_agreement(
    model,
    variables,
    int_model: IntModel,
    images,
    float64: bool = False,
    alignment: Alignment | None = None,
) -> dict:
    """Per-layer agreement given identical layer inputs (see the module docstring).

    Args:
      model, variables: the quantized MobileNetV1 and its variables (with ``quant_ranges``).
      int_model: its conversion (:func:`qfsep_jax.integer.from_variables`).
      images: float images ``[N, H, W, 3]`` as the float model takes them.
      float64: run the simulation in float64 (``jax.enable_x64``): layer inputs dequantized
        exactly, outputs rounded to codes in float64, no float32 rounding anywhere.
      alignment: the simulation aligned with the integer arithmetic
        (:func:`qfsep_jax.integer.align.rounding_alignment`), or ``None``.

    Returns:
      ``{layer name: {"max_lsb": int, "frac_differing": float}}`` for every layer, the
      average pool included.
    """
    model, variables = folded(model, variables)
    q = inference.quantize_input(int_model, images)
    _, ints = inference.run(int_model, q, return_intermediates=True)
    if float64:
        variables, alignment = _float64_tree(variables), _float64_tree(alignment)
    diffs, _ = _layer_code_differences(
        model, variables, alignment, int_model, images, q, ints, float64
    )
    return {
        name: {"max_lsb": int(d.max()), "frac_differing": float(np.mean(d > 0))}
        for name, d in diffs.items()
    }


def _sim_pre_quant_float64(model, variables64, alignment64, int_model: IntModel, codes):
    """The simulation's pre-quant logits computed in float64 (``jax.enable_x64``), ``[N, classes]``.

    ``variables64``, ``alignment64``: from :func:`_float64_tree`. ``codes``: the integer pass's
    input codes (:func:`~qfsep_jax.integer.quantize_input`), dequantized here exactly, so both
    passes start from the same codes. float64 rounds 2**29 times more finely than float32, so
    this is the simulation with its float32 rounding errors removed.
    """
    with jax.enable_x64(True):
        x = inference.dequantize_codes(
            codes, int_model.input_scale, int_model.input_zero_point, jnp.float64
        )
        _, pre, _ = _sim_logits(model, variables64, alignment64, int_model, x, dtype=jnp.float64)
        if pre.dtype != jnp.float64:
            raise RuntimeError(f"the float64 simulation computed in {pre.dtype}")
        return np.asarray(pre)


def end_to_end_agreement(
    model, variables, int_model: IntModel, images, alignment: Alignment | None = None
) -> dict:
    """Both passes run on their own; per-layer code differences and top-1 agreement.

    Returns ``{"top1_agreement": fraction (8-bit logit codes), "top1_agreement_fine": fraction
    (integer fine logits vs the simulation's pre-quant logits), "n": N, "layers": {name:
    {"max_lsb", "frac_differing"}}}``.
    """
    model, variables = folded(model, variables)
    q = inference.quantize_input(int_model, images)
    int_fine, ints = inference.run(int_model, q, return_intermediates=True, fine_logits=True)
    fake_logits, fake_pre, state = _sim_logits(model, variables, alignment, int_model, images)
    params = inference.output_qparams(int_model)
    layers = {}
    for name in int_model.layer_names:
        if name == POOL_NAME:
            continue
        node = subtree(state["intermediates"], layer_path(name), "intermediates")
        theirs = inference.round_codes(node["out"][0], *params[name])
        diff = np.abs(np.asarray(ints[name], np.int32) - theirs)
        layers[name] = {"max_lsb": int(diff.max()), "frac_differing": float(np.mean(diff > 0))}
    int_codes = np.asarray(ints[int_model.layer_names[-1]]).reshape(len(q), -1)
    agree = np.argmax(int_codes, -1) == np.argmax(np.asarray(fake_logits), -1)
    agree_fine = np.argmax(np.asarray(int_fine), -1) == np.argmax(np.asarray(fake_pre), -1)
    return {
        "top1_agreement": float(agree.mean()),
        "top1_agreement_fine": float(agree_fine.mean()),
        "n": int(agree.size),
        "layers": layers,
    }


# --------------------------------------------------------------------------------------------
# The report over an eval set.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Simulation:
    """The simulation a report compares against, prepared once: folded model and variables,
    the alignment, and what the optional checks need."""

    model: Any
    variables: Any
    alignment: Alignment | None
    reordered: Any = None  # the model with the other depthwise implementation
    variables64: Any = None
    alignment64: Any = None


@dataclasses.dataclass(frozen=True)
class _IntegerPass:
    """One batch through the integer pass."""

    q: np.ndarray  # input codes
    fine: np.ndarray  # fine logits, int64
    codes: np.ndarray  # 8-bit logit codes [N, classes], int32
    intermediates: dict


def agreement_report(
    model,
    variables,
    int_model: IntModel,
    batches: Iterable[dict[str, np.ndarray]],
    labels: bool = True,
    locate: bool = False,
    reorder_check: bool = False,
    float64_check: bool = False,
    alignment: Alignment | None = None,
) -> dict:
    """Layer-wise and end-to-end agreement over padded eval batches (masked images dropped).

    ``alignment``: compare against the simulation aligned with the integer arithmetic
    (:func:`qfsep_jax.integer.align.rounding_alignment`); ``None``: the plain simulation.

    Returns ``{"n", "top1_agreement", "top1_agreement_tie_aware", "disagreement_logit_gaps",
    "top1_agreement_fine", "top1_agreement_fine_same_input", "fine_disagreements",
    "fine_logit_error_lsb", "fine_logit_error_same_input_lsb", "top2_gap_lsb_below",
    "top2_pair_error_lsb", "layerwise_max_lsb": {name: int}, "layerwise_frac_differing": {name:
    float}, "top1_fake", "top1_int", "top1_fake_pre_quant", "top1_int_fine"}`` (top-1 in %
    against the batch labels when ``labels``).

    8-bit codes: both passes' logits as 8-bit codes, so two classes often tie; ``argmax`` then
    takes the lower index, and a 1-LSB difference in either tied logit flips the top-1. The
    tie-aware agreement counts an image when each pass's top-1 class is also a maximum of the
    other pass's logits; ``disagreement_logit_gaps`` lists, per disagreeing image, the
    simulation's logit of its own top-1 minus that of the integer pass's top-1, in codes (0 = a
    tie in the simulation).

    Fine logits: the integer pass's fine logits (``run(..., fine_logits=True)``) against the
    simulation's logits before the output fake-quant. ``top1_agreement_fine_same_input``: the
    same, with the simulation's classifier fed the integer pass's pooled codes (the classifier's
    own arithmetic: int32 bias, float32 sums; ``fine_logit_error_same_input_lsb`` is its largest
    logit error, in output LSBs). ``fine_disagreements``: per disagreeing image, its
    index in the stream (``image``), both top-1 classes, ``sim_gap_lsb`` (the simulation's
    pre-quant logit of its top-1 minus that of the integer top-1, in output LSBs) and
    ``int_gap_lsb`` (the same difference the other way round in the fine logits); with
    ``locate``, also :func:`locate_disagreements`'s ``culprit`` and ``culprit_codes_differing``.
    What moves a top-1: ``fine_logit_error_lsb`` (integer fine minus simulation pre-quant
    logits, every class, output LSBs: rms and max), ``top2_gap_lsb_below`` (how many images have
    the simulation's top-2 logits closer than each threshold, in LSBs) and
    ``top2_pair_error_lsb`` (the error of that top-2 difference in the integer pass: rms, max);
    an image flips when its pair error exceeds its gap. ``per_image`` keeps, in stream order,
    each image's ``sim_top2_gap_lsb``, its ``top2_pair_error_lsb`` (signed: negative narrows the
    gap) and ``fine_top1_agrees`` (what :func:`~qfsep_jax.analysis.plots.plot_top2_margins`
    draws).

    ``reorder_check`` adds ``"sim_reordered"``: the same simulation run with another depthwise
    implementation (``lax`` grouped conv against the CPU ones, ``native`` or ``shift``,
    :mod:`qfsep_jax.models.depthwise`), the same arithmetic in another float32 summation order.
    ``top1_agreement_fine_with_sim`` is its fine top-1 agreement with the simulation,
    ``top1_agreement_fine_with_int`` with the integer pass, ``logit_difference_lsb_rms`` the rms of
    its pre-quant logits minus the simulation's (output LSBs): how reproducible the simulation
    itself is, a reference for how well any other arithmetic can be expected to agree with it.

    ``float64_check`` adds ``"sim_float64"``: the same simulation computed in float64 from the
    integer pass's input codes (:func:`_sim_pre_quant_float64`), with the same three keys plus
    ``int_logit_error_lsb_rms`` (integer fine minus float64 pre-quant logits, rms, output LSBs)
    and its own ``layerwise_max_lsb`` / ``layerwise_frac_differing`` (float64 layer by layer):
    whether the residual is the float32 simulation's rounding or the integer arithmetic's own.
    """
    fake_model, fake_vars = folded(model, variables)
    sim = _Simulation(
        fake_model,
        fake_vars,
        alignment,
        reordered=(
            fake_model.clone(depthwise_impl=_other_depthwise_impl(fake_model.depthwise_impl))
            if reorder_check
            else None
        ),
        variables64=_float64_tree(fake_vars) if float64_check else None,
        alignment64=_float64_tree(alignment) if float64_check else None,
    )
    parts, n = [], 0
    for batch in batches:
        valid = int(batch["mask"].sum())
        if valid == 0:
            continue
        images = batch["image"][:valid]
        ints = _run_integer(int_model, images)
        part = _compare_batch(sim, int_model, images, ints, first_image=n, locate=locate)
        if labels:
            part["hits"] = _label_hits(part.pop("top1s"), batch["label"][:valid])
        else:
            part.pop("top1s")
        parts.append(part)
        n += valid
    if n == 0:
        raise ValueError("agreement_report saw no images")
    return _report(parts, n, sim, labels)


def _run_integer(int_model: IntModel, images) -> _IntegerPass:
    q = inference.quantize_input(int_model, images)
    fine, ints = inference.run(int_model, q, return_intermediates=True, fine_logits=True)
    codes = np.asarray(ints[int_model.layer_names[-1]], np.int32).reshape(len(images), -1)
    return _IntegerPass(q, np.asarray(fine, np.int64), codes, ints)


def _compare_batch(
    sim: _Simulation,
    int_model: IntModel,
    images,
    ints: _IntegerPass,
    first_image: int,
    locate: bool,
) -> dict[str, Any]:
    """Everything one batch adds to the report (see :func:`_report` for how parts combine)."""
    valid = len(images)
    scale, zp = inference.output_qparams(int_model)[int_model.layer_names[-1]]
    fine_unit = 2**inference.FINE_LOGIT_BITS
    part: dict[str, Any] = {"n": valid}
    # Layer-wise (each simulated layer fed the integer pass's input).
    diffs, pre_same = _layer_code_differences(
        sim.model, sim.variables, sim.alignment, int_model, images, ints.q, ints.intermediates
    )
    part["layers"] = _layer_stats(diffs, valid)
    # End to end, 8-bit codes.
    fake_logits, fake_pre, _ = _sim_logits(
        sim.model, sim.variables, sim.alignment, int_model, images
    )
    fake_codes = inference.round_codes(fake_logits, scale, zp)
    int_top, fake_top = np.argmax(ints.codes, -1), np.argmax(fake_codes, -1)
    rows = np.arange(valid)
    part["agree"] = int(np.sum(int_top == fake_top))
    # Tie-aware: each pass's top-1 class is also a (tied) maximum of the other's logits.
    ties = (fake_codes[rows, int_top] == fake_codes.max(-1)) | (
        ints.codes[rows, fake_top] == ints.codes.max(-1)
    )
    part["agree_ties"] = int(np.sum(ties))
    # How far apart the two top-1 classes are in the simulation's logits (codes).
    part["gaps"] = [
        int(fake_codes[i, fake_top[i]] - fake_codes[i, int_top[i]])
        for i in np.flatnonzero(int_top != fake_top)
    ]
    # End to end, fine logits vs pre-quant logits.
    fake_pre = np.asarray(fake_pre, np.float64)
    int_top_f, fake_top_f = np.argmax(ints.fine, -1), np.argmax(fake_pre, -1)
    part["agree_fine"] = int(np.sum(int_top_f == fake_top_f))
    part["fine_agrees"] = (int_top_f == fake_top_f).tolist()
    part["agree_same"] = int(np.sum(int_top_f == np.argmax(pre_same, -1)))
    part["err_same"] = float(np.abs(ints.fine / fine_unit - pre_same / scale).max())
    # End-to-end logit error and how close each image's top-2 is (output LSBs).
    err = ints.fine / fine_unit - fake_pre / scale
    part.update(err_sq=float(np.sum(err**2)), err_count=err.size, err_max=float(np.abs(err).max()))
    top2 = np.argsort(-fake_pre, axis=-1, kind="stable")[:, :2]
    sim_pair = (fake_pre[rows, top2[:, 0]] - fake_pre[rows, top2[:, 1]]) / scale
    int_pair = (ints.fine[rows, top2[:, 0]] - ints.fine[rows, top2[:, 1]]) / fine_unit
    part["top2_gaps"] = sim_pair.tolist()
    part["pair_errors"] = (int_pair - sim_pair).tolist()
    bad = np.flatnonzero(int_top_f != fake_top_f)
    part["fine_dis"] = []
    for i in bad:
        a, b = int(int_top_f[i]), int(fake_top_f[i])
        part["fine_dis"].append(
            {
                "image": first_image + int(i),
                "int_top1": a,
                "sim_top1": b,
                "sim_gap_lsb": float((fake_pre[i, b] - fake_pre[i, a]) / scale),
                "int_gap_lsb": float((ints.fine[i, a] - ints.fine[i, b]) / fine_unit),
            }
        )
    if sim.reordered is not None:
        _, re_pre, _ = _sim_logits(sim.reordered, sim.variables, sim.alignment, int_model, images)
        re_top = np.argmax(np.asarray(re_pre), -1)
        part["reordered"] = {
            "with_sim": int(np.sum(re_top == fake_top_f)),
            "with_int": int(np.sum(re_top == int_top_f)),
            "sq": float(np.sum(np.square((np.asarray(re_pre, np.float64) - fake_pre) / scale))),
        }
    if sim.variables64 is not None:
        part["float64"] = _float64_batch(
            sim, int_model, images, ints, fake_pre, fake_top_f, int_top_f, scale, fine_unit
        )
    if locate and bad.size:
        found = locate_disagreements(
            sim.model, sim.variables, int_model, images[bad], alignment=sim.alignment
        )
        for entry, loc in zip(part["fine_dis"], found, strict=True):
            entry.update(
                culprit=loc["culprit"], culprit_codes_differing=loc["culprit_codes_differing"]
            )
    part["top1s"] = {
        "int": int_top,
        "fake": fake_top,
        "int_fine": int_top_f,
        "fake_pre_quant": fake_top_f,
    }
    return part


def _float64_batch(
    sim, int_model, images, ints, fake_pre, fake_top_f, int_top_f, scale, fine_unit
) -> dict[str, Any]:
    """One batch of the float64 simulation: layer by layer and end to end."""
    diffs64, _ = _layer_code_differences(
        sim.model,
        sim.variables64,
        sim.alignment64,
        int_model,
        images,
        ints.q,
        ints.intermediates,
        float64=True,
    )
    pre64 = _sim_pre_quant_float64(sim.model, sim.variables64, sim.alignment64, int_model, ints.q)
    top64 = np.argmax(pre64, -1)
    return {
        "layers": _layer_stats(diffs64, len(images)),
        "with_sim": int(np.sum(top64 == fake_top_f)),
        "with_int": int(np.sum(top64 == int_top_f)),
        "sq": float(np.sum(np.square((fake_pre - pre64) / scale))),
        "int_sq": float(np.sum(np.square(ints.fine / fine_unit - pre64 / scale))),
    }


def _layer_stats(diffs: dict[str, np.ndarray], count: int) -> dict[str, tuple[int, float]]:
    """Per layer: the largest code difference and the count-weighted fraction that differ."""
    return {name: (int(d.max()), float(np.mean(d > 0)) * count) for name, d in diffs.items()}


def _label_hits(top1s: dict[str, np.ndarray], label: np.ndarray) -> dict[str, int]:
    return {k: int(np.sum(v == label)) for k, v in top1s.items()}


def _combine_layers(parts: list[dict], n: int) -> tuple[dict[str, int], dict[str, float]]:
    """Largest difference and fraction of differing codes per layer over all batches."""
    max_lsb: dict[str, int] = {}
    frac: dict[str, float] = {}
    for part in parts:
        for name, (lsb, weighted) in part.items():
            max_lsb[name] = max(max_lsb.get(name, 0), lsb)
            frac[name] = frac.get(name, 0.0) + weighted
    return max_lsb, {k: v / n for k, v in frac.items()}


def _total(parts: list[dict], key: str, sub: str | None = None):
    """The sum of a per-batch value over batches, added in batch order."""
    total = 0
    for part in parts:
        total += part[sub][key] if sub else part[key]
    return total


def _report(parts: list[dict], n: int, sim: _Simulation, labels: bool) -> dict[str, Any]:
    """The report from its per-batch parts (:func:`_compare_batch`)."""
    concat = lambda key: [v for part in parts for v in part[key]]  # noqa: E731
    err_count = _total(parts, "err_count")
    top2_gaps, pair_errors = concat("top2_gaps"), concat("pair_errors")
    max_lsb, frac = _combine_layers([p["layers"] for p in parts], n)
    out: dict[str, Any] = {
        "n": n,
        "top1_agreement": _total(parts, "agree") / n,
        "top1_agreement_tie_aware": _total(parts, "agree_ties") / n,
        "disagreement_logit_gaps": sorted(concat("gaps")),
        "top1_agreement_fine": _total(parts, "agree_fine") / n,
        "top1_agreement_fine_same_input": _total(parts, "agree_same") / n,
        "fine_disagreements": concat("fine_dis"),
        "fine_logit_error_lsb": {
            "rms": float(np.sqrt(_total(parts, "err_sq") / err_count)),
            "max": max(0.0, *(p["err_max"] for p in parts)),
        },
        "fine_logit_error_same_input_lsb": max(0.0, *(p["err_same"] for p in parts)),
        "top2_gap_lsb_below": {
            str(t): int(np.sum(np.asarray(top2_gaps) < t)) for t in TOP2_GAP_THRESHOLDS
        },
        "top2_pair_error_lsb": {
            "rms": float(np.sqrt(np.mean(np.square(pair_errors)))),
            "max": float(np.max(np.abs(pair_errors))),
        },
        "layerwise_max_lsb": max_lsb,
        "layerwise_frac_differing": frac,
        "per_image": {
            "sim_top2_gap_lsb": top2_gaps,
            "top2_pair_error_lsb": pair_errors,
            "fine_top1_agrees": concat("fine_agrees"),
        },
    }
    if sim.reordered is not None:
        out["sim_reordered"] = {
            "depthwise_impl": sim.reordered.depthwise_impl,
            "top1_agreement_fine_with_sim": _total(parts, "with_sim", "reordered") / n,
            "top1_agreement_fine_with_int": _total(parts, "with_int", "reordered") / n,
            "logit_difference_lsb_rms": float(
                np.sqrt(_total(parts, "sq", "reordered") / err_count)
            ),
        }
    if sim.variables64 is not None:
        max64, frac64 = _combine_layers([p["float64"]["layers"] for p in parts], n)
        out["sim_float64"] = {
            "top1_agreement_fine_with_sim": _total(parts, "with_sim", "float64") / n,
            "top1_agreement_fine_with_int": _total(parts, "with_int", "float64") / n,
            "logit_difference_lsb_rms": float(np.sqrt(_total(parts, "sq", "float64") / err_count)),
            "int_logit_error_lsb_rms": float(
                np.sqrt(_total(parts, "int_sq", "float64") / err_count)
            ),
            "layerwise_max_lsb": max64,
            "layerwise_frac_differing": frac64,
        }
    if labels:
        for key, name in (
            ("int", "top1_int"),
            ("fake", "top1_fake"),
            ("int_fine", "top1_int_fine"),
            ("fake_pre_quant", "top1_fake_pre_quant"),
        ):
            out[name] = 100.0 * _total(parts, key, "hits") / n
    return out


def _other_depthwise_impl(impl: str) -> str:
    """The depthwise implementation other than the one ``impl`` resolves to here."""
    return "lax" if resolve_impl(impl) != "lax" else "shift"


def locate_disagreements(
    model, variables, int_model: IntModel, images, alignment: Alignment | None = None
) -> list[dict]:
    """Which layer's differences decide each image's fine top-1 disagreement.

    Runs hybrids of the two passes: ``hybrid(L)`` is the simulation with the outputs of its
    first ``L`` conv layers replaced by the integer pass's (dequantized) codes, computing layer
    ``L`` onwards itself; ``hybrid(0)`` is the simulation, ``hybrid(last)`` its classifier alone
    on the integer pass's features. An image's ``culprit`` is the last layer ``L`` whose
    ``hybrid(L)`` still disagrees with the integer fine top-1: with the integer outputs taken
    through that layer, the passes agree, so the differences that layer's own arithmetic makes
    (given identical inputs) move the top-2 pair. ``culprit_codes_differing`` counts that
    layer's output codes differing from the integer pass's in ``hybrid(L)``; ``hybrid_agrees``
    lists the hybrid agreement for every ``L`` (1 = agree).

    Args:
      images: float images (typically only the disagreeing ones; one jitted pass per layer).
      alignment: as in :func:`agreement_report`.

    Returns:
      One ``{"culprit": layer name or None (no disagreement), "culprit_codes_differing": int,
      "hybrid_agrees": [0/1 per L]}`` per image.
    """
    model, variables = folded(model, variables)
    count = len(images)
    pad = -count % 4  # a few batch shapes only: one compilation each
    images = np.concatenate([np.asarray(images)] + [np.asarray(images[:1])] * pad)
    q = inference.quantize_input(int_model, images)
    int_fine, ints = inference.run(int_model, q, return_intermediates=True, fine_logits=True)
    int_top = np.argmax(np.asarray(int_fine), -1)
    deq = inference.dequantize_intermediates(int_model, ints)
    convs = tuple(n for n in int_model.layer_names if n != POOL_NAME)
    params = inference.output_qparams(int_model)
    path = _pre_quant_path(int_model)
    fn = _cached(("hybrid", model, convs), lambda: _make_hybrid_fn(model, convs, params, path))
    codes = {k: jnp.asarray(ints[k], jnp.int32) for k in convs}
    hybrid_agrees, differing = [], []
    for n_sub in range(len(convs)):
        pre, counts = fn(
            variables, alignment, jnp.asarray(images, jnp.float32), deq, codes, jnp.int32(n_sub)
        )
        hybrid_agrees.append(np.argmax(np.asarray(pre), -1) == int_top)
        differing.append(np.asarray(counts)[n_sub])
    hybrid_agrees, differing = np.stack(hybrid_agrees), np.stack(differing)  # [L, N]
    out = []
    for i in range(count):
        bad = np.flatnonzero(~hybrid_agrees[:, i])
        last = int(bad[-1]) if bad.size else None
        out.append(
            {
                "culprit": None if last is None else convs[last],
                "culprit_codes_differing": 0 if last is None else int(differing[last, i]),
                "hybrid_agrees": hybrid_agrees[:, i].astype(int).tolist(),
            }
        )
    return out


def _make_hybrid_fn(model, convs: tuple[str, ...], params: dict, pre_quant_path):
    index = {name: k for k, name in enumerate(convs)}

    @jax.jit
    def hybrid(variables, alignment, images, deq, codes, n_sub):
        counts: dict[str, jax.Array] = {}

        def take_int_outputs(next_fun, args, kwargs, context):
            if not _is_conv_call(context):
                return next_fun(*args, **kwargs)
            name = tfslim_name(tuple(context.module.path))
            out = next_fun(*args, **kwargs)
            scale, zp = params[name]
            mine = round_half_away_from_zero(out / jnp.float32(scale)).astype(jnp.int32) + zp
            counts[name] = jnp.sum(mine != codes[name], axis=(1, 2, 3))
            return jnp.where(index[name] < n_sub, deq[name], out)

        with _captured_pre_quant(pre_quant_path) as pre, aligned(alignment):
            with nn.intercept_methods(take_int_outputs):
                model.apply(variables, images, quant_mode="fake")
        return (
            jnp.reshape(pre[-1], (images.shape[0], -1)),
            jnp.stack([counts[name] for name in convs]),
        )

    return hybrid
