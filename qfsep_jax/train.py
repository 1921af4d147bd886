"""Float and quantization-aware training of MobileNetV1 with optax under ``jax.pmap``.

Reads top to bottom: losses, schedules and optimizers; the train state; the pure
:func:`train_step` and :func:`eval_step`; the one pmap wrapper :func:`pmap_step`; model and state
creation (from scratch, from a float checkpoint of ours or from an imported TF-slim model); QAT
export; and the loop :func:`train_and_evaluate` (``config.job = "train"`` in ``launch/main.py``).

* The state is replicated: ``pmap(step, in_axes=(None, 0), out_axes=(None, 0))``; gradients and
  metrics are ``pmean``-ed over the ``batch`` axis; BN batch moments (``ConvLayer``) and activation
  range observers (``ActQuant``) reduce over the same axis, so every replica computes the
  same new state and a run on ``n`` devices equals a run on one device with the same global batch.
* Weight decay is TF-slim's L2 loss term ``wd * sum(w^2) / 2`` on conv, pointwise and classifier
  kernels, with its own coefficient for depthwise kernels (0 in TF-slim's recipe; the paper's
  third change makes it positive); biases and BN parameters carry none.
* QAT (``config.qat.enabled``) runs the model in ``quant_mode="qat"``: folded weights and
  activations fake-quantized with the shared straight-through primitive, BN folding simulated by
  correction-and-freeze (``qat.bn_freeze_step``), EMA activation ranges in the ``quant_ranges``
  collection, quantization from step ``qat.quant_delay_steps`` on. :func:`export_quantized`
  turns the result into the BN-folded :class:`~qfsep_jax.ptq.QuantizedModel` that the
  integer-only pass converts.
* Runs are deterministic given ``config.seed``: the input is a pure function of (seed, step)
  (:mod:`qfsep_jax.data.train_input`), dropout keys are ``fold_in(seed key, step, device)``.
  A restart in the same workdir resumes from the newest checkpoint and reproduces the losses of
  an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from qfsep_jax import checkpointing, distributed, metrics_log, precision
from qfsep_jax.data import input as data_input
from qfsep_jax.data import labels as labels_lib
from qfsep_jax.data import sources, train_input
from qfsep_jax.evaluation import topk_correct
from qfsep_jax.io_utils import run_info, write_atomic, write_json
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.ptq import PTQRecipe, QuantizedModel, check_all_ranges
from qfsep_jax.quant.fold import fold_batch_norm
from qfsep_jax.quant.scheme import QuantConfig

AXIS = "batch"
OPTIMIZERS = ("sgd", "momentum", "rmsprop")
SCHEDULES = ("exponential", "cosine", "constant")
Variables = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Losses, schedules, optimizers.


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross entropy; ``label_smoothing`` as TF's (``1 - s`` + ``s / classes``)."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def weight_decay_loss(
    params: Variables, weight_decay: float, depthwise_weight_decay: float
) -> jax.Array:
    """TF-slim's L2 term ``coeff * sum(w^2) / 2`` over kernels; depthwise kernels use their own.

    Only leaves named ``kernel`` are regularized (no biases, no BN scale/offset); a kernel whose
    module path contains ``depthwise`` uses ``depthwise_weight_decay``.
    """
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] != "kernel":
            continue
        coeff = depthwise_weight_decay if "depthwise" in names else weight_decay
        if coeff:
            total = total + coeff * 0.5 * jnp.sum(jnp.square(leaf))
    return total


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The config's schedule: ``exponential`` (TF-slim: ``lr * rate^(step / decay_steps)``,
    staircase, decay every ``lr_decay_epochs``), ``cosine`` or ``constant``, after an optional
    linear warmup of ``warmup_epochs``."""
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; choose from {SCHEDULES}")
    lr = config.learning_rate
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "exponential":
        # TF-slim: decay_steps = int(num_samples / batch_size * num_epochs_per_decay).
        decay_steps = max(1, int(steps_per_epoch * config.lr_decay_epochs))
        main = optax.exponential_decay(
            lr, decay_steps, config.lr_decay_rate, staircase=config.lr_staircase
        )
    elif config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    else:
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``sgd`` (TF-slim's MobileNet recipe), ``momentum`` or ``rmsprop`` (the MobileNet paper,
    TF semantics: mean square initialised to 1, ``eps`` inside the root, momentum on the scaled
    update; TF-slim's values decay 0.9, momentum 0.9, epsilon 1.0)."""
    if config.optimizer == "sgd":
        return optax.sgd(schedule)
    if config.optimizer == "momentum":
        return optax.sgd(schedule, momentum=config.momentum)
    if config.optimizer == "rmsprop":
        return optax.rmsprop(
            schedule,
            decay=config.rmsprop_decay,
            eps=config.rmsprop_epsilon,
            initial_scale=1.0,
            eps_in_sqrt=True,
            momentum=config.momentum,
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {OPTIMIZERS}")


# ----------------------------------------------------------------------------------------------
# State and the pure steps.


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (replicated over devices)."""

    step: jax.Array
    params: Variables
    batch_stats: Variables
    quant_ranges: Variables
    opt_state: optax.OptState
    rng: jax.Array  # raw key data of the run's key (uint32), so that it checkpoints as an array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static hyper-parameters of :func:`train_step`."""

    num_classes: int
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    depthwise_weight_decay: float = 0.0
    qat: bool = False
    quant_delay_steps: int = 0
    bn_freeze_step: int = -1  # -1: never freeze (QAT)


def model_variables(state: TrainState) -> Variables:
    """The model's variables held by a train state."""
    out = {"params": state.params}
    if state.batch_stats:
        out["batch_stats"] = state.batch_stats
    if state.quant_ranges:
        out["quant_ranges"] = state.quant_ranges
    return out


def _quant_kwargs(step: jax.Array, hp: StepConfig) -> dict[str, Any]:
    if not hp.qat:
        return {}
    bn_frozen = step >= hp.bn_freeze_step if hp.bn_freeze_step >= 0 else False
    return {
        "quant_mode": "qat",
        "quant_active": step >= hp.quant_delay_steps,
        "bn_frozen": bn_frozen,
    }


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: MobileNetV1,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    hp: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's part of the global batch (run under :func:`pmap_step`).

    Returns the new (replicated) state and per-device metrics that are already averaged over
    devices: ``train_loss`` (cross entropy + weight decay), ``cross_entropy``,
    ``weight_decay_loss``, ``train_accuracy``, ``grad_norm``, ``learning_rate``.
    """
    key = jax.random.wrap_key_data(state.rng)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))
    mutable = ["batch_stats", "quant_ranges"] if hp.qat else ["batch_stats"]

    def loss_fn(params):
        variables = model_variables(state.replace(params=params))
        logits, new_vars = model.apply(
            variables,
            batch["image"],
            train=True,
            mutable=mutable,
            rngs={"dropout": dropout_key},
            **_quant_kwargs(state.step, hp),
        )
        ce = cross_entropy_loss(logits, batch["label"], hp.num_classes, hp.label_smoothing)
        wd = weight_decay_loss(params, hp.weight_decay, hp.depthwise_weight_decay)
        return ce + wd, (new_vars, logits, ce, wd)

    (loss, (new_vars, logits, ce, wd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    metrics = jax.lax.pmean(
        {
            "train_loss": loss,
            "cross_entropy": ce,
            "weight_decay_loss": wd,
            "train_accuracy": accuracy,
        },
        AXIS,
    )
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=new_vars.get("batch_stats", state.batch_stats),
        quant_ranges=new_vars.get("quant_ranges", state.quant_ranges),
    )
    return new_state, metrics


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, model: MobileNetV1, quant_mode: str
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Masked top-1/top-5 counts: (summed over all devices, this device's)."""
    logits = model.apply(model_variables(state), batch["image"], train=False, quant_mode=quant_mode)
    counts = topk_correct(logits, batch["label"], batch["mask"])
    return jax.lax.psum(counts, AXIS), counts


def pmap_step(fn: Callable, devices: Sequence[jax.Device] | None = None) -> Callable:
    """THE pmap of this module: replicated first argument in, replicated first result out.

    ``fn(state, batch) -> (replicated, per_device)``; ``batch`` arrays are laid out
    ``[local devices, per device, ...]``. ``devices=None`` maps over all devices of all
    processes.
    """
    return jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), out_axes=(None, 0), devices=devices)


