"""Activations of the conv layers: built-in ones by name, a user's own as :class:`Activation`.

A layer's ``activation`` is a registered name (``relu6``, ``relu``, ``none``, ``hard_swish`` and
whatever :func:`register_activation` adds) or an :class:`Activation` object, resolved by
:func:`get_activation`. An activation that is a clamp to ``[lo, hi]`` (``relu6`` = ``[0, 6]``,
``relu`` = ``[0, None]``) says so in ``clamp``: the integer-only pass then applies it as the
clamp ``[act_min, act_max]`` of the layer's output codes
(:func:`qfsep_jax.integer.kernels.activation_range`). An activation that is not a clamp
(``clamp=None``, e.g. ``hard_swish``) trains and runs in float and in the fake-quant
simulation, but the integer pass cannot express it and refuses it at conversion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Clamp = tuple[float | None, float | None]


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation: a name, the function, and its clamp where it is one.

    Attributes:
      name: how reports, the integer model (``IntLayer.activation``) and saved models call it.
      fn: the elementwise function ``x -> y`` (JAX-traceable; its derivative comes from JAX's
        autodiff). ``None`` for a pure clamp: then it is ``clip(x, lo, hi)``.
      clamp: ``(lo, hi)`` when the activation is exactly ``clip(x, lo, hi)`` (``None`` for an
        open side: ``relu`` is ``(0.0, None)``, identity ``(None, None)``); ``None`` when it is
        not a clamp. The integer-only pass uses it and trusts it: ``fn`` must compute that clip.

    Frozen and hashable, so that it can be a Flax module attribute and a static argument of
    ``jax.jit``; two objects are equal when name, ``fn`` (the same function object) and
    ``clamp`` are.
    """

    name: str
    fn: Callable[[jax.Array], jax.Array] | None = None
    clamp: Clamp | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Activation name must be a non-empty string, got {self.name!r}")
        if self.fn is not None and not callable(self.fn):
            raise TypeError(f"Activation {self.name!r}: fn must be callable, got {self.fn!r}")
        if self.clamp is None:
            if self.fn is None:
                raise ValueError(f"Activation {self.name!r}: give fn, clamp, or both")
            return
        if not isinstance(self.clamp, (tuple, list)) or len(self.clamp) != 2:
            raise TypeError(
                f"Activation {self.name!r}: clamp must be a pair (lo, hi) of floats or None, "
                f"got {self.clamp!r}"
            )
        bounds = []
        for b in self.clamp:
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))):
                raise TypeError(
                    f"Activation {self.name!r}: clamp bounds must be numbers or None, "
                    f"got {self.clamp!r}"
                )
            if b is not None and not math.isfinite(b):
                raise ValueError(
                    f"Activation {self.name!r}: clamp bounds must be finite (None for an open "
                    f"side), got {self.clamp!r}"
                )
            bounds.append(None if b is None else float(b))
        lo, hi = bounds
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"Activation {self.name!r}: clamp needs lo < hi, got {self.clamp!r}")
        object.__setattr__(self, "clamp", (lo, hi))

    @property
    def is_clamp(self) -> bool:
        """Whether the activation is a clamp ``[lo, hi]`` (the integer pass can run it)."""
        return self.clamp is not None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the activation elementwise."""
        if self.fn is not None:
            return self.fn(x)
        lo, hi = self.clamp
        if lo is None and hi is None:
            return x
        return jnp.clip(x, lo, hi)

    def derivative(self, z: jax.Array) -> jax.Array:
        """The derivative at ``z``, elementwise, as JAX's autodiff of :meth:`__call__` gives it."""
        return jax.jvp(self.__call__, (z,), (jnp.ones_like(z),))[1]


RELU6 = Activation("relu6", None, (0.0, 6.0))
RELU = Activation("relu", jax.nn.relu, (0.0, None))
NONE = Activation("none", None, (None, None))
HARD_SWISH = Activation("hard_swish", jax.nn.hard_swish, None)

BUILTIN: dict[str, Activation] = {a.name: a for a in (RELU6, RELU, NONE, HARD_SWISH)}
_REGISTRY: dict[str, Activation] = dict(BUILTIN)


def is_builtin(activation: Activation, names: tuple[str, ...] = tuple(BUILTIN)) -> bool:
    """Whether ``activation`` is (equal to) the built-in activation of its name in ``names``."""
    return activation.name in names and BUILTIN[activation.name] == activation


def activation_names() -> tuple[str, ...]:
    """The registered activation names, in registration order."""
    return tuple(_REGISTRY)


def register_activation(activation: Activation) -> Activation:
    """Registers ``activation`` under its name, so that configs and saved models can name it.

    Raises TypeError if it is not an :class:`Activation`, ValueError if the name is taken.
    Returns it.
    """
    if not isinstance(activation, Activation):
        raise TypeError(
            f"register_activation takes an Activation(name, fn, clamp), got {activation!r}"
        )
    if activation.name in _REGISTRY:
        raise ValueError(
            f"activation name {activation.name!r} is already registered "
            f"(registered: {activation_names()})"
        )
    _REGISTRY[activation.name] = activation
    return activation


def unregister_activation(name: str) -> None:
    """Removes a user-registered activation (the built-in ones stay)."""
    if name in BUILTIN:
        raise ValueError(f"activation {name!r} is built in and cannot be unregistered")
    if name not in _REGISTRY:
        raise ValueError(
            f"activation {name!r} is not registered (registered: {activation_names()})"
        )
    del _REGISTRY[name]


def get_activation(activation: str | Activation) -> Activation:
    """The :class:`Activation` for a registered name, or ``activation`` itself if it is one."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        if activation in _REGISTRY:
            return _REGISTRY[activation]
        raise ValueError(
            f"unknown activation {activation!r}; choose from {activation_names()} "
            "(or pass an Activation(name, fn, clamp), or register one with register_activation)"
        )
    raise TypeError(
        f"activation must be a registered name {activation_names()} or an Activation, "
        f"got {type(activation).__name__} {activation!r}"
    )


def activation_name(activation: str | Activation) -> str:
    """The registered name that stands for ``activation`` when a model is saved.

    A name is checked and returned; an :class:`Activation` must equal the registered one of its
    name (else ValueError: a saved model could not rebuild it).
    """
    act = get_activation(activation)
    if _REGISTRY.get(act.name) != act:
        raise ValueError(
            f"activation {act!r} is not registered; register it with register_activation(...) "
            "(in the saving and the loading process) so that it can be saved by name"
        )
    return act.name
