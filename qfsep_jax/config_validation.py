"""One validation of every job's config, run before any work; and the restart check of a run.

:func:`validate` checks every field a job reads (type, range, choice, that a named file or folder
exists) and raises :class:`ConfigError` at the first bad one, with a one-line message naming the
field, its value and what is allowed: ``config.total_steps=0: must be an integer >= 1, or None
(num_epochs decides)``. It reads no data and writes nothing, so ``launch/main.py`` calls
it before it creates the workdir, and each job's entry function calls it again (the jobs are also
called directly, from tests and from the figure5 job).

:func:`restart_changes` compares a resumed training run's config with the one it was started with
(``workdir/config.json``). A change to a field that decides the training trajectory or the model
(:data:`RESTART_NEUTRAL` lists the others) is refused; the others are recorded with their diff in
``workdir/config_history.json`` by :func:`record_restart`.

The allowed values come from the modules that use them (recipes from ``ptq``, depthwise
implementations from ``models.depthwise``, ...), imported when their job is validated; none of
them imports TensorFlow, so a bad value is reported within seconds. The few choices whose users
import TensorFlow (optimizers, schedules) are defined here.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

JOBS = ("train", "table1", "tflite_check", "analyze", "figure5", "agreement", "export_tflite")
OPTIMIZERS = ("sgd", "momentum", "rmsprop")  # qfsep_jax.train.make_optimizer
SCHEDULES = ("exponential", "cosine", "constant")  # qfsep_jax.train.learning_rate_schedule

# Fields of a training config that may change when a run is restarted in the same workdir (each
# change is recorded in config_history.json): where the data lives; how often the run logs,
# checkpoints and evaluates, and on what (evaluation results change, the training does not); and
# how the same arithmetic is executed (devices sharing the global batch, the depthwise
# implementation), which changes float rounding only. total_steps and num_epochs are neutral
# except under the cosine schedule, whose shape depends on them. Every other field is refused.
RESTART_NEUTRAL = (
    "job",
    "data_dir",
    "tfds_data_dir",
    "manual_dir",
    "prefetch_batches",
    "eval_data",
    "eval_batch_size",
    "eval_limit",
    "crop_fraction",
    "num_devices",
    "model.depthwise_impl",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "async_checkpoints",
    "halt_after_steps",
    "qat.integer",
    "distributed",
)
_LENGTH_FIELDS = ("total_steps", "num_epochs")
HISTORY_FILE = "config_history.json"


class ConfigError(ValueError):
    """A config field holds a value its job cannot use (the message names field and value)."""


# ----------------------------------------------------------------------------------------------
# Field checks. Each takes the config and a dotted field name and raises ConfigError.


def _get(config, field: str) -> Any:
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config.{field} is missing: the {part!r} field is required")
        node = node[part]
    return node


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field}={value!r}: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(config, field: str, minimum: int, optional: str = "") -> int | None:
    """An integer >= ``minimum``; ``optional`` (what None means) allows None."""
    v = _get(config, field)
    if v is None and optional:
        return None
    if not _is_int(v) or v < minimum:
        suffix = f", or None ({optional})" if optional else ""
        _fail(field, v, f"must be an integer >= {minimum}{suffix}")
    return v


def _number(config, field: str, lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False):
    """A finite number in the interval ``lo``..``hi`` (ends open or closed)."""
    v = _get(config, field)
    ok = _is_number(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open or hi == math.inf else "]"
        _fail(field, v, f"must be a finite number in {left}{lo:g}, {hi:g}{right}")
    return v


def _choice(config, field: str, choices: Iterable[str]) -> str:
    v = _get(config, field)
    choices = tuple(choices)
    if v not in choices:
        _fail(field, v, f"must be one of {choices}")
    return v


def _bool(config, field: str) -> bool:
    v = _get(config, field)
    if not isinstance(v, bool):
        _fail(field, v, "must be True or False")
    return v


def _string(config, field: str, nonempty: bool = False) -> str:
    v = _get(config, field)
    if not isinstance(v, str) or (nonempty and not v):
        _fail(field, v, "must be a non-empty string" if nonempty else "must be a string")
    return v


def _names(config, field: str, choices: Iterable[str], allow_empty: bool = False) -> tuple:
    """A sequence of names, each one of ``choices``; non-empty unless ``allow_empty``."""
    v = _get(config, field)
    choices = tuple(choices)
    if isinstance(v, str) or not isinstance(v, Iterable):
        _fail(field, v, f"must be a tuple of names from {choices}")
    v = tuple(v)
    if not v and not allow_empty:
        _fail(field, v, f"must name at least one of {choices}")
    bad = [n for n in v if n not in choices]
    if bad:
        _fail(field, v, f"{bad[0]!r} is not one of {choices}")
    return v


def _bits(config, field: str, optional: bool = False) -> None:
    """A bit width (:mod:`qfsep_jax.quant.scheme`: 2 to 8); ``optional``: the field may be
    absent (configs recorded before bit widths were settings)."""
    from qfsep_jax.quant import scheme

    if optional and _parent_lacks(config, field):
        return
    v = _get(config, field)
    if not _is_int(v) or not scheme.MIN_BITS <= v <= scheme.MAX_BITS:
        _fail(field, v, f"must be an integer in [{scheme.MIN_BITS}, {scheme.MAX_BITS}]")


def _parent_lacks(config, field: str) -> bool:
    *parents, last = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    return last not in node


def _bits_list(config, field: str) -> None:
    """A non-empty tuple of distinct bit widths (2 to 8), if the field is set."""
    from qfsep_jax.quant import scheme

    if _parent_lacks(config, field):
        return
    v = _get(config, field)
    allowed = f"must be a non-empty tuple of distinct integers in [{scheme.MIN_BITS}, "
    allowed += f"{scheme.MAX_BITS}]"
    if isinstance(v, str) or not isinstance(v, Iterable):
        _fail(field, v, allowed)
    v = tuple(v)
    ok = bool(v) and len(set(v)) == len(v)
    ok = ok and all(_is_int(b) and scheme.MIN_BITS <= b <= scheme.MAX_BITS for b in v)
    if not ok:
        _fail(field, v, allowed)


def _pair(config, field: str, lo: float, hi: float) -> None:
    """Two numbers ``a <= b`` in ``(lo, hi]``."""
    v = _get(config, field)
    try:
        a, b = v
        ok = _is_number(a) and _is_number(b) and lo < a <= b <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        _fail(field, v, f"must be two numbers (min, max) with {lo:g} < min <= max <= {hi:g}")


def _data_dir(config, check_paths: bool) -> str:
    v = _string(config, "data_dir", nonempty=True)
    if check_paths and not os.path.isdir(v):
        _fail("data_dir", v, "no such directory (the folder holding the project's data)")
    return v


def _path(config, field: str, data_dir: str, check_paths: bool, kind: str = "file") -> None:
    """A path (absolute, or relative to data_dir) that exists."""
    v = _string(config, field, nonempty=True)
    full = v if os.path.isabs(v) else os.path.join(data_dir, v)
    exists = os.path.isfile(full) if kind == "file" else os.path.exists(full)
    if check_paths and not exists:
        _fail(field, v, f"no such {kind}: {full}")


def _spec(config, field: str, data_dir: str, check_paths: bool) -> None:
    """A dataset spec ``folder:<path under data_dir>`` (the folder exists) or ``tfds:<n>:<s>``."""
    from qfsep_jax.data.specs import parse_spec

    v = _get(config, field)
    try:
        kind, parts = parse_spec(v)
    except ValueError:
        _fail(field, v, "must be 'folder:<path under data_dir>' or 'tfds:<name>:<split>'")
    if kind == "folder" and check_paths:
        folder = os.path.normpath(os.path.join(data_dir, parts[0]))
        if not os.path.isdir(folder):
            _fail(field, v, f"no such image folder: {folder}")


def _data_fields(config, check_paths: bool, image_size_min: int = 1) -> str:
    """The fields of ``configs/base.py:data_config`` every job reads; returns data_dir."""
    from qfsep_jax.data import labels, specs

    data_dir = _data_dir(config, check_paths)
    _choice(config, "label_space", labels.LABEL_SPACES)
    _int(config, "image_size", image_size_min)
    _number(config, "crop_fraction", 0.0, 1.0, lo_open=True)
    _int(config, "eval_batch_size", 1)
    _choice(config, "on_corrupt", specs.CORRUPT_POLICIES)
    _string(config, "tfds_data_dir")
    _string(config, "manual_dir")
    return data_dir


# ----------------------------------------------------------------------------------------------
# The jobs.


def _train(config, check_paths: bool) -> None:
    from qfsep_jax import distributed
    from qfsep_jax.models import activations, depthwise, mobilenet_v1
    from qfsep_jax.quant import scheme

    data_dir = _data_fields(config, check_paths)
    _int(config, "seed", 0)
    _spec(config, "train_data", data_dir, check_paths)
    _spec(config, "eval_data", data_dir, check_paths)
    num_classes = _int(config, "num_classes", 1, optional="the label space's class count")
    if num_classes is None and config.label_space == "folder":
        _fail("num_classes", None, "must be set: label_space 'folder' has no fixed class count")
    _pair(config, "crop_area_range", 0.0, 1.0)
    _pair(config, "crop_aspect_ratio_range", 0.0, math.inf)
    _int(config, "shuffle_buffer", 1)
    _int(config, "prefetch_batches", 1)
    _int(config, "batch_size", 1)
    _int(config, "eval_limit", 1, optional="all images")
    _int(config, "num_devices", 1, optional="all local devices")

    _number(config, "model.width_multiplier", 0.0, lo_open=True)
    # Registered names: a user's blocks and activations once their module has registered them.
    _choice(config, "model.block", mobilenet_v1.block_names())
    _choice(config, "model.activation", activations.activation_names())
    _bool(config, "model.depthwise_bias")
    _int(config, "model.stem_stride", 1)
    _number(config, "model.bn_momentum", 0.0, 1.0, hi_open=True)
    _number(config, "model.bn_epsilon", 0.0, lo_open=True)
    _choice(config, "model.depthwise_impl", depthwise.IMPLS)
    init_from = _string(config, "init_from")
    if init_from:
        kind, _, path = init_from.partition(":")
        if kind not in ("checkpoint", "tfslim") or not path:
            _fail("init_from", init_from, "must be '', 'checkpoint:<path>' or 'tfslim:<path>'")
        full = path if os.path.isabs(path) or kind == "checkpoint" else os.path.join(data_dir, path)
        if check_paths and not os.path.exists(full):
            _fail("init_from", init_from, f"no such file or folder: {full}")

    _choice(config, "optimizer", OPTIMIZERS)
    _number(config, "learning_rate", 0.0)
    _choice(config, "lr_schedule", SCHEDULES)
    _number(config, "lr_decay_rate", 0.0, 1.0, lo_open=True)
    _number(config, "lr_decay_epochs", 0.0, lo_open=True)
    _bool(config, "lr_staircase")
    _number(config, "warmup_epochs", 0.0)
    _number(config, "momentum", 0.0, 1.0, hi_open=True)
    _number(config, "rmsprop_decay", 0.0, 1.0, hi_open=True)
    _number(config, "rmsprop_epsilon", 0.0, lo_open=True)
    _number(config, "weight_decay", 0.0)
    _number(config, "depthwise_weight_decay", 0.0)
    _number(config, "label_smoothing", 0.0, 1.0, hi_open=True)
    _number(config, "dropout_rate", 0.0, 1.0, hi_open=True)
    _number(config, "num_epochs", 0.0, lo_open=True)
    _int(config, "total_steps", 1, optional="num_epochs decides")

    if _get(config, "half_precision") is not None:  # None: bfloat16 on GPU/TPU only
        _bool(config, "half_precision")
    _bool(config, "qat.enabled")
    _choice(config, "qat.scheme", scheme.SCHEMES)
    _bool(config, "qat.per_channel_weights")
    _bits(config, "qat.weight_bits", optional=True)
    _bits(config, "qat.act_bits", optional=True)
    _number(config, "qat.ema_decay", 0.0, 1.0, lo_open=True, hi_open=True)
    _int(config, "qat.quant_delay_steps", 0)
    _int(config, "qat.bn_freeze_step", -1)
    if _bool(config, "qat.integer") and config.qat.enabled:
        act = activations.get_activation(config.model.activation)
        if not act.is_clamp:
            _fail(
                "model.activation",
                act.name,
                "must be a clamp (relu6, relu, none or a registered clamp Activation) when "
                "qat.integer evaluates the QAT model integer-only",
            )

    _int(config, "log_every_steps", 1)
    _int(config, "eval_every_steps", -1)
    _int(config, "checkpoint_every_steps", 1)
    _int(config, "keep_checkpoints", 1)
    _bool(config, "async_checkpoints")
    _int(config, "halt_after_steps", 1, optional="run to the end")

    _choice(config, "distributed.mode", distributed.MODES)
    _string(config, "distributed.coordinator_address")
    _int(config, "distributed.num_processes", -1)
    _int(config, "distributed.process_id", -1)


def _table1(config, check_paths: bool) -> None:
    from qfsep_jax import ptq
    from qfsep_jax.models import depthwise
    from qfsep_jax.quant import scheme

    data_dir = _data_fields(config, check_paths)
    _path(config, "model_path", data_dir, check_paths)
    _spec(config, "eval_data", data_dir, check_paths)
    _spec(config, "calibration_data", data_dir, check_paths)
    _int(config, "num_calibration_images", 1)
    _int(config, "limit", 1, optional="all images")
    _names(config, "rows", ("float", "float_relu", *ptq.RECIPES))
    _bits_list(config, "weight_bits")
    _bits_list(config, "act_bits")
    _choice(config, "observer", scheme.OBSERVERS)
    _number(config, "zero_variance_threshold", 0.0)
    _int(config, "cle_iterations", 1)
    _choice(config, "depthwise_impl", depthwise.IMPLS)
    _bool(config, "integer")


def _tflite_check(config, check_paths: bool) -> None:
    from qfsep_jax import integer
    from qfsep_jax.integer.reference import OP_RESOLVERS

    data_dir = _data_fields(config, check_paths, image_size_min=0)
    _path(config, "model", data_dir, check_paths)
    if _string(config, "head"):
        _path(config, "head", data_dir, check_paths)
    _spec(config, "eval_data", data_dir, check_paths)
    _int(config, "limit", 1, optional="all images")
    _choice(config, "op_resolver", OP_RESOLVERS)
    rounding = _string(config, "rounding", nonempty=True)
    if rounding != "auto":
        try:
            integer.parse_rounding(rounding)
        except ValueError:
            _fail(
                "rounding",
                rounding,
                f"must be 'auto', a preset {sorted(integer.ROUNDING_PRESETS)}"
                f", a rule {integer.ROUNDINGS} or 'conv=<rule>,depthwise=<rule>'",
            )
    _int(config, "num_threads", 1)


def _analyze(config, check_paths: bool) -> None:
    from qfsep_jax import ptq
    from qfsep_jax.models import depthwise
    from qfsep_jax.quant import scheme

    data_dir = _data_fields(config, check_paths)
    _path(config, "model_path", data_dir, check_paths)
    _names(config, "pipelines", ptq.RECIPES)
    _spec(config, "calibration_data", data_dir, check_paths)
    _int(config, "num_calibration_images", 1)
    _spec(config, "sqnr_data", data_dir, check_paths)
    _int(config, "num_sqnr_images", 1)
    _int(config, "sqnr_batch_size", 1)
    _choice(config, "observer", scheme.OBSERVERS)
    _number(config, "zero_variance_threshold", 0.0)
    _bool(config, "integer")
    _bool(config, "plots")
    _choice(config, "depthwise_impl", depthwise.IMPLS)


def _figure5(config, check_paths: bool) -> None:
    """The experiment's own fields; the figure5 job validates each run's training config."""
    from qfsep_jax import ptq

    data_dir = _data_dir(config, check_paths)
    # jobs.figure5's steps
    _names(config, "steps", ("train", "evaluate", "sqnr", "ptq_rows", "summary"))
    _names(config, "variants", tuple(_get(config, "train_configs")))
    seeds = _get(config, "seeds")
    if isinstance(seeds, str) or not seeds or not all(_is_int(s) for s in seeds):
        _fail("seeds", seeds, "must be a non-empty tuple of integers")
    _choice(config, "ptq_recipe", ptq.RECIPES)
    _names(config, "ptq_rows", sorted(ptq.RECIPES), allow_empty=True)
    _number(config, "zero_variance_threshold", 0.0)
    _spec(config, "calibration_data", data_dir, check_paths)
    _int(config, "num_calibration_images", 1)
    _int(config, "eval_limit", 1, optional="all images")
    _int(config, "num_sqnr_images", 1)
    _int(config, "sqnr_batch_size", 1)
    _bool(config, "integer")


def _agreement(config, check_paths: bool) -> None:
    from qfsep_jax import integer, ptq
    from qfsep_jax.data import labels
    from qfsep_jax.models import depthwise

    if _get(config, "reports"):  # the summary of existing reports reads nothing else
        return
    data_dir = _data_dir(config, check_paths)
    source = _string(config, "source", nonempty=True)
    kind, _, path = source.partition(":")
    if not (source == "official" or (kind in ("trained", "quantized") and path)):
        _fail("source", source, "must be 'official', 'trained:<run dir>' or 'quantized:<dir>'")
    if kind in ("trained", "quantized") and check_paths and not os.path.isdir(path):
        _fail("source", source, f"no such directory: {path}")
    if kind != "quantized":
        _choice(config, "recipe", ptq.RECIPES)
        _spec(config, "calibration_data", data_dir, check_paths)
        _int(config, "num_calibration_images", 1)
    if source == "official":
        _path(config, "model_path", data_dir, check_paths)
    _spec(config, "eval_data", data_dir, check_paths)
    _int(config, "limit", 1, optional="all images")
    _int(config, "image_size", 1, optional="the run's")
    if _get(config, "label_space") is not None:
        _choice(config, "label_space", labels.LABEL_SPACES)
    _int(config, "eval_batch_size", 1)
    rounding = _string(config, "rounding", nonempty=True)
    try:
        integer.parse_rounding(rounding)
    except ValueError:
        _fail("rounding", rounding, f"must be a preset {sorted(integer.ROUNDING_PRESETS)}")
    for field in (
        "snap_biases",
        "sim_rounding",
        "locate",
        "reorder_check",
        "float64_check",
        "plot",
    ):
        _bool(config, field)
    _choice(config, "depthwise_impl", depthwise.IMPLS)


def _export_tflite(config, check_paths: bool) -> None:
    from qfsep_jax import integer, ptq
    from qfsep_jax.data import labels
    from qfsep_jax.integer.reference import OP_RESOLVERS

    data_dir = _data_dir(config, check_paths)
    source = _get(config, "source")
    kind, _, arg = (source or "").partition(":")
    if kind not in ("ptq", "quantized", "tflite") or not arg:
        _fail("source", source, "must be 'ptq:<recipe>', 'quantized:<dir>' or 'tflite:<path>'")
    if kind == "ptq":
        if arg not in ptq.RECIPES:
            _fail("source", source, f"the recipe must be one of {tuple(ptq.RECIPES)}")
        _path(config, "model_path", data_dir, check_paths)
        _spec(config, "calibration_data", data_dir, check_paths)
        _int(config, "num_calibration_images", 1)
        _number(config, "zero_variance_threshold", 0.0)
    elif check_paths:
        full = arg if os.path.isabs(arg) or kind == "quantized" else os.path.join(data_dir, arg)
        if not os.path.exists(full):
            _fail("source", source, f"no such {'directory' if kind == 'quantized' else 'file'}")
    if _get(config, "eval_data"):
        _spec(config, "eval_data", data_dir, check_paths)
    if _get(config, "label_space"):
        _choice(config, "label_space", labels.LABEL_SPACES)
    _int(config, "image_size", 0)
    _int(config, "limit", 1, optional="all images")
    _number(config, "crop_fraction", 0.0, 1.0, lo_open=True)
    _int(config, "eval_batch_size", 1)
    _bool(config, "softmax")
    _choice(config, "op_resolver", OP_RESOLVERS)
    rounding = _string(config, "rounding")
    if rounding:
        try:
            integer.parse_rounding(rounding)
        except ValueError:
            presets = sorted(integer.ROUNDING_PRESETS)
            _fail("rounding", rounding, f"must be '' or a preset {presets}")
    _int(config, "num_threads", 1)


_VALIDATORS: dict[str, Callable[[Any, bool], None]] = {
    "train": _train,
    "table1": _table1,
    "tflite_check": _tflite_check,
    "analyze": _analyze,
    "figure5": _figure5,
    "agreement": _agreement,
    "export_tflite": _export_tflite,
}


def validate(config, job: str | None = None, check_paths: bool = True) -> None:
    """Raises :class:`ConfigError` naming the first field of ``config`` its job cannot use.

    Args:
      config: a job config (``ml_collections.ConfigDict``).
      job: the job whose fields are checked (default ``config.job``), one of :data:`JOBS`.
      check_paths: also check that the named data folders and model files exist.
    """
    job = job if job is not None else config.get("job")
    if job not in _VALIDATORS:
        _fail("job", job, f"must be one of {JOBS}")
    _VALIDATORS[job](config, check_paths)


# ----------------------------------------------------------------------------------------------
# Restarts of a training run.


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (JSON values: tuples become lists)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def config_as_json(config) -> dict[str, Any]:
    """A config as the JSON object written to ``workdir/config.json``."""
    return json.loads(config.to_json_best_effort())


def restart_neutral(field: str, schedule: str) -> bool:
    """Whether a restart may change ``field`` (dotted) of a run with learning-rate ``schedule``."""
    if field in _LENGTH_FIELDS:
        return schedule != "cosine"
    return any(field == n or field.startswith(n + ".") for n in RESTART_NEUTRAL)


# A run's config.json without these fields ran with these values: a restart that sets them to
# the same values changes nothing.
IMPLIED_FIELDS = {"qat.weight_bits": 8, "qat.act_bits": 8}


def _effective_config(workdir: str) -> dict[str, Any]:
    """The flat config the run's last segment ran with: config.json plus the recorded changes."""
    from qfsep_jax.io_utils import read_json

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{workdir} holds checkpoints but no config.json: the restart's config cannot be "
            "checked against the run's; use a new workdir"
        )
    effective = flatten(read_json(path))
    if any(k.startswith("qat.") for k in effective):
        for field, value in IMPLIED_FIELDS.items():
            effective.setdefault(field, value)
    history = os.path.join(workdir, HISTORY_FILE)
    for entry in read_json(history) if os.path.isfile(history) else []:
        effective.update({k: new for k, (_, new) in entry["changes"].items()})
    return effective


