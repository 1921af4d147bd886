"""The analysis tools: SQNR definitions and plumbing, α per channel, range tables, plots, job."""

import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import FLOAT_GRAPH, require

from qfsep_jax import paper, ptq
from qfsep_jax.analysis import alpha as alpha_lib
from qfsep_jax.analysis import plots
from qfsep_jax.analysis import ranges as ranges_lib
from qfsep_jax.analysis import sqnr as sqnr_lib
from qfsep_jax.models import names
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.models.names import layer_paths, tfslim_name
from qfsep_jax.quant.fake_quant import fake_quant
from qfsep_jax.quant.fold import fold_batch_norm
from qfsep_jax.quant.numerics import UINT8, qparams
from qfsep_jax.quantized import QuantizedModel

SIZE = 32


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _batches(images, batch_size=4):
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        mask = np.ones(batch_size, np.float32)
        if len(chunk) < batch_size:
            mask[len(chunk) :] = 0
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:])])
        out.append({"image": chunk.astype(np.float32), "mask": mask})
    return out


@pytest.fixture(scope="module")
def tiny():
    """A width-0.25 random MobileNetV1 with one depthwise channel blown up (a zero-var-like α)."""
    model = MobileNetV1(num_classes=10, width_multiplier=0.25, dropout_rate=0.0)
    variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), _images(1)))
    rng = np.random.default_rng(1)
    stats = variables["batch_stats"]
    for name in ("Conv2d_1", "Conv2d_2"):
        for kind in ("depthwise", "pointwise"):
            c = stats[name][kind]["bn_var"].shape[0]
            stats[name][kind]["bn_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    gamma = variables["params"]["Conv2d_1"]["depthwise"]["bn_scale"].copy()
    gamma[3] = 60.0  # the outlier α that per-tensor weight quantization cannot serve
    variables["params"]["Conv2d_1"]["depthwise"]["bn_scale"] = gamma
    images = _images(10)
    return model, variables, images


def _quantize(model, variables, images, recipe):
    return ptq.quantize_post_training(model, variables, recipe, lambda: iter(_batches(images)))


@pytest.fixture(scope="module")
def quantized(tiny):
    """The tiny model post-training quantized per tensor and per channel (TF8)."""
    model, variables, images = tiny
    per_tensor = _quantize(model, variables, images, ptq.RECIPES["tf8_per_tensor"])
    # Calibration is a float pass, so per-channel weights share the per-tensor activation ranges.
    recipe = ptq.RECIPES["per_channel"]
    per_channel = QuantizedModel(
        per_tensor.model.clone(quant=recipe.quant_config()), per_tensor.variables, recipe, {}
    )
    return {"tf8_per_tensor": per_tensor, "per_channel": per_channel}


# ---------------------------------------------------------------- SQNR definitions


def test_uniform_noise_constant_is_the_papers_58_92():
    assert sqnr_lib.uniform_noise_constant(UINT8) == pytest.approx(58.92, abs=0.005)
    assert sqnr_lib.uniform_noise_constant(UINT8) == pytest.approx(10 * math.log10(12 * 255**2))


def test_summary_definitions_on_known_noise():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 5, 5, 2)).astype(np.float32)
    scales = np.array([0.1, 0.01, 0.001], np.float32)
    test = ref + scales[:, None, None, None] * rng.normal(size=ref.shape).astype(np.float32)
    power = sqnr_lib.per_image_power({"a": ref}, {"a": test})
    stats = sqnr_lib.SQNRStats.empty(["a"]).add(power, 3)
    row = sqnr_lib.summarize(stats)["a"]
    sig = (ref.astype(np.float64) ** 2).reshape(3, -1).mean(1)
    noise = ((test.astype(np.float64) - ref) ** 2).reshape(3, -1).mean(1)
    per_image = 10 * np.log10(sig / noise)
    assert row["sqnr_db"] == pytest.approx(per_image.mean(), abs=1e-4)
    assert row["sqnr_db_std"] == pytest.approx(per_image.std(), abs=1e-4)
    assert row["sqnr_db_ratio_of_sums"] == pytest.approx(
        10 * np.log10(sig.sum() / noise.sum()), abs=1e-4
    )
    # the two definitions differ when the noise differs a lot between images
    assert abs(row["sqnr_db"] - row["sqnr_db_ratio_of_sums"]) > 5
    assert row["num_images"] == 3


