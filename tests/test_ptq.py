"""Post-training quantization pipeline and the Table 1 job."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qfsep_jax import ptq
from qfsep_jax.models import MobileNetV1
from tests.conftest import REPO, require


def _model_and_vars(seed=0):
    model = MobileNetV1(num_classes=5, width_multiplier=0.25, depthwise_impl="lax")
    v = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    return model, {"params": v["params"], "batch_stats": v["batch_stats"]}


def _batches(n_batches=2, bs=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.uniform(-1, 1, (bs, 32, 32, 3)).astype(np.float32), "mask": np.ones(bs)}
        for _ in range(n_batches)
    ]


def test_calibration_ignores_padding_and_validates():
    model, v = _model_and_vars()
    qmodel, folded, _ = ptq.prepare_folded(model, v, ptq.RECIPES["tf8_per_tensor"])
    batches = _batches()
    ref = ptq.calibrate(qmodel, folded, batches)
    padded = [dict(b) for b in batches]
    padded[1]["image"] = np.concatenate([batches[1]["image"], np.full((2, 32, 32, 3), 50.0)])
    padded[1]["mask"] = np.array([1, 1, 1, 1, 0, 0])
    got = ptq.calibrate(qmodel, folded, padded)
    jax.tree.map(np.testing.assert_array_equal, got["quant_ranges"], ref["quant_ranges"])
    with pytest.raises(ValueError, match="no images"):
        ptq.calibrate(qmodel, folded, [])
    with pytest.raises(ValueError, match="not finite"):
        bad = [{"image": np.full((2, 32, 32, 3), np.nan, np.float32), "mask": np.ones(2)}]
        ptq.calibrate(qmodel, folded, bad)


def test_per_channel_beats_per_tensor_on_unequal_channels():
    model, v = _model_and_vars()
    k = np.asarray(v["params"]["Conv2d_1"]["depthwise"]["kernel"]).copy()
    k[..., 0] *= 100.0  # one outlier channel, as zero-variance folding produces
    v["params"]["Conv2d_1"]["depthwise"]["kernel"] = jnp.asarray(k)
    x = _batches(1, 8, seed=1)[0]["image"]
    ref = np.asarray(ptq.float_logits_fn(model, v)(x))
    errors = {}
    for name in ("tf8_per_tensor", "per_channel"):
        qm = ptq.quantize_post_training(model, v, ptq.RECIPES[name], lambda: _batches())
        out = np.asarray(ptq.fake_quant_logits_fn(qm)(x))
        errors[name] = float(np.mean((out - ref) ** 2))
    assert errors["per_channel"] < errors["tf8_per_tensor"] / 2, errors


def test_recipes_and_errors():
    assert set(ptq.RECIPES) >= {"tf8_per_tensor", "tf8_zero_variance_fix", "per_channel"}
    with pytest.raises(ValueError, match="unknown PTQ recipe"):
        ptq.recipe_by_name("fp4")
    model, v = _model_and_vars()
    qm, folded, _ = ptq.prepare_folded(model, v, ptq.RECIPES["tf8_per_tensor"])
    with pytest.raises(ValueError, match="unfolded"):
        ptq.prepare_folded(qm, folded, ptq.RECIPES["tf8_per_tensor"])


def test_zero_variance_scope_of_the_recipes(tmp_path):
    from qfsep_jax.quantized import PTQRecipe, QuantizedModel, load_quantized, save_quantized

    with pytest.raises(ValueError, match="zero_variance_scope must be one of"):
        PTQRecipe(zero_variance_fix=True, zero_variance_scope="pointwise")
    assert ptq.RECIPES["tf8_zero_variance_fix"].zero_variance_scope == "depthwise"
    assert ptq.RECIPES["tf8_zero_variance_fix_all"].zero_variance_scope == "all"
    model = MobileNetV1(num_classes=5, width_multiplier=0.25, depthwise_impl="lax")
    # Shapes only (no compile): prepare_folded reads the tree, it runs no layer.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    v = jax.tree.map(lambda s: np.ones(s.shape, np.float32), dict(shapes))
    stats = v["batch_stats"]
    for block, conv in (("Conv2d_2", "depthwise"), ("Conv2d_3", "pointwise")):
        var = np.asarray(stats[block][conv]["bn_var"]).copy()
        var[[0, 3]] = 0.0
        stats[block][conv]["bn_var"] = jnp.asarray(var)
    infos = {}
    for name in ("tf8_zero_variance_fix", "tf8_zero_variance_fix_all"):
        _, folded, infos[name] = ptq.prepare_folded(model, v, ptq.RECIPES[name])
    assert infos["tf8_zero_variance_fix"]["zero_variance_scope"] == "depthwise"
    assert infos["tf8_zero_variance_fix"]["zero_variance_channels"] == {
        "Conv2d_2/depthwise": [0, 3]
    }
    assert infos["tf8_zero_variance_fix_all"]["zero_variance_scope"] == "all"
    assert infos["tf8_zero_variance_fix_all"]["zero_variance_channels"] == {
        "Conv2d_2/depthwise": [0, 3],
        "Conv2d_3/pointwise": [0, 3],
    }

    # A model.json written before the recipe had a scope: that model was fixed on all layers.
    qmodel, folded, _ = ptq.prepare_folded(model, v, ptq.RECIPES["tf8_zero_variance_fix"])
    directory = tmp_path / "exported"
    save_quantized(
        QuantizedModel(qmodel, folded, ptq.RECIPES["tf8_zero_variance_fix"], {}), str(directory)
    )
    assert load_quantized(str(directory)).recipe.zero_variance_scope == "depthwise"
    desc = json.loads((directory / "model.json").read_text())
    del desc["recipe"]["zero_variance_scope"]
    (directory / "model.json").write_text(json.dumps(desc))
    assert load_quantized(str(directory)).recipe.zero_variance_scope == "all"


def _main(workdir, *overrides):
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "main.py"),
        "--config",
        os.path.join(REPO, "configs", "reproduce_table1.py"),
        "--workdir",
        str(workdir),
        f"--config.data_dir={require('.')}",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)


def _calibration_folder(root, n=6):
    """``root/<wnid>/``: the first ``n`` classes of imagenet_calib1000 (one image each) and a
    broken JPEG in the first class."""
    src = require("imagenet_calib1000")
    wnids = sorted(os.listdir(src))[:n]
    for wnid in wnids:
        shutil.copytree(os.path.join(src, wnid), root / wnid)
    (root / wnids[0] / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_table1_job_end_to_end(tmp_path):
    """The job on 10 images, calibrated on 7 files of which one is corrupt (skipped).

    Mutation that used to pass: every imported weight set to 0 (float top-1 0.00); the float row
    must now score as the model does. And num_calibration_images counts the images that decoded
    (it reported the files asked for)."""
    calib = _calibration_folder(tmp_path / "calib")
    proc = _main(
        tmp_path,
        "--config.limit=10",
        "--config.num_calibration_images=10",
        "--config.eval_batch_size=10",
        "--config.rows=('float', 'tf8_per_tensor')",
        f"--config.calibration_data=folder:{calib}",
        "--config.on_corrupt=skip",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert [r["name"] for r in results["rows"]] == ["float", "tf8_per_tensor"]
    for row in results["rows"]:
        assert row["n"] == 10 and 0.0 <= row["top1"] <= row["top5"] <= 100.0
    # The official float model on the first 10 images of imagenet_val500 (1001-way; chance 0.1 %):
    # 70 % measured.
    assert results["rows"][0]["top1"] >= 50.0, results["rows"][0]
    assert results["num_calibration_images"] == 6 and results["calibration_skipped_corrupt"] == 1
    assert "paper top1" in proc.stdout and "tf8_per_tensor" in proc.stdout
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_table1_job_rejects_bad_config(tmp_path):
    proc = _main(tmp_path, "--config.no_such_field=1")
    assert proc.returncode == 2 and "no_such_field" in proc.stderr
    proc = _main(tmp_path, "--config.rows=('float', 'tf3')", "--config.limit=2")
    assert proc.returncode == 2 and "config.rows=('float', 'tf3'): 'tf3' is not" in proc.stderr
    proc = _main(tmp_path, "--config.data_dir=/nonexistent/data")
    assert proc.returncode == 2 and "/nonexistent/data" in proc.stderr
    assert not os.path.exists(tmp_path / "results.json")


def test_score_quantized_scores_both_passes_and_keeps_an_integer_failure(monkeypatch):
    """The one scorer of quantized models that the Table 1 and Figure 5 jobs share."""
    from qfsep_jax import evaluation, integer
    from qfsep_jax.data.input import EvalInput
    from qfsep_jax.jobs import common

    model, v = _model_and_vars()
    batches = _batches(2, 4, seed=3)
    labels = np.random.default_rng(3).integers(0, 5, size=(2, 4))
    for b, y in zip(batches, labels, strict=True):
        b["label"] = y
    data = EvalInput(make=lambda: iter(batches), num_examples=8, num_batches=2, name="toy")
    qmodel = ptq.quantize_post_training(model, v, ptq.RECIPES["tf8_per_tensor"], lambda: batches)

    scores = common.score_quantized(qmodel, data, integer_pass=True, desc="toy")
    want_fq = evaluation.evaluate(ptq.fake_quant_logits_fn(qmodel), iter(batches), 2)
    int_fn = integer.logits_fn(integer.from_quantized(qmodel))
    want_int = evaluation.evaluate(int_fn, iter(batches), 2)
    assert scores == {"fake_quant": want_fq, "integer": want_int}
    assert common.score_quantized(qmodel, data, integer_pass=False, desc="toy")["integer"] is None

    def refuse(_):
        raise ValueError("int32 accumulator bound exceeded in Conv2d_3")

    monkeypatch.setattr(common.integer, "from_quantized", refuse)
    scores = common.score_quantized(qmodel, data, integer_pass=True, desc="toy")
    assert scores["fake_quant"] == want_fq and scores["integer"] is None
    assert "Conv2d_3" in scores["integer_error"]
