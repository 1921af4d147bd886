"""Export to ``.tflite`` (integer.to_tflite) and the export_tflite job.

Small models on purpose: MobileNetV1 0.25 at 32 px with random weights, post-training quantized on
8 random images, and the smoke QAT configuration for the QAT-trained QF model. The full runs on
imagenet_val500 are the job's (docs/deploy_tflite.md).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import TFLITE_MODEL, require

from configs import export_tflite, smoke
from qfsep_jax import integer, ptq
from qfsep_jax.integer import tflite_export
from qfsep_jax.integer.reference import LiteRTRunner, make_interpreter
from qfsep_jax.jobs import export_tflite as job
from qfsep_jax.models.mobilenet_v1 import MobileNetV1, random_variables

SIZE = 32


def _tiny_ptq(block: str, recipe: str | ptq.PTQRecipe, seed: int = 0):
    """A random-weight MobileNetV1 0.25/32 (BN unfolded) after PTQ on 8 random images."""
    model = MobileNetV1(
        num_classes=10,
        width_multiplier=0.25,
        block=block,
        stem_stride=1,
        dropout_rate=0.0,
        depthwise_impl="lax",
    )
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    variables = random_variables(model, SIZE, seed)  # no compile of model.init
    if isinstance(recipe, str):
        recipe = ptq.recipe_by_name(recipe)
    qmodel = ptq.quantize_post_training(model, variables, recipe, lambda: [{"image": images}], 1)
    return qmodel, images


@pytest.fixture(scope="module")
def tiny():
    """``{(block, scheme): (int model, images)}`` for both blocks and both schemes."""
    out = {}
    for block in ("original", "qf"):
        for recipe in ("tf8_per_tensor", "int8_per_channel"):
            qmodel, images = _tiny_ptq(block, recipe)
            out[block, recipe.split("_")[0]] = (integer.from_quantized(qmodel), images)
    return out


LEAVES = ("weight", "weight_zero_point", "bias", "multiplier", "shift")


def _meta(layer):
    fields = dataclasses.fields(layer)
    return {f.name: getattr(layer, f.name) for f in fields if f.name not in LEAVES}


@pytest.mark.parametrize("scheme", ["tf8", "int8"])
@pytest.mark.parametrize("block", ["original", "qf"])
def test_export_then_import_gives_back_the_integer_model(tiny, tmp_path, block, scheme):
    int_model = tiny[block, scheme][0]
    path = str(tmp_path / "m.tflite")
    exported = integer.to_tflite(int_model, path, SIZE)
    back = integer.from_tflite(path)
    assert back.dtype == int_model.dtype == ("uint8" if scheme == "tf8" else "int8")
    assert np.float32(back.input_scale) == np.float32(int_model.input_scale)
    assert back.input_zero_point == int_model.input_zero_point
    assert back.layer_names == int_model.layer_names
    leaves, back_leaves = jax.tree.leaves(int_model), jax.tree.leaves(back)
    assert len(leaves) == len(back_leaves) == 5 * (len(int_model.layers) - 1)
    for a, b in zip(leaves, back_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    for a, b in zip(int_model.layers, back.layers, strict=True):
        ma, mb = _meta(a), _meta(b)
        if a.kind == "avgpool":  # the global pool is written as a fixed 1x1-output window
            assert a.window is None and b.window == (2, 2) and b.stride == 1
            ma["window"], ma["stride"] = mb["window"], mb["stride"]
        for key in ("input_scale", "output_scale"):
            ma[key], mb[key] = np.float32(ma[key]), np.float32(mb[key])
        assert ma == mb, a.name
    if block == "qf":  # the QF block's depthwise conv: a bias, no activation, full clamp
        dw = back.layer("Conv2d_1_depthwise")
        assert dw.activation == "none" and np.any(dw.bias != 0)
    # The returned map names the file's tensors the way the importer's does.
    assert [name for name, _, _ in exported.tensor_map] == [name for name, _, _ in back.tensor_map]


def test_int8_per_tensor_weights_get_tflites_multipliers(tmp_path):
    # TFLite's int8 kernels form S_in * S_w / S_out in double even for per-tensor weights; the
    # uint8 kernels' float32 product (the rule for per-tensor weights) would give other M0s.
    int_model = integer.from_quantized(_tiny_ptq("original", ptq.PTQRecipe(scheme="int8"))[0])
    stem = int_model.layer("Conv2d_0")
    assert len(set(stem.weight_scale)) == 1 and int_model.dtype == "int8"
    path = str(tmp_path / "m.tflite")
    integer.to_tflite(int_model, path, SIZE)
    back = integer.from_tflite(path)
    for a, b in zip(jax.tree.leaves(int_model), jax.tree.leaves(back), strict=True):
        assert np.array_equal(a, b)
    real = integer.kernels.conv_multiplier(
        stem.input_scale, stem.weight_scale, stem.output_scale, per_channel=False
    )
    m0, shift = integer.kernels.quantize_multiplier(real)
    assert np.any(m0 != stem.multiplier)  # the float32 product differs in this layer ...
    legacy = _replace_layer(int_model, "Conv2d_0", multiplier=m0, shift=shift)
    with pytest.raises(integer.TFLiteExportError, match="Conv2d_0: QuantizeMultiplier"):
        integer.to_tflite(legacy, path + "2", SIZE)  # ... and LiteRT would not compute it


def test_reexport_of_the_official_file_is_identical_in_litert(tmp_path):
    official = require(TFLITE_MODEL)
    int_model = integer.from_tflite(official)
    path = str(tmp_path / "re.tflite")
    exported = integer.to_tflite(int_model, path, 128, softmax=True)
    back = integer.from_tflite(path)
    for a, b in zip(jax.tree.leaves(int_model), jax.tree.leaves(back), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
    assert [_meta(a) for a in int_model.layers] == [_meta(b) for b in back.layers]
    src, mine = LiteRTRunner(int_model, [official]), LiteRTRunner(exported, [path])
    images = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    for image in images:
        a, b = src(image), mine(image)
        for (name, f, t), (name2, f2, t2) in zip(
            int_model.tensor_map, exported.tensor_map, strict=True
        ):
            assert name == name2 and np.array_equal(a[f, t].reshape(-1), b[f2, t2].reshape(-1))
        outs = [
            r.interpreters[0].get_tensor(r.interpreters[0].get_output_details()[0]["index"])
            for r in (src, mine)
        ]
        assert np.array_equal(*outs)  # the softmax probabilities too


@pytest.mark.parametrize("block", ["original", "qf"])
def test_litert_builtin_equals_the_integer_pass_int8(tiny, tmp_path, block):
    # uint8 (TF8) models of both blocks go through the job tests below (the QAT-trained QF
    # model, a re-exported original-block model).
    int_model, images = tiny[block, "int8"]
    int_model = int_model.with_rounding("litert_x86_int8")
    path = str(tmp_path / "m.tflite")
    exported = integer.to_tflite(int_model, path, SIZE, softmax=True)
    runner = LiteRTRunner(exported, [path], "builtin")
    codes = np.asarray(integer.quantize_input(int_model, images))
    logits, ints = integer.run(int_model, codes, True)
    assert np.unique(np.asarray(logits)).size > 20  # not saturated: equality means something
    # Negative control: one bias one code off (a leaf, so no recompilation) is caught.
    dw_bias = np.asarray(int_model.layer("Conv2d_1_depthwise").bias)
    off = _replace_layer(int_model, "Conv2d_1_depthwise", bias=dw_bias + np.int32(1))
    _, ints_off = integer.run(off, codes, True)
    names = [name for name, _, _ in exported.tensor_map]
    assert names[-1] == names[-2] == "Logits" and len(names) == len(int_model.layers) + 1
    caught = 0
    for i, image in enumerate(codes):
        ref = runner(image)
        for name, f, t in exported.tensor_map:
            theirs = ref[f, t].reshape(-1)
            assert np.array_equal(np.asarray(ints[name][i]).reshape(-1), theirs), (i, name)
            if name == "Conv2d_1_depthwise":
                caught += int(not np.array_equal(np.asarray(ints_off[name][i]).reshape(-1), theirs))
    assert caught == len(codes)
    # LiteRT's int8 SOFTMAX after the logits (S = 1/256, Z = -128): probabilities summing to 1.
    it = runner.interpreters[0]
    probs = it.get_tensor(it.get_output_details()[0]["index"])
    assert probs.dtype == np.int8 and probs.shape == (1, 10)
    assert abs((probs.astype(np.int32) + 128).sum() / 256 - 1) < 0.05


def _file_buffers(path: str) -> list[tuple[int, int]]:
    """(position in the file, length) of every non-empty buffer's data."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        buf = f.read()
    model = schema.Model.GetRootAs(buf, 0)
    out = []
    for i in range(model.BuffersLength()):
        table = model.Buffers(i)._tab
        field = table.Offset(4)
        if field:
            out.append((table.Vector(field), model.Buffers(i).DataLength()))
    return out


