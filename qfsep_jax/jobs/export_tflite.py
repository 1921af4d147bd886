"""Export a quantized model to ``.tflite`` and check it in LiteRT against the integer pass.

    python launch/main.py --config configs/export_tflite.py --config.source=SOURCE --workdir W \
        [--config.limit=N]

``SOURCE`` is ``ptq:RECIPE`` (the official float MobileNetV1 1.0/224 post-training quantized with
a :data:`qfsep_jax.ptq.RECIPES` recipe, calibrated on ``calibration_data``), ``quantized:DIR`` (a
model saved by QAT or PTQ, ``qfsep_jax.quantized.save_quantized``) or ``tflite:PATH`` (an imported
``.tflite``, re-exported).

The model is converted to an :class:`~qfsep_jax.integer.IntModel` and written to
``W/model.tflite`` (atomically; :func:`qfsep_jax.integer.to_tflite` refuses, and nothing is
written, if TFLite cannot express it). Then LiteRT's builtin kernels run that file and the integer
pass runs the integer model, on the same input codes (the eval images, preprocessed as the float
model takes them and quantized with the model's input parameters), image by image: every layer's
output tensor and the logits are compared. LiteRT's default XNNPACK delegate runs the same file
too; its outputs are compared with the builtin kernels'. For a ``tflite:`` source, the original
file also runs in LiteRT and every layer output and the final output of the two files are
compared.

Writes ``W/results.json`` (``bit_exact_images``, ``n``, ``first_mismatch``, ``top1_litert``,
``top1_integer``, ``xnnpack``, ...). The last output line is ``bit-exact: K/N``; the exit status
is non-zero unless ``K == N`` (and, for ``tflite:``, every image is identical to the source
file's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys

import jax
import ml_collections
import numpy as np

from qfsep_jax import checkpointing, config_validation, integer, io_utils, ptq
from qfsep_jax import progress as progress_lib
from qfsep_jax.data import labels as labels_lib
from qfsep_jax.data.input import eval_input, resolve_path
from qfsep_jax.integer.reference import LiteRTRunner, expected_rounding, make_interpreter
from qfsep_jax.jobs import common
from qfsep_jax.jobs.tflite_check import compare_tensors, litert_version
from qfsep_jax.quantized import load_quantized

log = logging.getLogger(__name__)

SOURCE_KINDS = ("ptq", "quantized", "tflite")
MODEL_FILE = "model.tflite"


@dataclasses.dataclass
class Source:
    """The integer model to export and the data it is evaluated on."""

    int_model: integer.IntModel
    description: str
    data_config: ml_collections.ConfigDict  # data_dir, image_size, label_space, crop, batch
    eval_data: str
    tflite_path: str | None = None  # tflite: the original file
    softmax: bool = False
    info: dict = dataclasses.field(default_factory=dict)


def parse_source(spec: str | None) -> tuple[str, str]:
    """``"kind:arg"`` → ``(kind, arg)``, with a clear error for anything else."""
    kind, sep, arg = (spec or "").partition(":")
    if not sep or kind not in SOURCE_KINDS or not arg:
        raise ValueError(
            f"config.source={spec!r}: use ptq:RECIPE (one of {sorted(ptq.RECIPES)}), "
            "quantized:DIR (a saved quantized model) or tflite:PATH"
        )
    return kind, arg


def _data_config(config, **defaults) -> ml_collections.ConfigDict:
    """The data fields for the source: the job's own where set, else the source's defaults."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.label_space = config.label_space or defaults.get("label_space", "imagenet1001")
    c.image_size = int(config.image_size or defaults.get("image_size", 224))
    if "crop_fraction" in defaults:
        c.crop_fraction = defaults["crop_fraction"]
    return c