# ----------------------------------------------------------------------------------------------
# Model and state creation.


def quant_config(config) -> QuantConfig | None:
    """The QAT quantization scheme of a config (None for float training)."""
    if not config.qat.enabled:
        return None
    return QuantConfig(
        scheme=config.qat.scheme,
        per_channel_weights=config.qat.per_channel_weights,
        observer="ema",
        ema_decay=config.qat.ema_decay,
    )


def num_classes_of(config) -> int:
    """``config.num_classes`` or the class count of ``config.label_space``."""
    if config.get("num_classes"):
        return int(config.num_classes)
    if config.label_space == "folder":
        raise ValueError("set config.num_classes: label_space 'folder' has no fixed class count")
    return labels_lib.num_classes(config.label_space, config.data_dir)


def create_model_and_variables(config, num_classes: int) -> tuple[MobileNetV1, Variables]:
    """The model (``axis_name="batch"``) and its initial variables, per ``config.init_from``.

    ``init_from`` is ``""`` (random init), ``"checkpoint:<workdir or checkpoint dir>"`` (a float
    run of ours with the same ``config.model``) or ``"tfslim:<.pb or TF1 checkpoint>"`` (relative
    paths are under ``data_dir``; the imported architecture replaces ``config.model``'s).
    """
    m = config.model
    train_kw = dict(
        dropout_rate=config.dropout_rate,
        bn_momentum=m.bn_momentum,
        depthwise_impl=m.depthwise_impl,
        axis_name=AXIS,
        quant=quant_config(config),
        dtype=precision.compute_dtype(config),
    )
    init_from = config.get("init_from", "")
    kind, _, path = init_from.partition(":")
    loaded: Variables | None = None
    if kind == "tfslim":
        from qfsep_jax.importers.tfslim import load_tfslim

        imported = load_tfslim(data_input.resolve_path(config.data_dir, path))
        model = imported.model(**train_kw)
        if model.num_classes != num_classes:
            raise ValueError(
                f"imported model has {model.num_classes} classes, the data's label space "
                f"{config.label_space!r} has {num_classes}; use label_space='imagenet1001'"
            )
        loaded = imported.variables
    else:
        model = MobileNetV1(
            num_classes=num_classes,
            width_multiplier=m.width_multiplier,
            block=m.block,
            activation=m.activation,
            depthwise_bias=m.depthwise_bias,
            stem_stride=m.stem_stride,
            bn_epsilon=m.bn_epsilon,
            **train_kw,
        )
        if kind == "checkpoint":
            loaded = checkpointing.load_variables(path)
        elif init_from:
            raise ValueError(
                f"bad init_from {init_from!r}: use '', 'checkpoint:<path>' or 'tfslim:<path>'"
            )
    size = config.image_size
    rng = jax.random.key(config.seed)
    init = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, size, size, 3), jnp.float32)
    )
    init = jax.tree.map(np.asarray, flax.core.unfreeze(init))
    if loaded is None:
        return model, init
    variables = {k: v for k, v in init.items()}
    for col in ("params", "batch_stats"):
        if col in init:
            got = loaded.get(col)
            if got is None:
                raise ValueError(f"{init_from}: no {col!r} in the loaded variables")
            checkpointing.check_same_structure(init[col], got, f"{init_from} {col}")
            variables[col] = jax.tree.map(lambda a: np.asarray(a, np.float32), got)
    # quant_ranges start empty (count 0): QAT calibrates them with its EMA observers.
    return model, variables