def test_uniform_estimate_predicts_a_single_quantizer():
    """For one uniform quantizer without clipping, measured SQNR ≈ 58.92 − 10·log10(R²/E[x²])."""
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 8)).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    xq = np.asarray(fake_quant(x, lo, hi, UINT8))
    stats = sqnr_lib.SQNRStats.empty(["a"]).add(sqnr_lib.per_image_power({"a": x}, {"a": xq}), 4)
    step = float(qparams(lo, hi, UINT8)[0])
    row = sqnr_lib.summarize(stats, {"a": step})["a"]
    paper_formula = np.mean(
        58.92 - 10 * np.log10((255 * step) ** 2 / (x.reshape(4, -1) ** 2).mean(1))
    )
    assert row["uniform_estimate_db"] == pytest.approx(paper_formula, abs=0.01)
    assert row["sqnr_db"] == pytest.approx(row["uniform_estimate_db"], abs=0.3)


def test_power_alignment_errors_and_reshape():
    ref = {"a": np.ones((2, 1, 1, 4)), "b": np.ones((2, 3))}
    with pytest.raises(ValueError, match=r"missing in the quantized pass \['b'\]"):
        sqnr_lib.per_image_power(ref, {"a": ref["a"]})
    with pytest.raises(ValueError, match="does not match"):
        sqnr_lib.per_image_power({"a": ref["a"]}, {"a": np.ones((2, 5))})
    power = sqnr_lib.per_image_power({"a": ref["a"]}, {"a": np.full((2, 4), 2.0)})
    np.testing.assert_allclose(power["a"]["noise"], [1.0, 1.0])


def test_exact_pass_has_infinite_sqnr_written_as_null():
    x = np.ones((2, 3))
    stats = sqnr_lib.SQNRStats.empty(["a"]).add(sqnr_lib.per_image_power({"a": x}, {"a": x}), 2)
    row = sqnr_lib.summarize(stats)["a"]
    assert row["sqnr_db"] is None and row["sqnr_db_ratio_of_sums"] is None
    json.dumps(row, allow_nan=False)
    with pytest.raises(ValueError, match="no images"):
        sqnr_lib.summarize(sqnr_lib.SQNRStats.empty(["a"]))


# ---------------------------------------------------------------- SQNR of a model


