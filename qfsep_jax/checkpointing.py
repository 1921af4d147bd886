"""Orbax checkpoints of the training state, with the data-stream position alongside.

A checkpoint is a step directory of an Orbax ``CheckpointManager`` with two items: ``state``
(the train state as a nested dict of numpy arrays: step, params, batch_stats, quant_ranges,
optimizer state, rng) and ``meta`` (JSON: the data position and what defines the stream).
Orbax writes a step into a temporary directory and renames it when complete, so a crash during
a save never leaves a half-written checkpoint that :meth:`Checkpointer.latest_step` would return.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

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
    logging.info("loaded variables from %s", step_dir)
    return {
        k: jax.tree.map(np.asarray, tree[k])
        for k in ("params", "batch_stats", "quant_ranges")
        if tree.get(k)
    }
