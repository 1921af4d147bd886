"""Import TF-slim MobileNetV1 weights: frozen GraphDefs (``.pb``) and TF1 checkpoints.

TF-slim names (``MobilenetV1/Conv2d_3_depthwise/depthwise_weights``,
``.../BatchNorm/moving_variance``, ``MobilenetV1/Logits/Conv2d_1c_1x1/biases``) map onto this
project's variables (``params/Conv2d_3/depthwise/kernel``, ``batch_stats/.../bn_var``,
``params/Logits/bias``). Width, class count, block type and (for graphs) activation and BN
epsilon are read from the file; every tensor's shape is checked against the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import numpy as np

from qfsep_jax.models.mobilenet_v1 import BLOCK_SPECS, MobileNetV1

SCOPE = "MobilenetV1"
# The paper's float model in the project's data directory (see its README.md).
DEFAULT_DATA_DIR = "../shared/data"
OFFICIAL_MODEL = "models/mobilenet_v1_1.0_224_retrained_graph.pb"

log = logging.getLogger(__name__)
_BN_KEYS = {
    "gamma": ("params", "bn_scale"),
    "beta": ("params", "bn_bias"),
    "moving_mean": ("batch_stats", "bn_mean"),
    "moving_variance": ("batch_stats", "bn_var"),
}


class TFSlimImportError(ValueError):
    """The file is not a (readable) TF-slim MobileNetV1."""


@dataclasses.dataclass
class ImportedModel:
    """Variables in this project's layout plus the model attributes they fit."""

    variables: dict[str, Any]
    model_kwargs: dict[str, Any]
    source: str

    def model(self, **overrides) -> MobileNetV1:
        """The :class:`MobileNetV1` these variables belong to (attributes may be overridden)."""
        return MobileNetV1(**{**self.model_kwargs, **overrides})


def _layer_of(tf_layer: str) -> tuple[str, ...]:
    """``Conv2d_3_depthwise`` → ``("Conv2d_3", "depthwise")``; ``Conv2d_0`` → ``("Conv2d_0",)``."""
    m = re.fullmatch(r"(Conv2d_\d+)_(depthwise|pointwise)", tf_layer)
    return (m.group(1), m.group(2)) if m else (tf_layer,)


def map_tfslim_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """TF-slim variable name → array, to ``(variables, found)`` in this project's layout.

    ``found`` records structural facts (which layers have BN, depthwise biases).
    """
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    found = {"depthwise_bn": False, "depthwise_bias": False}

    def put(collection: str, path: tuple[str, ...], key: str, value: np.ndarray) -> None:
        node = variables[collection]
        for p in path:
            node = node.setdefault(p, {})
        node[key] = np.asarray(value, np.float32)

    pattern = re.compile(
        rf"{SCOPE}/(?:(Logits)/Conv2d_1c_1x1|(Conv2d_\d+(?:_depthwise|_pointwise)?))/(.+)"
    )
    for name, value in tensors.items():
        m = pattern.fullmatch(name)
        if not m:
            continue
        layer = ("Logits",) if m.group(1) else _layer_of(m.group(2))
        leaf = m.group(3)
        if leaf in ("weights", "depthwise_weights"):
            if leaf == "depthwise_weights":
                kh, kw, c, mult = value.shape
                if mult != 1:
                    raise TFSlimImportError(f"{name}: depth multiplier {mult} is not supported")
                value = value.reshape(kh, kw, 1, c)
            put("params", layer, "kernel", value)
        elif leaf == "biases":
            put("params", layer, "bias", value)
            if layer[-1] == "depthwise":
                found["depthwise_bias"] = True
        elif leaf.startswith("BatchNorm/") and leaf[len("BatchNorm/") :] in _BN_KEYS:
            collection, key = _BN_KEYS[leaf[len("BatchNorm/") :]]
            put(collection, layer, key, value)
            if layer[-1] == "depthwise":
                found["depthwise_bn"] = True
    return variables, found


def infer_model_kwargs(variables: dict, found: dict, source: str) -> dict[str, Any]:
    """Width, classes and block type from the mapped variables, with clear errors."""
    params = variables["params"]
    missing = [k for k in ("Conv2d_0", "Conv2d_13", "Logits") if k not in params]
    if missing:
        raise TFSlimImportError(
            f"{source}: no TF-slim MobileNetV1 weights found (missing {missing} under "
            f"'{SCOPE}/'); is this a MobileNetV1 graph or checkpoint?"
        )
    last_depth = params["Conv2d_13"]["pointwise"]["kernel"].shape[-1]
    width = last_depth / BLOCK_SPECS[-1][0]
    logits = params["Logits"]["kernel"]
    return {
        "num_classes": int(logits.shape[-1]),
        "width_multiplier": float(width),
        "block": "original" if found["depthwise_bn"] else "qf",
        "depthwise_bias": bool(found["depthwise_bias"]),
    }


def check_shapes(variables: dict, model: MobileNetV1, source: str, image_size: int = 224) -> None:
    """Raises :class:`TFSlimImportError` unless ``variables`` has exactly the model's shapes."""
    expected = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32),
    )
    for collection in ("params", "batch_stats"):
        want = {
            jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(expected.get(collection, {}))
        }
        got = {
            jax.tree_util.keystr(k): np.shape(v)
            for k, v in jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))
        }
        if want != got:
            absent = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:5]
            raise TFSlimImportError(
                f"{source}: {collection} do not fit MobileNetV1{model.width_multiplier}: "
                f"missing {absent}, unexpected {extra}, wrong shapes "
                f"{[(k, got[k], want[k]) for k in wrong]}"
            )


