"""Our own quantized models through the integer pass: PTQ of the official float graph, QAT-style.

Small on purpose (128 px, 16 calibration and 16 evaluation images); the full imagenet_val500 run
is the ``agreement`` job (``configs/agreement.py``; see the README).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FLOAT_GRAPH, require
from test_integer import float_ops

from configs import base
from qfsep_jax import integer, ptq
from qfsep_jax.analysis import agreement
from qfsep_jax.data.input import eval_input
from qfsep_jax.importers.tfslim import load_tfslim
from qfsep_jax.integer import align
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.quant.fold import folded
from qfsep_jax.quant.scheme import QuantConfig

SIZE = 96


@pytest.fixture(scope="module")
def setup(data_dir):
    config = base.data_config()
    config.data_dir, config.image_size, config.eval_batch_size = data_dir, SIZE, 16
    imported = load_tfslim(require(FLOAT_GRAPH))
    model = imported.model(dropout_rate=0.0)
    calib = eval_input(config, "folder:imagenet_calib1000", limit=16)
    images = next(iter(eval_input(config, "folder:imagenet_val500", limit=16).make()))["image"]
    return model, imported.variables, calib, images


def _ptq(setup, recipe):
    model, variables, calib, _ = setup
    return ptq.quantize_post_training(
        model, variables, ptq.recipe_by_name(recipe), calib.make, calib.num_batches
    )


@pytest.fixture(scope="module")
def tf8(setup):
    qmodel = _ptq(setup, "tf8_zero_variance_fix")
    return qmodel, integer.from_quantized(qmodel)


def test_tf8_layers_agree_within_one_lsb(setup, tf8):
    qmodel, int_model = tf8
    lw = agreement.layerwise_agreement(qmodel.model, qmodel.variables, int_model, setup[3])
    assert list(lw) == int_model.layer_names
    assert max(v["max_lsb"] for v in lw.values()) == 1, lw
    assert all(v["frac_differing"] < 0.1 for v in lw.values()), lw


def test_simulation_modelling_int32_biases_and_the_rounding_agrees_to_float_error(setup, tf8):
    # The plain simulation differs from TFLite's double rounding on a few % of a layer's codes;
    # with the int32 biases and the rounding modelled (align.rounding_offsets), only float32
    # rounding is left: measured 0.036 % of codes summed over the layers against 36 % (16
    # images at 96 px), and no depthwise code differs.
    qmodel, int_model = tf8
    images = setup[3]

    def total(model, variables, int_model=int_model, alignment=None):
        lw = agreement.layerwise_agreement(model, variables, int_model, images, alignment=alignment)
        assert max(v["max_lsb"] for v in lw.values()) <= 1, lw
        return sum(v["frac_differing"] for v in lw.values())

    plain = total(qmodel.model, qmodel.variables)
    snapped = align.snap_biases(qmodel.model, qmodel.variables, int_model)
    alignment = align.rounding_alignment(int_model)
    both = total(*snapped, alignment=alignment)
    assert both < plain / 100, (both, plain)
    rounding_only = total(qmodel.model, qmodel.variables, alignment=alignment)
    assert rounding_only < plain / 2, (rounding_only, plain)
    # Negative control: the same offsets against the single-rounding variant, which rounds once
    # (its conv offsets are all zero; the pool's tie rule is the same), disagree far more.
    single = int_model.with_rounding("single")
    offsets = align.rounding_offsets(single)
    assert offsets.pop(integer.POOL_NAME) == align.rounding_offsets(int_model)[integer.POOL_NAME]
    assert all(not np.any(p) and not np.any(n) for p, n in offsets.values())
    assert total(*snapped, int_model=single, alignment=alignment) > 20 * both


def test_float64_simulation_modelling_the_integer_arithmetic_is_exact_layer_by_layer(setup, tf8):
    # In float64 the modelled simulation (int32 biases, rounding offsets, 31-bit multipliers,
    # float32-defined weight codes, exact scales) computes every layer's codes as the integer
    # pass does; the plain simulation in float64 does not.
    qmodel, int_model = tf8
    images = setup[3]
    snapped = align.snap_biases(qmodel.model, qmodel.variables, int_model)
    alignment = align.rounding_alignment(int_model)
    exact = agreement.layerwise_agreement(
        *snapped, int_model, images, float64=True, alignment=alignment
    )
    assert all(v["frac_differing"] == 0.0 for v in exact.values()), exact
    plain = agreement.layerwise_agreement(
        qmodel.model, qmodel.variables, int_model, images, float64=True
    )
    assert sum(v["frac_differing"] for v in plain.values()) > 0.1, plain
    assert jnp.zeros(1).dtype == jnp.float32  # x64 is off again
    # End to end, the report's float64 check: the same logits as the integer pass's fine ones
    # up to their own resolution (rounded to 2**-FINE_LOGIT_BITS LSB: rms 2**-16 / sqrt(12)),
    # and the same codes in every layer.
    batch = {"image": images, "label": np.zeros(16, np.int32), "mask": np.ones(16)}
    f64 = agreement.agreement_report(
        *snapped, int_model, [batch], float64_check=True, alignment=alignment
    )["sim_float64"]
    assert f64["top1_agreement_fine_with_int"] == 1.0, f64
    assert f64["int_logit_error_lsb_rms"] < 2.0**-integer.FINE_LOGIT_BITS, f64
    assert set(f64["layerwise_frac_differing"]) == set(int_model.layer_names), f64
    assert max(f64["layerwise_frac_differing"].values()) == 0.0, f64


def test_float64_exactness_needs_the_exact_scales(setup, tf8, monkeypatch):
    # Negative control for the test above: give the simulation XLA:CPU's reciprocal-multiply
    # scales again (what numerics.divide_exactly fixed; the integer model keeps its exact ones)
    # and some codes differ even in float64 (measured: 3 layers, 8e-5 of codes summed).
    import sys

    numerics = sys.modules["qfsep_jax.quant.numerics"]
    qmodel, int_model = tf8
    snapped = align.snap_biases(qmodel.model, qmodel.variables, int_model)
    alignment = align.rounding_alignment(int_model)
    monkeypatch.setattr(
        numerics, "divide_exactly", lambda n, d: jnp.asarray(n, jnp.float32) / jnp.float32(d)
    )
    agreement._CACHE.clear()
    jax.clear_caches()  # traces of the fake-quant primitive are cached by function identity
    try:
        lw = agreement.layerwise_agreement(
            *snapped, int_model, setup[3], float64=True, alignment=alignment
        )
    finally:
        monkeypatch.undo()
        agreement._CACHE.clear()
        jax.clear_caches()
    assert sum(v["frac_differing"] for v in lw.values()) > 0, lw


def test_simulation_models_the_integer_pools_ties(setup, tf8, data_dir):
    # At 128 px the pool averages 4x4 = 16 codes: 1 in 16 sums is an exact tie, which the
    # integer pool rounds away from code 0 and the float mean puts either side. (At 96 px the
    # 3x3 window has no ties.)
    qmodel, int_model = tf8
    config = base.data_config()
    config.data_dir, config.image_size = data_dir, 128
    images = next(iter(eval_input(config, "folder:imagenet_val500", limit=16).make()))["image"]
    model, variables = align.snap_biases(qmodel.model, qmodel.variables, int_model)
    alignment = align.rounding_alignment(int_model)
    assert alignment["pool"]["positive"] == align.POOL_TIE_OFFSET
    pool = integer.POOL_NAME
    lw = agreement.layerwise_agreement(model, variables, int_model, images, alignment=alignment)
    assert lw[pool]["frac_differing"] == 0.0, lw[pool]
    without = agreement.layerwise_agreement(
        model, variables, int_model, images, alignment={**alignment, "pool": {}}
    )
    # Ties that float32 rounding put on the wrong side: 0.3 % of the pooled codes here (49).
    assert without[pool]["frac_differing"] > 0.001, without[pool]


def test_layerwise_comparison_detects_a_wrong_layer(setup, tf8):
    # Negative control: double one layer's multiplier; that layer (only) must disagree.
    qmodel, int_model = tf8
    layers = list(int_model.layers)
    k = int_model.layer_names.index("Conv2d_5_pointwise")
    layers[k] = dataclasses.replace(layers[k], shift=np.asarray(layers[k].shift) + 1)
    broken = dataclasses.replace(int_model, layers=tuple(layers))
    lw = agreement.layerwise_agreement(qmodel.model, qmodel.variables, broken, setup[3])
    assert lw["Conv2d_5_pointwise"]["max_lsb"] > 1
    assert lw["Conv2d_5_depthwise"]["max_lsb"] <= 1 and lw["Conv2d_6_depthwise"]["max_lsb"] <= 1
    # The top-1 disagreements it causes are attributed to that layer.
    found = agreement.locate_disagreements(qmodel.model, qmodel.variables, broken, setup[3])
    culprits = [f["culprit"] for f in found if f["culprit"] is not None]
    assert len(culprits) >= 8 and set(culprits) == {"Conv2d_5_pointwise"}, found


def test_tf8_end_to_end_top1(setup, tf8):
    qmodel, int_model = tf8
    e2e = agreement.end_to_end_agreement(qmodel.model, qmodel.variables, int_model, setup[3])
    assert e2e["n"] == 16
    assert e2e["layers"]["Conv2d_0"]["max_lsb"] <= 1  # first layer: same input, same codes
    batch = {"image": setup[3], "label": np.zeros(16, np.int32), "mask": np.ones(16)}
    report = agreement.agreement_report(
        qmodel.model, qmodel.variables, int_model, [batch], reorder_check=True, float64_check=True
    )
    assert jnp.zeros(1).dtype == jnp.float32  # float64_check leaves x64 off again
    # Full imagenet_val500 numbers: README / report. Disagreements are 8-bit logit ties.
    assert report["top1_agreement"] >= 14 / 16, report
    assert report["top1_agreement_tie_aware"] >= 15 / 16, report
    assert report["top1_agreement"] == e2e["top1_agreement"]
    # Fine logits vs the simulation's pre-quant logits. Given the same pooled input, the
    # classifiers compute the same logits up to the int32 bias and float32 sums (tiny), so the
    # top-1 agrees on every image; end to end, the network's 1-LSB differences remain.
    assert report["top1_agreement_fine_same_input"] == 1.0, report
    assert report["fine_logit_error_same_input_lsb"] < 0.01, report
    assert report["top1_agreement_fine"] >= 15 / 16, report
    assert report["top1_agreement_fine"] == e2e["top1_agreement_fine"]
    assert report["fine_logit_error_lsb"]["rms"] < 2, report
    assert len(report["fine_disagreements"]) == round(16 * (1 - report["top1_agreement_fine"]))
    per_image = report["per_image"]
    assert [len(v) for v in per_image.values()] == [16, 16, 16], per_image
    assert np.mean(per_image["fine_top1_agrees"]) == report["top1_agreement_fine"]
    assert min(per_image["sim_top2_gap_lsb"]) >= 0, per_image
    pair_rms = np.sqrt(np.mean(np.square(per_image["top2_pair_error_lsb"])))
    assert pair_rms == pytest.approx(report["top2_pair_error_lsb"]["rms"])
    # The simulation in another float32 summation order (the other depthwise implementation):
    # the same model, so its logits stay within a fraction of an LSB of the simulation's.
    reordered = report["sim_reordered"]
    assert reordered["depthwise_impl"] == "lax", reordered  # the simulation runs "native" on CPU
    assert 0 < reordered["logit_difference_lsb_rms"] < 1, reordered
    assert reordered["top1_agreement_fine_with_sim"] >= 14 / 16, reordered
    # The simulation in float64 (its float32 rounding gone): again within a fraction of an LSB.
    f64 = report["sim_float64"]
    assert 0 < f64["logit_difference_lsb_rms"] < 1, f64
    assert f64["top1_agreement_fine_with_sim"] >= 14 / 16, f64
    assert f64["int_logit_error_lsb_rms"] < 2, f64
    assert max(f64["layerwise_frac_differing"].values()) > 0, f64  # plain: TFLite's rounding


def test_agreement_job_on_an_exported_model(setup, tf8, data_dir, tmp_path, capsys):
    from configs import agreement as agreement_config
    from qfsep_jax.jobs import agreement as agreement_job
    from qfsep_jax.quantized import save_quantized

    qmodel, _ = tf8
    save_quantized(qmodel, str(tmp_path / "exported"))
    config = agreement_config.get_config()
    config.source = f"quantized:{tmp_path / 'exported'}"
    config.data_dir, config.image_size, config.limit, config.eval_batch_size = (
        data_dir,
        SIZE,
        8,
        8,
    )
    config.locate = config.reorder_check = config.float64_check = False
    workdir = tmp_path / "report"
    agreement_job.run(config, str(workdir))
    report = json.loads((workdir / "report.json").read_text())
    assert report["n"] == 8 and report["model"] == str(tmp_path / "exported"), report
    assert report["recipe"]["zero_variance_fix"] and report["calibration_images"] is None
    assert report["eval_data"] == "folder:imagenet_val500"
    assert report["label_space"] == "imagenet1001"  # no training run's config next to the export
    png = (workdir / "report_margins.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fine logits: top-1 integer" in capsys.readouterr().out
    summary = agreement_config.get_config("summary")
    summary.reports = (str(workdir / "report.json"), str(tmp_path / "*" / "report.json"))
    agreement_job.run(summary, str(tmp_path / "summary"))
    rows = json.loads((tmp_path / "summary" / "summary.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["recipe"] == "exported (QAT)" and rows[0]["n"] == 8, rows
    assert rows[0]["top1_agreement_fine"] == report["top1_agreement_fine"]
    assert rows[0]["run"]["cores"] >= 1
    with pytest.raises(ValueError, match="not an agreement report"):
        agreement_job.summarize_reports([str(tmp_path / "exported" / "model.json")])
    config.source = "exported:somewhere"
    with pytest.raises(ValueError, match="config.source='exported:somewhere': must be 'official'"):
        agreement_job.run(config, str(tmp_path / "bad"))


def test_agreement_summary_names_reports_without_a_zero_variance_scope(tmp_path):
    from qfsep_jax.jobs import agreement as agreement_job

    report = {
        "n": 4,
        "top1_agreement": 1.0,
        "top1_agreement_tie_aware": 1.0,
        "top1_agreement_fine": 1.0,
        "fine_logit_error_lsb": {"rms": 0.1},
        "top2_gap_lsb_below": {"1.0": 0},
        "layerwise_frac_differing": {"Conv2d_0": 0.0},
        "recipe": "tf8_zero_variance_fix",
    }
    paths = []
    for name, extra in (("old", {}), ("new", {"zero_variance_scope": "depthwise"})):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump({**report, **extra}, f)
    rows = agreement_job.summarize_reports(paths)["rows"]
    # A report made before recipes had a scope ran the fix on every BN layer.
    assert [r["recipe"] for r in rows] == ["tf8_zero_variance_fix_all", "tf8_zero_variance_fix"]


def test_float64_simulation_is_free_of_summation_order(setup, tf8):
    # In float32 the two depthwise implementations differ by a fraction of an LSB end to end
    # (see above); in float64 their logits must agree to far below an LSB, which fails if any
    # op of the float64 simulation silently ran in float32.
    qmodel, int_model = tf8
    model, variables = folded(qmodel.model, qmodel.variables)
    scale = integer.output_qparams(int_model)[int_model.layer_names[-1]][0]
    variables64 = agreement._float64_tree(variables)
    codes = integer.quantize_input(int_model, setup[3])
    shift, lax_ = (
        agreement._sim_pre_quant_float64(
            model.clone(depthwise_impl=impl), variables64, None, int_model, codes
        )
        for impl in ("shift", "lax")
    )
    assert shift.dtype == np.float64
    assert np.max(np.abs(shift - lax_)) / scale < 1e-6


def test_int8_per_channel_scheme(setup):
    qmodel = _ptq(setup, "int8_per_channel")
    int_model = integer.from_quantized(qmodel)
    assert int_model.dtype == "int8"
    first = int_model.layer("Conv2d_0")
    assert first.weight.dtype == np.int8 and int(np.abs(first.weight).max()) <= 127
    assert np.all(np.asarray(first.weight_zero_point) == 0)
    assert len(set(np.asarray(first.multiplier).tolist())) > 1  # per-channel multipliers
    batch = {"image": setup[3], "mask": np.ones(16)}
    report = agreement.agreement_report(
        qmodel.model, qmodel.variables, int_model, [batch], labels=False
    )
    assert max(report["layerwise_max_lsb"].values()) == 1, report
    # Per-class accumulator scales, one fine-logit grid: the classifier alone agrees exactly.
    assert report["top1_agreement_fine_same_input"] == 1.0, report
    assert report["fine_logit_error_same_input_lsb"] < 0.01, report
    x = jnp.zeros((1, SIZE, SIZE, 3), jnp.int8)
    assert float_ops(jax.make_jaxpr(lambda m, x: integer.forward(m, x, True))(int_model, x)) == []


def test_unfolded_qat_style_model(setup):
    # A BN-unfolded model with observed ranges (as QAT leaves it): from_variables folds first.
    model = MobileNetV1(
        width_multiplier=0.25,
        num_classes=10,
        block="qf",
        activation="relu",
        quant=QuantConfig(),
        dropout_rate=0.0,
    )
    images = jnp.asarray(setup[3][:8])
    # Random variables from the shapes (compiling model.init costs more than this whole test).
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        if "quant_ranges" in name:
            init = {"'min'": np.inf, "'max'": -np.inf, "'count'": 0.0}
            return np.float32(next(v for k, v in init.items() if k in name))
        return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)  # BN stats, biases

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    calibrate = jax.jit(
        lambda v, x: model.apply(v, x, quant_mode="calibrate", mutable=["quant_ranges"])[1]
    )
    new = calibrate(variables, images)
    variables = {**variables, **new}
    int_model = integer.from_variables(model, variables)
    assert int_model.layer("Conv2d_1_depthwise").activation == "none"
    lw = agreement.layerwise_agreement(model, variables, int_model, images)
    assert max(v["max_lsb"] for v in lw.values()) <= 1, lw
    with pytest.raises(ValueError, match="quant_ranges"):
        integer.from_variables(model, {k: v for k, v in variables.items() if k != "quant_ranges"})
    with pytest.raises(ValueError, match="dynamic"):
        integer.from_variables(
            model.clone(quant=QuantConfig(dynamic_activation_ranges=True)), variables
        )
