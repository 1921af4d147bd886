"""The library's one-call paths and their guards (docs/library.md).

A tiny MobileNetV1 (width 0.25, 32 px, 10 classes) with random BN statistics stands in for a real
model; the data helpers and the official-model loader run on the shared data.
"""

import dataclasses
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import DATA_DIR, FLOAT_GRAPH, REPO, require

from qfsep_jax import ptq
from qfsep_jax.models.layers import ActQuant
from qfsep_jax.models.mobilenet_v1 import MobileNetV1, random_variables
from qfsep_jax.quant.numerics import UINT8, qparams
from qfsep_jax.quant.scheme import QuantConfig
from qfsep_jax.quantized import QuantizedModel

SIZE = 32


@pytest.fixture(scope="module")
def float_model():
    model = MobileNetV1(num_classes=10, width_multiplier=0.25, stem_stride=1, dropout_rate=0.0)
    return model, random_variables(model, SIZE)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).uniform(-1, 1, (48, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def quantized(float_model, images):
    model, variables = float_model
    return ptq.quantize(model, variables, "tf8_per_tensor", images, batch_size=16, progress=False)


def _uncalibrated(quantized: QuantizedModel) -> QuantizedModel:
    fresh = ptq.empty_ranges(quantized.model)
    return dataclasses.replace(quantized, variables={**quantized.variables, "quant_ranges": fresh})


# --- one-call PTQ: the calibration forms -----------------------------------------------------


def test_array_iterable_and_factory_calibrate_identical_ranges(float_model, images, quantized):
    model, variables = float_model
    batches = [images[i : i + 16] for i in range(0, len(images), 16)]
    from_list = ptq.quantize(
        model, variables, ptq.RECIPES["tf8_per_tensor"], batches, progress=False
    )
    from_factory = ptq.quantize(
        model,
        variables,
        "tf8_per_tensor",
        lambda: ({"image": b, "mask": np.ones(len(b))} for b in batches),
        progress=False,
    )
    expected = quantized.variables["quant_ranges"]
    for other in (from_list, from_factory):
        same = jax.tree.map(np.array_equal, expected, other.variables["quant_ranges"])
        assert all(jax.tree.leaves(same))
    assert quantized.info["calibration_images"] == len(images)
    assert np.isfinite(expected["input_quant"]["min"]) and expected["input_quant"]["count"] == 3


@pytest.mark.parametrize(
    "calibration,error,words",
    [
        ("folder:imagenet_val500", TypeError, "got str"),
        (np.zeros((SIZE, SIZE, 3), np.float32), ValueError, f"got shape ({SIZE}, {SIZE}, 3)"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), TypeError, "dtype uint8"),
        ({"image": np.zeros((2, SIZE, SIZE, 3), np.float32)}, TypeError, "got dict"),
        ([("not", "a batch")], TypeError, "batch 0 must be a dict"),
        (lambda: 5, TypeError, "must return an iterable of batches, got int"),
        (7, TypeError, "got int"),
    ],
)
def test_wrong_calibration_types_say_what_was_expected(float_model, calibration, error, words):
    model, variables = float_model
    with pytest.raises(error, match="calibration") as info:
        ptq.quantize(model, variables, "tf8_per_tensor", calibration, progress=False)
    assert words in str(info.value)


def test_recipe_by_name_or_object_only(float_model, images):
    model, variables = float_model
    with pytest.raises(ValueError, match="unknown PTQ recipe 'tf8'.*tf8_per_tensor"):
        ptq.quantize(model, variables, "tf8", images, progress=False)
    with pytest.raises(TypeError, match="recipe must be a PTQRecipe .* got dict"):
        ptq.quantize(model, variables, {"scheme": "tf8"}, images, progress=False)


def test_quantize_post_training_takes_a_factory_only(float_model, images):
    model, variables = float_model
    one_shot = iter([{"image": images}])
    with pytest.raises(TypeError, match="zero-argument callable.*got list_iterator.*consumed once"):
        ptq.quantize_post_training(model, variables, "tf8_per_tensor", one_shot)
    # A recipe name is resolved there too, and plain image arrays are batches.
    q = ptq.quantize_post_training(
        model, variables, "tf8_per_tensor", lambda: [images[:16], images[16:]], progress=False
    )
    assert q.recipe == ptq.RECIPES["tf8_per_tensor"]
    assert q.info["calibration_images"] == len(images)


# --- the quantized model's three passes ------------------------------------------------------


def test_logits_in_three_modes(float_model, images, quantized):
    model, variables = float_model
    float_logits = quantized.logits(images, "float", batch_size=20)  # 20, 20, 8 padded to 20
    fake = quantized.logits(images, "fake")
    integer = quantized.logits(images, mode="integer")
    assert float_logits.shape == fake.shape == integer.shape == (len(images), 10)
    # "float" is the folded float network: the unfolded model's logits up to rounding.
    reference = np.asarray(jax.jit(model.apply)(variables, images))
    np.testing.assert_allclose(float_logits, reference, rtol=1e-3, atol=1e-3)
    assert not np.allclose(fake, float_logits, atol=1e-4)  # 8-bit rounding shows
    agree = np.mean(fake.argmax(1) == integer.argmax(1))
    assert agree >= 0.9, agree
    # The integer logits lie on the last layer's output grid.
    last = quantized.to_integer().layers[-1]
    codes = integer / np.float32(last.output_scale) + last.output_zero_point
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantized.logits(images, "int8")
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\]"):
        quantized.logits(images[0])


