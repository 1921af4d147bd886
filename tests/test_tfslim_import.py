"""Import of the paper's TF-slim MobileNetV1: parity with TensorFlow, checkpoints, bad files."""

import os
import re

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import FLOAT_GRAPH, require

from configs import reproduce_table1
from qfsep_jax import paper
from qfsep_jax.data.input import eval_input
from qfsep_jax.importers.tfslim import (
    TFSlimImportError,
    load_tfslim,
    load_tfslim_checkpoint,
    load_tfslim_graphdef,
    tfslim_variable_names,
)
from qfsep_jax.models import MobileNetV1
from qfsep_jax.quant.fold import bn_alpha


@pytest.fixture(scope="module")
def official():
    return load_tfslim_graphdef(require(FLOAT_GRAPH))


def _tf_logits_fn(graph_path):
    graph_def = tf.compat.v1.GraphDef()
    with open(graph_path, "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        (logits,) = tf.compat.v1.import_graph_def(
            graph_def,
            input_map={"input:0": x},
            return_elements=["MobilenetV1/Logits/SpatialSqueeze:0"],
        )
    sess = tf.compat.v1.Session(graph=graph)
    return lambda images: sess.run(logits, {x: images})


def test_inferred_structure(official):
    assert official.model_kwargs["num_classes"] == 1001
    assert official.model_kwargs["width_multiplier"] == 1.0
    assert official.model_kwargs["block"] == "original"
    assert official.model_kwargs["activation"] == "relu6"
    np.testing.assert_allclose(official.model_kwargs["bn_epsilon"], 1e-3, rtol=1e-6)


def test_logits_match_tensorflow_on_every_val500_image(official):
    config = reproduce_table1.get_config()
    config.data_dir = require(".")
    data = eval_input(config, "folder:imagenet_val500")
    assert data.num_examples == 500
    model = official.model(dropout_rate=0.0)
    ours = jax.jit(model.apply)
    theirs = _tf_logits_fn(require(FLOAT_GRAPH))
    agree, worst, n = 0, 0.0, 0
    for batch in data.make():
        valid = int(batch["mask"].sum())
        a = np.asarray(ours(official.variables, batch["image"]))[:valid]
        b = theirs(batch["image"][:valid])
        worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
        agree += int(np.sum(a.argmax(1) == b.argmax(1)))
        n += valid
    assert n == 500
    assert worst <= 1e-4, f"relative logit error {worst}"
    assert agree == 500, f"top-1 agrees on {agree}/500 images"


def test_alpha_of_first_depthwise_is_the_papers_figure3(official):
    p = official.variables["params"]["Conv2d_1"]["depthwise"]
    s = official.variables["batch_stats"]["Conv2d_1"]["depthwise"]
    alpha = np.asarray(bn_alpha(p["bn_scale"], s["bn_var"], official.model_kwargs["bn_epsilon"]))
    np.testing.assert_allclose(alpha, paper.FIG3_ALPHA, rtol=5e-5, atol=1e-4)


def _write_tf1_checkpoint(tensors: dict, prefix: str) -> None:
    graph = tf.Graph()
    with graph.as_default():
        var_list = {
            name: tf.compat.v1.Variable(value, name=name.replace("/", "_"))
            for name, value in tensors.items()
        }
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False)


# Where each TF-slim variable belongs, written out here rather than taken from the importer, so
# that a mistake in the importer's name map cannot also be in what the tests write and expect.
SLIM_LEAF = {
    "weights": ("params", "kernel"),
    "depthwise_weights": ("params", "kernel"),
    "biases": ("params", "bias"),
    "BatchNorm/gamma": ("params", "bn_scale"),
    "BatchNorm/beta": ("params", "bn_bias"),
    "BatchNorm/moving_mean": ("batch_stats", "bn_mean"),
    "BatchNorm/moving_variance": ("batch_stats", "bn_var"),
}
SLIM_VARIABLE = re.compile(
    r"MobilenetV1/(Logits/Conv2d_1c_1x1|Conv2d_\d+(?:_depthwise|_pointwise)?)/("
    + "|".join(SLIM_LEAF)
    + ")"
)


def _our_place(name: str) -> tuple[str, tuple[str, ...]]:
    """A TF-slim variable name → (collection, path) in this project's variables."""
    scope, leaf = SLIM_VARIABLE.fullmatch(name).groups()
    if scope.startswith("Logits"):
        layer = ("Logits",)
    else:  # Conv2d_3_depthwise → ("Conv2d_3", "depthwise"); Conv2d_0 → ("Conv2d_0",)
        parts = scope.split("_")
        layer = ("_".join(parts[:2]), *parts[2:])
    collection, key = SLIM_LEAF[leaf]
    return collection, (*layer, key)


