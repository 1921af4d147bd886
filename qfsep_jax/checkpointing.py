"""Orbax checkpoints of the training state, and reading a training run back.

:class:`Checkpointer` saves and restores the train state with the data-stream position
alongside; :func:`load_run_config`, :func:`model_from_config` and :func:`load_trained` give back
a finished run's config, model and variables.

A checkpoint is a step directory of an Orbax ``CheckpointManager`` with two items: ``state``
(the train state as a nested dict of numpy arrays: step, params, batch_stats, quant_ranges,
optimizer state, rng) and ``meta`` (JSON: the data position and what defines the stream).
Orbax writes a step into a temporary directory and renames it when complete, so a crash during
a save never leaves a half-written checkpoint that :meth:`Checkpointer.latest_step` would return.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from qfsep_jax import precision
from qfsep_jax.data import labels as labels_lib
from qfsep_jax.data.input import resolve_path
from qfsep_jax.models.mobilenet_v1 import MobileNetV1
from qfsep_jax.quant.scheme import QuantConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores a train-state pytree and its metadata in ``directory``.

    Args:
      directory: the checkpoint folder (created if needed).
      max_to_keep: how many of the newest checkpoints are kept.
      asynchronous: write in a background thread (the state is copied to the host first).
    """

    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes ``state`` (any pytree of arrays; copied to host numpy) and JSON ``meta``."""
        tree = to_host_tree(state)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores step ``step`` into the structure of ``target``; returns (state, meta)."""
        abstract = to_host_tree(target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        check_same_structure(abstract, restored["state"], f"checkpoint {self.directory}/{step}")
        state = flax.serialization.from_state_dict(target, restored["state"])
        return state, dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until an asynchronous save has been finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def to_host_tree(state: Any) -> Any:
    """A state pytree as nested dicts of numpy arrays (what Orbax stores)."""
    return jax.tree.map(np.asarray, flax.serialization.to_state_dict(jax.device_get(state)))


def check_same_structure(expected: Any, got: Any, what: str) -> None:
    """Raises ValueError naming the first path whose presence, shape or dtype differs."""
    exp = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
    missing, extra = sorted(set(exp) - set(have)), sorted(set(have) - set(exp))
    if missing or extra:
        raise ValueError(
            f"{what} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, v in exp.items():
        if np.shape(v) != np.shape(have[key]):
            raise ValueError(
                f"{what}: {key} has shape {np.shape(have[key])}, the model needs {np.shape(v)}"
            )


def load_variables(path: str) -> dict[str, Any]:
    """Model variables (params, batch_stats, quant_ranges) of the newest checkpoint under ``path``.

    ``path`` is a training workdir, its ``checkpoints`` folder, or one step folder. Used to start
    QAT from a float run. Returns numpy arrays.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        path = os.path.join(path, CHECKPOINT_DIR)
    if os.path.isdir(os.path.join(path, "state")):  # a step folder
        step_dir = path
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint folder at {path}")
        manager = ocp.CheckpointManager(path, item_names=("state", "meta"))
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        step_dir = os.path.join(path, str(step))
        manager.close()
    tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    log.info("loaded variables from %s", step_dir)
    return {
        k: jax.tree.map(np.asarray, tree[k])
        for k in ("params", "batch_stats", "quant_ranges")
        if tree.get(k)
    }


def load_run_config(workdir: str):
    """The config a training run wrote to ``workdir/config.json``, as a ``ConfigDict``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training run: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def quant_config(config) -> QuantConfig | None:
    """The QAT quantization scheme of a config (None for float training)."""
    if not config.qat.enabled:
        return None
    return QuantConfig(
        scheme=config.qat.scheme,
        per_channel_weights=config.qat.per_channel_weights,
        observer="ema",
        ema_decay=config.qat.ema_decay,
        # Runs recorded before bit widths were settings were 8-bit.
        weight_bits=config.qat.get("weight_bits", 8),
        act_bits=config.qat.get("act_bits", 8),
    )


def num_classes_of(config) -> int:
    """``config.num_classes`` or the class count of ``config.label_space``."""
    if config.get("num_classes"):
        return int(config.num_classes)
    if config.label_space == "folder":
        raise ValueError("set config.num_classes: label_space 'folder' has no fixed class count")
    return labels_lib.num_classes(config.label_space, config.data_dir)


def model_from_config(
    config: ml_collections.ConfigDict, num_classes: int, **overrides: Any
) -> tuple[MobileNetV1, dict[str, Any] | None]:
    """A training config's model and the variables its ``init_from`` names (``None``: random init).

    ``init_from`` is ``""`` (random init), ``"checkpoint:<workdir or checkpoint dir>"`` (a float
    run of ours with the same ``config.model``) or ``"tfslim:<.pb or TF1 checkpoint>"`` (relative
    paths are under ``data_dir``; the imported architecture replaces ``config.model``'s).
    ``overrides`` are model attributes set on top (e.g. ``axis_name``).
    """
    m = config.model
    kw = dict(
        dropout_rate=config.dropout_rate,
        bn_momentum=m.bn_momentum,
        depthwise_impl=m.depthwise_impl,
        quant=quant_config(config),
        dtype=precision.compute_dtype(config),
        **overrides,
    )
    init_from = config.get("init_from", "")
    kind, _, path = init_from.partition(":")
    if kind == "tfslim":
        from qfsep_jax.importers.tfslim import load_tfslim

        imported = load_tfslim(resolve_path(config.data_dir, path))
        model = imported.model(**kw)
        if model.num_classes != num_classes:
            raise ValueError(
                f"imported model has {model.num_classes} classes, the data's label space "
                f"{config.label_space!r} has {num_classes}; use label_space='imagenet1001'"
            )
        return model, imported.variables
    if init_from and kind != "checkpoint":
        raise ValueError(
            f"bad init_from {init_from!r}: use '', 'checkpoint:<path>' or 'tfslim:<path>'"
        )
    model = MobileNetV1(
        num_classes=num_classes,
        width_multiplier=m.width_multiplier,
        block=m.block,
        activation=m.activation,
        depthwise_bias=m.depthwise_bias,
        stem_stride=m.stem_stride,
        bn_epsilon=m.bn_epsilon,
        **kw,
    )
    return model, (load_variables(path) if kind == "checkpoint" else None)


def load_trained(config, workdir: str) -> tuple[MobileNetV1, dict[str, Any]]:
    """A training run's float model in inference mode and its newest checkpoint's variables.

    Returns ``(model, {"params", "batch_stats"})``; the model is built from ``config`` (the
    run's own, see :func:`load_run_config`) with dropout off, no pmap axis and float32 compute
    (the checkpoint is the same whatever precision trained it).
    """
    model, _ = model_from_config(config, num_classes_of(config))
    model = model.clone(axis_name=None, dropout_rate=0.0, dtype=None)  # float32 inference
    loaded = load_variables(workdir)
    return model, {k: loaded[k] for k in ("params", "batch_stats") if k in loaded}