def _finish(tensors: dict, source: str, extra_kwargs: dict) -> ImportedModel:
    variables, found = map_tfslim_tensors(tensors)
    kwargs = {**infer_model_kwargs(variables, found, source), **extra_kwargs}
    model = MobileNetV1(**kwargs)
    check_shapes(variables, model, source)
    variables = jax.tree.map(np.asarray, variables)
    return ImportedModel(variables, kwargs, source)


def load_tfslim_graphdef(path: str) -> ImportedModel:
    """Imports a frozen TF-slim MobileNetV1 GraphDef.

    Ops outside the ``MobilenetV1/`` scope (e.g. a retrained head on top) are ignored. The
    activation (Relu6/Relu) and BN epsilon are read from the graph.
    """
    import tensorflow as tf  # heavy; only importers and data need it
    from google.protobuf.message import DecodeError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GraphDef not found: {path}")
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
    except DecodeError as err:
        raise TFSlimImportError(f"{path} is not a binary TF GraphDef: {err}") from None
    tensors, acts, eps = {}, set(), None
    for node in graph_def.node:
        if node.op == "Const" and node.name.startswith(SCOPE + "/"):
            tensors[node.name] = tf.make_ndarray(node.attr["value"].tensor)
        elif node.op in ("Relu6", "Relu") and node.name.startswith(SCOPE + "/"):
            acts.add(node.op)
        elif node.op.startswith("FusedBatchNorm") and node.name.startswith(SCOPE + "/"):
            eps = float(node.attr["epsilon"].f)
    for name, value in tensors.items():
        if name.endswith("Conv2d_0/BatchNorm/batchnorm/add/y"):
            eps = float(value)
    if len(acts) > 1:
        raise TFSlimImportError(f"{path}: mixes Relu and Relu6 activations, not supported")
    extra = {"bn_epsilon": eps if eps is not None else 1e-3}
    if acts:
        extra["activation"] = "relu6" if acts == {"Relu6"} else "relu"
    return _finish(tensors, path, extra)


def load_tfslim_checkpoint(
    path: str, activation: str = "relu6", bn_epsilon: float = 1e-3, use_ema: bool = True
) -> ImportedModel:
    """Imports a TF1 (name-based) TF-slim MobileNetV1 checkpoint (``model.ckpt-N`` prefix).

    Checkpoints do not record the activation or BN epsilon, so they are arguments. With
    ``use_ema`` the ``/ExponentialMovingAverage`` shadow variables, when present, are used, as
    TF-slim's evaluation does.
    """
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as err:
        raise TFSlimImportError(f"cannot read TF checkpoint {path!r}: {err}") from None
    names = reader.get_variable_to_shape_map()
    tensors = {}
    for name in names:
        if name.endswith("/ExponentialMovingAverage"):
            continue
        ema = name + "/ExponentialMovingAverage"
        tensors[name] = reader.get_tensor(ema if use_ema and ema in names else name)
    return _finish(tensors, path, {"activation": activation, "bn_epsilon": bn_epsilon})


def load_tfslim(path: str, **kwargs) -> ImportedModel:
    """Imports a ``.pb`` GraphDef or a checkpoint prefix, chosen by the path."""
    if path.endswith(".pb"):
        return load_tfslim_graphdef(path)
    return load_tfslim_checkpoint(path, **kwargs)


def load_official(
    data_dir: str = DEFAULT_DATA_DIR, model_path: str = OFFICIAL_MODEL, **model_overrides: Any
) -> tuple[MobileNetV1, dict[str, Any]]:
    """The paper's float MobileNetV1 1.0/224 (the official TF-slim graph): ``(model, variables)``.

    Args:
      data_dir: the project's data directory (default ``../shared/data``).
      model_path: the GraphDef, relative to ``data_dir`` unless absolute.
      **model_overrides: :class:`MobileNetV1` attributes to change (e.g. ``depthwise_impl``).

    The model is for inference (``dropout_rate=0`` unless overridden; call it with the default
    ``train=False``); it takes RGB images scaled to [-1, 1] and returns 1001 logits
    (0 = background). Raises FileNotFoundError naming the missing path.
    """
    path = model_path if os.path.isabs(model_path) else os.path.join(data_dir, model_path)
    if not os.path.isabs(model_path) and not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory not found: {os.path.abspath(data_dir)!r}; pass data_dir= the "
            f"folder that holds {OFFICIAL_MODEL}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"official float model not found: {os.path.abspath(path)!r} (data_dir={data_dir!r}, "
            f"model_path={model_path!r}); pass data_dir= the folder that holds {OFFICIAL_MODEL}"
        )
    imported = load_tfslim(path)
    model = imported.model(**{"dropout_rate": 0.0, **model_overrides})
    log.info("model %s (%s)", imported.source, imported.model_kwargs)
    return model, imported.variables


def tfslim_variable_names(variables: dict) -> dict[str, np.ndarray]:
    """Inverse of :func:`map_tfslim_tensors`: this project's variables as TF-slim names."""
    out = {}
    inv_bn = {v: k for k, v in _BN_KEYS.items()}

    def walk(collection: str, node: dict, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(collection, value, path + (key,))
                continue
            layer = "Logits/Conv2d_1c_1x1" if path == ("Logits",) else "_".join(path)
            value = np.asarray(value)
            if key == "kernel":
                if len(path) == 2 and path[1] == "depthwise":
                    kh, kw, _, c = value.shape
                    out[f"{SCOPE}/{layer}/depthwise_weights"] = value.reshape(kh, kw, c, 1)
                else:
                    out[f"{SCOPE}/{layer}/weights"] = value
            elif key == "bias":
                out[f"{SCOPE}/{layer}/biases"] = value
            else:
                out[f"{SCOPE}/{layer}/BatchNorm/{inv_bn[(collection, key)]}"] = value

    for collection in ("params", "batch_stats"):
        walk(collection, variables.get(collection, {}), ())
    return out
