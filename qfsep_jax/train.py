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
  collection, quantization from step ``qat.quant_delay_steps`` on.
  :func:`qfsep_jax.quantized.from_qat`
  turns the result into the BN-folded :class:`~qfsep_jax.quantized.QuantizedModel` that the
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

from qfsep_jax import checkpointing, config_validation, distributed, metrics_log, precision
from qfsep_jax import progress as progress_lib
from qfsep_jax import quantized as quantized_lib
from qfsep_jax.config_validation import OPTIMIZERS, SCHEDULES
from qfsep_jax.data import input as data_input
from qfsep_jax.data import sources, train_input
from qfsep_jax.evaluation import topk_correct
from qfsep_jax.io_utils import run_info, write_atomic, write_json
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.quantized import QuantizedModel

log = logging.getLogger(__name__)

AXIS = "batch"
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


def _quant_kwargs(step: jax.Array, step_config: StepConfig) -> dict[str, Any]:
    if not step_config.qat:
        return {}
    bn_frozen = step >= step_config.bn_freeze_step if step_config.bn_freeze_step >= 0 else False
    return {
        "quant_mode": "qat",
        "quant_active": step >= step_config.quant_delay_steps,
        "bn_frozen": bn_frozen,
    }


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: MobileNetV1,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    step_config: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's part of the global batch (run under :func:`pmap_step`).

    Returns the new (replicated) state and per-device metrics that are already averaged over
    devices: ``train_loss`` (cross entropy + weight decay), ``cross_entropy``,
    ``weight_decay_loss``, ``train_accuracy``, ``grad_norm``, ``learning_rate``.
    """
    key = jax.random.wrap_key_data(state.rng)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))
    mutable = ["batch_stats", "quant_ranges"] if step_config.qat else ["batch_stats"]

    def loss_fn(params):
        variables = model_variables(state.replace(params=params))
        logits, new_vars = model.apply(
            variables,
            batch["image"],
            train=True,
            mutable=mutable,
            rngs={"dropout": dropout_key},
            **_quant_kwargs(state.step, step_config),
        )
        ce = cross_entropy_loss(
            logits, batch["label"], step_config.num_classes, step_config.label_smoothing
        )
        wd = weight_decay_loss(params, step_config.weight_decay, step_config.depthwise_weight_decay)
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


def create_model_and_variables(config, num_classes: int) -> tuple[MobileNetV1, Variables]:
    """The model (``axis_name="batch"``) and its initial variables, per ``config.init_from``
    (see :func:`qfsep_jax.checkpointing.model_from_config`)."""
    model, loaded = checkpointing.model_from_config(config, num_classes, axis_name=AXIS)
    size = config.image_size
    rng = jax.random.key(config.seed)
    init = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, size, size, 3), jnp.float32)
    )
    init = jax.tree.map(np.asarray, flax.core.unfreeze(init))
    if loaded is None:
        return model, init
    init_from = config.init_from
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


# ----------------------------------------------------------------------------------------------
# Evaluation over all processes.


def evaluate_on_devices(
    p_eval: Callable, state: TrainState, config, local_devices: Sequence[jax.Device]
) -> dict[str, float]:
    """Top-1/top-5 (%) over ``config.eval_data``, every image counted once over all processes."""
    process_index, process_count = jax.process_index(), jax.process_count()
    per_process = config.eval_batch_size // process_count
    # eval_limit counts images over all processes: this process's share of the first N.
    limit = config.get("eval_limit")
    limit = None if limit is None else len(range(process_index, limit, process_count))
    inp = data_input.eval_input(
        config,
        config.eval_data,
        limit=limit,
        batch_size=per_process,
        shard=(process_index, process_count),
    )
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
    for batch in progress_lib.bar(
        itertools.islice(stream, num_batches),
        process_index == 0,
        total=num_batches,
        desc="eval",
        unit="batch",
    ):
        skipped = max(skipped, int(batch.get("skipped", 0)))
        batch = {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}
        counts, _ = p_eval(state, train_input.shard_batch(batch, len(local_devices)))
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.device_get(totals)
    n = float(totals["n"])
    if n == 0:
        raise ValueError(f"evaluation of {config.eval_data} saw no images")
    seconds = time.perf_counter() - start
    log.info("eval: %d images in %.1fs (%.1f images/s)", n, seconds, n / seconds)
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
    taken on the integer pass's fine logits (:func:`qfsep_jax.integer.logits_fn`).
    """
    from qfsep_jax import evaluation, integer

    inp = data_input.eval_input(config, config.eval_data, limit=config.get("eval_limit"))
    int_model = integer.from_quantized(quantized)
    result = evaluation.evaluate(
        integer.logits_fn(int_model), inp.make(), inp.num_batches, desc="eval/integer"
    )
    log.info("integer-only pass: top1 %.2f top5 %.2f", result["top1"], result["top5"])
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

    The config is validated before anything else (:mod:`qfsep_jax.config_validation`); a restart
    whose config changes a field that changes results is refused, other changes are recorded in
    ``workdir/config_history.json``. A checkpoint is saved before each evaluation; if an
    evaluation (or the QAT export) fails, the run saves the state it has, writes
    ``results.json`` with the ``error`` and re-raises. Restarting a finished run evaluates it
    again.
    """
    config_validation.validate(config, "train")
    distributed.maybe_initialize(config.distributed)
    config = precision.resolved(config)  # config.json records the precision that ran
    _hide_accelerators_from_tf()
    devices = _Devices.of(config)
    os.makedirs(workdir, exist_ok=True)

    num_classes = checkpointing.num_classes_of(config)
    train_source = sources.make_source(
        config.train_data,
        config.data_dir,
        label_space=config.label_space,
        tfds_data_dir=config.get("tfds_data_dir") or None,
        manual_dir=config.get("manual_dir") or None,
        process_split=(devices.process_index, devices.process_count),
    )
    # A random-access source is global; a streaming one holds this process's split only.
    global_examples = train_source.num_examples * (
        1 if train_source.random_access else devices.process_count
    )
    steps_per_epoch = max(1, global_examples // config.batch_size)
    total_steps = config.get("total_steps") or int(math.ceil(config.num_epochs * steps_per_epoch))

    model, variables = create_model_and_variables(config, num_classes)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = make_optimizer(config, schedule)
    run = _Run(config, workdir, devices, total_steps)
    state, start_step, skipped = run.restore(create_train_state(variables, tx, config.seed))
    p_train, p_eval = _pmapped_steps(config, model, tx, schedule, num_classes, devices)
    stream = train_input.TrainStream(
        seed=config.seed,
        global_batch=config.batch_size,
        process_index=devices.process_index,
        process_count=devices.process_count,
        image_size=config.image_size,
        area_range=tuple(config.crop_area_range),
        aspect_ratio_range=tuple(config.crop_aspect_ratio_range),
        on_corrupt=config.on_corrupt,
        shuffle_buffer=config.shuffle_buffer,
        num_classes=num_classes,
    )
    batches = train_input.prefetch_to_devices(
        train_input.train_batches(
            train_source, stream, start_step, int(skipped[devices.process_index])
        ),
        devices.local,
        size=config.prefetch_batches,
    )
    log.info(
        "training %s for %d steps (%d/epoch), global batch %d on %d devices x %d processes",
        "QAT" if config.qat.enabled else "float",
        total_steps,
        steps_per_epoch,
        config.batch_size,
        len(devices.local),
        devices.process_count,
    )

    # Lay the state out as the step returns it (replicated over the local mesh), so the first
    # step does not compile a second executable for host inputs.
    replicated = NamedSharding(train_input.device_mesh(devices.local), PartitionSpec())
    state = jax.device_put(state, replicated)
    state = _train_loop(
        run, state, start_step, int(skipped[devices.process_index]), batches, p_train, p_eval
    )
    if start_step >= total_steps and config.eval_every_steps >= 0:
        run.evaluate_finished_run(state, p_eval)
    run.close()
    run.summary["final_step"] = int(state.step)
    run.summary["run"] = run_info()
    if config.qat.enabled and int(state.step) == total_steps:
        run.export_qat(model, state)
    if run.is_main:
        write_json(os.path.join(workdir, "results.json"), run.summary)
    return run.summary


@dataclasses.dataclass(frozen=True)
class _Devices:
    """This process's devices (``pmap=None``: all of them) and the process grid."""

    local: list
    pmap: list | None
    process_index: int
    process_count: int

    @property
    def num_global(self) -> int:
        return len(self.local) * self.process_count

    @classmethod
    def of(cls, config) -> _Devices:
        process_index, process_count = jax.process_index(), jax.process_count()
        local, pmap = list(jax.local_devices()), None
        if config.get("num_devices"):
            if process_count > 1:
                raise ValueError("config.num_devices is for single-process runs; unset it")
            if config.num_devices > len(local):
                raise ValueError(f"num_devices={config.num_devices} > {len(local)} devices")
            local = pmap = local[: config.num_devices]
        devices = cls(local, pmap, process_index, process_count)
        for name in ("batch_size", "eval_batch_size"):
            if config[name] % devices.num_global:
                raise ValueError(
                    f"config.{name}={config[name]} is not divisible by the {devices.num_global} "
                    "devices of this run"
                )
        return devices


