"""Import of the paper's TF-slim MobileNetV1: parity with TensorFlow, checkpoints, bad files."""

import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import reproduce_table1
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
from tests.conftest import FLOAT_GRAPH, require

# The paper's Figure 3: alpha of the 32 channels of the first depthwise layer.
PAPER_FIG3_ALPHA = [
    21.5191, 0.223199, 1.08687, 14.1944, 0.863097, 0.183423, 0.101928, 0.194357, 24.2374,
    0.0637057, 0.113416, 1.48599, 0.299164, 0.6962, 0.932557, 3.70812, 14.8428, 0.0413136,
    0.184471, 0.228431, 17.1846, 30.6505, 0.114515, 1.3315, 0.214905, 0.627026, 0.0899751,
    0.199664, 0.0595126, 0.461869, 0.339099, 0.229413,
]  # fmt: skip


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
    np.testing.assert_allclose(alpha, PAPER_FIG3_ALPHA, rtol=5e-5, atol=1e-4)


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


def test_checkpoint_of_the_official_weights_imports_identically(official, tmp_path):
    tensors = tfslim_variable_names(official.variables)
    assert "MobilenetV1/Conv2d_1_depthwise/depthwise_weights" in tensors
    assert "MobilenetV1/Logits/Conv2d_1c_1x1/biases" in tensors
    prefix = str(tmp_path / "model.ckpt-0")
    _write_tf1_checkpoint(tensors, prefix)
    ckpt = load_tfslim(prefix)
    assert ckpt.model_kwargs["width_multiplier"] == 1.0 and ckpt.model_kwargs["num_classes"] == 1001
    jax.tree.map(np.testing.assert_array_equal, ckpt.variables, official.variables)


def _random_variables(model: MobileNetV1) -> dict:
    """Random arrays with the model's variable shapes (no compile needed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_checkpoint_prefers_moving_average_weights(tmp_path):
    model = MobileNetV1(num_classes=10, width_multiplier=0.25, block="qf")
    v = _random_variables(model)
    tensors = tfslim_variable_names(v)
    ema = {k + "/ExponentialMovingAverage": np.asarray(t) + 1.0 for k, t in tensors.items()}
    prefix = str(tmp_path / "qf.ckpt")
    _write_tf1_checkpoint({**tensors, **ema}, prefix)
    imported = load_tfslim_checkpoint(prefix, activation="relu")
    assert imported.model_kwargs["block"] == "qf" and imported.model_kwargs["depthwise_bias"]
    assert imported.model_kwargs["width_multiplier"] == 0.25
    k = imported.variables["params"]["Conv2d_3"]["pointwise"]["kernel"]
    np.testing.assert_allclose(k, np.asarray(v["params"]["Conv2d_3"]["pointwise"]["kernel"]) + 1.0)
    raw = load_tfslim_checkpoint(prefix, activation="relu", use_ema=False)
    np.testing.assert_array_equal(
        raw.variables["params"]["Conv2d_3"]["pointwise"]["kernel"],
        v["params"]["Conv2d_3"]["pointwise"]["kernel"],
    )


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