def create_train_state(
    variables: Variables, tx: optax.GradientTransformation, seed: int
) -> TrainState:
    """Step 0 state on the host (numpy), with the optimizer initialised on ``params``."""
    params = variables["params"]
    state = TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        quant_ranges=variables.get("quant_ranges", {}),
        opt_state=tx.init(params),
        rng=np.asarray(jax.random.key_data(jax.random.key(seed))),
    )
    return jax.tree.map(np.asarray, state)


def export_quantized(model: MobileNetV1, variables: Variables) -> QuantizedModel:
    """A QAT model as the BN-folded quantized model the integer-only pass converts.

    BN is folded with the moving statistics (what the QAT model evaluates with); the EMA ranges
    of ``quant_ranges`` become the activation ranges. The folded model's ``"fake"`` forward pass
    equals the QAT model's inference pass (``quant_mode="qat"``, ``train=False``).
    """
    if model.quant is None:
        raise ValueError("export_quantized needs a QAT model (built with quant=QuantConfig)")
    ranges = variables.get("quant_ranges")
    if not ranges:
        raise ValueError("export_quantized: the variables hold no quant_ranges")
    ranges = jax.tree.map(np.asarray, ranges)
    check_all_ranges(ranges)
    for path, count in jax.tree_util.tree_leaves_with_path(ranges):
        if jax.tree_util.keystr(path).endswith("['count']") and count <= 0:
            raise ValueError(f"quant range {jax.tree_util.keystr(path)} was never observed")
    folded = fold_batch_norm(
        {k: v for k, v in variables.items() if k in ("params", "batch_stats")}, model.bn_epsilon
    )
    folded = jax.tree.map(np.asarray, folded)
    # The integer pass and its simulation are float32 whatever precision the QAT run used.
    qmodel = model.clone(bn_folded=True, axis_name=None, dtype=None)
    q = model.quant
    recipe = PTQRecipe(scheme=q.scheme, per_channel_weights=q.per_channel_weights, observer="ema")
    return QuantizedModel(qmodel, {**folded, "quant_ranges": ranges}, recipe, {"source": "qat"})


