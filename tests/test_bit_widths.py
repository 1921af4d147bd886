"""Bit widths below 8 (QuantConfig.weight_bits/act_bits/layer_bits) through PTQ, the integer
pass, the TFLite export and save/load.

Small on purpose: MobileNetV1 0.25 at 32 px with random weights, calibrated on 8 random images;
one calibration serves every bit width (QuantizedModel.with_bits). The result on the official
model is the table1 job's (configs/table1_bits.py, docs/bit_widths.md).
"""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from configs import smoke, table1_bits
from qfsep_jax import config_validation as cv
from qfsep_jax import integer, ptq
from qfsep_jax.analysis import agreement
from qfsep_jax.analysis.sqnr import activation_steps
from qfsep_jax.integer import tflite_export
from qfsep_jax.integer.reference import LiteRTRunner
from qfsep_jax.jobs.table1 import bit_widths
from qfsep_jax.models.mobilenet_v1 import MobileNetV1, random_variables
from qfsep_jax.quant.numerics import INT8, INT8_NARROW, UINT8, IntRange
from qfsep_jax.quant.scheme import QuantConfig
from qfsep_jax.quantized import PTQRecipe, load_quantized, save_quantized
from tools import collect_results

SIZE = 32


# -- QuantConfig ---------------------------------------------------------------------------


def test_eight_bits_are_exactly_the_existing_ranges():
    assert QuantConfig().act_int_range == UINT8 and QuantConfig().weight_int_range == UINT8
    int8 = QuantConfig(scheme="int8")
    assert int8.act_int_range == INT8 and int8.weight_int_range == INT8_NARROW


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_lower_bits_narrow_the_ranges(bits):
    tf8 = QuantConfig(weight_bits=bits, act_bits=bits)
    assert tf8.weight_int_range == tf8.act_int_range == IntRange(0, 2**bits - 1)
    int8 = QuantConfig(scheme="int8", weight_bits=bits, act_bits=bits)
    half = 2 ** (bits - 1)
    assert int8.act_int_range == IntRange(-half, half - 1)
    assert int8.weight_int_range == IntRange(-(half - 1), half - 1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weight_bits": 1}, ValueError, r"weight_bits must be in \[2, 8\].*got 1"),
        ({"act_bits": 9}, ValueError, r"act_bits must be in \[2, 8\].*got 9"),
        ({"weight_bits": 4.0}, TypeError, "weight_bits must be an int"),
        ({"act_bits": True}, TypeError, "act_bits must be an int"),
        ({"layer_bits": (("Logits", 8),)}, ValueError, "entries are .pattern, weight_bits"),
        ({"layer_bits": (("Logits", 8, 16),)}, ValueError, "act_bits of layer_bits 'Logits'"),
        ({"layer_bits": ((3, 8, 8),)}, TypeError, "pattern must be a non-empty str"),
        ({"layer_bits": "first_last_4"}, ValueError, "unknown layer_bits preset"),
    ],
)
def test_bad_bits_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantConfig(**kwargs)


def test_layer_overrides_first_match_wins_and_stay_hashable():
    q = QuantConfig(
        weight_bits=4,
        act_bits=6,
        layer_bits=[["Conv2d_1_depthwise", 8, 8], ["Conv2d_*_depthwise", 5, 7]],  # JSON lists
    )
    assert q.layer_bits == (("Conv2d_1_depthwise", 8, 8), ("Conv2d_*_depthwise", 5, 7))
    hash(q)  # a Flax module attribute
    assert q.bits_for("Conv2d_1_depthwise") == (8, 8)  # first match
    assert q.bits_for("Conv2d_13_depthwise") == (5, 7)
    assert q.bits_for("Conv2d_13_pointwise") == (4, 6)  # no match: the global bits
    layer = q.for_layer("Conv2d_3_depthwise")
    assert (layer.weight_bits, layer.act_bits, layer.layer_bits) == (5, 7, ())
    assert layer.weight_int_range == IntRange(0, 31) and layer.act_int_range == IntRange(0, 127)
    assert layer.for_layer("Logits") == layer  # resolved once, for good
    preset = QuantConfig(weight_bits=4, act_bits=4, layer_bits="first_last_8")
    assert [preset.bits_for(n) for n in ("input", "Conv2d_0", "Logits", "Conv2d_1_pointwise")] == [
        (8, 8),
        (8, 8),
        (8, 8),
        (4, 4),
    ]


