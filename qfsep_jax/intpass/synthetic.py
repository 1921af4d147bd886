"""Synthetic uint8 MobileNetV1-family ``.tflite`` models, made by TensorFlow's own converter.

:func:`build_mobilenet_tflite` writes a MobileNetV1-shaped TF graph (any width, resolution,
number of blocks, class count; the original block or the paper's quantization-friendly block)
with random weights and ``FakeQuantWithMinMaxArgs`` nodes whose activation ranges are
calibrated on random images, and converts it with ``tf.compat.v1.lite.TFLiteConverter``
(``inference_type=tf.uint8``), the legacy quantization-aware path the official models came
from. These models test the TFLite importer and bit-exactness beyond the one official file;
the ``qf`` block's depthwise output has no activation and a mid-range zero point, so its
requantization meets negative values (where the rounding rules differ).
"""

from __future__ import annotations

import numpy as np

from qfsep_jax.io_utils import write_atomic
from qfsep_jax.models.mobilenet_v1 import BLOCK_SPECS, scaled_depth


def _layers(width: float, num_blocks: int, num_classes: int, block: str, act: str = "relu6"):
    """(kind, out channels, stride, activation) of the chain, MobileNetV1 order."""
    out = [("conv3", scaled_depth(32, width), 2, act)]
    for depth, stride in BLOCK_SPECS[:num_blocks]:
        out.append(("dw", None, stride, act if block == "original" else "none"))
        out.append(("pw", scaled_depth(depth, width), 1, act))
    out.append(("pool", None, 1, "none"))
    out.append(("logits", num_classes, 1, "none"))
    return out


def build_mobilenet_tflite(
    path: str,
    width: float = 0.25,
    image_size: int = 64,
    num_blocks: int = 13,
    num_classes: int = 11,
    block: str = "original",
    seed: int = 0,
    calibration_images: int = 8,
    activation: str = "relu6",
) -> str:
    """Builds, converts and writes (atomically) a synthetic uint8 model; returns ``path``.

    Input quantization is the official models' (``S = 1/128``, ``Z = 128``); activation ranges
    are min/max over ``calibration_images`` random images of the float graph (nudged to contain
    0), weight ranges the weights' own min/max. ``activation="none"`` drops the ReLU6s: every
    layer's output then has a mid-range zero point, so the depthwise layers' inputs do too
    (the official models' depthwise inputs, ReLU6 outputs, all have zero point 0).
    """
    import tensorflow as tf

    if block not in ("original", "qf"):
        raise ValueError(f"block must be 'original' or 'qf', got {block!r}")
    if activation not in ("relu6", "none"):
        raise ValueError(f"activation must be 'relu6' or 'none', got {activation!r}")
    tf1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    spec = _layers(width, num_blocks, num_classes, block, activation)
    weights = []
    channels = 3
    for kind, cout, _, _ in spec:
        if kind == "conv3":
            w = rng.normal(0, np.sqrt(2 / 27), (3, 3, 3, cout))
        elif kind == "dw":
            w = rng.normal(0, np.sqrt(2 / 9), (3, 3, channels, 1))
            cout = channels
        elif kind in ("pw", "logits"):
            w = rng.normal(0, np.sqrt(2 / channels), (1, 1, channels, cout))
        else:
            weights.append(None)
            continue
        b = rng.normal(0, 0.1, (cout,))
        weights.append((w.astype(np.float32), b.astype(np.float32)))
        channels = cout

    def graph(x, ranges):
        """The chain; with ``ranges`` it carries fake-quant nodes, else returns activations."""
        fq = tf.quantization.fake_quant_with_min_max_args
        acts = []
        h = fq(x, -1.0, 127.0 / 128.0) if ranges is not None else x
        for i, ((kind, _, stride, act), wb) in enumerate(zip(spec, weights, strict=True)):
            if kind == "pool":
                size = int(h.shape[1])
                h = tf.nn.avg_pool2d(h, [1, size, size, 1], [1, 1, 1, 1], "VALID")
            else:
                w, b = wb
                wq = fq(tf.constant(w), float(w.min()), float(w.max())) if ranges else w
                if kind == "dw":
                    h = tf.nn.depthwise_conv2d(h, wq, [1, stride, stride, 1], "SAME")
                else:
                    h = tf.nn.conv2d(h, wq, [1, stride, stride, 1], "SAME")
                h = tf.nn.bias_add(h, tf.constant(b))
                if act == "relu6":
                    h = tf.nn.relu6(h)
            if ranges is not None:
                lo, hi = ranges[i]
                h = fq(h, lo, hi)
            acts.append(h)
        logits = tf.squeeze(h, [1, 2], name="logits")
        return acts, logits

    with tf.Graph().as_default() as g:
        x = tf1.placeholder(tf.float32, [1, image_size, image_size, 3], name="input")
        acts, _ = graph(x, None)
        with tf1.Session(graph=g) as sess:
            lo = [np.inf] * len(acts)
            hi = [-np.inf] * len(acts)
            for _ in range(calibration_images):
                img = rng.uniform(-1, 1, (1, image_size, image_size, 3)).astype(np.float32)
                for i, a in enumerate(sess.run(acts, {x: img})):
                    lo[i], hi[i] = min(lo[i], float(a.min())), max(hi[i], float(a.max()))
    ranges = [(min(a, 0.0), max(b, 0.0) if b > 0 else 1.0) for a, b in zip(lo, hi, strict=True)]
    # TFLite's AVERAGE_POOL_2D keeps its input's scale and zero point.
    pool = [kind for kind, *_ in spec].index("pool")
    ranges[pool] = ranges[pool - 1]

    with tf.Graph().as_default() as g:
        x = tf1.placeholder(tf.float32, [1, image_size, image_size, 3], name="input")
        _, logits = graph(x, ranges)
        with tf1.Session(graph=g) as sess:
            converter = tf1.lite.TFLiteConverter.from_session(sess, [x], [logits])
            converter.inference_type = tf.uint8
            converter.quantized_input_stats = {"input": (128.0, 128.0)}
            flatbuffer = converter.convert()
    write_atomic(path, flatbuffer)
    return path