def load_source(config: ml_collections.ConfigDict) -> Source:
    """Builds the integer model named by ``config.source`` (see the module docstring)."""
    kind, arg = parse_source(config.source)
    if kind == "ptq":
        recipe = ptq.recipe_by_name(arg)
        if recipe.dynamic_activation_ranges:
            raise ValueError(
                f"config.source={config.source!r}: recipe {arg} quantizes each "
                "input with its own ranges; an integer model needs static ranges"
            )
        data = _data_config(config)
        model, variables, _ = common.load_official(data)
        calib = common.calibration_input(data)
        qmodel = common.quantize(model, variables, recipe, data, calib)
        info = {
            "recipe": arg,
            "float_model": config.model_path,
            "calibration_data": calib.name,
            "calibration_images": calib.num_examples,
            # Which BN layers the zero-variance fix touched, and the channels it fixed per layer.
            **{
                k: qmodel.info[k]
                for k in ("zero_variance_scope", "zero_variance_channels")
                if k in qmodel.info
            },
        }
        return Source(
            integer.from_quantized(qmodel),
            f"{arg} PTQ of {config.model_path}",
            data,
            config.eval_data or "folder:imagenet_val500",
            info=info,
        )
    if kind == "quantized":
        qmodel = load_quantized(arg)
        run_dir = os.path.dirname(os.path.abspath(arg))
        run = {}
        if os.path.isfile(os.path.join(run_dir, "config.json")):  # a QAT export in its workdir
            run = checkpointing.load_run_config(run_dir).to_dict()
        defaults = {k: run[k] for k in ("label_space", "image_size", "crop_fraction") if k in run}
        data = _data_config(config, **defaults)
        eval_data = config.eval_data or run.get("eval_data") or "folder:imagenet_val500"
        info = {
            "quantized_model": os.path.abspath(arg),
            "training_run": run_dir if run else None,
            "recipe": dataclasses.asdict(qmodel.recipe),
        }
        return Source(
            integer.from_quantized(qmodel), f"quantized model {arg}", data, eval_data, info=info
        )
    path = resolve_path(config.data_dir, arg)
    int_model = integer.from_tflite(path)
    probe = make_interpreter(path, "builtin", preserve_all_tensors=False)
    _, height, width, _ = (int(d) for d in probe.get_input_details()[0]["shape"])
    if height != width:
        raise ValueError(f"{path}: non-square input {height}x{width} is not supported")
    # The importer stops at the logits; a file whose output is not them ends with SOFTMAX.
    softmax = int(probe.get_output_details()[0]["index"]) != int_model.tensor_map[-1][2]
    data = _data_config(config, image_size=height)
    if data.image_size != height:
        raise ValueError(f"config.image_size={config.image_size} but {path} takes {height} px")
    return Source(
        int_model,
        f"re-export of {path}",
        data,
        config.eval_data or "folder:imagenet_val500",
        path,
        softmax,
        {"tflite": path},
    )


def _output(interpreter) -> np.ndarray:
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1)