def _pmapped_steps(config, model, tx, schedule, num_classes: int, devices: _Devices):
    """The pmapped :func:`train_step` and :func:`eval_step` of this run."""
    step_config = StepConfig(
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        weight_decay=config.weight_decay,
        depthwise_weight_decay=config.depthwise_weight_decay,
        qat=config.qat.enabled,
        quant_delay_steps=config.qat.quant_delay_steps,
        bn_freeze_step=config.qat.bn_freeze_step,
    )
    p_train = pmap_step(
        functools.partial(
            train_step, model=model, tx=tx, schedule=schedule, step_config=step_config
        ),
        devices.pmap,
    )
    quant_mode = "qat" if config.qat.enabled else "float"
    p_eval = pmap_step(
        functools.partial(eval_step, model=model, quant_mode=quant_mode), devices.pmap
    )
    return p_train, p_eval


class _Run:
    """A training run's workdir: checkpoints, metrics, the summary, and keeping work on failure."""

    def __init__(self, config, workdir: str, devices: _Devices, total_steps: int):
        self.config, self.workdir, self.devices = config, workdir, devices
        self.is_main = devices.process_index == 0
        self.ckpt = checkpointing.Checkpointer(
            os.path.join(workdir, checkpointing.CHECKPOINT_DIR),
            max_to_keep=config.keep_checkpoints,
            asynchronous=config.async_checkpoints,
        )
        self.ckpt_closed = False
        self.meta = _stream_meta(config, devices.process_count)
        self.writer = None  # created once the restart is accepted (a refusal writes nothing)
        self.summary: dict[str, Any] = {
            "total_steps": total_steps,
            "num_devices": devices.num_global,
        }

    def restore(self, state: TrainState) -> tuple[TrainState, int, np.ndarray]:
        """``(state, start step, skipped corrupt files per process)``, from the newest checkpoint
        if there is one (a resume must see the same data stream and no result-changing config
        change); else writes ``config.json``."""
        start_step, skipped = 0, np.zeros((self.devices.process_count,), np.int64)
        latest = self.ckpt.latest_step()
        if latest is not None:
            state, meta = self.ckpt.restore(latest, state)
            for k, v in self.meta.items():
                if meta.get(k) != v:
                    raise ValueError(
                        f"checkpoint {latest} in {self.workdir} was written with "
                        f"{k}={meta.get(k)!r}, this run has {v!r}: the data stream would not "
                        "continue; use a new workdir"
                    )
            start_step = int(state.step)
            skipped = np.asarray(meta["skipped_corrupt"], np.int64)
            changes = config_validation.restart_changes(self.workdir, self.config)  # or refuses
            if self.is_main and changes:
                config_validation.record_restart(self.workdir, start_step, changes)
                log.info("restart with changed fields (config_history.json): %s", changes)
            log.info("resuming from step %d (examples seen %d)", start_step, meta["examples_seen"])
        elif self.is_main:
            write_atomic(
                os.path.join(self.workdir, "config.json"),
                self.config.to_json_best_effort(indent=2),
            )
        self.summary = {"start_step": start_step, **self.summary}
        self.writer = metrics_log.create_writer(self.workdir, self.is_main)
        return state, start_step, skipped

    def keep_work_and_raise(self, err: Exception, step: int, what: str) -> None:
        """After a failure: finish the checkpoint, write results.json with the error, re-raise."""
        log.error("%s failed; the checkpoint of step %d is kept", what, step)
        self.writer.flush()
        if not self.ckpt_closed:
            self.ckpt.wait()
            self.ckpt.close()
        self.summary.update(final_step=step, error=f"{what}: {type(err).__name__}: {err}")
        self.summary["run"] = run_info()
        if self.is_main:
            write_json(os.path.join(self.workdir, "results.json"), self.summary)
        raise err

    def evaluate_finished_run(self, state: TrainState, p_eval: Callable) -> None:
        """A finished run restarted (e.g. after its final evaluation failed): evaluate it again."""
        if os.path.isfile(os.path.join(self.workdir, metrics_log.METRICS_FILE)):
            last = metrics_log.read_metrics(self.workdir).get(self.summary["total_steps"], {})
            self.summary.update({k: last[k] for k in ("train_loss",) if k in last})
        try:
            self.summary.update(evaluate_on_devices(p_eval, state, self.config, self.devices.local))
        except Exception as err:
            self.keep_work_and_raise(err, int(state.step), "evaluation")

    def close(self) -> None:
        self.writer.flush()
        self.ckpt.wait()
        self.ckpt.close()
        self.ckpt_closed = True

    def export_qat(self, model: MobileNetV1, state: TrainState) -> None:
        """The QAT model as a quantized model (``quantized_model``), scored integer-only."""
        what = "QAT export"
        try:
            quantized = quantized_lib.from_qat(model, jax.device_get(model_variables(state)))
            path = os.path.join(self.workdir, "quantized_model")
            if self.is_main:
                quantized_lib.save_quantized(quantized, path)
            self.summary["quantized_model"] = path
            if self.is_main and self.config.qat.integer:
                what = "integer-only evaluation"
                self.summary.update(evaluate_integer(quantized, self.config))
        except Exception as err:
            self.keep_work_and_raise(err, int(state.step), what)