def model_kwargs(model: MobileNetV1) -> dict[str, Any]:
    """The dataclass fields of a model as JSON-able values (``quant`` as a dict)."""
    out = {}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        v = getattr(model, f.name)
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation over all processes.


def evaluate(
    p_eval: Callable, state: TrainState, config, local_devices: Sequence[jax.Device]
) -> dict[str, float]:
    """Top-1/top-5 (%) over ``config.eval_data``, every image counted once over all processes."""
    pi, pc = jax.process_index(), jax.process_count()
    per_process = config.eval_batch_size // pc
    # eval_limit counts images over all processes: this process's share of the first N.
    limit = config.get("eval_limit")
    limit = None if limit is None else len(range(pi, limit, pc))
    inp = data_input.eval_input(
        config, config.eval_data, limit=limit, batch_size=per_process,
        shard=(pi, pc),
    )  # fmt: skip
    # Every process must run the same number of steps (collectives): pad with empty batches.
    num_batches = int(np.max(multihost_utils.process_allgather(np.int64(inp.num_batches))))
    size = config.image_size
    empty = {
        "image": np.zeros((per_process, size, size, 3), np.float32),
        "label": np.zeros((per_process,), np.int32),
        "mask": np.zeros((per_process,), np.float32),
    }
    totals, skipped, start = None, 0, time.perf_counter()
    stream = itertools.chain(inp.make(), itertools.repeat(empty))
    for batch in tqdm(
        itertools.islice(stream, num_batches), total=num_batches, desc="eval", unit="batch",
        leave=False, disable=pi != 0,
    ):  # fmt: skip
        skipped = max(skipped, int(batch.get("skipped", 0)))
        batch = {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}
        counts, _ = p_eval(state, train_input.shard_batch(batch, len(local_devices)))
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.device_get(totals)
    n = float(totals["n"])
    if n == 0:
        raise ValueError(f"evaluation of {config.eval_data} saw no images")
    seconds = time.perf_counter() - start
    logging.info("eval: %d images in %.1fs (%.1f images/s)", n, seconds, n / seconds)
    out = {
        "eval_top1": 100.0 * float(totals["top1"]) / n,
        "eval_top5": 100.0 * float(totals["top5"]) / n,
        "eval_images": int(n),
    }
    skipped = int(np.sum(multihost_utils.process_allgather(np.int64(skipped))))
    if skipped:
        out["eval_skipped_corrupt"] = skipped
    return out