def test_signature_names_xnnpack_and_aligned_buffers(tiny, tmp_path, monkeypatch):
    int_model, images = tiny["qf", "tf8"]
    path = str(tmp_path / "m.tflite")
    integer.to_tflite(int_model, path, SIZE)
    it = make_interpreter(path, "builtin", preserve_all_tensors=False)
    assert it.get_signature_list() == {
        "serving_default": {"inputs": ["input"], "outputs": ["logits"]}
    }
    codes = np.asarray(integer.quantize_input(int_model, images[:1]))
    out = it.get_signature_runner("serving_default")(input=codes)["logits"]
    it.set_tensor(it.get_input_details()[0]["index"], codes)
    it.invoke()
    assert out.shape == (1, 10) and np.array_equal(
        out, it.get_tensor(it.get_output_details()[0]["index"])
    )
    names = {d["name"] for d in it.get_tensor_details()}
    assert {
        "input",
        "Conv2d_0",
        "Conv2d_0/weights",
        "Conv2d_0/biases",
        "Conv2d_13_pointwise",
        "AvgPool_1a",
        "Logits",
        "Logits/SpatialSqueeze",
    } <= names

    # XNNPACK takes the whole network, in as many partitions as for the official file (with a
    # depthwise weight's per-tensor quantization on axis 3 it declined all 13: 15 partitions).
    def partitions(p):
        it = make_interpreter(p, "xnnpack", preserve_all_tensors=False)
        return [op["op_name"] for op in it._get_ops_details()].count("DELEGATE")

    assert partitions(path) == partitions(require(TFLITE_MODEL)) == 2
    buffers = _file_buffers(path)
    assert len(buffers) == 2 * 28 + 1  # weights and bias of 28 convs, the reshape's shape
    assert all(pos % 16 == 0 for pos, _ in buffers)
    # Negative control: without the alignment the generated Pack leaves some buffers unaligned.
    monkeypatch.setattr(tflite_export, "_ALIGN", 1)
    integer.to_tflite(int_model, str(tmp_path / "unaligned.tflite"), SIZE)
    assert any(pos % 16 for pos, _ in _file_buffers(str(tmp_path / "unaligned.tflite")))