def test_dynamic_ranges_need_no_calibration(float_model, images):
    model, variables = float_model
    q = ptq.quantize(model, variables, "tf8_dynamic_ranges", None, progress=False)
    fake, reference = q.logits(images[:8], "fake"), q.logits(images[:8], "float")
    assert np.all(np.isfinite(fake)) and not np.array_equal(fake, reference)
    # The pool is re-rounded on each image's own grid: 6.4 % of the largest logit here; the
    # old scale-1 grid of a never-observed range rounded the pooled means to integers.
    np.testing.assert_allclose(fake, reference, atol=0.1 * np.abs(reference).max())


# --- guards against uncalibrated ranges ------------------------------------------------------


def test_uncalibrated_ranges_raise_eagerly_naming_the_layer(quantized, images):
    bad = _uncalibrated(quantized)
    with pytest.raises(ValueError, match="'input_quant' is not finite.*never calibrated"):
        bad.model.apply(bad.variables, images[:2], quant_mode="fake")
    with pytest.raises(ValueError, match="not finite.*never calibrated"):
        bad.logits(images[:2])
    with pytest.raises(ValueError, match="never calibrated"):
        ptq.fake_quant_logits_fn(bad)
    # One later layer left uncalibrated is named with its path.
    ranges = jax.tree.map(np.asarray, quantized.variables["quant_ranges"])
    ranges["Conv2d_1"]["depthwise"]["act_quant"] = ptq.empty_ranges(quantized.model)["Conv2d_0"][
        "act_quant"
    ]
    partial = {**quantized.variables, "quant_ranges": ranges}
    with pytest.raises(ValueError, match="'Conv2d_1/depthwise/act_quant' is not finite"):
        quantized.model.apply(partial, images[:1], quant_mode="fake")


def test_uncalibrated_ranges_under_jit_give_nan_not_zeros(quantized, images):
    bad = _uncalibrated(quantized)
    out = jax.jit(lambda v, x: bad.model.apply(v, x, quant_mode="fake"))(bad.variables, images[:2])
    assert np.all(np.isnan(np.asarray(out)))
    scale, _ = qparams(np.float32(np.inf), np.float32(-np.inf), UINT8)
    assert np.isnan(scale)
    scale, zp = qparams(np.float32(-1.0), np.float32(3.0), UINT8)
    assert np.isclose(scale, 4.0 / 255) and zp == 64


def test_quant_delay_keeps_gradients_finite_before_ranges_are_observed(images):
    # QAT before its quant delay ends: the range unobserved (NaN scale), the fake-quant masked
    # by a traced quant_active; the NaN must not leak into the output or the gradient.
    quantizer = ActQuant(QuantConfig())
    fresh = quantizer.init(jax.random.key(0), images[:2])

    def loss(x, active):
        return (quantizer.apply(fresh, x, quant_mode="qat", quant_active=active) ** 2).sum()

    x = images[:2]
    value, grad = jax.jit(jax.value_and_grad(loss))(x, np.bool_(False))
    np.testing.assert_allclose(value, (x**2).sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-6)
    assert np.all(np.isnan(jax.jit(loss)(x, np.bool_(True))))  # active: the NaN shows


# --- smaller frictions -----------------------------------------------------------------------


def test_dropout_without_rng_says_what_to_pass(float_model, images):
    model, variables = float_model
    with_dropout = model.clone(dropout_rate=0.001)
    no_rng = jax.jit(lambda v, x: with_dropout.apply(v, x, train=True, mutable=["batch_stats"]))
    with pytest.raises(ValueError, match=r"rngs=\{'dropout': key\}.*dropout_rate=0"):
        no_rng(variables, images[:2])  # raised while tracing
    train = jax.jit(
        lambda v, x, key: with_dropout.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )[0]
    )
    logits = train(variables, images[:2], jax.random.key(0))
    assert logits.shape == (2, 10)