def _slim_tensors(variables: dict) -> dict[str, np.ndarray]:
    """This project's variables under TF-slim's names (the inverse of ``_our_place``)."""
    ours = {v: k for k, v in SLIM_LEAF.items() if k != "depthwise_weights"}
    out = {}
    for collection in ("params", "batch_stats"):
        for path, value in jax.tree_util.tree_leaves_with_path(variables[collection]):
            *layer, key = (p.key for p in path)
            scope = "Logits/Conv2d_1c_1x1" if layer == ["Logits"] else "_".join(layer)
            leaf, value = ours[(collection, key)], np.asarray(value)
            if layer[-1] == "depthwise" and key == "kernel":
                leaf, value = "depthwise_weights", value.reshape(*value.shape[:2], -1, 1)
            out[f"MobilenetV1/{scope}/{leaf}"] = value
    return out


def _at(variables: dict, collection: str, path: tuple[str, ...]) -> np.ndarray:
    node = variables[collection]
    for p in path:
        node = node[p]
    return np.asarray(node)


def test_checkpoint_of_the_official_weights_imports_identically(official, tmp_path):
    """A TF1 checkpoint holding the official graph's own tensors, under the graph's own names.

    Mutation that used to pass (the test wrote the checkpoint with the importer's inverse name
    map): gamma and beta swapped in the importer's map. Every tensor must land where
    ``SLIM_LEAF`` (written out above) says."""
    graph_def = tf.compat.v1.GraphDef()
    with open(require(FLOAT_GRAPH), "rb") as f:
        graph_def.ParseFromString(f.read())
    tensors = {
        n.name: tf.make_ndarray(n.attr["value"].tensor)
        for n in graph_def.node
        if n.op == "Const" and SLIM_VARIABLE.fullmatch(n.name)
    }
    assert len(tensors) == 1 + 15 + 13 + 4 * 27  # biases, weights, depthwise weights, BN
    prefix = str(tmp_path / "model.ckpt-0")
    _write_tf1_checkpoint(tensors, prefix)
    ckpt = load_tfslim(prefix)
    assert ckpt.model_kwargs["width_multiplier"] == 1.0 and ckpt.model_kwargs["num_classes"] == 1001
    for name, value in tensors.items():
        got = _at(ckpt.variables, *_our_place(name))
        np.testing.assert_array_equal(got, value.reshape(got.shape), err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, ckpt.variables, official.variables)
    # The importer's own inverse map agrees with TF's names.
    ours = tfslim_variable_names(official.variables)
    assert sorted(ours) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def _random_variables(model: MobileNetV1) -> dict:
    """Random arrays with the model's variable shapes (no compile needed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_checkpoint_prefers_moving_average_weights(tmp_path):
    """Names written by ``_slim_tensors`` (not the importer's map); every variable must come back
    in its place (a gamma/beta swap in the importer fails here too)."""
    model = MobileNetV1(num_classes=10, width_multiplier=0.25, block="qf")
    v = _random_variables(model)
    tensors = _slim_tensors(v)
    assert "MobilenetV1/Conv2d_3_pointwise/BatchNorm/gamma" in tensors
    ema = {k + "/ExponentialMovingAverage": np.asarray(t) + 1.0 for k, t in tensors.items()}
    prefix = str(tmp_path / "qf.ckpt")
    _write_tf1_checkpoint({**tensors, **ema}, prefix)
    imported = load_tfslim_checkpoint(prefix, activation="relu")
    assert imported.model_kwargs["block"] == "qf" and imported.model_kwargs["depthwise_bias"]
    assert imported.model_kwargs["width_multiplier"] == 0.25
    for collection in ("params", "batch_stats"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, np.asarray(b) + 1.0, rtol=1e-6),
            imported.variables[collection],
            v[collection],
        )
    raw = load_tfslim_checkpoint(prefix, activation="relu", use_ema=False)
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, raw.variables[collection], v[collection])


def test_bad_files_get_clear_errors(tmp_path):
    junk = tmp_path / "junk.pb"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(TFSlimImportError, match="not a binary TF GraphDef|no TF-slim MobileNetV1"):
        load_tfslim_graphdef(str(junk))
    truncated = tmp_path / "truncated.pb"
    with open(require(FLOAT_GRAPH), "rb") as f:
        truncated.write_bytes(f.read()[:100_000])
    with pytest.raises(TFSlimImportError):
        load_tfslim_graphdef(str(truncated))
    unrelated = tmp_path / "unrelated.pb"
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(np.ones((3, 3), np.float32), name="ResNet/conv1/weights")
    unrelated.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(TFSlimImportError, match="no TF-slim MobileNetV1 weights"):
        load_tfslim_graphdef(str(unrelated))
    with pytest.raises(FileNotFoundError):
        load_tfslim_graphdef(str(tmp_path / "missing.pb"))
    with pytest.raises(TFSlimImportError, match="cannot read TF checkpoint"):
        load_tfslim_checkpoint(str(tmp_path / "missing.ckpt"))


def test_wrong_shapes_are_rejected(tmp_path):
    v = _random_variables(MobileNetV1(num_classes=10, width_multiplier=0.25))
    tensors = tfslim_variable_names(v)
    tensors["MobilenetV1/Conv2d_5_pointwise/weights"] = np.zeros((1, 1, 64, 99), np.float32)
    prefix = str(tmp_path / "bad.ckpt")
    _write_tf1_checkpoint(tensors, prefix)
    with pytest.raises(TFSlimImportError, match="wrong shapes"):
        load_tfslim_checkpoint(prefix)