def test_measure_sqnr_matches_a_direct_computation(tiny, quantized):
    _, variables, images = tiny
    qmodel = quantized["tf8_per_tensor"]
    passes = jax.jit(
        lambda v, x: (
            sqnr_lib.collect_intermediates(qmodel.model, v, x, "calibrate")[1],
            sqnr_lib.collect_intermediates(qmodel.model, v, x, "fake")[1],
        )
    )
    integer_fn = sqnr_lib.integer_pass_fn(qmodel)
    result = sqnr_lib.measure_sqnr(qmodel, _batches(images[:6]), integer_fn=integer_fn)
    fq, integer = result["fake_quant"], result["integer"]
    names = [tfslim_name(p) for p in layer_paths(variables["params"])]
    assert list(fq) == names and names[0] == "Conv2d_0" and names[-1] == "Logits"
    assert list(integer) == names
    assert all(row["num_images"] == 6 for row in fq.values())  # padding dropped
    # The integer pass implements the fake-quant model: equal at the first layer, close after
    # (requantization rounding differs from float rounding by at most one step per layer).
    assert integer["Conv2d_0"]["sqnr_db"] == pytest.approx(fq["Conv2d_0"]["sqnr_db"], abs=0.05)
    for name in names:
        assert integer[name]["sqnr_db"] == pytest.approx(fq[name]["sqnr_db"], abs=2.0)

    # independent computation of one layer from the raw sown outputs
    ref_inter, fq_inter = passes(qmodel.variables, images[:6])
    ref = np.asarray(ref_inter["Conv2d_2_pointwise"], np.float64)
    out = np.asarray(fq_inter["Conv2d_2_pointwise"], np.float64)
    per_image = 10 * np.log10(
        (ref**2).reshape(6, -1).mean(1) / ((out - ref) ** 2).reshape(6, -1).mean(1)
    )
    assert fq["Conv2d_2_pointwise"]["sqnr_db"] == pytest.approx(per_image.mean(), abs=1e-3)
    # estimate uses the layer's calibrated output range
    r = qmodel.variables["quant_ranges"]["Conv2d_2"]["pointwise"]["act_quant"]
    span = max(float(r["max"]), 0) - min(float(r["min"]), 0)
    est = np.mean(58.92 - 10 * np.log10(span**2 / (ref**2).reshape(6, -1).mean(1)))
    assert fq["Conv2d_2_pointwise"]["uniform_estimate_db"] == pytest.approx(est, abs=0.01)


def test_outlier_alpha_costs_sqnr_per_tensor_not_per_channel(tiny, quantized):
    """The paper's mechanism: one large α ruins per-tensor depthwise weights; per-channel heals."""
    images = tiny[2]
    t = sqnr_lib.measure_sqnr(quantized["tf8_per_tensor"], _batches(images[:4]))["fake_quant"]
    c = sqnr_lib.measure_sqnr(quantized["per_channel"], _batches(images[:4]))["fake_quant"]
    assert c["Conv2d_1_depthwise"]["sqnr_db"] > t["Conv2d_1_depthwise"]["sqnr_db"] + 3
    # before the outlier layer, both pipelines are the same
    assert c["Conv2d_0"]["sqnr_db"] == pytest.approx(t["Conv2d_0"]["sqnr_db"], abs=1.0)


# ---------------------------------------------------------------- alpha


def test_bn_alphas_flags_zero_variance_and_skips_other_layers(tiny):
    model, variables, _ = tiny
    v = jax.tree.map(np.copy, variables)
    var = v["batch_stats"]["Conv2d_2"]["depthwise"]["bn_var"]
    var[[1, 5]] = 4e-35
    alphas = alpha_lib.bn_alphas(v, eps=1e-3, zero_variance_threshold=1e-10)
    assert list(alphas)[:2] == ["Conv2d_1_depthwise", "Conv2d_2_depthwise"]
    assert all(k.endswith("_depthwise") for k in alphas) and len(alphas) == 13
    row = alphas["Conv2d_2_depthwise"]
    gamma = v["params"]["Conv2d_2"]["depthwise"]["bn_scale"].astype(np.float64)
    np.testing.assert_allclose(row["alpha"], gamma / np.sqrt(var + 1e-3), rtol=1e-6)
    assert row["zero_variance"] == [1, 5]
    assert alphas["Conv2d_1_depthwise"]["alpha"][3] == pytest.approx(
        60.0 / math.sqrt(float(v["batch_stats"]["Conv2d_1"]["depthwise"]["bn_var"][3]) + 1e-3),
        rel=1e-6,
    )
    all_bn = alpha_lib.bn_alphas(v, eps=1e-3, depthwise_only=False)
    assert "Conv2d_0" in all_bn and "Conv2d_1_pointwise" in all_bn and "Logits" not in all_bn
    summary = alpha_lib.alpha_summary(alphas)
    assert summary["Conv2d_2_depthwise"]["zero_variance_channels"] == 2
    qf = MobileNetV1(num_classes=10, width_multiplier=0.25, block="qf")
    qf_vars = jax.eval_shape(qf.init, jax.random.key(0), _images(1))
    assert alpha_lib.bn_alphas(qf_vars, eps=1e-3) == {}
    with pytest.raises(ValueError, match="no BN after a depthwise conv"):
        alpha_lib.compare_to_paper({})