def _replace_layer(int_model, name, **changes):
    layers = tuple(
        dataclasses.replace(layer, **changes) if layer.name == name else layer
        for layer in int_model.layers
    )
    return dataclasses.replace(int_model, layers=layers)


def _bad_models(tiny):
    tf8, int8 = tiny["original", "tf8"][0], tiny["qf", "int8"][0]
    pw = int8.layer("Conv2d_1_pointwise")
    dw = tf8.layer("Conv2d_2_depthwise")
    stem = tf8.layer("Conv2d_0")
    per_channel = np.float32(stem.weight_scale) * np.linspace(1, 2, len(stem.weight_scale))
    return {
        # What PTQ recipe per_channel (uint8 asymmetric per-channel weights) gives.
        "uint8 per-channel weights": (
            _replace_layer(tf8, "Conv2d_0", weight_scale=tuple(float(v) for v in per_channel)),
            "Conv2d_0: uint8 weights with per-channel scales .* per-axis quantization is int8",
        ),
        "int8 weights with a nonzero zero point": (
            _replace_layer(int8, pw.name, weight_zero_point=np.ones_like(pw.weight_zero_point)),
            "Conv2d_1_pointwise: int8 weights with a nonzero zero point",
        ),
        "multiplier that the scales do not give": (
            _replace_layer(tf8, dw.name, multiplier=dw.multiplier + 1),
            "Conv2d_2_depthwise: QuantizeMultiplier of the written scales",
        ),
        "multiplier that no scales give": (
            _replace_layer(tf8, dw.name, multiplier=dw.multiplier // 2),
            "Conv2d_2_depthwise: multiplier of channel 0 .* cannot be represented",
        ),
        "clamp that no fused activation gives": (
            _replace_layer(tf8, "Conv2d_0", act_min=tf8.layer("Conv2d_0").act_min + 1),
            "Conv2d_0: LiteRT derives the clamp",
        ),
        "requantization between two ops": (
            _replace_layer(tf8, dw.name, input_scale=dw.input_scale * 1.01),
            "Conv2d_2_depthwise: its input quantization .* no requantization",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "uint8 per-channel weights",
        "int8 weights with a nonzero zero point",
        "multiplier that the scales do not give",
        "multiplier that no scales give",
        "clamp that no fused activation gives",
        "requantization between two ops",
    ],
)
def test_unexpressible_model_is_a_clear_error_and_no_file(tiny, tmp_path, case):
    model, match = _bad_models(tiny)[case]
    path = tmp_path / "m.tflite"
    with pytest.raises(integer.TFLiteExportError, match=match):
        integer.to_tflite(model, str(path), SIZE)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"previous export")  # an existing file is left as it was
    with pytest.raises(integer.TFLiteExportError):
        integer.to_tflite(model, str(path), SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]
    assert path.read_bytes() == b"previous export"