def restart_changes(workdir: str, config) -> dict[str, list]:
    """The fields a restart in ``workdir`` changes, ``{field: [previous, new]}``; refuses some.

    Compares ``config`` with the run's (``workdir/config.json`` and the changes recorded in
    ``config_history.json``). Raises :class:`ConfigError` listing every changed field that is not
    neutral (:data:`RESTART_NEUTRAL`): the steps still to run would compute something other than
    what the run's recorded config says. Returns the neutral changes (empty if none). Reads only.
    """
    old, new = _effective_config(workdir), flatten(config_as_json(config))
    changed = {
        k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }
    schedule = new.get("lr_schedule", old.get("lr_schedule"))
    refused = {k: v for k, v in changed.items() if not restart_neutral(k, schedule)}
    if refused:
        diff = "; ".join(f"config.{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"{workdir} holds a run started with other values of fields that change its results "
            f"({diff}); restart with the run's values (its config.json) or use a new workdir"
        )
    return changed


def record_restart(workdir: str, start_step: int, changes: Mapping[str, list]) -> None:
    """Appends a restart's changes to ``workdir/config_history.json`` (written atomically)."""
    from qfsep_jax.io_utils import read_json, write_json

    path = os.path.join(workdir, HISTORY_FILE)
    history = read_json(path) if os.path.isfile(path) else []
    history.append(
        {
            "start_step": int(start_step),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "changes": {k: list(v) for k, v in changes.items()},
        }
    )
    write_json(path, history)