def _source_difference(src_runner, src_ref, exp_runner, exp_ref, exported) -> dict | None:
    """The first tensor in which the source file and the re-export differ, or ``None``."""
    first = {}
    for name, f, t in src_runner.int_model.tensor_map:
        first.setdefault(name, (f, t))
    mine = {}
    for name, f, t in exported.tensor_map:
        mine.setdefault(name, (f, t))
    if list(first) != list(mine):
        return {"layers": [list(first), list(mine)]}
    pairs = [(name, src_ref[first[name]], exp_ref[mine[name]]) for name in first]
    pairs.append(
        ("output", _output(src_runner.interpreters[0]), _output(exp_runner.interpreters[0]))
    )
    for name, a, b in pairs:
        a, b = a.reshape(-1), b.reshape(-1)
        if a.shape != b.shape or np.any(a != b):
            return {
                "tensor": name,
                "shapes": [list(a.shape), list(b.shape)],
                "differing_elements": int(np.count_nonzero(a != b)) if a.shape == b.shape else None,
            }
    return None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Exports, checks and writes ``workdir/results.json``; exits non-zero unless all exact."""
    config_validation.validate(config, "export_tflite")
    source = load_source(config)
    int_model = source.int_model
    rounding = config.rounding or expected_rounding(config.op_resolver, int_model.dtype)
    int_model = int_model.with_rounding(rounding)
    size = source.data_config.image_size
    path = os.path.join(workdir, MODEL_FILE)
    softmax = source.softmax or bool(config.softmax)
    exported = integer.to_tflite(int_model, path, size, softmax=softmax)
    with open(path, "rb") as f:
        blob = f.read()
    log.info("wrote %s (%d bytes): %s", path, len(blob), source.description)

    runner = LiteRTRunner(exported, [path], config.op_resolver, config.num_threads)
    xnn = make_interpreter(path, "xnnpack", config.num_threads, preserve_all_tensors=False)
    src_runner = None
    if source.tflite_path:
        src_runner = LiteRTRunner(
            source.int_model, [source.tflite_path], config.op_resolver, config.num_threads
        )
    data = eval_input(source.data_config, source.eval_data, limit=config.limit)
    num_classes = int_model.layers[-1].out_channels
    space = source.data_config.label_space
    score = space != "folder" and num_classes == labels_lib.num_classes(
        space, source.data_config.data_dir
    )
    log.info(
        "%s: %d images of %s at %d px, %s, label space %s (%s)",
        source.description,
        data.num_examples,
        data.name,
        size,
        int_model.dtype,
        space,
        "scored" if score else f"not scored: the model has {num_classes} classes",
    )

    n = exact = identical = 0
    xnn_same_output = xnn_same_top1 = 0
    hits = {"litert": 0, "integer": 0, "integer_fine": 0, "xnnpack": 0, "builtin_output": 0}
    first_mismatch = first_source_difference = None
    bar = progress_lib.bar(total=data.num_examples, desc="LiteRT vs integer pass", unit="img")
    for batch in data.make():
        valid = int(batch["mask"].sum())
        if valid == 0:
            continue
        codes = np.asarray(integer.quantize_input(int_model, batch["image"][:valid]))
        fine, ints = integer.run(int_model, codes, True, fine_logits=True)
        fine = np.asarray(fine)
        logits = np.asarray(ints[int_model.layers[-1].name]).reshape(valid, -1)
        for i in range(valid):
            ref = runner(codes[i])
            mismatch = compare_tensors(exported, ints, ref, i, runner)
            if mismatch is None:
                exact += 1
            elif first_mismatch is None:
                first_mismatch = {"image_index": n + i, **mismatch}
                log.warning("first mismatch: %s", first_mismatch)
            builtin_out = _output(runner.interpreters[0])
            xnn.set_tensor(xnn.get_input_details()[0]["index"], codes[i : i + 1])
            xnn.invoke()
            xnn_out = _output(xnn)
            xnn_same_output += int(np.array_equal(xnn_out, builtin_out))
            xnn_same_top1 += int(np.argmax(xnn_out) == np.argmax(builtin_out))
            if src_runner is not None:
                src_ref = src_runner(codes[i])
                diff = _source_difference(src_runner, src_ref, runner, ref, exported)
                if diff is None:
                    identical += 1
                elif first_source_difference is None:
                    first_source_difference = {"image_index": n + i, **diff}
                    log.warning("re-export differs from the source: %s", diff)
            if score:
                label = int(batch["label"][i])
                litert_logits = ref[runner.logits_index()].reshape(-1)
                hits["litert"] += int(np.argmax(litert_logits) == label)
                hits["integer"] += int(np.argmax(logits[i]) == label)
                hits["integer_fine"] += int(np.argmax(fine[i]) == label)
                hits["xnnpack"] += int(np.argmax(xnn_out) == label)
                hits["builtin_output"] += int(np.argmax(builtin_out) == label)
        n += valid
        bar.update(valid)
    bar.close()
    if n == 0:
        raise ValueError(f"{data.name}: no images were checked")

    def pct(k: int) -> float:
        return 100.0 * k / n

    out = {
        "bit_exact_images": exact,
        "n": n,
        "first_mismatch": first_mismatch,
        "top1_litert": pct(hits["litert"]) if score else None,
        "top1_integer": pct(hits["integer"]) if score else None,
        "top1_integer_fine_logits": pct(hits["integer_fine"]) if score else None,
        # On the file's output tensor: the logits, or SOFTMAX's codes when the file ends with it.
        "xnnpack": {
            "output": "softmax" if softmax else "logits",
            "top1": pct(hits["xnnpack"]) if score else None,
            "top1_builtin_same_output": pct(hits["builtin_output"]) if score else None,
            "outputs_equal_builtin_images": xnn_same_output,
            "top1_equal_builtin_images": xnn_same_top1,
        },
        "source": config.source,
        "source_info": source.info,
        "model_file": os.path.abspath(path),
        "model_bytes": len(blob),
        "model_sha256": hashlib.sha256(blob).hexdigest(),
        "dtype": int_model.dtype,
        "softmax": softmax,
        "eval_data": data.name,
        "image_size": size,
        "label_space": space,
        "num_classes": num_classes,
        "input": "eval preprocessing (float) quantized with the model's input scale and zero "
        "point (integer.quantize_input); the same codes go to both engines",
        "top1_on": "argmax of the 8-bit logit codes (lowest index on ties), both engines; "
        "top1_integer_fine_logits: of the integer pass's fine logits",
        "op_resolver": config.op_resolver,
        "rounding": str(int_model.rounding),
        "rounding_preset": rounding,
        "tensors_compared_per_image": len(exported.tensor_map),
        "litert_num_threads": config.num_threads,
        "litert_version": litert_version(),
        "jax_backend": jax.default_backend(),
        "run": io_utils.run_info(),
    }
    if src_runner is not None:
        out["identical_to_source_images"] = identical
        out["first_source_difference"] = first_source_difference
    io_utils.write_json(os.path.join(workdir, "results.json"), out)
    print(f"wrote {path} ({len(blob)} bytes, sha256 {out['model_sha256'][:16]}...)")
    kernels = config.op_resolver  # "builtin" in the names below: the kernels checked
    if score:
        print(
            f"top-1: LiteRT {kernels} {out['top1_litert']:.2f}%, integer pass "
            f"{out['top1_integer']:.2f}% (fine logits {out['top1_integer_fine_logits']:.2f}%) "
            f"({n} images of {data.name}); on the file's {out['xnnpack']['output']} output: "
            f"XNNPACK {out['xnnpack']['top1']:.2f}%, {kernels} "
            f"{out['xnnpack']['top1_builtin_same_output']:.2f}%"
        )
    print(
        f"XNNPACK vs {kernels}: outputs equal on {xnn_same_output}/{n} images, top-1 equal on "
        f"{xnn_same_top1}/{n}"
    )
    print(f"rounding: {rounding} ({int_model.rounding}); op resolver: {config.op_resolver}")
    if first_mismatch is not None:
        print(f"first mismatch: {first_mismatch}")
    ok = exact == n
    if src_runner is not None:
        print(f"identical to {source.tflite_path}: {identical}/{n}")
        ok = ok and identical == n
    print(f"bit-exact: {exact}/{n}", flush=True)
    if not ok:
        sys.exit(1)
    return out