def test_recipe_carries_the_bits_into_its_config():
    recipe = PTQRecipe(scheme="int8", weight_bits=4, layer_bits=[["Logits", 8, 8]])
    q = recipe.quant_config()
    assert (q.weight_bits, q.act_bits, q.layer_bits) == (4, 8, (("Logits", 8, 8),))
    with pytest.raises(ValueError, match="weight_bits"):
        PTQRecipe(weight_bits=12)


def test_uniform_noise_estimate_follows_each_layers_bits():
    ranges = {
        "Conv2d_0": {"act_quant": {"min": np.float32(0), "max": np.float32(6)}},
        "Conv2d_1": {"depthwise": {"act_quant": {"min": np.float32(0), "max": np.float32(6)}}},
    }
    steps = activation_steps(ranges, QuantConfig(act_bits=4, layer_bits="first_last_8"))
    assert steps["Conv2d_0"] == pytest.approx(6 / 255)
    assert steps["Conv2d_1_depthwise"] == pytest.approx(6 / 15)


# -- PTQ → integer pass --------------------------------------------------------------------


def _tiny_model():
    return MobileNetV1(
        num_classes=10,
        width_multiplier=0.25,
        stem_stride=1,
        dropout_rate=0.0,
        depthwise_impl="lax",
    )


@pytest.fixture(scope="module")
def calibrated():
    """``{scheme: 8-bit QuantizedModel}`` and the 8 random images they were calibrated on."""
    model = _tiny_model()
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    variables = random_variables(model, SIZE, 0)
    out = {}
    for name in ("tf8_per_tensor", "int8_per_channel"):
        recipe = ptq.recipe_by_name(name)
        out[name] = ptq.quantize_post_training(
            model, variables, recipe, lambda: [{"image": images}], 1
        )
    return out, images


