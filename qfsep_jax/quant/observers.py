"""Activation-range calibration: the observers that turn activations into (min, max) ranges.

An observer state is a dict ``{"min", "max", "count"}`` of float32 scalars (``count`` is the
number of batches seen). :func:`observe` is pure and jit-friendly; the models keep the state in
the ``quant_ranges`` Flax collection and call it during calibration (PTQ) and QAT training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qfsep_jax.quant.scheme import QuantConfig

RangeState = dict


def init_range_state() -> RangeState:
    """An empty observer state: min=+inf, max=-inf, nothing seen."""
    return {
        "min": jnp.array(jnp.inf, jnp.float32),
        "max": jnp.array(-jnp.inf, jnp.float32),
        "count": jnp.array(0.0, jnp.float32),
    }


def batch_range(x: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """The (min, max) of one batch as the observer sees it (percentiles for ``percentile``)."""
    x = x.astype(jnp.float32)
    if config.observer == "percentile":
        flat = jnp.ravel(x)
        return (
            jnp.percentile(flat, 100.0 - config.percentile),
            jnp.percentile(flat, config.percentile),
        )
    return jnp.min(x), jnp.max(x)


def observe(
    state: RangeState, x: jax.Array, config: QuantConfig, axis_name: str | None = None
) -> RangeState:
    """Folds one batch ``x`` into the observer state.

    ``minmax`` keeps the running extremes, ``ema`` an exponential moving average of the per-batch
    extremes (initialised by the first batch), ``percentile`` the running mean of per-batch
    percentiles. With ``axis_name``, the per-batch statistics are combined across devices first
    (min/max across replicas; the mean of percentiles), so replicated states stay identical.
    """
    lo, hi = batch_range(x, config)
    if axis_name is not None:
        if config.observer == "percentile":
            lo, hi = jax.lax.pmean(lo, axis_name), jax.lax.pmean(hi, axis_name)
        else:
            lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    count = state["count"]
    first = count == 0
    if config.observer == "minmax":
        new_lo, new_hi = jnp.minimum(state["min"], lo), jnp.maximum(state["max"], hi)
    elif config.observer == "ema":
        d = config.ema_decay
        new_lo = jnp.where(first, lo, d * state["min"] + (1 - d) * lo)
        new_hi = jnp.where(first, hi, d * state["max"] + (1 - d) * hi)
    else:
        w = 1.0 / (count + 1.0)
        new_lo = jnp.where(first, lo, state["min"] + w * (lo - state["min"]))
        new_hi = jnp.where(first, hi, state["max"] + w * (hi - state["max"]))
    return {"min": new_lo, "max": new_hi, "count": count + 1.0}