def split_tflite(path: str, backbone_path: str, head_path: str, split_tensor: str) -> None:
    """Splits a chain model into a backbone and a head file at the tensor named ``split_tensor``.

    The backbone keeps the operators up to the one producing that tensor (its output); the head
    keeps the rest, with that tensor as its input, like Coral's split (embedding extractor +
    classifier head) models. Uses LiteRT's flatbuffer object API; unused buffers stay in both
    files. Raises ``ValueError`` if no operator output has that name.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        buf = f.read()

    def load():
        model = schema.ModelT.InitFromPackedBuf(buf, 0)
        return model, model.subgraphs[0]

    model, sg = load()
    names = [t.name.decode() for t in sg.tensors]
    cut = None
    for k, op in enumerate(sg.operators):
        if names[op.outputs[0]] == split_tensor:
            cut = k
    if cut is None:
        raise ValueError(f"{path}: no operator output named {split_tensor!r}")
    tensor = int(sg.operators[cut].outputs[0])
    for part, out_path in (("backbone", backbone_path), ("head", head_path)):
        model, sg = load()
        if part == "backbone":
            sg.operators = sg.operators[: cut + 1]
            sg.outputs = [tensor]
        else:
            sg.operators = sg.operators[cut + 1 :]
            sg.inputs = [tensor]
        model.signatureDefs = None
        builder = flatbuffers.Builder(0)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        write_atomic(out_path, bytes(builder.Output()))


def build_int8_tflite(
    path: str, image_size: int = 32, num_classes: int = 1001, seed: int = 0
) -> str:
    """A small MobileNetV1-like model in TFLite's int8 scheme (TF's full-integer converter).

    Conv 3×3/2 (ReLU6) → depthwise 3×3 without activation → 1×1 (ReLU6) → depthwise 3×3/2
    (ReLU6) → 1×1 → global AVERAGE_POOL_2D → 1×1 classifier → reshape: per-channel symmetric
    int8 weights, asymmetric int8 activations, int8 input and output, calibrated on random
    images. Returns ``path``.
    """
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    inp = tf.keras.Input((image_size, image_size, 3), batch_size=1)
    h = layers.Conv2D(8, 3, strides=2, padding="same", activation=tf.nn.relu6)(inp)
    h = layers.DepthwiseConv2D(3, padding="same")(h)
    h = layers.Conv2D(16, 1, activation=tf.nn.relu6)(h)
    h = layers.DepthwiseConv2D(3, strides=2, padding="same", activation=tf.nn.relu6)(h)
    h = layers.Conv2D(16, 1)(h)
    h = layers.AveragePooling2D(image_size // 4)(h)
    h = layers.Conv2D(num_classes, 1)(h)
    out = layers.Reshape((num_classes,))(h)
    model = tf.keras.Model(inp, out)
    rng = np.random.default_rng(seed)

    def representative():
        for _ in range(16):
            yield [rng.uniform(-1, 1, (1, image_size, image_size, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    write_atomic(path, converter.convert())
    return path
