"""The LiteRT bit-exactness check (issue 3): official model, synthetic family members, pairs."""

import json
import os
import shutil

import pytest
from conftest import TFLITE_MODEL, require
from fixtures.synthetic_tflite import build_int8_tflite, build_mobilenet_tflite, split_tflite

from configs import tflite_check
from qfsep_jax import integer
from qfsep_jax.jobs import tflite_check as job


def _config(data_dir, **overrides):
    c = tflite_check.get_config()
    c.data_dir = data_dir
    for k, v in overrides.items():
        c[k] = v
    return c


def _results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def test_official_model_bit_exact_on_imagenet_val500(data_dir, tmp_path, capsys):
    # All 500 images, every intermediate tensor and the logits, rounding found automatically.
    out = job.run(_config(data_dir), str(tmp_path))
    res = _results(tmp_path)
    assert res["n"] == 500 and res["bit_exact_images"] == 500 and res["first_mismatch"] is None
    assert res == out
    assert res["tensors_compared_per_image"] == 30
    # LiteRT's built-in kernels: CONV_2D through ruy (ties up), depthwise with gemmlowp rounding.
    assert res["rounding_preset"] == "litert_x86"
    assert res["rounding_candidates"]["litert_x86"] == 0
    assert res["rounding_candidates"]["reference"] > 0  # the probe can tell the rules apart
    assert res["top1_int"] == res["top1_litert"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "bit-exact: 500/500"


def test_reference_kernels_pick_gemmlowp_rounding(data_dir, tmp_path):
    # TFLite's reference kernels round as gemmlowp does in every layer.
    job.run(
        _config(data_dir, op_resolver="reference", rounding="reference", limit=10), str(tmp_path)
    )
    res = _results(tmp_path)
    assert res["bit_exact_images"] == res["n"] == 10


def test_wrong_rounding_fails_loudly(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.run(_config(data_dir, rounding="single", limit=3), str(tmp_path))
    assert exit_info.value.code == 1
    res = _results(tmp_path)
    assert res["bit_exact_images"] < res["n"] == 3
    assert res["first_mismatch"]["layer"] == "Conv2d_0"
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("bit-exact: ")


@pytest.mark.parametrize(
    "width,size,block",
    [(0.5, 96, "qf"), (0.35, 80, "original")],  # other widths/resolutions, odd feature maps
)
def test_synthetic_family_members_bit_exact(data_dir, tmp_path, width, size, block):
    path = build_mobilenet_tflite(
        str(tmp_path / "m.tflite"), width=width, image_size=size, block=block, num_classes=1001
    )
    model = integer.from_tflite(path)
    assert model.layer("Conv2d_13_pointwise").out_channels == int(1024 * width)
    config = _config(data_dir, model=path, limit=8, eval_batch_size=8, rounding="litert_x86")
    job.run(config, str(tmp_path))
    res = _results(tmp_path)
    assert res["bit_exact_images"] == res["n"] == 8 and res["image_size"] == size


def test_depthwise_padding_with_nonzero_input_zero_point_bit_exact(data_dir, tmp_path):
    """Depthwise layers whose inputs have mid-range zero points (a model without ReLU6), stride 1
    and 2: SAME padding must hold the input's real zero (code ``Z_in``), as LiteRT pads. In the
    official model every depthwise input has zero point 0, where padding with code 0 is the same.

    Mutation that fails this test: the integer pass padding the depthwise input codes with 0
    instead of ``Z_in`` (``lax.pad(x, -Z_in)`` on ``q - Z_in``). Of the other tests here only the
    int8 model's catches it (int8 ReLU6 outputs have zero point -128); the uint8 ones do not."""
    path = build_mobilenet_tflite(
        str(tmp_path / "nozero.tflite"),
        width=0.25,
        image_size=32,
        num_blocks=2,
        num_classes=11,
        activation="none",
    )
    model = integer.from_tflite(path)
    depthwise = [layer for layer in model.layers if layer.kind == "depthwise"]
    assert sorted(layer.stride for layer in depthwise) == [1, 2]
    assert all(20 < layer.input_zero_point < 235 for layer in depthwise), [
        layer.input_zero_point for layer in depthwise
    ]
    config = _config(data_dir, model=path, limit=8, eval_batch_size=8, rounding="litert_x86")
    job.run(config, str(tmp_path))
    res = _results(tmp_path)
    assert res["bit_exact_images"] == res["n"] == 8


def test_int8_scheme_model_bit_exact(data_dir, tmp_path):
    # TFLite's current scheme: per-channel int8 weights, int8 activations (input: pixel - 128).
    path = build_int8_tflite(str(tmp_path / "int8.tflite"), image_size=32)
    model = integer.from_tflite(path)
    assert model.dtype == "int8" and len(set(model.layer("Conv2d_0").multiplier.tolist())) > 1
    # LiteRT's optimized int8 depthwise kernel rounds ties up, unlike its uint8 one.
    config = _config(data_dir, model=path, limit=8, eval_batch_size=8, rounding="litert_x86_int8")
    job.run(config, str(tmp_path))
    res = _results(tmp_path)
    assert res["bit_exact_images"] == res["n"] == 8


def test_backbone_and_head_pair_bit_exact(data_dir, tmp_path):
    backbone, head = str(tmp_path / "backbone.tflite"), str(tmp_path / "head.tflite")
    split_tflite(require(TFLITE_MODEL), backbone, head, "MobilenetV1/Logits/AvgPool_1a/AvgPool")
    config = _config(data_dir, model=backbone, head=head, limit=8, rounding="litert_x86")
    job.run(config, str(tmp_path))
    res = _results(tmp_path)
    assert res["bit_exact_images"] == res["n"] == 8 and res["head"] == head


def test_skipped_corrupt_images_are_recorded(data_dir, tmp_path, capsys):
    """``on_corrupt="skip"``: results.json says how many files were skipped (it said nothing)."""
    src = os.path.join(data_dir, "imagenet_val500")
    root = tmp_path / "val"
    for wnid in sorted(os.listdir(src))[:2]:
        (root / wnid).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(src, wnid)))[:3]:
            shutil.copy(os.path.join(src, wnid, name), root / wnid / name)
    (root / wnid / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    config = _config(data_dir, eval_data=f"folder:{root}", on_corrupt="skip", rounding="litert_x86")
    job.run(config, str(tmp_path / "out"))
    res = _results(tmp_path / "out")
    assert res["n"] == res["bit_exact_images"] == 6 and res["skipped_corrupt"] == 1
    assert "skipped 1 corrupt image file(s)" in capsys.readouterr().out


def test_malformed_model_is_a_clear_error(data_dir, tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(integer.TFLiteImportError, match="not a TensorFlow Lite flatbuffer"):
        job.run(_config(data_dir, model=str(bad)), str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
