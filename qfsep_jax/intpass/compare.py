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
(:func:`~qfsep_jax.intpass.run` with ``fine_logits=True``, integer ops only) against the
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
:func:`~qfsep_jax.intpass.model.snap_biases` and
:func:`~qfsep_jax.intpass.model.with_rounding_offsets` (``--snap_biases --sim_rounding``), the
simulation also models the integer pass's int32 biases and its requantization rounding (TFLite's
two roundings are one rounding with a moved threshold, see
:func:`~qfsep_jax.intpass.model.rounding_offsets`; in float64 also the 31-bit multiplier,
:func:`~qfsep_jax.intpass.model.multiplier_ratios`); what then separates the two passes is float32
rounding, and in float64 nothing: that simulation gives the integer pass's codes in every layer.
``main`` runs one model (``--recipe`` on the official graph, ``--trained_run``,
``--quantized_model``) and writes a JSON report and a per-image margin plot;
``--summarize`` collects reports into the README's table.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.intpass import model as model_lib
from qfsep_jax.models.depthwise import resolve_impl
from qfsep_jax.models.layers import ActQuant, ConvLayer
from qfsep_jax.quant.fake_quant import round_half_away_from_zero
from qfsep_jax.quant.fold import folded


def layerwise_agreement(
    model, variables, int_model: model_lib.IntModel, images, float64: bool = False
) -> dict:
    """Per-layer agreement given identical layer inputs (see the module docstring).

    Args:
      model, variables: the quantized MobileNetV1 and its variables (with ``quant_ranges``).
      int_model: its conversion (:func:`qfsep_jax.intpass.from_variables`).
      images: float images ``[N, H, W, 3]`` as the float model takes them.
      float64: run the simulation in float64 (``jax.enable_x64``): layer inputs dequantized
        exactly, outputs rounded to codes in float64, no float32 rounding anywhere.

    Returns:
      ``{layer name: {"max_lsb": int, "frac_differing": float}}`` for every layer, the
      average pool included.
    """
    model, variables = folded(model, variables)
    q = model_lib.quantize_input(int_model, images)
    _, ints = model_lib.run(int_model, q, return_intermediates=True)
    if float64:
        variables = _float64_variables(variables)
    diffs, _ = _layer_code_differences(model, variables, int_model, images, q, ints, float64)
    return {
        name: {"max_lsb": int(d.max()), "frac_differing": float(np.mean(d > 0))}
        for name, d in diffs.items()
    }


