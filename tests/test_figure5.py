"""The figure5 job at tiny scale: train 1 step, PTQ, scores, SQNR, resume, summary, errors."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import figure5 as figure5_config
from qfsep_jax.jobs import figure5
from tools import collect_results


def tiny_config(data_dir, **fields):
    c = figure5_config.get_config("tiny")
    c.data_dir = data_dir
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """The whole pipeline once, for the variant with the most options (qf block, ReLU, L2)."""
    workdir = str(tmp_path_factory.mktemp("figure5"))
    config = tiny_config(
        data_dir, variants=("qf_relu_l2dw",), ptq_rows=("tf8_zero_variance_fix", "per_channel")
    )
    return config, workdir, figure5.run(config, workdir)


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_tiny_pipeline_writes_every_result(tiny_run):
    config, workdir, result = tiny_run
    assert result["actions"] == {
        f"qf_relu_l2dw/seed0/{s}": "ran" for s in ("train", "evaluate", "sqnr", "ptq_rows")
    }
    run = os.path.join(workdir, "qf_relu_l2dw", "seed0")
    trained = _read(os.path.join(run, "train", "results.json"))
    assert trained["final_step"] == trained["total_steps"] == 1
    used = _read(os.path.join(run, "train", "config.json"))  # the variant's config, overridden
    assert used["model"]["block"] == "qf" and used["model"]["activation"] == "relu"
    assert used["depthwise_weight_decay"] > 0 and used["image_size"] == 32 and used["seed"] == 0

    scores = _read(os.path.join(run, "results.json"))
    kinds = ["float", "fake_quant", "integer"]
    for kind in kinds:
        assert scores[kind]["n"] == 8 and 0.0 <= scores[kind]["top1"] <= 100.0
    assert (
        scores["ptq_recipe"]["scheme"] == "tf8" and not scores["ptq_recipe"]["per_channel_weights"]
    )
    assert scores["num_calibration_images"] == 8
    assert scores["eval_data"] == "folder:imagenette/val"
    # kept with the scores: the checkpoints they are counted from do not outlive the machine
    assert scores["zero_variance_channels"] is None and scores["max_depthwise_alpha"] is None

    sqnr = _read(os.path.join(run, "sqnr.json"))
    layers = list(sqnr["fake_quant"])
    assert layers[0] == "Conv2d_0" and layers[-1] == "Logits" and len(layers) == 28
    assert all(row["num_images"] == 4 for row in sqnr["fake_quant"].values())
    if "integer" in kinds:
        assert list(sqnr["integer"]) == layers

    rows = _read(os.path.join(run, "ptq_rows.json"))["rows"]
    assert list(rows) == ["tf8_zero_variance_fix", "per_channel"]
    assert rows["per_channel"]["recipe"]["per_channel_weights"]
    for row in rows.values():
        assert row["fake_quant"]["n"] == 8 and row["integer"]["n"] == 8
    # No BN after the QF block's depthwise conv: the fix changes nothing, so it scores exactly
    # as the evaluate step's TF8 per-tensor model did.
    assert rows["tf8_zero_variance_fix"]["zero_variance_fixed"] == {}
    assert rows["tf8_zero_variance_fix"]["zero_variance_threshold"] == 1e-10
    for kind in ("fake_quant", "integer"):
        assert rows["tf8_zero_variance_fix"][kind]["top1"] == scores[kind]["top1"]

    summary = _read(os.path.join(workdir, "summary.json"))
    s = summary["variants"]["qf_relu_l2dw"]
    assert s["ptq_rows"]["seeds"] == [0]
    assert s["ptq_rows"]["recipes"]["per_channel"]["fake_quant"]["values"] == [
        rows["per_channel"]["fake_quant"]["top1"]
    ]
    assert s["ptq_rows"]["recipes"]["tf8_per_tensor"]["integer"]["values"] == [
        scores["integer"]["top1"]
    ]
    assert s["float_top1"]["values"] == [scores["float"]["top1"]] and s["num_seeds"] == 1
    assert s["paper"] == {"float": 70.77, "8bit": 68.03}
    assert s["zero_variance_channels"] == [None]  # the QF block has no BN after its DW conv
    assert summary["sqnr"]["qf_relu_l2dw"]["Conv2d_0"] == pytest.approx(
        sqnr["fake_quant"]["Conv2d_0"]["sqnr_db"]
    )
    assert "1 steps, batch 8" in summary["description"]
    for png in ("figure5_accuracy.png", "figure5_sqnr.png", "figure5_curves.png"):
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(4) == b"\x89PNG"


def test_rerun_skips_every_finished_step(tiny_run):
    config, workdir, _ = tiny_run
    results = os.path.join(workdir, "qf_relu_l2dw", "seed0", "results.json")
    before = os.stat(results).st_mtime_ns
    again = figure5.run(config, workdir)
    assert set(again["actions"].values()) == {"skipped"} and len(again["actions"]) == 4
    assert os.stat(results).st_mtime_ns == before
    # Another variance threshold for the fix adds its own row and keeps every other row.
    rows_path = os.path.join(workdir, "qf_relu_l2dw", "seed0", "ptq_rows.json")
    before_rows = _read(rows_path)["rows"]
    changed = tiny_config(
        config.data_dir,
        variants=config.variants,
        ptq_rows=config.ptq_rows,
        zero_variance_threshold=1e-6,
    )
    again = figure5.run(changed, workdir)
    assert again["actions"]["qf_relu_l2dw/seed0/ptq_rows"] == "ran"
    rows = _read(rows_path)["rows"]
    assert list(rows) == [*before_rows, "tf8_zero_variance_fix@1e-06"]
    assert rows["tf8_zero_variance_fix@1e-06"]["zero_variance_threshold"] == 1e-6
    assert {k: rows[k] for k in before_rows} == before_rows
    summary = _read(os.path.join(workdir, "summary.json"))["variants"]["qf_relu_l2dw"]
    assert "tf8_zero_variance_fix@1e-06" in summary["ptq_rows"]["recipes"]
    assert figure5.run(changed, workdir)["actions"]["qf_relu_l2dw/seed0/ptq_rows"] == "skipped"
    # Results without their checkpoints (a fresh clone): nothing is retrained.
    shutil.rmtree(os.path.join(workdir, "qf_relu_l2dw", "seed0", "train", "checkpoints"))
    again = figure5.run(config, workdir)
    assert set(again["actions"].values()) == {"skipped"} and len(again["actions"]) == 4
    # A new PTQ row needs the trained model, which is gone: a clear error, nothing rewritten.
    rows = os.path.join(workdir, "qf_relu_l2dw", "seed0", "ptq_rows.json")
    before = _read(rows)
    config = tiny_config(
        data_dir=config.data_dir, variants=config.variants, ptq_rows=("cle_per_tensor",)
    )
    with pytest.raises(RuntimeError, match="'ptq_rows' needs a finished training run"):
        figure5.run(config, workdir)
    assert _read(rows) == before


def test_depthwise_bn_stats_counts_dead_channels():
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1, random_variables

    model = MobileNetV1(num_classes=10, width_multiplier=0.25, block="original")
    variables = random_variables(model, 32)
    assert figure5.depthwise_bn_stats(variables)["zero_variance_channels"] == 0
    stats = variables["batch_stats"]["Conv2d_3"]["depthwise"]
    stats["bn_var"][:2] = 0.0  # numpy leaves
    variables["params"]["Conv2d_3"]["depthwise"]["bn_scale"][:2] = 1.0
    got = figure5.depthwise_bn_stats(variables)
    assert got["zero_variance_channels"] == 2
    assert got["max_depthwise_alpha"] == pytest.approx(1.0 / np.sqrt(1e-3), rel=1e-5)
    qf = MobileNetV1(num_classes=10, width_multiplier=0.25, block="qf")
    assert figure5.depthwise_bn_stats(random_variables(qf, 32)) == {
        "zero_variance_channels": None,
        "max_depthwise_alpha": None,
    }


def test_dead_channel_origins_finds_the_dead_input_of_a_zero_variance_channel():
    from qfsep_jax.models.mobilenet_v1 import MobileNetV1, random_variables
    from tools import figure5_dead_channels as dead

    assert dead.input_layer("Conv2d_1_depthwise") == "Conv2d_0"
    assert dead.input_layer("Conv2d_12_depthwise") == "Conv2d_11_pointwise"
    model = MobileNetV1(num_classes=10, width_multiplier=0.25, block="original")
    variables = random_variables(model, 32)
    # Channel 3 of Conv2d_0 cut off for every input (BN offset far below zero), and the moving
    # variance of the depthwise BN that reads it at zero, as training would leave it.
    variables["params"]["Conv2d_0"]["bn_bias"][3] = -1e3
    variables["batch_stats"]["Conv2d_1"]["depthwise"]["bn_var"][3] = 0.0
    images = np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
    batches = [
        {"image": images[:4], "mask": np.ones(4)},
        {"image": np.concatenate([images[4:], np.zeros_like(images[:2])]), "mask": [1, 1, 0, 0]},
    ]
    maxima = dead.channel_maxima(model, variables, batches)
    assert maxima["Conv2d_0"][3] == 0.0 and np.all(np.delete(maxima["Conv2d_0"], 3) > 0)
    layers = dead.dead_channel_origins(variables, maxima, model.bn_epsilon)
    assert layers["Conv2d_1_depthwise"]["zero_variance"] == [3]
    assert layers["Conv2d_1_depthwise"]["dead_input"] == [3]
    assert layers["Conv2d_1_depthwise"]["zero_variance_with_dead_input"] == [3]
    assert layers["Conv2d_1_depthwise"]["dead_input_variance"] == [0.0]
    got = dead.totals(layers)
    assert got["zero_variance"] == got["zero_variance_with_dead_input"] == 1


def test_per_epoch_curves_weight_windows_by_their_steps():
    from qfsep_jax.analysis import curves

    rows = [
        {"step": 4, "train_loss": 2.0, "train_accuracy": 0.1},
        {"step": 10, "train_loss": 1.0, "train_accuracy": 0.4, "eval_top1": 30.0},
        {"step": 20, "train_loss": 0.5, "train_accuracy": 0.5, "eval_top1": 50.0},
    ]
    c = curves.per_epoch(rows, steps_per_epoch=10)
    assert c["epoch"] == [1, 2] and c["eval_epoch"] == [1, 2] and c["eval_top1"] == [30.0, 50.0]
    assert c["train_loss"] == pytest.approx([(4 * 2.0 + 6 * 1.0) / 10, 0.5])
    assert c["train_accuracy"] == pytest.approx([100 * (4 * 0.1 + 6 * 0.4) / 10, 50.0])
    per_epoch_rows = [{"epoch": 1, "step": 7, "train_loss": 3.0, "train_accuracy": 0.2}]
    assert curves.per_epoch(per_epoch_rows, 1)["train_loss"] == [3.0]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        curves.per_epoch(rows, 0)


def test_readme_table_from_the_summary(tiny_run):
    _, workdir, _ = tiny_run
    summary_path = os.path.join(workdir, "summary.json")
    tables = collect_results.format_figure5(_read(summary_path), summary_path)
    assert set(tables) == {
        "figure5",
        "figure5_sqnr",
        "figure5_expected",
        "figure5_expected_qf_relu_l2dw",
        "figure5_ptq_rows",
    }
    assert "| `qf_relu_l2dw` | DW→PW→BN→ReLU, L2 on DW weights | 1 |" in tables["figure5"]
    assert "qf_relu_l2dw top-1 %" in tables["figure5_expected_qf_relu_l2dw"]
    assert "| `Conv2d_0` |" in tables["figure5_sqnr"]
    header = "| variant | seeds | float top-1 % | `tf8_per_tensor` | `tf8_zero_variance_fix` |"
    assert header + " `per_channel` |" in tables["figure5_ptq_rows"]


def test_summary_over_seeds_and_variants(tmp_path, data_dir):
    """Aggregation on hand-made run files (two variants × two seeds): mean, std, curves."""
    config = tiny_config(data_dir, seeds=(0, 1), steps=("summary",))
    top1 = {("original", 0): 10.0, ("original", 1): 20.0, ("qf_relu_l2dw", 0): 50.0}
    for (variant, seed), value in top1.items():
        d = tmp_path / variant / f"seed{seed}"
        d.mkdir(parents=True)
        res = {
            k: {"top1": value + i, "top5": 99.0, "n": 8}
            for i, k in enumerate(["float", "fake_quant"])
        }
        dead = {"zero_variance_channels": seed * 3, "max_depthwise_alpha": 3.2 + 28.4 * seed}
        extra = dead if variant == "original" else {}
        (d / "results.json").write_text(json.dumps({**res, "integer": None, **extra}))
        sq = {"fake_quant": {"Conv2d_0": {"sqnr_db": value}, "Logits": {"sqnr_db": None}}}
        (d / "sqnr.json").write_text(json.dumps(sq))
    # Only seed 1 of the original block ran the further PTQ recipes.
    fix = {"fake_quant": {"top1": 19.0}, "integer": None, "zero_variance_fixed": {"a": [1]}}
    rows = {"rows": {"tf8_zero_variance_fix": fix}}
    (tmp_path / "original" / "seed1" / "ptq_rows.json").write_text(json.dumps(rows))
    result = figure5.run(config, str(tmp_path))
    assert result["actions"] == {}
    v = result["summary"]["variants"]
    assert v["original"]["float_top1"]["mean"] == pytest.approx(15.0)
    assert v["original"]["float_top1"]["std"] == pytest.approx(np.std([10.0, 20.0]))
    assert v["original"]["fake_quant_top1"]["values"] == [11.0, 21.0]
    assert v["original"]["integer_top1"] is None and v["original"]["seeds"] == [0, 1]
    assert v["original"]["zero_variance_channels"] == [0, 3]  # read from each run's results
    assert v["qf_relu_l2dw"]["num_seeds"] == 1
    assert result["summary"]["sqnr"]["original"] == {"Conv2d_0": 15.0}  # None layers dropped
    assert v["original"]["sqnr_fake_quant_std"]["Conv2d_0"] == pytest.approx(5.0)
    assert _read(tmp_path / "original" / "results.json")["float_top1"]["n"] == 2
    table = collect_results.format_figure5(result["summary"], "summary.json")["figure5"]
    row = "| `original` | DW→BN→ReLU6→PW→BN→ReLU6 | 2 | 0/3 | 3/32 | 15.00 ± 5.00 | 16.00 ± 5.00 |"
    assert row in table
    # The PTQ-rows table compares recipes over the seeds that ran them all: seed 1 only.
    rows = v["original"]["ptq_rows"]
    assert rows["seeds"] == [1] and rows["float_top1"]["values"] == [20.0]
    assert rows["recipes"]["tf8_per_tensor"]["fake_quant"]["values"] == [21.0]
    assert rows["recipes"]["tf8_zero_variance_fix"]["fake_quant"]["values"] == [19.0]
    assert v["qf_relu_l2dw"]["ptq_rows"] is None
    table = collect_results.format_figure5(result["summary"], "summary.json")["figure5_ptq_rows"]
    assert "| `original` | 1 | 20.00 | 21.00 | 19.00 |" in table


def test_bad_configs_fail_clearly(tmp_path, data_dir):
    with pytest.raises(ValueError, match="config.steps=.*'fly' is not one of"):
        figure5.run(tiny_config(data_dir, steps=("train", "fly")), str(tmp_path))
    config = tiny_config(data_dir)
    config.train_overrides.model.widht = 1.0
    with pytest.raises(KeyError, match="no field 'model.widht'"):
        figure5.run(config, str(tmp_path))
    config = tiny_config(data_dir, variants=("original", "nope"))
    with pytest.raises(ValueError, match="config.variants=.*'nope' is not one of"):
        figure5.run(config, str(tmp_path))
    with pytest.raises(RuntimeError, match="needs a finished training run"):
        figure5.run(tiny_config(data_dir, steps=("evaluate",)), str(tmp_path))
    with pytest.raises(ValueError, match="config.ptq_rows=.*'tf9' is not one of"):
        figure5.run(tiny_config(data_dir, ptq_rows=("tf9",)), str(tmp_path))
    with pytest.raises(ValueError, match="config.zero_variance_threshold="):
        figure5.run(tiny_config(data_dir, zero_variance_threshold=-1.0), str(tmp_path))
    with pytest.raises(TypeError, match="integer"):  # the ConfigDict refuses a non-bool
        tiny_config(data_dir, integer="maybe")
    assert not figure5.train_done(str(tmp_path / "nothing"))
    halted = tmp_path / "halted"
    halted.mkdir()
    (halted / "results.json").write_text(json.dumps({"final_step": 3, "total_steps": 10}))
    assert not figure5.train_done(str(halted))


def test_recipe_screen_counts_dead_channels_of_a_halted_run(tmp_path, data_dir):
    from tools import figure5_recipe_screen as screen

    with pytest.raises(ValueError, match="unknown figure5 config variant"):
        screen.main(["--recipes", "tiny,no_such_recipe", "--data_dir", data_dir])
    workdir = str(tmp_path / "screen")
    screen.main(
        ["--recipes", "tiny", "--epochs", "0.01", "--data_dir", data_dir, "--workdir", workdir]
    )
    rows = _read(os.path.join(workdir, "screen.json"))["rows"]
    assert [(r["recipe"], r["seed"], r["step"]) for r in rows] == [("tiny", 0, 1)]
    per_layer = rows[0]["zero_variance_per_layer"]
    assert len(per_layer) == 13  # one count per depthwise BN of the original block
    assert rows[0]["zero_variance_channels"] == sum(per_layer.values())
    assert rows[0]["max_depthwise_alpha"] > 0
    assert sum(rows[0]["below_epsilon_per_layer"].values()) == rows[0]["below_epsilon_channels"]
    assert os.path.isfile(os.path.join(workdir, "screen.png"))
    # The halted run sits where the figure5 job of that recipe resumes it.
    assert figure5.train_done(os.path.join(workdir, "tiny", "original", "seed0", "train"))
