"""Batch-norm folding and the paper's zero-variance fix, on the variables pytree.

A conv layer's variables are ``params: {kernel, [bias], [bn_scale, bn_bias]}`` and
``batch_stats: {bn_mean, bn_var}``. Folding rewrites each BN layer into ``{kernel, bias}`` with

    alpha = gamma / sqrt(var + eps), kernel' = kernel * alpha, bias' = beta + alpha * (bias - mean)

so that the model built with ``bn_folded=True`` computes the same function in inference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Variables = dict[str, Any]


def bn_alpha(gamma: jax.Array, var: jax.Array, eps: float) -> jax.Array:
    """The per-channel scale that BN folding multiplies into the kernel: gamma / sqrt(var + eps)."""
    return gamma * jax.lax.rsqrt(var + eps)


def fold_bn(
    kernel: jax.Array,
    bias: jax.Array | None,
    gamma: jax.Array,
    beta: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    eps: float,
) -> tuple[jax.Array, jax.Array]:
    """Folds inference-mode BN into a conv kernel (output channels last) and bias.

    The bias is ``beta + round(alpha * (bias - mean))``: the product is rounded to float32 before
    the sum, inside ``jit`` as well as outside it. XLA otherwise contracts the multiply-add into
    a fused multiply-add (one rounding) when it compiles the fold into a larger function, so the
    QAT model's inference pass (which folds inside its jitted forward pass) and the exported
    folded variables (folded eagerly, :func:`fold_batch_norm`) would differ by one float32 ulp
    in about a quarter of the channels; that moves activations across 8-bit rounding
    boundaries. Under ``jax.vmap`` the product is not kept apart (see :func:`_rounded`).
    """
    alpha = bn_alpha(gamma, var, eps)
    conv_bias = jnp.zeros_like(beta) if bias is None else bias
    return kernel * alpha, beta + _rounded(alpha * (conv_bias - mean))


def _rounded(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed (rounded to its dtype) before any consumer reads it.

    XLA does not fuse across a conditional, so an operation that consumes the result cannot be
    contracted with the one that produced it (multiply + add into an FMA). The predicate is
    always true (``x != x`` or ``x == x`` holds for every value, NaN included) but is runtime
    data that XLA does not fold; the never-taken branch differs (``-x``) only because identical
    branches are simplified away. ``jax.vmap`` turns the conditional into a select, which fuses.
    """
    always = jnp.all((x != x) | (x == x))
    return jax.lax.cond(always, lambda v: v, lambda v: -v, x)


def _map_bn_layers(
    variables: Variables, fn: Callable[[tuple, dict, dict], tuple[dict, dict]]
) -> Variables:
    """Applies ``fn(path, params, stats) -> (params, stats)`` to every BN layer of a tree."""

    def walk(params: dict, stats: dict, path: tuple) -> tuple[dict, dict]:
        if "bn_scale" in params:
            return fn(path, params, stats)
        new_params, new_stats = {}, {}
        for key, sub in params.items():
            if isinstance(sub, dict):
                new_params[key], s = walk(sub, stats.get(key, {}), path + (key,))
                if s:
                    new_stats[key] = s
            else:
                new_params[key] = sub
        return new_params, new_stats

    if "params" not in variables:
        raise ValueError(f"expected a variables dict with 'params', got keys {list(variables)}")
    params, stats = walk(variables["params"], variables.get("batch_stats", {}), ())
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    if stats:
        out["batch_stats"] = stats
    return out


def fold_batch_norm(variables: Variables, eps: float) -> Variables:
    """Folds every BN layer; the result matches a model built with ``bn_folded=True``."""

    def fold(path, params, stats):
        kernel, bias = fold_bn(
            params["kernel"],
            params.get("bias"),
            params["bn_scale"],
            params["bn_bias"],
            stats["bn_mean"],
            stats["bn_var"],
            eps,
        )
        return {"kernel": kernel, "bias": bias}, {}

    return _map_bn_layers(variables, fold)


def folded(model: Any, variables: Variables) -> tuple[Any, Variables]:
    """``(model, variables)`` with BN folded: ``model.clone(bn_folded=True)`` and
    :func:`fold_batch_norm` of the variables; returned unchanged if already folded."""
    if model.bn_folded:
        return model, variables
    return model.clone(bn_folded=True), fold_batch_norm(variables, model.bn_epsilon)


# Which BN layers the zero-variance fix may touch: the paper's fix is for the depthwise layers,
# whose all-zero channels are the source of the exploding folded scales (its first root cause);
# "all" also fixes the standard convs (Conv2d_0 and the pointwise layers).
ZERO_VARIANCE_SCOPES = ("depthwise", "all")


def is_depthwise_path(path: tuple[str, ...]) -> bool:
    """Whether a conv layer's module path is a depthwise layer (its last name is ``depthwise``).

    The path, not the kernel shape, decides: the module name is what the model, the TF-slim
    importer and :mod:`qfsep_jax.models.names` all key layers by, for both block types, while
    the shape ``(k, k, 1, C)`` would equally match any conv with one input channel and depends
    on the kernel layout.
    """
    return bool(path) and path[-1] == "depthwise"


def fix_zero_variance(
    variables: Variables,
    threshold: float,
    layer_filter: Callable[[dict], bool] | None = None,
    scope: str = "all",
) -> tuple[Variables, dict[str, list[int]]]:
    """The paper's fix: replace near-zero BN variances by the mean variance of the other channels.

    Channels whose moving variance is below ``threshold`` are the all-zero channels whose folded
    scale gamma/sqrt(var + eps) explodes. Their variance becomes the mean variance of the other
    channels of the same layer, before folding. ``scope`` (one of :data:`ZERO_VARIANCE_SCOPES`)
    picks the BN layers: ``"depthwise"`` only the depthwise layers (the paper's fix), ``"all"``
    every BN layer; ``layer_filter(params)`` narrows them further. Returns the new variables and,
    per layer path, the indices that were fixed.
    """
    if scope not in ZERO_VARIANCE_SCOPES:
        raise ValueError(f"scope must be one of {ZERO_VARIANCE_SCOPES}, got {scope!r}")
    fixed: dict[str, list[int]] = {}

    def fix(path, params, stats):
        if scope == "depthwise" and not is_depthwise_path(path):
            return params, stats
        if layer_filter is not None and not layer_filter(params):
            return params, stats
        var = np.asarray(stats["bn_var"])
        dead = var < threshold
        if dead.any() and not dead.all():
            var = var.copy()
            var[dead] = var[~dead].mean()
            fixed["/".join(path)] = np.flatnonzero(dead).tolist()
            stats = {**stats, "bn_var": jnp.asarray(var, jnp.float32)}
        return params, stats

    return _map_bn_layers(variables, fix), fixed