def _layer_code_differences(
    model, variables, int_model: model_lib.IntModel, images, q, ints, float64: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``|integer codes - simulation codes|`` of every layer given identical layer inputs, and
    the simulation classifier's pre-quant logits on the integer pass's pooled codes (float64).

    ``q``, ``ints``: the integer pass's input codes and intermediates. ``float64``: computed
    under x64 from the exactly dequantized codes (``variables`` from :func:`_float64_variables`).
    """
    params = model_lib.output_qparams(int_model)
    dtype = jnp.float64 if float64 else jnp.float32
    with jax.enable_x64(float64):
        deq = model_lib.dequantize_intermediates(int_model, ints, dtype)
        deq_input = model_lib.dequantize_codes(q, int_model.input_scale,
                                               int_model.input_zero_point, dtype)  # fmt: skip
        if float64:
            images = deq_input  # the input quantizer gives back exactly the codes q
        fake, pre_same = _layerwise_outputs(model, variables, int_model, images, deq, deq_input,
                                            dtype)  # fmt: skip
        codes = {n: model_lib.round_codes(fake[n], *params[n], dtype) for n in fake}
        diffs = {n: np.abs(np.asarray(ints[n], np.int32) - codes[n]) for n in int_model.layer_names}
        return diffs, np.asarray(pre_same, np.float64)


_CACHE: dict = {}


def _cached(key, make):
    """One jitted function per model (a new closure per call would recompile every batch)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _layerwise_outputs(model, variables, int_model, images, deq, deq_input, dtype=jnp.float32):
    """The simulation's layer outputs given the int pass's layer inputs, and its classifier's
    pre-quant logits ``[N, classes]`` given the int pass's pooled codes."""
    names = int_model.layer_names
    prev_name = {n: (names[i - 1] if i else None) for i, n in enumerate(names)}
    path = _pre_quant_path(int_model)
    fn = _cached(("layerwise", model, tuple(names)),
                 lambda: _make_layerwise_fn(model, prev_name, path))  # fmt: skip
    return fn(variables, jnp.asarray(images, dtype), deq, deq_input)


def _pre_quant_path(int_model: model_lib.IntModel) -> tuple[str, ...]:
    """Module path of the classifier's output quantizer (its input: the pre-quant logits)."""
    return model_lib.layer_path(int_model.layer_names[-1]) + ("act_quant",)


def _is_pre_quant(context, pre_quant_path) -> bool:
    return isinstance(context.module, ActQuant) and tuple(context.module.path) == pre_quant_path


def _make_layerwise_fn(model, prev_name: dict, pre_quant_path: tuple[str, ...]):
    @jax.jit
    def fake_given_int_inputs(variables, images, deq, deq_input):
        fake: dict[str, jax.Array] = {}
        pre: list[jax.Array] = []

        def interceptor(next_fun, args, kwargs, context):
            if _is_pre_quant(context, pre_quant_path):
                pre.append(args[0])
            if not (isinstance(context.module, ConvLayer) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            name = "_".join(context.module.path)
            before = prev_name[name]
            if before == model_lib.POOL_NAME:
                fake[before] = args[0]  # the simulation's pool of the int pass's codes
            x_int = deq_input if before is None else deq[before]
            fake[name] = next_fun(x_int, *args[1:], **kwargs)
            return deq[name]

        with nn.intercept_methods(interceptor):
            model.apply(variables, images, quant_mode="fake")
        return fake, jnp.reshape(pre[-1], (images.shape[0], -1))

    return fake_given_int_inputs


def _sim_logits(model, variables, int_model: model_lib.IntModel, images, dtype=jnp.float32):
    """The simulation's logits (on its 8-bit grid) and its pre-quant logits, ``[N, classes]``."""
    pre_quant_path = _pre_quant_path(int_model)

    def make():
        @jax.jit
        def apply(v, x):
            pre: list[jax.Array] = []

            def interceptor(next_fun, args, kwargs, context):
                if _is_pre_quant(context, pre_quant_path):
                    pre.append(args[0])
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(interceptor):
                out, state = model.apply(v, x, quant_mode="fake", mutable=["intermediates"])
            return out, jnp.reshape(pre[-1], out.shape), state

        return apply

    apply = _cached(("e2e", model, pre_quant_path), make)
    return apply(variables, jnp.asarray(images, dtype))


def _float64_variables(variables) -> dict:
    """The simulation's variables with every float leaf as a float64 array (cast once)."""
    with jax.enable_x64(True):
        return jax.tree_util.tree_map(_to_float64, variables)


def _to_float64(leaf):
    leaf = jnp.asarray(leaf)
    return leaf.astype(jnp.float64) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf


def _sim_pre_quant_float64(model, variables64, int_model: model_lib.IntModel, codes) -> np.ndarray:
    """The simulation's pre-quant logits computed in float64 (``jax.enable_x64``), ``[N, classes]``.

    ``variables64``: from :func:`_float64_variables`. ``codes``: the integer pass's input codes
    (:func:`~qfsep_jax.intpass.quantize_input`), dequantized here exactly, so both passes start
    from the same codes. float64 rounds 2**29 times more finely than float32, so this is the
    simulation with its float32 rounding errors removed.
    """
    with jax.enable_x64(True):
        x = model_lib.dequantize_codes(codes, int_model.input_scale, int_model.input_zero_point,
                                       jnp.float64)  # fmt: skip
        _, pre, _ = _sim_logits(model, variables64, int_model, x, dtype=jnp.float64)
        if pre.dtype != jnp.float64:
            raise RuntimeError(f"the float64 simulation computed in {pre.dtype}")
        return np.asarray(pre)


def end_to_end_agreement(model, variables, int_model: model_lib.IntModel, images) -> dict:
    """Both passes run on their own; per-layer code differences and top-1 agreement.

    Returns ``{"top1_agreement": fraction (8-bit logit codes), "top1_agreement_fine": fraction
    (integer fine logits vs the simulation's pre-quant logits), "n": N, "layers": {name:
    {"max_lsb", "frac_differing"}}}``.
    """
    model, variables = folded(model, variables)
    q = model_lib.quantize_input(int_model, images)
    int_fine, ints = model_lib.run(int_model, q, return_intermediates=True, fine_logits=True)
    fake_logits, fake_pre, state = _sim_logits(model, variables, int_model, images)
    params = model_lib.output_qparams(int_model)
    layers = {}
    for name in int_model.layer_names:
        if name == model_lib.POOL_NAME:
            continue
        node = state["intermediates"]
        for key in model_lib.layer_path(name):
            node = node[key]
        theirs = model_lib.round_codes(node["out"][0], *params[name])
        diff = np.abs(np.asarray(ints[name], np.int32) - theirs)
        layers[name] = {"max_lsb": int(diff.max()), "frac_differing": float(np.mean(diff > 0))}
    int_codes = np.asarray(ints[int_model.layer_names[-1]]).reshape(len(q), -1)
    agree = np.argmax(int_codes, -1) == np.argmax(np.asarray(fake_logits), -1)
    agree_fine = np.argmax(np.asarray(int_fine), -1) == np.argmax(np.asarray(fake_pre), -1)
    return {"top1_agreement": float(agree.mean()), "top1_agreement_fine": float(agree_fine.mean()),
            "n": int(agree.size), "layers": layers}  # fmt: skip


def agreement_report(
    model, variables, int_model: model_lib.IntModel, batches, labels: bool = True,
    locate: bool = False, reorder_check: bool = False, float64_check: bool = False,
) -> dict:  # fmt: skip
    """Layer-wise and end-to-end agreement over padded eval batches (masked images dropped).

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
    n = agree = agree_ties = agree_fine = agree_same = hit_fake = hit_int = 0
    hit_pre = hit_fine = err_count = 0
    err_sq = err_max = err_same = 0.0
    top2_gaps: list[float] = []
    pair_errors: list[float] = []
    fine_agrees: list[bool] = []
    gaps: list[int] = []
    fine_dis: list[dict] = []
    max_lsb: dict[str, int] = {}
    frac: dict[str, float] = {}
    scale, zp = model_lib.output_qparams(int_model)[int_model.layer_names[-1]]
    fine_unit = 2**model_lib.FINE_LOGIT_BITS
    fake_model, fake_vars = folded(model, variables)
    reordered = None
    if reorder_check:
        other = _other_depthwise_impl(fake_model.depthwise_impl)
        reordered = fake_model.clone(depthwise_impl=other)
    re_sim = re_int = 0
    re_sq = 0.0
    fake_vars64 = _float64_variables(fake_vars) if float64_check else None
    f64_sim = f64_int = 0
    f64_sq = f64_int_sq = 0.0
    max_lsb64: dict[str, int] = {}
    frac64: dict[str, float] = {}
    for batch in batches:
        valid = int(batch["mask"].sum())
        if valid == 0:
            continue
        images = batch["image"][:valid]
        q = model_lib.quantize_input(int_model, images)
        int_fine, ints = model_lib.run(int_model, q, return_intermediates=True, fine_logits=True)
        int_fine = np.asarray(int_fine, np.int64)
        int_codes = np.asarray(ints[int_model.layer_names[-1]], np.int32).reshape(valid, -1)
        # Layer-wise (each simulated layer fed the integer pass's input).
        diffs, pre_same = _layer_code_differences(fake_model, fake_vars, int_model, images, q,
                                                  ints)  # fmt: skip
        _accumulate_layer_stats(diffs, valid, max_lsb, frac)
        if float64_check:
            diffs64, _ = _layer_code_differences(fake_model, fake_vars64, int_model, images, q,
                                                 ints, float64=True)  # fmt: skip
            _accumulate_layer_stats(diffs64, valid, max_lsb64, frac64)
        # End to end, 8-bit codes.
        fake_logits, fake_pre, _ = _sim_logits(fake_model, fake_vars, int_model, images)
        fake_codes = model_lib.round_codes(fake_logits, scale, zp)
        int_top, fake_top = np.argmax(int_codes, -1), np.argmax(fake_codes, -1)
        rows = np.arange(valid)
        agree += int(np.sum(int_top == fake_top))
        # Tie-aware: each pass's top-1 class is also a (tied) maximum of the other's logits.
        agree_ties += int(np.sum((fake_codes[rows, int_top] == fake_codes.max(-1))
                                 | (int_codes[rows, fake_top] == int_codes.max(-1))))  # fmt: skip
        for i in np.flatnonzero(int_top != fake_top):
            # How far apart the two top-1 classes are in the simulation's logits (codes).
            gaps.append(int(fake_codes[i, fake_top[i]] - fake_codes[i, int_top[i]]))
        # End to end, fine logits vs pre-quant logits.
        fake_pre = np.asarray(fake_pre, np.float64)
        int_top_f, fake_top_f = np.argmax(int_fine, -1), np.argmax(fake_pre, -1)
        agree_fine += int(np.sum(int_top_f == fake_top_f))
        fine_agrees.extend((int_top_f == fake_top_f).tolist())
        agree_same += int(np.sum(int_top_f == np.argmax(pre_same, -1)))
        err_same = max(err_same, float(np.abs(int_fine / fine_unit - pre_same / scale).max()))
        # End-to-end logit error and how close each image's top-2 is (output LSBs).
        err = int_fine / fine_unit - fake_pre / scale
        err_sq += float(np.sum(err**2))
        err_count += err.size
        err_max = max(err_max, float(np.abs(err).max()))
        top2 = np.argsort(-fake_pre, axis=-1, kind="stable")[:, :2]
        sim_pair = (fake_pre[rows, top2[:, 0]] - fake_pre[rows, top2[:, 1]]) / scale
        int_pair = (int_fine[rows, top2[:, 0]] - int_fine[rows, top2[:, 1]]) / fine_unit
        top2_gaps.extend(sim_pair.tolist())
        pair_errors.extend((int_pair - sim_pair).tolist())
        bad = np.flatnonzero(int_top_f != fake_top_f)
        for i in bad:
            a, b = int(int_top_f[i]), int(fake_top_f[i])
            fine_dis.append({
                "image": n + int(i), "int_top1": a, "sim_top1": b,
                "sim_gap_lsb": float((fake_pre[i, b] - fake_pre[i, a]) / scale),
                "int_gap_lsb": float((int_fine[i, a] - int_fine[i, b]) / fine_unit),
            })  # fmt: skip
        if reorder_check:
            _, re_pre, _ = _sim_logits(reordered, fake_vars, int_model, images)
            re_top = np.argmax(np.asarray(re_pre), -1)
            re_sim += int(np.sum(re_top == fake_top_f))
            re_int += int(np.sum(re_top == int_top_f))
            re_sq += float(np.sum(np.square((np.asarray(re_pre, np.float64) - fake_pre) / scale)))
        if float64_check:
            pre64 = _sim_pre_quant_float64(fake_model, fake_vars64, int_model, q)
            top64 = np.argmax(pre64, -1)
            f64_sim += int(np.sum(top64 == fake_top_f))
            f64_int += int(np.sum(top64 == int_top_f))
            f64_sq += float(np.sum(np.square((fake_pre - pre64) / scale)))
            f64_int_sq += float(np.sum(np.square(int_fine / fine_unit - pre64 / scale)))
        if locate and bad.size:
            found = locate_disagreements(fake_model, fake_vars, int_model, images[bad])
            for entry, loc in zip(fine_dis[len(fine_dis) - bad.size :], found, strict=True):
                entry.update(culprit=loc["culprit"],
                             culprit_codes_differing=loc["culprit_codes_differing"])  # fmt: skip
        if labels:
            label = batch["label"][:valid]
            hit_int += int(np.sum(int_top == label))
            hit_fake += int(np.sum(fake_top == label))
            hit_fine += int(np.sum(int_top_f == label))
            hit_pre += int(np.sum(fake_top_f == label))
        n += valid
    if n == 0:
        raise ValueError("agreement_report saw no images")
    out = {
        "n": n,
        "top1_agreement": agree / n,
        "top1_agreement_tie_aware": agree_ties / n,
        "disagreement_logit_gaps": sorted(gaps),
        "top1_agreement_fine": agree_fine / n,
        "top1_agreement_fine_same_input": agree_same / n,
        "fine_disagreements": fine_dis,
        "fine_logit_error_lsb": {"rms": float(np.sqrt(err_sq / err_count)), "max": err_max},
        "fine_logit_error_same_input_lsb": err_same,
        "top2_gap_lsb_below": {
            str(t): int(np.sum(np.asarray(top2_gaps) < t)) for t in (0.25, 0.5, 1.0, 2.0, 4.0)
        },
        "top2_pair_error_lsb": {
            "rms": float(np.sqrt(np.mean(np.square(pair_errors)))),
            "max": float(np.max(np.abs(pair_errors))),
        },
        "layerwise_max_lsb": max_lsb,
        "layerwise_frac_differing": {k: v / n for k, v in frac.items()},
        "per_image": {
            "sim_top2_gap_lsb": top2_gaps,
            "top2_pair_error_lsb": pair_errors,
            "fine_top1_agrees": fine_agrees,
        },
    }
    if reorder_check:
        out["sim_reordered"] = {
            "depthwise_impl": reordered.depthwise_impl,
            "top1_agreement_fine_with_sim": re_sim / n,
            "top1_agreement_fine_with_int": re_int / n,
            "logit_difference_lsb_rms": float(np.sqrt(re_sq / err_count)),
        }
    if float64_check:
        out["sim_float64"] = {
            "top1_agreement_fine_with_sim": f64_sim / n,
            "top1_agreement_fine_with_int": f64_int / n,
            "logit_difference_lsb_rms": float(np.sqrt(f64_sq / err_count)),
            "int_logit_error_lsb_rms": float(np.sqrt(f64_int_sq / err_count)),
            "layerwise_max_lsb": max_lsb64,
            "layerwise_frac_differing": {k: v / n for k, v in frac64.items()},
        }
    if labels:
        out["top1_int"] = 100.0 * hit_int / n
        out["top1_fake"] = 100.0 * hit_fake / n
        out["top1_int_fine"] = 100.0 * hit_fine / n
        out["top1_fake_pre_quant"] = 100.0 * hit_pre / n
    return out


def _accumulate_layer_stats(diffs: dict, count: int, max_lsb: dict, frac: dict) -> None:
    """Adds one batch's code differences: the largest per layer, the count-weighted fraction."""
    for name, diff in diffs.items():
        max_lsb[name] = max(max_lsb.get(name, 0), int(diff.max()))
        frac[name] = frac.get(name, 0.0) + float(np.mean(diff > 0)) * count


def _other_depthwise_impl(impl: str) -> str:
    """The depthwise implementation other than the one ``impl`` resolves to here."""
    return "lax" if resolve_impl(impl) != "lax" else "shift"


def locate_disagreements(model, variables, int_model: model_lib.IntModel, images) -> list[dict]:
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

    Returns:
      One ``{"culprit": layer name or None (no disagreement), "culprit_codes_differing": int,
      "hybrid_agrees": [0/1 per L]}`` per image.
    """
    model, variables = folded(model, variables)
    count = len(images)
    pad = -count % 4  # a few batch shapes only: one compilation each
    images = np.concatenate([np.asarray(images)] + [np.asarray(images[:1])] * pad)
    q = model_lib.quantize_input(int_model, images)
    int_fine, ints = model_lib.run(int_model, q, return_intermediates=True, fine_logits=True)
    int_top = np.argmax(np.asarray(int_fine), -1)
    deq = model_lib.dequantize_intermediates(int_model, ints)
    convs = tuple(n for n in int_model.layer_names if n != model_lib.POOL_NAME)
    params = model_lib.output_qparams(int_model)
    path = _pre_quant_path(int_model)
    fn = _cached(("hybrid", model, convs), lambda: _make_hybrid_fn(model, convs, params, path))
    codes = {k: jnp.asarray(ints[k], jnp.int32) for k in convs}
    hybrid_agrees, differing = [], []
    for n_sub in range(len(convs)):
        pre, counts = fn(variables, jnp.asarray(images, jnp.float32), deq, codes, jnp.int32(n_sub))
        hybrid_agrees.append(np.argmax(np.asarray(pre), -1) == int_top)
        differing.append(np.asarray(counts)[n_sub])
    hybrid_agrees, differing = np.stack(hybrid_agrees), np.stack(differing)  # [L, N]
    out = []
    for i in range(count):
        bad = np.flatnonzero(~hybrid_agrees[:, i])
        last = int(bad[-1]) if bad.size else None
        out.append({
            "culprit": None if last is None else convs[last],
            "culprit_codes_differing": 0 if last is None else int(differing[last, i]),
            "hybrid_agrees": hybrid_agrees[:, i].astype(int).tolist(),
        })  # fmt: skip
    return out


def _make_hybrid_fn(model, convs: tuple[str, ...], params: dict, pre_quant_path):
    index = {name: k for k, name in enumerate(convs)}

    @jax.jit
    def hybrid(variables, images, deq, codes, n_sub):
        pre: list[jax.Array] = []
        counts: dict[str, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            if _is_pre_quant(context, pre_quant_path):
                pre.append(args[0])
            if not (isinstance(context.module, ConvLayer) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            name = "_".join(context.module.path)
            out = next_fun(*args, **kwargs)
            scale, zp = params[name]
            mine = round_half_away_from_zero(out / jnp.float32(scale)).astype(jnp.int32) + zp
            counts[name] = jnp.sum(mine != codes[name], axis=(1, 2, 3))
            return jnp.where(index[name] < n_sub, deq[name], out)

        with nn.intercept_methods(interceptor):
            model.apply(variables, images, quant_mode="fake")
        return (jnp.reshape(pre[-1], (images.shape[0], -1)),
                jnp.stack([counts[name] for name in convs]))  # fmt: skip

    return hybrid


def _simulation_kind(report: dict) -> str:
    """Which simulation a report compared against: what it models of the integer arithmetic."""
    parts = [
        name
        for key, name in (("snap_biases", "int32 biases"), ("sim_rounding", "integer rounding"))
        if report.get(key)
    ]
    return " + ".join(parts) if parts else "plain"  # fmt: skip


def margin_title(report: dict) -> str:
    """The margin plot's title: model, quantization, simulation kind and the fine agreement."""
    import os

    where = os.path.join(*os.path.normpath(report["model"]).split(os.sep)[-3:])
    recipe = report["recipe"] if isinstance(report["recipe"], str) else "exported"
    return (f"{where} ({recipe}), {_simulation_kind(report)} simulation:\n"
            f"fine top-1 agrees on {100 * report['top1_agreement_fine']:.1f} %")  # fmt: skip


def _run_config_of(workdir: str):
    """The training config in ``workdir`` (``train.load_run_config``), or ``{}`` when it has none
    (or ``workdir`` is empty)."""
    import os

    if not workdir or not os.path.isfile(os.path.join(workdir, "config.json")):
        return {}
    from qfsep_jax import train

    return train.load_run_config(workdir)


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (README tables)."""
    import os

    here = os.getcwd()
    if os.path.isabs(path) and os.path.commonpath([here, path]) == here:
        return os.path.relpath(path, here)
    return path


def summarize_reports(paths: list[str]) -> dict:
    """One row per :func:`agreement_report` JSON (as ``main`` writes them), for the README table.

    Each row: the report's ``model`` (relative to the working directory where it lies below it),
    ``recipe`` (a name, or ``exported (QAT)``), ``label_space``,
    the integer pass's ``rounding``, the ``simulation`` (``plain``, or what it models of the
    integer arithmetic: ``int32 biases``, ``integer rounding``), ``n``, the three top-1
    agreements (8-bit codes, tie-aware, fine logits), the fine logit error rms (LSB), how many
    images have a simulation top-2 gap below 1 LSB, the largest
    fraction of a layer's codes that differ given the same input, and, where the report has
    them, the simulation's fine agreement with itself reordered and in float64, and the integer
    pass's with the float64 simulation (fine top-1, logit error rms, worst layer's fraction of
    differing codes).
    """
    from qfsep_jax import io_utils

    rows = []
    for path in paths:
        r = io_utils.read_json(path)
        missing = [
            k for k in ("n", "top1_agreement_fine", "layerwise_frac_differing") if k not in r
        ]
        if missing:
            raise ValueError(f"{path} is not an agreement report (no {missing})")
        recipe = r.get("recipe")
        rows.append({
            "report": path,
            "model": _display_path(r.get("model", "official float graph")),
            "recipe": recipe if isinstance(recipe, str) else "exported (QAT)",
            "label_space": r.get("label_space", "imagenet1001"),
            "rounding": r.get("rounding", "conv=double,depthwise=double"),
            "simulation": _simulation_kind(r),
            "n": r["n"],
            "top1_agreement": r["top1_agreement"],
            "top1_agreement_tie_aware": r["top1_agreement_tie_aware"],
            "top1_agreement_fine": r["top1_agreement_fine"],
            "fine_logit_error_lsb_rms": r["fine_logit_error_lsb"]["rms"],
            "top2_gap_below_1_lsb": r["top2_gap_lsb_below"]["1.0"],
            "max_layer_frac_differing": max(r["layerwise_frac_differing"].values()),
            "sim_reordered_agreement_fine": r.get("sim_reordered", {}).get(
                "top1_agreement_fine_with_sim"),
            "sim_float64_agreement_fine": r.get("sim_float64", {}).get(
                "top1_agreement_fine_with_sim"),
            "int_vs_float64_agreement_fine": r.get("sim_float64", {}).get(
                "top1_agreement_fine_with_int"),
            "int_vs_float64_logit_error_lsb_rms": r.get("sim_float64", {}).get(
                "int_logit_error_lsb_rms"),
            "max_layer_frac_differing_float64": max(
                r.get("sim_float64", {}).get("layerwise_frac_differing", {}).values(),
                default=None),
            "run": r.get("run"),
        })  # fmt: skip
    return {"rows": rows}


def main(argv=None) -> None:
    """``python -m qfsep_jax.intpass.compare``: quantize a model, then compare the two passes.

    The model is the official float graph after the PTQ ``--recipe`` (default), a training
    run's newest checkpoint after that recipe (``--trained_run``), or an exported quantized model
    (``--quantized_model``, e.g. a QAT run's ``workdir/quantized_model``). Image size and label
    space default to the training run's (``config.json`` of ``--trained_run``, or of the
    directory holding ``--quantized_model``), else 224 px and ``imagenet1001``.
    """
    import argparse
    import dataclasses
    import os

    from configs import base
    from qfsep_jax import io_utils, ptq
    from qfsep_jax.data.input import eval_input, resolve_path
    from qfsep_jax.importers.tfslim import load_tfslim

    p = argparse.ArgumentParser(description="integer pass vs fake-quant simulation agreement")
    p.add_argument("--recipe", default=None,
                   help=f"PTQ recipe for the official graph {sorted(ptq.RECIPES)} (default "
                   "tf8_zero_variance_fix)")  # fmt: skip
    p.add_argument("--quantized_model", default="",
                   help="an exported quantized model directory (QAT's workdir/quantized_model) "
                   "instead of PTQ of the official graph")  # fmt: skip
    p.add_argument("--trained_run", default="",
                   help="a training workdir (config.json + checkpoints): PTQ its newest "
                   "checkpoint with --recipe instead of the official graph")  # fmt: skip
    p.add_argument("--calibration_data", default="folder:imagenet_calib1000")
    p.add_argument("--eval_data", default="folder:imagenet_val500")
    p.add_argument("--label_space", default=None,
                   help="the model's label space (default: its training run's, else "
                   "imagenet1001)")  # fmt: skip
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--model_path", default="models/mobilenet_v1_1.0_224_retrained_graph.pb")
    p.add_argument("--image_size", type=int, default=None,
                   help="default: its training run's, else 224")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="eval images (default: all 500)")
    p.add_argument("--calibration_images", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--rounding", default="reference", help="integer pass rounding preset/rule")
    p.add_argument("--snap_biases", action="store_true",
                   help="compare against the simulation with int32-snapped biases")  # fmt: skip
    p.add_argument("--sim_rounding", action="store_true",
                   help="compare against the simulation with the integer pass's requantization "
                   "rounding (model.with_rounding_offsets)")  # fmt: skip
    p.add_argument("--locate", action="store_true",
                   help="attribute each fine top-1 disagreement to a layer")  # fmt: skip
    p.add_argument(
        "--reorder_check", action="store_true",
        help="also run the simulation with the other depthwise implementation (another float32 "
        "summation order) and report how well it agrees with itself",
    )  # fmt: skip
    p.add_argument(
        "--float64_check", action="store_true",
        help="also run the simulation in float64 and report how the integer pass and the float32 "
        "simulation agree with it",
    )  # fmt: skip
    p.add_argument("--out", default="", help="write the report as JSON here")
    p.add_argument("--summarize", nargs="+", default=None, metavar="REPORT",
                   help="instead of comparing: summarize these report JSONs into --out "
                   "(the README's table, launch/collect_results.py)")  # fmt: skip
    p.add_argument("--plot", default="",
                   help="write the per-image top-2 margin plot here (default: next to --out, "
                   "<out>_margins.png)")  # fmt: skip
    args = p.parse_args(argv)
    if args.summarize:
        if not args.out:
            p.error("--summarize needs --out")
        io_utils.write_json(os.path.abspath(args.out), summarize_reports(args.summarize))
        print(f"wrote {args.out} ({len(args.summarize)} reports)")
        return
    if args.quantized_model and (args.recipe or args.trained_run):
        p.error("--quantized_model is already quantized: no --recipe or --trained_run with it")
    if args.trained_run:
        from qfsep_jax import train

        run_config = train.load_run_config(args.trained_run)
    else:  # a QAT export sits in its training run's workdir
        run_config = _run_config_of(os.path.dirname(os.path.abspath(args.quantized_model))
                                    if args.quantized_model else "")  # fmt: skip
    args.image_size = args.image_size or run_config.get("image_size", 224)
    args.label_space = args.label_space or run_config.get("label_space", "imagenet1001")
    config = base.data_config()
    config.data_dir, config.image_size, config.eval_batch_size, config.label_space = (
        args.data_dir, args.image_size, args.batch_size, args.label_space,
    )  # fmt: skip
    calibration_images = None
    if args.quantized_model:
        from qfsep_jax.train import load_quantized

        qmodel = load_quantized(args.quantized_model)
        source = os.path.abspath(args.quantized_model)
    else:
        args.recipe = args.recipe or "tf8_zero_variance_fix"
        recipe = ptq.recipe_by_name(args.recipe)
        if args.trained_run:
            model, variables = train.load_trained(run_config, args.trained_run)
            source = os.path.abspath(args.trained_run)
        else:
            imported = load_tfslim(resolve_path(args.data_dir, args.model_path))
            model, variables = imported.model(dropout_rate=0.0), imported.variables
            source = args.model_path
        calib = eval_input(config, args.calibration_data, limit=args.calibration_images)
        qmodel = ptq.quantize_post_training(model, variables, recipe, calib.make, calib.num_batches)
        calibration_images = calib.num_examples
    int_model = model_lib.from_quantized(qmodel, rounding=args.rounding)
    sim_model, sim_vars = qmodel.model, qmodel.variables
    if args.snap_biases:
        sim_model, sim_vars = model_lib.snap_biases(sim_model, sim_vars, int_model)
    if args.sim_rounding:
        sim_model, sim_vars = model_lib.with_rounding_offsets(sim_model, sim_vars, int_model)
    data = eval_input(config, args.eval_data, limit=args.limit)
    report = agreement_report(sim_model, sim_vars, int_model, data.make(), locate=args.locate,
                              reorder_check=args.reorder_check,
                              float64_check=args.float64_check)  # fmt: skip
    report.update(model=source, recipe=args.recipe or dataclasses.asdict(qmodel.recipe),
                  eval_data=args.eval_data, calibration_data=args.calibration_data
                  if calibration_images else None, image_size=args.image_size,
                  label_space=args.label_space, run=io_utils.run_info(),
                  snap_biases=args.snap_biases, sim_rounding=args.sim_rounding,
                  rounding=str(int_model.rounding),
                  calibration_images=calibration_images)  # fmt: skip
    for name, lsb in report["layerwise_max_lsb"].items():
        print(f"{name:22s} max {lsb} LSB, {100 * report['layerwise_frac_differing'][name]:.3f}% "
              "of codes differ (same layer input)")  # fmt: skip
    print(
        f"top-1: fake {report['top1_fake']:.2f}%, integer {report['top1_int']:.2f}%; "
        f"top-1 agreement {100 * report['top1_agreement']:.2f}% of {report['n']} images "
        f"(tie-aware {100 * report['top1_agreement_tie_aware']:.2f}%; simulation logit gaps of "
        f"the disagreeing images, in codes: {report['disagreement_logit_gaps']})"
    )
    print(
        f"fine logit error (integer - simulation pre-quant): rms "
        f"{report['fine_logit_error_lsb']['rms']:.4f} LSB, max "
        f"{report['fine_logit_error_lsb']['max']:.4f} LSB; top-2 pair error rms "
        f"{report['top2_pair_error_lsb']['rms']:.4f} LSB, max "
        f"{report['top2_pair_error_lsb']['max']:.4f} LSB; images with a simulation top-2 gap "
        f"below t LSB: {report['top2_gap_lsb_below']}"
    )
    print(
        f"fine logits: top-1 integer {report['top1_int_fine']:.2f}%, simulation (pre-quant) "
        f"{report['top1_fake_pre_quant']:.2f}%; top-1 agreement "
        f"{100 * report['top1_agreement_fine']:.2f}% (classifier alone, same input: "
        f"{100 * report['top1_agreement_fine_same_input']:.2f}%, max logit error "
        f"{report['fine_logit_error_same_input_lsb']:.2e} LSB)"
    )
    if "sim_reordered" in report:
        r = report["sim_reordered"]
        print(
            f"simulation reordered (depthwise_impl={r['depthwise_impl']}): fine top-1 agreement "
            f"{100 * r['top1_agreement_fine_with_sim']:.2f}% with the simulation, "
            f"{100 * r['top1_agreement_fine_with_int']:.2f}% with the integer pass; logit "
            f"difference to the simulation rms {r['logit_difference_lsb_rms']:.4f} LSB"
        )
    if "sim_float64" in report:
        r = report["sim_float64"]
        print(
            f"simulation in float64: fine top-1 agreement "
            f"{100 * r['top1_agreement_fine_with_sim']:.2f}% with the float32 simulation, "
            f"{100 * r['top1_agreement_fine_with_int']:.2f}% with the integer pass; logit "
            f"difference rms {r['logit_difference_lsb_rms']:.4f} LSB to the float32 simulation, "
            f"{r['int_logit_error_lsb_rms']:.4f} LSB to the integer pass"
        )
        worst = max(r["layerwise_frac_differing"], key=r["layerwise_frac_differing"].get)
        print(
            f"simulation in float64, same layer input: max {max(r['layerwise_max_lsb'].values())} "
            f"LSB; worst layer {worst}, {100 * r['layerwise_frac_differing'][worst]:.4f}% of "
            f"codes differ"
        )
    for d in report["fine_disagreements"]:
        where = f", culprit {d['culprit']} ({d['culprit_codes_differing']} codes differ)" if (
            "culprit" in d) else ""  # fmt: skip
        print(f"  image {d['image']}: integer top-1 {d['int_top1']}, simulation {d['sim_top1']}; "
              f"gap {d['sim_gap_lsb']:.4f} LSB (simulation), {d['int_gap_lsb']:.4f} LSB "
              f"(integer){where}")  # fmt: skip
    if args.out:
        io_utils.write_json(os.path.abspath(args.out), report)
    plot = args.plot or (os.path.splitext(args.out)[0] + "_margins.png" if args.out else "")
    if plot:
        from qfsep_jax.analysis.plots import plot_top2_margins

        plot_top2_margins(report["per_image"], os.path.abspath(plot), title=margin_title(report))
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