def test_official_model_alpha_is_the_papers_figure3():
    from qfsep_jax.importers.tfslim import load_tfslim

    imported = load_tfslim(require(FLOAT_GRAPH))
    alphas = alpha_lib.bn_alphas(imported.variables, imported.model_kwargs["bn_epsilon"])
    cmp = alpha_lib.compare_to_paper(alphas)
    assert cmp["channels"] == 32
    assert cmp["max_abs_diff"] < 5e-5 and cmp["matches_4_decimals"]
    assert cmp["matches_printed_digits"]
    # the six large outliers of Figure 3 are zero-variance channels (and a 7th with small γ)
    row = alphas["Conv2d_1_depthwise"]
    big = [i for i, a in enumerate(row["alpha"]) if a > 10]
    assert len(big) == 6 and set(big) <= set(row["zero_variance"])
    # the comparison can fail: one channel off in its 5th digit
    bad = {k: {**r, "alpha": list(r["alpha"])} for k, r in alphas.items()}
    bad["Conv2d_1_depthwise"]["alpha"][9] += 2e-4
    assert not alpha_lib.compare_to_paper(bad)["matches_4_decimals"]


# ---------------------------------------------------------------- ranges and plots


def test_range_tables(tiny, quantized):
    model, variables, images = tiny
    qmodel = quantized["tf8_per_tensor"]
    act = ranges_lib.activation_range_table(qmodel.variables["quant_ranges"])
    names = [tfslim_name(p) for p in layer_paths(variables["params"])]
    assert list(act) == ["input"] + names
    r = qmodel.variables["quant_ranges"]["Conv2d_1"]["depthwise"]["act_quant"]
    scale, zp = qparams(r["min"], r["max"], UINT8)
    assert act["Conv2d_1_depthwise"]["scale"] == pytest.approx(float(scale))
    assert act["Conv2d_1_depthwise"]["zero_point"] == int(zp)
    assert act["input"]["min"] == pytest.approx(float(images.min()), abs=1e-6)

    folded = fold_batch_norm(variables, model.bn_epsilon)
    w_table = ranges_lib.weight_range_table(qmodel.variables["params"])
    w = np.asarray(folded["params"]["Conv2d_1"]["depthwise"]["kernel"])
    per_ch = np.abs(w).reshape(-1, w.shape[-1]).max(0)
    row = w_table["Conv2d_1_depthwise"]
    assert row["max_over_median"] == pytest.approx(per_ch.max() / np.median(per_ch), rel=1e-5)
    assert row["step_max"] == pytest.approx((w.max() - w.min()) / 255, rel=1e-5)
    md = ranges_lib.format_markdown(w_table, ["min", "max"])
    assert md.splitlines()[0] == "| layer | min | max |" and "| Conv2d_13_pointwise |" in md


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    curves = {"a": {"Conv2d_0": 30.0, "Conv2d_1_depthwise": 12.0, "Logits": 3.0}}
    plots.plot_sqnr(curves, str(tmp_path / "s.png"), estimates=curves, spreads=curves)
    plots.plot_alpha_channels([1.0, 20.0, 0.1], str(tmp_path / "a.png"), [1], paper=[1, 20, 0.1])
    plots.plot_alpha_layers(
        {"Conv2d_1_depthwise": {"alpha": [1.0, 30.0], "zero_variance": [1]}},
        str(tmp_path / "l.png"),
    )
    plots.plot_accuracy({"v": {"float": 70.0, "8-bit": 1.8}}, str(tmp_path / "b.png"))
    for name in ("s", "a", "l", "b"):
        assert _is_png(tmp_path / f"{name}.png")
    assert [os.path.basename(p) for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert names.short_layer_name("Conv2d_12_pointwise") == "pw12"
    assert names.short_layer_name("Conv2d_0") == "conv0"
    with pytest.raises(ValueError, match="at least one curve"):
        plots.plot_sqnr({}, str(tmp_path / "x.png"))


# ---------------------------------------------------------------- the analyze job


def test_analyze_job_on_official_model(tmp_path, data_dir):
    """The job end to end on the official model, at reduced cost (64 px, 4 + 8 images)."""
    from configs import analyze_official
    from qfsep_jax.jobs import analyze

    config = analyze_official.get_config()
    config.data_dir = data_dir
    config.image_size = 64
    config.num_sqnr_images = 4
    config.sqnr_batch_size = 4
    config.num_calibration_images = 8
    config.eval_batch_size = 8
    # One pipeline and no integer pass, for test time: the integer SQNR is tested on the tiny
    # model, the fix's gain on the official model is in the full job's output (README).
    config.pipelines = ("tf8_zero_variance_fix",)
    config.integer = False
    results = analyze.run(config, str(tmp_path))
    assert not results["integer_sqnr"] and "disabled by config" in results["integer_note"]

    with open(tmp_path / "alpha.json") as f:
        alpha = json.load(f)
    assert list(alpha) == [f"Conv2d_{i}_depthwise" for i in range(1, 14)]
    np.testing.assert_allclose(alpha["Conv2d_1_depthwise"], paper.FIG3_ALPHA, atol=5e-5)
    cmp = results["alpha"]["paper_fig3_comparison"]
    assert cmp["matches_4_decimals"] and cmp["max_abs_diff"] < 5e-5

    with open(tmp_path / "sqnr.json") as f:
        sqnr = json.load(f)
    assert list(sqnr) == ["tf8_zero_variance_fix"]
    table = sqnr["tf8_zero_variance_fix"]
    assert set(table) == {"fake_quant", "uniform_estimate"}
    assert list(table["fake_quant"])[0] == "Conv2d_0" and len(table["fake_quant"]) == 28
    # accumulated error: the last layers are noisier than the first
    assert table["fake_quant"]["Conv2d_0"] > table["fake_quant"]["Conv2d_13_pointwise"] + 10
    fixed = results["pipelines"]["tf8_zero_variance_fix"]["zero_variance_channels"]
    assert fixed["Conv2d_1/depthwise"] == [0, 3, 4, 8, 16, 20, 21]
    # The paper's fix touches the depthwise layers only (the graph has dead channels elsewhere).
    assert results["pipelines"]["tf8_zero_variance_fix"]["zero_variance_scope"] == "depthwise"
    assert len(fixed) == 7 and all(layer.endswith("/depthwise") for layer in fixed), fixed

    with open(tmp_path / "ranges.json") as f:
        ranges = json.load(f)
    assert list(ranges["tf8_zero_variance_fix"]["activations"])[0] == "input"
    for name in ("alpha_Conv2d_1_depthwise", "alpha_layers", "sqnr_fake_quant"):
        assert _is_png(tmp_path / f"{name}.png")
    assert not (tmp_path / "sqnr_integer.png").exists()
    assert (tmp_path / "results.json").exists() and (tmp_path / "ranges.md").exists()
    json.dumps(results, allow_nan=False)

    # the README tables made from this results.json
    from tools import collect_results

    tables = collect_results.format_analyze(results, "results.json")
    assert "equal to 4 decimals: **yes**" in tables["analyze_alpha"]
    assert "| `Conv2d_1_depthwise` | 32 | 7 |" in tables["analyze_alpha"]
    row = next(r for r in tables["analyze_sqnr"].splitlines() if r.startswith("| `Conv2d_0` |"))
    assert row.split(" | ")[1] == "30"  # the paper's value, beside ours
