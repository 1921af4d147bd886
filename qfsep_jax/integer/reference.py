"""LiteRT (``ai_edge_litert``) as the reference the integer pass is checked against.

:class:`LiteRTRunner` runs a ``.tflite`` model (and optionally its head) image by image with
``experimental_preserve_all_tensors=True`` and returns the tensors an :class:`IntModel`'s
``tensor_map`` names, so every intermediate uint8 tensor can be compared.

Op resolvers (``OP_RESOLVERS``):

* ``builtin``: LiteRT's built-in optimized kernels without the default XNNPACK delegate
  (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``): TFLite's integer kernels, the arithmetic of
  ``../shared/docs/numerics.md``; matches rounding preset ``litert_x86`` (``litert_x86_int8``
  for int8 models) on x86.
* ``reference``: TFLite's reference kernels (``BUILTIN_REF``); matches preset ``reference``.
* ``xnnpack``: LiteRT's default (``AUTO``): the XNNPACK delegate takes the quantized ops and
  requantizes in float32 ("fp32" requantization), so its results differ from the fixed-point
  kernels by a few LSB, and tensors inside the delegated partition are not written back.
"""

from __future__ import annotations

import warnings

import numpy as np

from qfsep_jax.integer.types import IntModel

OP_RESOLVERS = ("builtin", "reference", "xnnpack")


def expected_rounding(op_resolver: str, dtype: str) -> str:
    """The rounding preset a resolver is expected to match (``rounding="auto"`` tries all)."""
    if op_resolver == "reference":
        return "reference"
    return "litert_x86" if dtype == "uint8" else "litert_x86_int8"


def make_interpreter(
    path: str, op_resolver: str = "builtin", num_threads: int = 1, preserve_all_tensors: bool = True
):
    """An allocated LiteRT interpreter; by default it keeps every intermediate tensor.

    ``preserve_all_tensors=False`` is the interpreter as deployed (LiteRT may reuse the memory of
    intermediate tensors).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if op_resolver not in OP_RESOLVERS:
        raise ValueError(f"unknown op_resolver {op_resolver!r}; choose from {OP_RESOLVERS}")
    kind = {
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "reference": OpResolverType.BUILTIN_REF,
        "xnnpack": OpResolverType.AUTO,
    }[op_resolver]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "preserve_all_tensors is for debugging" warning
        it = Interpreter(
            model_path=path,
            experimental_op_resolver_type=kind,
            experimental_preserve_all_tensors=preserve_all_tensors,
            num_threads=num_threads,
        )
    it.allocate_tensors()
    return it


class LiteRTRunner:
    """Runs the backbone (and head) on one image at a time, returning the mapped tensors."""

    def __init__(
        self,
        int_model: IntModel,
        paths: list[str],
        op_resolver: str = "builtin",
        num_threads: int = 1,
    ):
        self.int_model = int_model
        self.interpreters = [make_interpreter(p, op_resolver, num_threads) for p in paths]
        self.details = [
            {d["index"]: d for d in it.get_tensor_details()} for it in self.interpreters
        ]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.interpreters[0].get_input_details()[0]["shape"])

    @property
    def input_dtype(self):
        return self.interpreters[0].get_input_details()[0]["dtype"]

    def tensor_name(self, file_index: int, tensor_index: int) -> str:
        return self.details[file_index][tensor_index]["name"]

    def __call__(self, image: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        """``{(file index, tensor index): array}`` for one image (no batch axis)."""
        x = image[None]
        for it in self.interpreters:
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], np.ascontiguousarray(x.reshape(d["shape"])))
            it.invoke()
            x = it.get_tensor(it.get_output_details()[0]["index"])
            # A head takes the backbone's output; a trailing softmax is never a head's input.
        return {
            (f, t): self.interpreters[f].get_tensor(t).copy()
            for _, f, t in self.int_model.tensor_map
        }

    def logits_index(self) -> tuple[int, int]:
        """Where the logits (the last mapped tensor) live."""
        _, f, t = self.int_model.tensor_map[-1]
        return f, t