# ----------------------------------------------------------------------------------------------
# The job.


def _config(data_dir, source, **overrides):
    c = export_tflite.get_config()
    c.data_dir, c.source = data_dir, source
    for key, value in overrides.items():
        c[key] = value
    return c


def test_job_reexports_a_tflite_file(tiny, data_dir, tmp_path, capsys):
    # A small original-block uint8 model ending with SOFTMAX, written by to_tflite: the job
    # re-exports it, keeps the softmax, and compares the integer pass, LiteRT on the re-export
    # and LiteRT on the source file (the official file's re-export: the test above).
    source = str(tmp_path / "source.tflite")
    integer.to_tflite(tiny["original", "tf8"][0], source, SIZE, softmax=True)
    work = tmp_path / "work"
    out = job.run(_config(data_dir, f"tflite:{source}", limit=4, eval_batch_size=4), str(work))
    res = json.loads((work / "results.json").read_text())
    assert res == out
    assert res["bit_exact_images"] == res["n"] == res["identical_to_source_images"] == 4
    assert res["first_mismatch"] is None and res["softmax"] and res["image_size"] == SIZE
    assert res["tensors_compared_per_image"] == 30 and res["rounding_preset"] == "litert_x86"
    # 10 classes are not the label space imagenet1001: no top-1 is claimed.
    assert res["top1_litert"] is None and res["top1_integer"] is None
    assert 0 <= res["xnnpack"]["top1_equal_builtin_images"] <= 4
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-2].endswith(": 4/4") and lines[-1] == "bit-exact: 4/4"
    a, b = integer.from_tflite(source), integer.from_tflite(str(work / "model.tflite"))
    assert all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_job_rejects_a_bad_source_before_writing(data_dir, tmp_path):
    with pytest.raises(ValueError, match="config.source='onnx:x'.*'ptq:<recipe>'"):
        job.run(_config(data_dir, "onnx:x"), str(tmp_path))
    with pytest.raises(ValueError, match="config.source='ptq:tf9': the recipe must be one of"):
        job.run(_config(data_dir, "ptq:tf9"), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_qat_trained_qf_model_exports_bit_exact(data_dir, tmp_path, capsys):
    """End to end: QAT of a QF-block model (smoke configuration), its export, LiteRT."""
    from qfsep_jax import train

    c = smoke.get_config()
    c.data_dir, c.eval_every_steps, c.num_devices = data_dir, -1, 1
    c.model.block, c.total_steps = "qf", 2
    c.qat.enabled, c.qat.integer = True, False
    run_dir = tmp_path / "qat"
    train.train_and_evaluate(c, str(run_dir))
    work = tmp_path / "export"
    res = job.run(_config(data_dir, f"quantized:{run_dir / 'quantized_model'}", limit=8), str(work))
    # The run's own data: Imagenette validation images, 10 classes, 32 px.
    assert res["eval_data"] == "folder:imagenette/val" and res["image_size"] == SIZE
    assert res["label_space"] == "imagenette" and res["top1_integer"] is not None
    assert res["bit_exact_images"] == res["n"] == 8 and res["dtype"] == "uint8"
    back = integer.from_tflite(str(work / "model.tflite"))
    assert back.layer("Conv2d_1_depthwise").activation == "none"
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "bit-exact: 8/8"