def _train_loop(
    run: _Run, state: TrainState, start_step: int, last_skipped: int, batches, p_train, p_eval
) -> TrainState:
    """Steps from ``start_step`` to the end (or ``halt_after_steps``), logging, checkpointing
    (before each evaluation, so that a failing evaluation loses no training) and evaluating."""
    config, process_count = run.config, run.devices.process_count
    total_steps = run.summary["total_steps"]
    window: list[dict[str, jax.Array]] = []
    window_start, t0 = start_step, time.perf_counter()
    halt = config.get("halt_after_steps")
    if halt and start_step >= halt:
        log.info("halt_after_steps=%d reached at step %d: nothing to train", halt, start_step)
        return state
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
        scalars = _window_scalars(rows, time.perf_counter() - t0, config.batch_size)
        skipped_all = multihost_utils.process_allgather(np.int64(last_skipped))
        skipped_all = np.asarray(skipped_all, np.int64).reshape(process_count)
        scalars["skipped_corrupt"] = int(skipped_all.sum())
        run.summary["train_loss"] = scalars["train_loss"]
        meta = {
            **run.meta,
            "step": done,
            "examples_seen": done * config.batch_size,
            "skipped_corrupt": skipped_all.tolist(),
        }
        if do_ckpt:
            run.ckpt.save(done, state, meta)
        if do_eval:
            try:
                scalars.update(evaluate_on_devices(p_eval, state, config, run.devices.local))
            except Exception as err:
                if not do_ckpt:
                    run.ckpt.save(done, state, meta)
                run.writer.write_scalars(done, scalars)
                run.keep_work_and_raise(err, done, "evaluation")
            run.summary.update({k: v for k, v in scalars.items() if k.startswith("eval_")})
        run.writer.write_scalars(done, scalars)
        window, window_start, t0 = [], done, time.perf_counter()
        if halting:
            log.info("halt_after_steps=%d reached: stopping (resumable)", halt)
            break
    return state


def _window_scalars(rows: list[dict[str, np.ndarray]], seconds: float, batch: int) -> dict:
    """Mean metrics over a logging window, the last learning rate, steps/s and images/s."""
    scalars = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    scalars["learning_rate"] = float(rows[-1]["learning_rate"])
    scalars["steps_per_sec"] = len(rows) / seconds
    scalars["images_per_sec"] = len(rows) * batch / seconds
    return scalars


def _hide_accelerators_from_tf() -> None:
    """Keeps tf.data's TensorFlow off the GPUs/TPUs that JAX uses."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised
        pass