def evaluate_integer(quantized: QuantizedModel, config) -> dict[str, float]:
    """Top-1/top-5 (%) of an exported QAT model in the integer-only pass on ``config.eval_data``.

    Runs on this process alone, over the first ``eval_limit`` images (all when unset); top-1 is
    taken on the integer pass's fine logits (:func:`qfsep_jax.intpass.logits_fn`).
    """
    from qfsep_jax import evaluation, intpass

    inp = data_input.eval_input(config, config.eval_data, limit=config.get("eval_limit"))
    int_model = intpass.from_quantized(quantized)
    result = evaluation.evaluate(
        intpass.logits_fn(int_model), inp.make(), inp.num_batches, desc="eval/integer"
    )
    logging.info("integer-only pass: top1 %.2f top5 %.2f", result["top1"], result["top5"])
    return {"eval_int_top1": result["top1"], "eval_int_top5": result["top5"]}


# ----------------------------------------------------------------------------------------------
# The loop.


def _stream_meta(config, process_count: int) -> dict[str, Any]:
    """What the data position means; a resume must see the same values."""
    return {
        "seed": int(config.seed),
        "global_batch": int(config.batch_size),
        "train_data": config.train_data,
        "process_count": process_count,
    }


def _check_finite(rows: list[dict[str, np.ndarray]], first_step: int) -> None:
    for i, row in enumerate(rows):
        bad = [k for k in ("train_loss", "grad_norm") if not np.all(np.isfinite(row[k]))]
        if bad:
            raise FloatingPointError(
                f"NaN guard: {', '.join(bad)} not finite at step {first_step + i + 1} "
                f"(train_loss={row['train_loss']}, grad_norm={row['grad_norm']}); stopping "
                "without saving a checkpoint of this state. The last checkpoint is the newest "
                "finite one; lower the learning rate or check the data."
            )


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (float or QAT) per ``config``, evaluating and checkpointing in ``workdir``.

    Resumes from the newest checkpoint in ``workdir/checkpoints``. Writes
    ``workdir/metrics.jsonl`` (and TensorBoard events), ``workdir/results.json`` at the end and,
    for QAT, the exported quantized model (``workdir/quantized_model``). Returns the summary.
    """
    distributed.maybe_initialize(config.distributed)
    config = precision.resolved(config)  # config.json records the precision that ran
    _hide_accelerators_from_tf()
    pi, pc = jax.process_index(), jax.process_count()
    local_devices = list(jax.local_devices())
    pmap_devices = None
    if config.get("num_devices"):
        if pc > 1:
            raise ValueError("config.num_devices is for single-process runs; unset it")
        if config.num_devices > len(local_devices):
            raise ValueError(f"num_devices={config.num_devices} > {len(local_devices)} devices")
        local_devices = local_devices[: config.num_devices]
        pmap_devices = local_devices
    num_global_devices = len(local_devices) * pc
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % num_global_devices:
            raise ValueError(
                f"config.{name}={config[name]} is not divisible by the {num_global_devices} "
                "devices of this run"
            )
    os.makedirs(workdir, exist_ok=True)

    num_classes = num_classes_of(config)
    train_source = sources.make_source(
        config.train_data, config.data_dir, label_space=config.label_space,
        tfds_data_dir=config.get("tfds_data_dir") or None,
        manual_dir=config.get("manual_dir") or None, process_split=(pi, pc),
    )  # fmt: skip
    # A random-access source is global; a streaming one holds this process's split only.
    global_examples = train_source.num_examples * (1 if train_source.random_access else pc)
    steps_per_epoch = max(1, global_examples // config.batch_size)
    total_steps = config.get("total_steps") or int(math.ceil(config.num_epochs * steps_per_epoch))

    model, variables = create_model_and_variables(config, num_classes)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = make_optimizer(config, schedule)
    state = create_train_state(variables, tx, config.seed)

    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, checkpointing.CHECKPOINT_DIR),
        max_to_keep=config.keep_checkpoints,
        asynchronous=config.async_checkpoints,
    )
    expected_meta = _stream_meta(config, pc)
    start_step, skipped = 0, np.zeros((pc,), np.int64)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        for k, v in expected_meta.items():
            if meta.get(k) != v:
                raise ValueError(
                    f"checkpoint {latest} in {workdir} was written with {k}={meta.get(k)!r}, "
                    f"this run has {v!r}: the data stream would not continue; use a new workdir"
                )
        start_step = int(state.step)
        skipped = np.asarray(meta["skipped_corrupt"], np.int64)
        logging.info("resuming from step %d (examples seen %d)", start_step, meta["examples_seen"])

    is_main = pi == 0
    writer = metrics_log.create_writer(workdir, is_main)
    if is_main and latest is None:
        write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    hp = StepConfig(
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        weight_decay=config.weight_decay,
        depthwise_weight_decay=config.depthwise_weight_decay,
        qat=config.qat.enabled,
        quant_delay_steps=config.qat.quant_delay_steps,
        bn_freeze_step=config.qat.bn_freeze_step,
    )
    p_train = pmap_step(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule, hp=hp), pmap_devices
    )
    quant_mode = "qat" if config.qat.enabled else "float"
    p_eval = pmap_step(
        functools.partial(eval_step, model=model, quant_mode=quant_mode), pmap_devices
    )

    stream = train_input.TrainStream(
        seed=config.seed,
        global_batch=config.batch_size,
        process_index=pi,
        process_count=pc,
        image_size=config.image_size,
        area_range=tuple(config.crop_area_range),
        aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
        on_corrupt=config.on_corrupt,
        shuffle_buffer=config.shuffle_buffer,
        num_classes=num_classes,
    )
    batches = train_input.prefetch_to_devices(
        train_input.train_batches(train_source, stream, start_step, int(skipped[pi])),
        local_devices,
        size=config.prefetch_batches,
    )
    logging.info(
        "training %s for %d steps (%d/epoch), global batch %d on %d devices x %d processes",
        "QAT" if config.qat.enabled else "float", total_steps, steps_per_epoch,
        config.batch_size, len(local_devices), pc,
    )  # fmt: skip

    # Lay the state out as the step returns it (replicated over the local mesh), so the first
    # step does not compile a second executable for host inputs.
    replicated = NamedSharding(train_input.device_mesh(local_devices), PartitionSpec())
    state = jax.device_put(state, replicated)
    window: list[dict[str, jax.Array]] = []
    window_start, t0 = start_step, time.perf_counter()
    summary: dict[str, Any] = {"start_step": start_step, "total_steps": total_steps}
    last_skipped = int(skipped[pi])
    halt = config.get("halt_after_steps")
    for step in range(start_step, total_steps):
        device_batch, host = next(batches)
        state, metrics = p_train(state, device_batch)
        window.append(metrics)
        last_skipped = int(host["skipped"])
        done = step + 1
        is_last = done == total_steps
        halting = bool(halt) and done == halt
        every = config.eval_every_steps  # 0: at the end only; negative: never
        do_eval = every >= 0 and (is_last or (every > 0 and done % every == 0))
        do_ckpt = is_last or halting or done % config.checkpoint_every_steps == 0
        do_log = do_eval or do_ckpt or done % config.log_every_steps == 0
        if not do_log:
            continue
        rows = [jax.tree.map(lambda a: np.asarray(a)[0], r) for r in jax.device_get(window)]
        _check_finite(rows, window_start)  # before anything of this state is saved
        seconds = time.perf_counter() - t0
        scalars = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        scalars["learning_rate"] = float(rows[-1]["learning_rate"])
        scalars["steps_per_sec"] = len(rows) / seconds
        scalars["images_per_sec"] = len(rows) * config.batch_size / seconds
        skipped_all = multihost_utils.process_allgather(np.int64(last_skipped))
        skipped_all = np.asarray(skipped_all, np.int64).reshape(pc)
        scalars["skipped_corrupt"] = int(skipped_all.sum())
        if do_eval:
            scalars.update(evaluate(p_eval, state, config, local_devices))
            summary.update({k: v for k, v in scalars.items() if k.startswith("eval_")})
        writer.write_scalars(done, scalars)
        summary["train_loss"] = scalars["train_loss"]
        if do_ckpt:
            meta = {
                **expected_meta,
                "step": done,
                "examples_seen": done * config.batch_size,
                "skipped_corrupt": skipped_all.tolist(),
            }
            ckpt.save(done, state, meta)
        window, window_start, t0 = [], done, time.perf_counter()
        if halting:
            logging.info("halt_after_steps=%d reached: stopping (resumable)", halt)
            break
    writer.flush()
    ckpt.wait()
    ckpt.close()
    summary["final_step"] = int(state.step)
    summary["run"] = run_info()
    if config.qat.enabled and int(state.step) == total_steps:
        quantized = export_quantized(model, jax.device_get(model_variables(state)))
        if is_main:
            save_quantized(quantized, os.path.join(workdir, "quantized_model"))
        summary["quantized_model"] = os.path.join(workdir, "quantized_model")
        if is_main and config.qat.get("integer_eval", True):
            summary.update(evaluate_integer(quantized, config))
    if is_main:
        write_json(os.path.join(workdir, "results.json"), summary)
    return summary


def load_run_config(workdir: str):
    """The config a training run wrote to ``workdir/config.json``, as a ``ConfigDict``."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training run: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_trained(config, workdir: str) -> tuple[MobileNetV1, Variables]:
    """A training run's float model in inference mode and its newest checkpoint's variables.

    Returns ``(model, {"params", "batch_stats"})``; the model is built from ``config`` (the
    run's own, see :func:`load_run_config`) with dropout off, no pmap axis and
    float32 compute (the checkpoint is the same whatever precision trained it).
    """
    model, _ = create_model_and_variables(config, num_classes_of(config))
    model = model.clone(axis_name=None, dropout_rate=0.0, dtype=None)  # float32 inference
    loaded = checkpointing.load_variables(workdir)
    return model, {k: loaded[k] for k in ("params", "batch_stats") if k in loaded}