CASES = {
    "w4a8_tf8_per_tensor": ("tf8_per_tensor", 4, 8, ()),
    "w6a8_int8_per_channel": ("int8_per_channel", 6, 8, ()),
    "w4a4_tf8_first_last_8": ("tf8_per_tensor", 4, 4, "first_last_8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_pass_matches_the_simulation_with_lower_bits(calibrated, case):
    qmodels, images = calibrated
    recipe_name, w_bits, a_bits, layer_bits = CASES[case]
    qmodel = qmodels[recipe_name].with_bits(w_bits, a_bits, layer_bits)
    quant = qmodel.model.quant
    int_model = integer.from_quantized(qmodel)
    lw = agreement.layerwise_agreement(qmodel.model, qmodel.variables, int_model, images)
    assert list(lw) == int_model.layer_names
    assert max(v["max_lsb"] for v in lw.values()) <= 1, lw

    codes = integer.quantize_input(int_model, images)
    _, ints = integer.run(int_model, codes, return_intermediates=True)
    in_range = quant.for_layer("input").act_int_range
    assert int_model.input_bits == quant.bits_for("input")[1]
    assert in_range.qmin <= int(np.min(codes)) and int(np.max(codes)) <= in_range.qmax
    prev_bits = None
    for layer in int_model.layers:
        out = np.asarray(ints[layer.name]).astype(np.int32)
        if layer.kind == "avgpool":  # the pooled tensor keeps the range of the one it pools
            assert layer.act_bits == prev_bits
            act_range = quant.for_layer("Conv2d_13_pointwise").act_int_range
        else:
            w_expected, a_expected = quant.bits_for(layer.name)
            assert (layer.weight_bits, layer.act_bits) == (w_expected, a_expected)
            layer_q = quant.for_layer(layer.name)
            w_range, act_range = layer_q.weight_int_range, layer_q.act_int_range
            w = np.asarray(layer.weight).astype(np.int32)
            assert np.asarray(layer.weight).dtype.itemsize == 1  # uint8/int8 storage
            assert w_range.qmin <= w.min() and w.max() <= w_range.qmax, layer.name
            assert np.unique(w).size <= 2**w_expected
            # The narrow grid is really used, not a degenerate all-zero layer.
            assert np.unique(w).size > 4, (layer.name, np.unique(w))
        assert act_range.qmin <= layer.act_min and layer.act_max <= act_range.qmax, layer.name
        assert act_range.qmin <= out.min() and out.max() <= act_range.qmax, layer.name
        assert np.unique(out).size <= act_range.qmax - act_range.qmin + 1
        prev_bits = layer.act_bits
    if layer_bits == "first_last_8":  # the override is visible in the integer model
        assert int_model.input_bits == 8
        for name in ("Conv2d_0", "Logits"):
            layer = int_model.layer(name)
            assert (layer.weight_bits, layer.act_bits) == (8, 8)
            assert np.unique(np.asarray(layer.weight)).size > 16  # more than 4-bit codes
            assert np.unique(np.asarray(ints[name])).size > 16
        dw = int_model.layer("Conv2d_1_depthwise")
        assert (dw.weight_bits, dw.act_bits) == (4, 4) and dw.act_max <= 15


def test_with_bits_equals_ptq_with_a_recipe_at_those_bits(calibrated):
    # Calibration never rounds, so PTQ at 4 bits gives the same model as re-using the 8-bit
    # calibration (the integer tests above show the 4-bit grid is then used).
    qmodels, images = calibrated
    base = qmodels["tf8_per_tensor"]
    model = _tiny_model()
    variables = random_variables(model, SIZE, 0)
    recipe = PTQRecipe(weight_bits=4, act_bits=4, layer_bits="first_last_8")
    direct = ptq.quantize_post_training(model, variables, recipe, lambda: [{"image": images}], 1)
    reused = base.with_bits(4, 4, "first_last_8")
    assert reused.recipe == direct.recipe and reused.model.quant == direct.model.quant
    assert reused.model.quant != base.model.quant
    _assert_same_tree(reused.variables, direct.variables)


def _assert_same_tree(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# -- TFLite export -------------------------------------------------------------------------


def test_export_refuses_activations_below_8_bits_naming_the_layer(calibrated, tmp_path):
    qmodels, _ = calibrated
    path = tmp_path / "m.tflite"
    first_last = integer.from_quantized(qmodels["tf8_per_tensor"].with_bits(8, 4, "first_last_8"))
    with pytest.raises(tflite_export.TFLiteExportError) as info:
        integer.to_tflite(first_last, str(path), SIZE)
    message = str(info.value)
    assert message.startswith("layer Conv2d_1_depthwise: 4-bit activations"), message
    assert "derived from the uint8 type" in message
    everywhere = integer.from_quantized(qmodels["int8_per_channel"].with_bits(8, 6))
    with pytest.raises(tflite_export.TFLiteExportError, match="layer input: 6-bit activations"):
        integer.to_tflite(everywhere, str(path), SIZE)
    assert not path.exists()


def test_w4a8_exports_and_litert_runs_it_bit_exactly(calibrated, tmp_path):
    qmodels, images = calibrated
    qmodel = qmodels["int8_per_channel"].with_bits(4, 8)
    int_model = integer.from_quantized(qmodel).with_rounding("litert_x86_int8")
    path = str(tmp_path / "w4a8.tflite")
    exported = integer.to_tflite(int_model, path, SIZE)
    back = integer.from_tflite(path)
    for layer in back.layers:
        if layer.weight is not None:  # the file holds 4-bit codes in int8
            w = np.asarray(layer.weight)
            assert w.dtype == np.int8 and -7 <= w.min() and w.max() <= 7, layer.name
    runner = LiteRTRunner(exported, [path], "builtin")
    codes = np.asarray(integer.quantize_input(int_model, images[:3]))
    logits, ints = integer.run(int_model, codes, True)
    assert np.unique(np.asarray(logits)).size > 10  # not saturated: equality means something
    for i, image in enumerate(codes):
        ref = runner(image)
        for name, f, t in exported.tensor_map:
            theirs = ref[f, t].reshape(-1)
            assert np.array_equal(np.asarray(ints[name][i]).reshape(-1), theirs), (i, name)


# -- save/load, configs --------------------------------------------------------------------


def test_save_load_round_trip_keeps_layer_bits(calibrated, tmp_path):
    qmodels, _ = calibrated
    qmodel = qmodels["tf8_per_tensor"].with_bits(6, 4, [["Conv2d_*_depthwise", 8, 8]])
    save_quantized(qmodel, str(tmp_path / "q"))
    back = load_quantized(str(tmp_path / "q"))
    assert back.model.quant == qmodel.model.quant
    assert back.recipe == qmodel.recipe
    assert back.recipe.layer_bits == (("Conv2d_*_depthwise", 8, 8),)
    _assert_same_tree(back.variables, qmodel.variables)  # same model, same variables
    int_model = integer.from_quantized(back)
    assert int_model.layer("Conv2d_2_depthwise").act_bits == 8
    assert int_model.layer("Conv2d_2_pointwise").act_bits == 4


def test_configs_list_and_validate_bit_widths(data_dir):
    config = table1_bits.get_config()
    config.data_dir = data_dir
    cv.validate(config)
    assert bit_widths(config) == [(8, 8), (6, 8), (4, 8)]
    assert bit_widths(ml_collections.ConfigDict({"rows": ("float",)})) is None
    for value in ((8, 9), (), (4, 4)):
        bad = table1_bits.get_config()
        bad.data_dir = data_dir
        bad.weight_bits = value
        with pytest.raises(cv.ConfigError, match="config.weight_bits=.*distinct integers in"):
            cv.validate(bad)
    qat = smoke.get_config()
    qat.data_dir = data_dir
    qat.qat.act_bits = 1
    with pytest.raises(cv.ConfigError, match=r"config.qat.act_bits=1: must be an integer in"):
        cv.validate(qat)


def test_recipe_dict_round_trips_through_json_lists():
    recipe = PTQRecipe(weight_bits=4, act_bits=8, layer_bits="first_last_8")
    as_json = dataclasses.asdict(recipe)
    as_json["layer_bits"] = [list(e) for e in as_json["layer_bits"]]
    assert PTQRecipe(**as_json) == recipe


def test_result_table_has_one_row_per_recipe_and_a_column_per_bit_width():
    def row(name, w, top1, int_top1):
        recipe = {"weight_bits": w, "act_bits": 8}
        return {"name": f"{name}_w{w}a8", "top1": top1, "int_top1": int_top1, "recipe": recipe}

    results = {
        "bit_widths": [[8, 8], [4, 8]],
        "rows": [
            {"name": "float", "top1": 70.0, "n": 500},
            row("per_channel", 8, 69.0, 68.5),
            row("per_channel", 4, 12.25, 11.0),
            row("tf8_per_tensor", 8, 5.0, 4.0),
        ],
        "eval_data": "folder:x",
        "calibration_data": "folder:y",
        "num_calibration_images": 10,
        "image_size": 224,
        "crop_fraction": 0.875,
    }
    table = collect_results.format_table1_bits(results, "r.json")["table1_bits"]
    lines = table.splitlines()
    assert lines[1] == "| recipe | W8A8 | W4A8 |"
    assert lines[3] == "| `per_channel` | 69.0 / 68.5 | 12.2 / 11.0 |"
    assert lines[4] == "| `tf8_per_tensor` | 5.0 / 4.0 | – |"
    assert "float: float 70.0" in table
