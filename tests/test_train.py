"""Training: losses/schedules/optimizers, 8 devices = 1 device, exact resume (after a halt and
after SIGKILL), NaN guard, QAT, failing evaluations that keep the checkpoint, refused restarts.

The end-to-end runs use ``configs/smoke.py`` (MobileNetV1 0.25 at 32 px on real Imagenette
images). Compiled executables go to a per-session persistent cache so that runs sharing a step
function (the resume test's three runs) compile it once.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FLOAT_GRAPH, REPO, require

from configs import smoke
from qfsep_jax import checkpointing, train
from qfsep_jax import quantized as quantized_lib
from qfsep_jax.config_validation import HISTORY_FILE, ConfigError
from qfsep_jax.data import train_input
from qfsep_jax.data.pipeline import CorruptImageError
from qfsep_jax.metrics_log import read_metrics

pytestmark = pytest.mark.usefixtures("compile_cache")


def smoke_config(data_dir, **overrides):
    c = smoke.get_config()
    c.data_dir = data_dir
    c.eval_every_steps = -1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def losses(workdir):
    return {s: r["train_loss"] for s, r in read_metrics(str(workdir)).items()}


# ----------------------------------------------------------------------------------------------
# Pure pieces.


def test_weight_decay_is_tfslim_l2_with_its_own_depthwise_coefficient():
    params = {
        "Conv2d_0": {"kernel": jnp.full((3, 3, 3, 2), 2.0), "bn_scale": jnp.ones(2)},
        "Conv2d_1": {
            "depthwise": {"kernel": jnp.full((3, 3, 1, 2), 3.0), "bias": jnp.ones(2)},
            "pointwise": {"kernel": jnp.full((1, 1, 2, 4), 1.0), "bn_bias": jnp.ones(4)},
        },
        "Logits": {"kernel": jnp.full((1, 1, 4, 5), 0.5), "bias": jnp.ones(5)},
    }
    sq_regular = 54 * 4.0 + 8 * 1.0 + 20 * 0.25  # Conv2d_0, pointwise, Logits kernels
    sq_depthwise = 18 * 9.0
    got = train.weight_decay_loss(params, 1e-2, 0.0)
    np.testing.assert_allclose(got, 1e-2 * sq_regular / 2, rtol=1e-6)
    got = train.weight_decay_loss(params, 1e-2, 1e-3)
    np.testing.assert_allclose(got, 1e-2 * sq_regular / 2 + 1e-3 * sq_depthwise / 2, rtol=1e-6)
    assert float(train.weight_decay_loss(params, 0.0, 0.0)) == 0.0


def test_cross_entropy_with_label_smoothing_matches_formula():
    logits = jnp.asarray([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    labels = jnp.asarray([0, 3])
    logp = jax.nn.log_softmax(logits)
    s = 0.1
    target = np.full((2, 4), s / 4)
    target[0, 0] += 1 - s
    target[1, 3] += 1 - s
    expected = -np.mean(np.sum(target * np.asarray(logp), axis=1))
    got = train.cross_entropy_loss(logits, labels, 4, s)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    plain = -np.mean([logp[0, 0], logp[1, 3]])
    np.testing.assert_allclose(train.cross_entropy_loss(logits, labels, 4), plain, rtol=1e-6)


def test_schedules():
    c = smoke.get_config()
    c.learning_rate, c.lr_schedule = 0.045, "exponential"
    sched = train.learning_rate_schedule(c, steps_per_epoch=100, total_steps=10_000)
    # TF-slim: staircase decay by 0.94 every int(2.5 epochs) = 250 steps.
    for step, k in [(0, 0), (249, 0), (250, 1), (499, 1), (500, 2), (2600, 10)]:
        np.testing.assert_allclose(sched(step), 0.045 * 0.94**k, rtol=1e-6)
    c.lr_schedule, c.warmup_epochs = "cosine", 1.0
    sched = train.learning_rate_schedule(c, steps_per_epoch=100, total_steps=1100)
    np.testing.assert_allclose([sched(0), sched(50), sched(100)], [0.0, 0.0225, 0.045], atol=1e-7)
    np.testing.assert_allclose(sched(600), 0.0225, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(sched(1100), 0.0, atol=1e-9)
    c.lr_schedule = "bogus"
    with pytest.raises(ValueError, match="lr_schedule"):
        train.learning_rate_schedule(c, 100, 1000)


def test_rmsprop_follows_tensorflow_semantics():
    """TF1 RMSProp: ms starts at 1, ms = d*ms + (1-d)*g^2, mom = m*mom + lr*g/sqrt(ms+eps)."""
    c = smoke.get_config()
    c.optimizer, c.rmsprop_decay, c.momentum, c.rmsprop_epsilon = "rmsprop", 0.9, 0.9, 1.0
    tx = train.make_optimizer(c, optax.constant_schedule(0.1))
    w = jnp.asarray([1.0, -2.0, 0.5])
    state = tx.init(w)
    ms, mom, w_ref = np.ones(3), np.zeros(3), np.asarray(w, np.float64)
    rng = np.random.RandomState(0)
    for _ in range(5):
        g = rng.normal(size=3)
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, w)
        w = optax.apply_updates(w, updates)
        ms = 0.9 * ms + 0.1 * g**2
        mom = 0.9 * mom + 0.1 * g / np.sqrt(ms + 1.0)
        w_ref = w_ref - mom
    np.testing.assert_allclose(w, w_ref, rtol=1e-5)
    c.optimizer = "adamw"
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer(c, optax.constant_schedule(0.1))


# ----------------------------------------------------------------------------------------------
# End-to-end runs.


# The smoke network at initialisation is a deep, narrow plain BN net whose gradients explode
# (|g| ~ 60, mostly in the first layers): its training is chaotic. A 1e-6 relative perturbation
# of the initial weights changes the loss by 1e-2 within 2 steps at learning rate 0.01, and by
# ~1e-4 over 10 steps at 1e-6. Float rounding differs between 8 devices (cross-replica means) and
# 1 device, so the comparison runs at learning rate 1e-6, where the updates still move the loss
# (against a run at learning rate 0) by 1e-4 at step 2 and by 1e-3 to 5e-3 from step 6 on.
EQUIVALENCE_LR = 1e-6


@pytest.fixture(scope="module")
def float_runs(data_dir, tmp_path_factory):
    """The same 10-step float run (dropout off) on 8 devices and on 1 device."""
    out = {}
    for n in (8, 1):
        workdir = tmp_path_factory.mktemp(f"float_{n}dev")
        config = smoke_config(
            data_dir,
            total_steps=10,
            num_devices=n,
            learning_rate=EQUIVALENCE_LR,
            checkpoint_every_steps=1,
            keep_checkpoints=10,
        )
        train.train_and_evaluate(config, str(workdir))
        out[n] = workdir
    return out


def _raw_state(workdir, step):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


def _rel_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb, strict=True)))
    return diff / np.sqrt(sum(np.sum(y**2) for y in lb))


def test_eight_devices_match_one_device(float_runs):
    """Mutation that used to pass: every run forced onto one device (the test then compared a
    run with itself). Each run records how many devices it used, and the two runs' states must
    differ in float rounding (identical bits would mean the same computation)."""
    assert jax.local_device_count() >= 8, "conftest must give 8 fake CPU devices"
    for n in (8, 1):
        assert json.loads((float_runs[n] / "results.json").read_text())["num_devices"] == n
    last8, last1 = _raw_state(float_runs[8], 10), _raw_state(float_runs[1], 10)
    assert any(
        np.any(a != b)
        for a, b in zip(
            jax.tree.leaves(last8["params"]), jax.tree.leaves(last1["params"]), strict=True
        )
    )
    l8, l1 = losses(float_runs[8]), losses(float_runs[1])
    assert sorted(l8) == sorted(l1) == list(range(1, 11))
    a, b = np.array([l8[s] for s in l8]), np.array([l1[s] for s in l1])
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert len(set(np.round(a, 6))) > 5, "losses should change from step to step"
    # After step 1 (same initial state), the momentum trace is the device-averaged gradient and
    # the moving BN statistics hold the cross-replica batch moments: both match 1 device's
    # (a gradient summed over devices or not averaged, or per-device BN, would be off by O(1)).
    s8, s1 = _raw_state(float_runs[8], 1), _raw_state(float_runs[1], 1)
    assert int(s8["step"]) == int(s1["step"]) == 1
    assert _rel_diff(s8["opt_state"], s1["opt_state"]) < 1e-4
    assert _rel_diff(_batch_moments(s8), _batch_moments(s1)) < 1e-3


def _batch_moments(state, momentum=0.9997):
    """The batch moments of step 1 from the moving statistics (initialised to mean 0, var 1)."""
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(state["batch_stats"]):
        key = jax.tree_util.keystr(path)
        v = np.asarray(v, np.float64)
        out[key] = (v - momentum if key.endswith("['bn_var']") else v) / (1 - momentum)
    return out


def test_agreement_job_quantizes_a_trained_run(float_runs, data_dir, tmp_path):
    from configs import agreement as agreement_config
    from qfsep_jax.jobs import agreement as agreement_job

    run = str(float_runs[1])
    config = checkpointing.load_run_config(run)
    _, variables = checkpointing.load_trained(config, run)
    saved = checkpointing.load_variables(run)
    for a, b in zip(
        jax.tree.leaves(variables), jax.tree.leaves({k: saved[k] for k in variables}), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    job = agreement_config.get_config("smoke")
    job.source, job.recipe, job.data_dir = f"trained:{run}", "tf8_per_tensor", data_dir
    job.calibration_data, job.eval_data = "folder:imagenette/train", "folder:imagenette/val"
    job.image_size = job.label_space = None  # from the run's own config
    agreement_job.run(job, str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n"] == 8 and report["calibration_images"] == 8, report
    assert report["calibration_data"] == "folder:imagenette/train"
    # Image size and label space come from the run's own config.
    assert (report["image_size"], report["label_space"]) == (config.image_size, "imagenette")
    assert max(report["layerwise_max_lsb"].values()) <= 1, report["layerwise_max_lsb"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpointing.load_run_config(str(tmp_path))


def test_metrics_file_has_one_record_per_logged_step(float_runs):
    records = read_metrics(str(float_runs[1]))
    for step, r in records.items():
        assert r["step"] == step and np.isfinite(r["train_loss"])
        for key in ("cross_entropy", "learning_rate", "steps_per_sec", "images_per_sec"):
            assert key in r
    with open(os.path.join(float_runs[1], "metrics.jsonl")) as f:
        assert len(f.read().splitlines()) == 10
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(float_runs[1]))


def test_nan_guard_stops_without_saving_the_nan_state(data_dir, tmp_path, monkeypatch):
    real = train_input.train_batches

    def poisoned(source, stream, start_step, skipped_before=0):
        for batch in real(source, stream, start_step, skipped_before):
            if batch["step"] == 1:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(train_input, "train_batches", poisoned)
    config = smoke_config(
        data_dir,
        total_steps=4,
        num_devices=1,
        checkpoint_every_steps=1,
        learning_rate=EQUIVALENCE_LR,  # the 1-device float run's executable (compile cache)
    )
    with pytest.raises(FloatingPointError, match="NaN guard: .*step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [1]
    ckpt.close()
    assert sorted(read_metrics(str(tmp_path))) == [1]


QAT = {
    "qat.enabled": True,
    "qat.quant_delay_steps": 2,
    "qat.bn_freeze_step": 4,
    "total_steps": 6,
    "num_devices": 2,
    # On, so that a resumed run must restore the run's dropout key to reproduce the losses.
    "dropout_rate": 0.5,
}


@pytest.fixture(scope="module")
def qat_runs(data_dir, tmp_path_factory):
    """QAT (delay 2, BN frozen at 4) for 6 steps: uninterrupted, and stopped at 3 + resumed."""
    full = tmp_path_factory.mktemp("qat_full")
    train.train_and_evaluate(smoke_config(data_dir, **QAT), str(full))
    split = tmp_path_factory.mktemp("qat_split")
    first = train.train_and_evaluate(smoke_config(data_dir, halt_after_steps=3, **QAT), str(split))
    # Rerunning a halted run with the same halt step trains nothing more.
    again = train.train_and_evaluate(smoke_config(data_dir, halt_after_steps=3, **QAT), str(split))
    at_halt = checkpointing.Checkpointer(str(split / "checkpoints"))
    halted = {"steps": at_halt.all_steps(), "summary": first, "again": again}
    model, variables = train.create_model_and_variables(smoke_config(data_dir, **QAT), 10)
    tx = train.make_optimizer(smoke_config(data_dir, **QAT), optax.constant_schedule(0.01))
    target = train.create_train_state(variables, tx, 0)
    halted["state"], halted["meta"] = at_halt.restore(3, target)
    halted["initial"] = target
    at_halt.close()
    # A save that crashed half way: Orbax's temporary folder of a later step.
    junk = split / "checkpoints" / "5.orbax-checkpoint-tmp-1234"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\0" * 10)
    second = train.train_and_evaluate(smoke_config(data_dir, **QAT), str(split))
    return {"full": full, "split": split, "halted": halted, "resumed": second}


def test_stop_and_resume_reproduces_the_uninterrupted_losses(qat_runs):
    """Mutation that used to pass (the run had no dropout): replacing the restored RNG key after
    a resume, e.g. ``state.replace(rng=key_data(key(seed + 1)))``; with dropout 0.5 every later
    loss changes. A crash instead of a clean halt: the kill test below."""
    h = qat_runs["halted"]
    assert h["steps"] == [3] and h["summary"]["final_step"] == 3
    assert h["again"]["final_step"] == 3
    assert qat_runs["resumed"]["start_step"] == 3
    full, split = losses(qat_runs["full"]), losses(qat_runs["split"])
    assert sorted(full) == sorted(split) == list(range(1, 7))
    for step in range(1, 7):
        assert split[step] == full[step], (step, split[step], full[step])  # exactly


def test_checkpoint_holds_the_whole_training_state(qat_runs):
    h = qat_runs["halted"]
    state, meta, initial = h["state"], h["meta"], h["initial"]
    assert int(state.step) == 3
    assert meta["examples_seen"] == 3 * 16 and meta["seed"] == 0 and meta["global_batch"] == 16
    # Ranges were observed in each of the 3 steps; BN statistics and optimizer moved.
    counts = [
        c
        for p, c in jax.tree_util.tree_leaves_with_path(state.quant_ranges)
        if jax.tree_util.keystr(p).endswith("['count']")
    ]
    assert counts and all(float(c) == 3.0 for c in counts)
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), state.batch_stats, initial.batch_stats
    )
    assert all(jax.tree.leaves(changed))
    momenta = jax.tree.leaves(state.opt_state)
    assert momenta and any(np.any(m != 0) for m in momenta)


def test_qat_steps_change_the_weights(qat_runs):
    """Steps 3-6 run with fake quantization active; the weights keep moving (STE gradients)."""
    h = qat_runs["halted"]
    final = checkpointing.load_variables(str(qat_runs["full"]))["params"]
    at3 = h["state"].params
    moved = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(at3), strict=True)
    ]
    assert min(moved) > 0.0


def test_qat_model_runs_integer_only_with_the_fake_quant_logits(qat_runs, data_dir):
    """The exported QAT model: its integer-only pass, fake-quant simulation and the QAT model's
    own inference compared per image and class in 8-bit logit codes (quantization steps).

    Mutation that used to pass: a constant predictor (every image given the first image's
    logits in ``integer.logits_fn``). The 6-step model predicts one class for all 64 images, so
    the old top-1 comparison could not tell; the codes differ between images by up to 16 steps.
    """
    from qfsep_jax import integer as integer_lib
    from qfsep_jax.data import input as data_input
    from qfsep_jax.evaluation import topk_correct
    from qfsep_jax.ptq import fake_quant_logits_fn

    quantized = quantized_lib.load_quantized(str(qat_runs["full"] / "quantized_model"))
    assert quantized.model.bn_folded and quantized.model.quant is not None
    config = smoke_config(data_dir, **QAT)
    model, _ = train.create_model_and_variables(config, 10)
    qat_apply = jax.jit(lambda v, x: model.clone(axis_name=None).apply(v, x, quant_mode="qat"))
    qat_vars = checkpointing.load_variables(str(qat_runs["full"]))
    fake_fn = fake_quant_logits_fn(quantized)
    int_model = integer_lib.from_quantized(quantized)
    scale, zero_point = int_model.layers[-1].output_scale, int_model.layers[-1].output_zero_point
    int_codes_fn = integer_lib.logits_fn(int_model, fine=False)
    int_fn = integer_lib.logits_fn(int_model)
    inp = data_input.eval_input(config, "folder:imagenette/val", limit=64, batch_size=32)

    def codes(logits):
        return np.round(np.asarray(logits, np.float64) / scale) + zero_point

    fake, qat, integer = [], [], []
    for batch in inp.make():
        valid = int(batch["mask"].sum())
        fake.append(codes(fake_fn(batch["image"]))[:valid])
        qat.append(codes(qat_apply(qat_vars, batch["image"]))[:valid])
        integer.append(np.asarray(int_codes_fn(batch["image"]), np.float64)[:valid])
    fake, qat, integer = (np.concatenate(a) for a in (fake, qat, integer))
    assert fake.shape == (64, 10)
    # The simulation's logits lie on the 8-bit grid (codes are whole numbers before rounding).
    np.testing.assert_allclose(codes(fake_fn(next(iter(inp.make()))["image"]))[:32], fake[:32])
    # The export is the QAT model's inference pass: the same codes, up to float rounding of the
    # BN folding (one step, rarely).
    qat_steps = np.abs(qat - fake)
    assert qat_steps.max() <= 1 and np.mean(qat_steps == 0) >= 0.99, np.mean(qat_steps == 0)
    # Integer-only pass vs simulation: requantization rounding differs by up to one step per
    # layer and accumulates over the 14 layers (measured here: mean 0.56 steps, at most 3; a
    # constant predictor is off by 2.7 on average, at most 11).
    int_steps = np.abs(integer - fake)
    assert int_steps.max() <= 4 and int_steps.mean() <= 1.0, (int_steps.max(), int_steps.mean())
    # Non-vacuity: the images' logits differ from the first image's by more than one step.
    assert np.mean(np.max(np.abs(fake - fake[:1]), axis=1) > 1) >= 0.5
    # The run itself scored the export in the integer pass on its 32 eval images (first batch).
    run_summary = json.loads((qat_runs["full"] / "results.json").read_text())
    first = next(iter(inp.make()))
    first_hits = topk_correct(int_fn(first["image"]), first["label"], first["mask"])["top1"]
    assert run_summary["eval_int_top1"] == pytest.approx(100.0 * float(first_hits) / 32)


def test_quantized_export_is_replaced_whole_or_not_at_all(qat_runs, tmp_path, monkeypatch):
    quantized = quantized_lib.load_quantized(str(qat_runs["full"] / "quantized_model"))
    target = tmp_path / "export"
    quantized_lib.save_quantized(quantized, str(target))
    doubled = dataclasses.replace(
        quantized, variables=jax.tree.map(lambda a: a * 2, quantized.variables)
    )
    quantized_lib.save_quantized(doubled, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    again = quantized_lib.load_quantized(str(target))
    for a, b in zip(
        jax.tree.leaves(again.variables), jax.tree.leaves(doubled.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(quantized_lib, "write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        quantized_lib.save_quantized(quantized, str(target))
    kept = quantized_lib.load_quantized(str(target))  # the previous export, intact
    for a, b in zip(
        jax.tree.leaves(kept.variables), jax.tree.leaves(doubled.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_qat_starts_from_a_float_checkpoint(float_runs, data_dir):
    config = smoke_config(
        data_dir, **{"qat.enabled": True, "init_from": f"checkpoint:{float_runs[1]}"}
    )
    model, variables = train.create_model_and_variables(config, 10)
    assert model.quant is not None and model.quant.observer == "ema"
    floats = checkpointing.load_variables(str(float_runs[1]))
    for a, b in zip(
        jax.tree.leaves(variables["params"]), jax.tree.leaves(floats["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    counts = jax.tree.leaves(
        {k: v["count"] for k, v in _range_nodes(variables["quant_ranges"]).items()}
    )
    assert counts and all(float(c) == 0.0 for c in counts)
    bad = smoke_config(
        data_dir,
        **{
            "qat.enabled": True,
            "model.width_multiplier": 0.5,
            "init_from": f"checkpoint:{float_runs[1]}",
        },
    )
    with pytest.raises(ValueError, match="shape"):
        train.create_model_and_variables(bad, 10)


def test_qat_starts_from_the_imported_tfslim_graph(data_dir):
    require(FLOAT_GRAPH)
    config = smoke_config(
        data_dir,
        label_space="imagenet1001",
        **{"qat.enabled": True, "init_from": f"tfslim:{FLOAT_GRAPH}"},
    )
    model, variables = train.create_model_and_variables(config, 1001)
    assert model.num_classes == 1001 and model.width_multiplier == 1.0
    assert model.quant is not None and model.axis_name == "batch"
    kernel = variables["params"]["Conv2d_1"]["depthwise"]["kernel"]
    assert kernel.shape == (3, 3, 1, 32) and float(np.abs(kernel).max()) > 0.1
    with pytest.raises(ValueError, match="1001 classes"):
        train.create_model_and_variables(
            smoke_config(data_dir, **{"qat.enabled": True, "init_from": f"tfslim:{FLOAT_GRAPH}"}),
            10,
        )


def _range_nodes(tree, path=()):
    if "count" in tree:
        return {path: tree}
    out = {}
    for k, v in tree.items():
        out.update(_range_nodes(v, path + (k,)))
    return out


def test_resume_with_another_data_stream_is_refused(qat_runs, data_dir):
    config = smoke_config(data_dir, seed=1, **QAT)
    with pytest.raises(ValueError, match="seed=0"):
        train.train_and_evaluate(config, str(qat_runs["split"]))


def test_metrics_reader_keeps_the_last_record_of_a_step_and_drops_a_torn_line(tmp_path):
    from qfsep_jax.metrics_log import JsonlWriter

    writer = JsonlWriter(str(tmp_path / "metrics.jsonl"))
    writer.write_scalars(1, {"train_loss": np.float32(2.5)})
    writer.write_scalars(2, {"train_loss": 2.25, "eval_top1": 10.0})
    writer.write_scalars(2, {"train_loss": 2.0})  # the step again after a resume
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train_lo')  # a crash in the middle of a line
    records = read_metrics(str(tmp_path))
    assert records == {1: {"step": 1, "train_loss": 2.5}, 2: {"step": 2, "train_loss": 2.0}}


def test_distributed_initialization_is_requested_by_config_or_environment():
    from ml_collections import ConfigDict

    from qfsep_jax import distributed

    assert not distributed.requested_by_environment({})
    assert not distributed.requested_by_environment({"SLURM_NTASKS": "1"})
    assert distributed.requested_by_environment({"SLURM_NTASKS": "4"})
    assert distributed.requested_by_environment({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed.requested_by_environment({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"})
    off = ConfigDict(
        {"mode": "off", "coordinator_address": "", "num_processes": -1, "process_id": -1}
    )
    assert distributed.maybe_initialize(off) is False
    with pytest.raises(ValueError, match="distributed.mode"):
        distributed.maybe_initialize(ConfigDict({**off.to_dict(), "mode": "yes"}))


def test_restart_with_a_changed_learning_rate_is_refused(qat_runs, data_dir):
    """A restart that changes a field that changes results (learning rate, width, dropout, ...)
    is refused before anything is written; other changes are recorded with their diff."""
    split = qat_runs["split"]
    # The resumed run dropped halt_after_steps=3: recorded, with the step it took effect.
    history = json.loads((split / HISTORY_FILE).read_text())
    assert [(h["start_step"], h["changes"]) for h in history] == [
        (3, {"halt_after_steps": [3, None]})
    ]
    listing = {p: p.stat().st_mtime_ns for p in split.rglob("*")}
    for field, value in (
        ("learning_rate", 0.02),
        ("dropout_rate", 0.1),
        ("model.activation", "relu"),
    ):
        config = smoke_config(data_dir, **{**QAT, field: value})
        with pytest.raises(ConfigError, match=f"config.{field}: .* -> {value!r}"):
            train.train_and_evaluate(config, str(split))
    assert {p: p.stat().st_mtime_ns for p in split.rglob("*")} == listing


def _eval_folder(root, data_dir, per_class=3):
    """``root/<wnid>/``: real Imagenette val images of two classes, plus a broken JPEG."""
    src = os.path.join(data_dir, "imagenette", "val")
    for wnid in sorted(os.listdir(src))[:2]:
        (root / wnid).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(src, wnid)))[:per_class]:
            shutil.copy(os.path.join(src, wnid, name), root / wnid / name)
    broken = root / sorted(os.listdir(src))[0] / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    return broken


def test_failing_final_evaluation_keeps_the_final_checkpoint(data_dir, tmp_path):
    """A corrupt image in the eval set: the final checkpoint exists, results.json holds the
    training and the error; restarting after the fix evaluates without training again.

    Mutation that fails it: the final checkpoint saved after the final evaluation (as before)."""
    broken = _eval_folder(tmp_path / "val", data_dir)
    workdir = tmp_path / "run"
    config = smoke_config(
        data_dir,
        total_steps=3,
        checkpoint_every_steps=2,
        eval_every_steps=0,
        num_devices=1,
        learning_rate=EQUIVALENCE_LR,
        eval_data=f"folder:{tmp_path / 'val'}",
    )
    with pytest.raises(CorruptImageError, match="broken.JPEG"):
        train.train_and_evaluate(config, str(workdir))
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()
    results = json.loads((workdir / "results.json").read_text())
    assert results["error"].startswith("evaluation: CorruptImageError: corrupt image file")
    assert results["final_step"] == 3 and results["train_loss"] == losses(workdir)[3]
    os.remove(broken)
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["start_step"] == 3 and "error" not in summary
    assert summary["eval_images"] == 6 and summary["train_loss"] == results["train_loss"]
    assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(summary))


def test_failing_evaluation_between_checkpoints_saves_the_state(data_dir, tmp_path, monkeypatch):
    """An evaluation at a step without a checkpoint fails (the error eval_limit=0 used to cause
    after training): the state of that step is saved before the error propagates."""

    def broken_evaluation(*args, **kwargs):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(train, "evaluate_on_devices", broken_evaluation)
    config = smoke_config(
        data_dir,
        total_steps=3,
        checkpoint_every_steps=2,
        eval_every_steps=1,
        num_devices=1,
        learning_rate=EQUIVALENCE_LR,
    )
    with pytest.raises(TypeError, match="not subscriptable"):
        train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [1]
    ckpt.close()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final_step"] == 1 and results["error"].startswith("evaluation: TypeError")


def _fault_injection():
    from tools import fault_injection

    return fault_injection


def test_kill_during_an_async_save_then_resume_is_bit_exact(qat_runs, data_dir, tmp_path):
    """The suite's version of tools/fault_injection.py: the QAT run (dropout on) killed with
    SIGKILL right after it logged step 4, while its asynchronous checkpoint of step 4 is being
    written, then resumed: every logged metric, the final results and every array of the final
    checkpoint equal the uninterrupted run's bit for bit."""
    fi = _fault_injection()
    fields = {
        **QAT,
        "data_dir": data_dir,
        "eval_every_steps": -1,
        "checkpoint_every_steps": 1,
        "async_checkpoints": True,
    }
    workdir = tmp_path / "killed"
    cmd = fi.train_command(
        os.path.join(REPO, "configs", "smoke.py"),
        str(workdir),
        [f"--config.{k}={v}" for k, v in fields.items()],
    )
    env = fi.child_env(jax.config.jax_compilation_cache_dir)  # conftest's 8 devices inherited
    record = fi.run_and_kill(cmd, str(workdir), env, at_step=4, delay_s=0.005)
    assert record["killed"] and record["last_logged_step"] < 6, record
    config = smoke_config(data_dir, **{k: v for k, v in fields.items() if k != "data_dir"})
    resumed = train.train_and_evaluate(config, str(workdir))
    assert 1 <= resumed["start_step"] <= record["last_logged_step"], (resumed, record)
    comparison = fi.compare_runs(str(qat_runs["full"]), str(workdir))
    assert comparison["bit_exact"], comparison["mismatches"]
    assert (
        comparison["metric_values_compared"] >= 6 * 8
        and "eval_int_top1" in (comparison["final_metrics"])
    )