def test_analysis_exports_and_alpha_default_eps(float_model):
    from qfsep_jax import analysis

    for name in ("sqnr_curve", "integer_pass_fn", "measure_sqnr", "layerwise_agreement"):
        assert callable(getattr(analysis, name)), name
    _, variables = float_model
    assert analysis.bn_alphas(variables) == analysis.bn_alphas(variables, eps=1e-3)
    assert analysis.bn_alphas(variables) != analysis.bn_alphas(variables, eps=1.0)


def test_quiet_mode(float_model, images, capsys, caplog, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model, variables = float_model
    few = images[:16]
    caplog.set_level(logging.INFO)
    ptq.quantize(model, variables, "tf8_per_tensor", few, batch_size=8, progress=True)
    assert "calibrate" in capsys.readouterr().err  # the control: a bar is drawn
    assert any(r.name == "qfsep_jax.ptq" for r in caplog.records)
    caplog.clear()
    logging.getLogger("qfsep_jax").setLevel(logging.WARNING)
    try:
        ptq.quantize(model, variables, "tf8_per_tensor", few, batch_size=8, progress=False)
    finally:
        logging.getLogger("qfsep_jax").setLevel(logging.NOTSET)
    assert capsys.readouterr().err == ""
    assert not [r for r in caplog.records if r.name.startswith("qfsep_jax")]


# --- the official model and the data helpers (shared data) -----------------------------------


def test_load_official_in_one_call(tmp_path):
    from qfsep_jax.importers.tfslim import load_official

    require(FLOAT_GRAPH)
    model, variables = load_official(DATA_DIR, depthwise_impl="lax")
    assert model.dropout_rate == 0.0 and model.depthwise_impl == "lax"
    assert model.num_classes == 1001 and set(variables) == {"params", "batch_stats"}
    with pytest.raises(FileNotFoundError, match="data directory not found.*data_dir="):
        load_official(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"not found: .*models/.*data_dir="):
        load_official(str(tmp_path))


def test_data_helpers_on_real_images(tmp_path):
    from qfsep_jax.data import class_names, eval_batches, load_images

    require("imagenet_val500")
    images, labels = load_images("folder:imagenet_val500", DATA_DIR, image_size=48, limit=10)
    assert images.shape == (10, 48, 48, 3) and images.dtype == np.float32
    assert -1.0 <= images.min() < 0.0 < images.max() <= 1.0
    names = class_names("imagenet1001", DATA_DIR)
    assert len(names) == 1001 and names[0] == "background" and names[1].startswith("tench")
    assert labels.dtype == np.int32 and set(labels) <= set(range(1, 1001))
    wnids = set(os.listdir(os.path.join(DATA_DIR, "imagenet_val500")))
    synsets = open(os.path.join(DATA_DIR, "labels", "imagenet_synsets.txt")).read().split()
    assert {names[synsets.index(w) + 1] for w in wnids} == set(class_names("imagenette", DATA_DIR))
    data = eval_batches("folder:imagenet_val500", DATA_DIR, 48, batch_size=4, limit=10, uint8=True)
    assert (data.num_examples, data.num_batches) == (10, 3)
    batch = next(iter(data.make()))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 48, 48, 3)
    with pytest.raises(FileNotFoundError, match="data directory not found.*data_dir"):
        load_images(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no fixed class names"):
        class_names("folder", DATA_DIR)


def test_importing_data_loads_no_tensorflow():
    code = (
        "import sys, qfsep_jax.data, qfsep_jax.data.input, qfsep_jax.data.labels\n"
        "from qfsep_jax.data import eval_batches, load_images, class_names\n"
        "print('tensorflow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_launch_list_names_every_job_and_config():
    import ast

    env = {**os.environ, "PYTHONPATH": REPO}
    main = os.path.join(REPO, "launch", "main.py")
    for args in (["--list"], []):
        out = subprocess.run(
            [sys.executable, main, *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
        tree = ast.parse(open(main).read())
        jobs = next(
            ast.literal_eval(n.value)
            for n in tree.body
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "JOBS"
        )
        listed = out.stdout.splitlines()
        for job in jobs:
            assert any(line.split()[:1] == [job] for line in listed), job
        for name in os.listdir(os.path.join(REPO, "configs")):
            text = open(os.path.join(REPO, "configs", name)).read() if name.endswith(".py") else ""
            has = "\ndef get_config(" in text
            assert has == any(f"configs/{name}" in line for line in listed), name