def save_quantized(quantized: QuantizedModel, directory: str) -> None:
    """Writes an exported model: ``variables`` (Orbax) and ``model.json`` (its attributes).

    Written completely into a sibling directory (``<directory>.tmp-<pid>``) first and then
    renamed into place, the previous export moved aside (``<directory>.old-<pid>``) and deleted
    last. A crash never leaves a mix of two exports or half a model at ``directory``; between
    the two renames (a moment) both complete copies sit under those sibling names.
    """
    import shutil

    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    staging, retired = f"{directory}.tmp-{os.getpid()}", f"{directory}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(staging, "variables"), quantized.variables)
    write_json(
        os.path.join(staging, "model.json"),
        {"model": model_kwargs(quantized.model), "recipe": dataclasses.asdict(quantized.recipe)},
    )
    if os.path.exists(directory):
        os.rename(directory, retired)
    os.rename(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


def load_quantized(directory: str) -> QuantizedModel:
    """Reads a model written by :func:`save_quantized`."""
    import orbax.checkpoint as ocp

    path = os.path.join(directory, "model.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported quantized model in {directory}")
    with open(path) as f:
        desc = json.load(f)
    kw = dict(desc["model"])
    kw["quant"] = QuantConfig(**kw["quant"])
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(os.path.abspath(directory), "variables"))
    variables = jax.tree.map(np.asarray, variables)
    return QuantizedModel(
        MobileNetV1(**kw), variables, PTQRecipe(**desc["recipe"]), {"source": "qat"}
    )


def _hide_accelerators_from_tf() -> None:
    """Keeps tf.data's TensorFlow off the GPUs/TPUs that JAX uses."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised
        pass
