"""How the integer pass and the fake-quant simulation of the same model agree.

Two views, both running the model's own ``fake`` forward pass (no re-implementation):

* :func:`layerwise_agreement`: every layer of the simulation is fed exactly the integer pass's
  input to that layer (a Flax method interceptor replaces each ``ConvLayer``'s input and output
  by the dequantized integer codes), so a difference measures that layer's arithmetic alone.
  Expected: at most 1 LSB. The simulation adds the float bias unrounded, accumulates in float32
  and multiplies by the exact ``S_in S_w / S_out``; the integer pass rounds the bias to int32 and
  the multiplier to 31 bits and rounds twice. Results differ only when the exact value sits
  within that error of a rounding boundary (a .5 tie), by one code.
* :func:`end_to_end_agreement`: both passes run freely; per-layer differences then accumulate
  through the network, and the top-1 agreement on the logits is what remains of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qfsep_jax.intpass import model as model_lib
from qfsep_jax.models.layers import ConvLayer


def _codes(values, scale: float, zero_point: int) -> np.ndarray:
    return model_lib.round_codes(values, scale, zero_point)


def _fake_model(model, variables):
    if not model.bn_folded:
        from qfsep_jax.quant.fold import fold_batch_norm

        variables = fold_batch_norm(variables, model.bn_epsilon)
        model = model.clone(bn_folded=True)
    return model, variables


def layerwise_agreement(model, variables, int_model: model_lib.IntModel, images) -> dict:
    """Per-layer agreement given identical layer inputs (see the module docstring).

    Args:
      model, variables: the quantized MobileNetV1 and its variables (with ``quant_ranges``).
      int_model: its conversion (:func:`qfsep_jax.intpass.from_variables`).
      images: float images ``[N, H, W, 3]`` as the float model takes them.

    Returns:
      ``{layer name: {"max_lsb": int, "frac_differing": float}}`` for every layer, the
      average pool included.
    """
    model, variables = _fake_model(model, variables)
    q = model_lib.quantize_input(int_model, images)
    _, ints = model_lib.run(int_model, q, return_intermediates=True)
    params = model_lib.output_qparams(int_model)
    names = int_model.layer_names
    prev_name = {n: (names[i - 1] if i else None) for i, n in enumerate(names)}
    deq = model_lib.dequantize_intermediates(int_model, ints)
    deq_input = model_lib.dequantize_codes(q, int_model.input_scale, int_model.input_zero_point)

    fake_given_int_inputs = _cached(("layerwise", model, tuple(names)),
                                    lambda: _make_layerwise_fn(model, prev_name))  # fmt: skip
    fake = fake_given_int_inputs(variables, jnp.asarray(images, jnp.float32), deq, deq_input)
    out = {}
    for name in names:
        mine = np.asarray(ints[name], np.int32)
        theirs = _codes(fake[name], *params[name])
        diff = np.abs(mine - theirs)
        out[name] = {"max_lsb": int(diff.max()), "frac_differing": float(np.mean(diff > 0))}
    return out


_CACHE: dict = {}


def _cached(key, make):
    """One jitted function per model (a new closure per call would recompile every batch)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _make_layerwise_fn(model, prev_name: dict):
    @jax.jit
    def fake_given_int_inputs(variables, images, deq, deq_input):
        fake: dict[str, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
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
        return fake

    return fake_given_int_inputs


def end_to_end_agreement(model, variables, int_model: model_lib.IntModel, images) -> dict:
    """Both passes run on their own; per-layer code differences and top-1 agreement.

    Returns ``{"top1_agreement": fraction, "n": N, "layers": {name: {"max_lsb",
    "frac_differing"}}}``.
    """
    model, variables = _fake_model(model, variables)
    q = model_lib.quantize_input(int_model, images)
    int_logits, ints = model_lib.run(int_model, q, return_intermediates=True)
    apply = _cached(
        ("e2e", model),
        lambda: jax.jit(
            lambda v, x: model.apply(v, x, quant_mode="fake", mutable=["intermediates"])
        ),
    )
    fake_logits, state = apply(variables, jnp.asarray(images, jnp.float32))
    params = model_lib.output_qparams(int_model)
    layers = {}
    for name in int_model.layer_names:
        if name == model_lib.POOL_NAME:
            continue
        node = state["intermediates"]
        for key in model_lib.layer_path(name):
            node = node[key]
        theirs = _codes(node["out"][0], *params[name])
        diff = np.abs(np.asarray(ints[name], np.int32) - theirs)
        layers[name] = {"max_lsb": int(diff.max()), "frac_differing": float(np.mean(diff > 0))}
    agree = np.argmax(np.asarray(int_logits), -1) == np.argmax(np.asarray(fake_logits), -1)
    return {"top1_agreement": float(agree.mean()), "n": int(agree.size), "layers": layers}


def agreement_report(
    model, variables, int_model: model_lib.IntModel, batches, labels: bool = True
) -> dict:
    """Layer-wise and end-to-end agreement over padded eval batches (masked images dropped).

    Returns ``{"n", "top1_agreement", "top1_agreement_tie_aware", "disagreement_logit_gaps",
    "layerwise_max_lsb": {name: int}, "layerwise_frac_differing": {name: float}, "top1_fake",
    "top1_int"}`` (top-1 in % against the batch labels when ``labels``). Logits are 8-bit codes,
    so two classes often tie; ``argmax`` then takes the lower index, and a 1-LSB difference in
    either tied logit flips the top-1. The tie-aware agreement counts an image when each pass's
    top-1 class is also a maximum of the other pass's logits; ``disagreement_logit_gaps`` lists,
    per disagreeing image, the simulation's logit of its own top-1 minus that of the integer
    pass's top-1, in codes (0 = a tie in the simulation).
    """
    n = agree = agree_ties = hit_fake = hit_int = 0
    gaps: list[int] = []
    max_lsb: dict[str, int] = {}
    frac: dict[str, float] = {}
    for batch in batches:
        valid = int(batch["mask"].sum())
        if valid == 0:
            continue
        images = batch["image"][:valid]
        lw = layerwise_agreement(model, variables, int_model, images)
        for name, v in lw.items():
            max_lsb[name] = max(max_lsb.get(name, 0), v["max_lsb"])
            frac[name] = frac.get(name, 0.0) + v["frac_differing"] * valid
        q = model_lib.quantize_input(int_model, images)
        int_codes = np.asarray(model_lib.run(int_model, q), np.int32)
        fake_model, fake_vars = _fake_model(model, variables)
        scale, zp = model_lib.output_qparams(int_model)["Logits"]
        fake_codes = _codes(_fake_logits(fake_model, fake_vars, images), scale, zp)
        int_top, fake_top = np.argmax(int_codes, -1), np.argmax(fake_codes, -1)
        rows = np.arange(valid)
        agree += int(np.sum(int_top == fake_top))
        # Tie-aware: each pass's top-1 class is also a (tied) maximum of the other's logits.
        agree_ties += int(np.sum((fake_codes[rows, int_top] == fake_codes.max(-1))
                                 | (int_codes[rows, fake_top] == int_codes.max(-1))))  # fmt: skip
        for i in np.flatnonzero(int_top != fake_top):
            # How far apart the two top-1 classes are in the simulation's logits (codes).
            gaps.append(int(fake_codes[i, fake_top[i]] - fake_codes[i, int_top[i]]))
        if labels:
            hit_int += int(np.sum(int_top == batch["label"][:valid]))
            hit_fake += int(np.sum(fake_top == batch["label"][:valid]))
        n += valid
    if n == 0:
        raise ValueError("agreement_report saw no images")
    out = {
        "n": n,
        "top1_agreement": agree / n,
        "top1_agreement_tie_aware": agree_ties / n,
        "disagreement_logit_gaps": sorted(gaps),
        "layerwise_max_lsb": max_lsb,
        "layerwise_frac_differing": {k: v / n for k, v in frac.items()},
    }
    if labels:
        out["top1_int"] = 100.0 * hit_int / n
        out["top1_fake"] = 100.0 * hit_fake / n
    return out


def _fake_logits(model, variables, images):
    apply = _cached(
        ("logits", model), lambda: jax.jit(lambda v, x: model.apply(v, x, quant_mode="fake"))
    )
    return apply(variables, jnp.asarray(images, jnp.float32))


def main(argv=None) -> None:
    """``python -m qfsep_jax.intpass.compare``: PTQ the official float graph, then compare."""
    import argparse
    import os

    from configs import base
    from qfsep_jax import io_utils, ptq
    from qfsep_jax.data.input import eval_input, resolve_path
    from qfsep_jax.importers.tfslim import load_tfslim

    p = argparse.ArgumentParser(description="integer pass vs fake-quant simulation agreement")
    p.add_argument("--recipe", default="tf8_zero_variance_fix", help=f"{sorted(ptq.RECIPES)}")
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--model_path", default="models/mobilenet_v1_1.0_224_retrained_graph.pb")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--limit", type=int, default=None, help="eval images (default: all 500)")
    p.add_argument("--calibration_images", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--rounding", default="reference", help="integer pass rounding preset/rule")
    p.add_argument("--snap_biases", action="store_true",
                   help="compare against the simulation with int32-snapped biases")  # fmt: skip
    p.add_argument("--out", default="", help="write the report as JSON here")
    args = p.parse_args(argv)
    config = base.data_config()
    config.data_dir, config.image_size, config.eval_batch_size = (
        args.data_dir, args.image_size, args.batch_size,
    )  # fmt: skip
    imported = load_tfslim(resolve_path(args.data_dir, args.model_path))
    model = imported.model(dropout_rate=0.0)
    calib = eval_input(config, "folder:imagenet_calib1000", limit=args.calibration_images)
    qmodel = ptq.quantize_post_training(
        model, imported.variables, ptq.recipe_by_name(args.recipe), calib.make, calib.num_batches
    )
    int_model = model_lib.from_quantized(qmodel, rounding=args.rounding)
    sim_model, sim_vars = qmodel.model, qmodel.variables
    if args.snap_biases:
        sim_model, sim_vars = model_lib.snap_biases(sim_model, sim_vars, int_model)
    data = eval_input(config, "folder:imagenet_val500", limit=args.limit)
    report = agreement_report(sim_model, sim_vars, int_model, data.make())
    report.update(recipe=args.recipe, image_size=args.image_size, snap_biases=args.snap_biases,
                  rounding=str(int_model.rounding),
                  calibration_images=calib.num_examples)  # fmt: skip
    for name, lsb in report["layerwise_max_lsb"].items():
        print(f"{name:22s} max {lsb} LSB, {100 * report['layerwise_frac_differing'][name]:.3f}% "
              "of codes differ (same layer input)")  # fmt: skip
    print(
        f"top-1: fake {report['top1_fake']:.2f}%, integer {report['top1_int']:.2f}%; "
        f"top-1 agreement {100 * report['top1_agreement']:.2f}% of {report['n']} images "
        f"(tie-aware {100 * report['top1_agreement_tie_aware']:.2f}%; simulation logit gaps of "
        f"the disagreeing images, in codes: {report['disagreement_logit_gaps']})"
    )
    if args.out:
        io_utils.write_json(os.path.abspath(args.out), report)


if __name__ == "__main__":
    main()
