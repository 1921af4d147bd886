"""Bit-exactness check: the JAX integer-only pass against LiteRT on real images.

    python launch/main.py --config configs/tflite_check.py --config.model=M.tflite \
        [--config.head=H.tflite] --config.data_dir=DIR --config.limit=N --workdir W

Both engines get the same uint8 images (the project's eval preprocessing in uint8 mode at the
model's input resolution). Every tensor the integer pass reproduces (each layer's output, the
reshaped logits) is compared with LiteRT's (``experimental_preserve_all_tensors``). An image is
bit-exact when all of them are equal. Writes ``W/results.json`` (``{"bit_exact_images": K,
"n": N, "skipped_corrupt": S, "first_mismatch": ..., ...}``; S: files skipped with
``on_corrupt="skip"``), prints ``bit-exact: K/N`` as its last line and exits non-zero unless
``K == N``.

``rounding="auto"`` runs every rounding preset on the first batch and keeps the one with the
fewest differing elements (reported under ``rounding_candidates``), so the check finds which
requantization rounding the installed LiteRT applies instead of assuming it.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import ml_collections
import numpy as np

from qfsep_jax import config_validation, integer, io_utils
from qfsep_jax.data.input import eval_input, resolve_path
from qfsep_jax.integer.reference import LiteRTRunner, expected_rounding

log = logging.getLogger(__name__)


def compare_tensors(int_model, ints: dict, ref: dict, i: int, runner) -> dict | None:
    """The first differing tensor of image ``i`` (``None`` if all are equal), with details."""
    for name, f, t in int_model.tensor_map:
        mine = np.asarray(ints[name][i]).reshape(-1)
        theirs = ref[(f, t)].reshape(-1)
        if mine.shape != theirs.shape or np.any(mine != theirs):
            if mine.shape != theirs.shape:
                return {
                    "layer": name,
                    "tflite_tensor": runner.tensor_name(f, t),
                    "file": f,
                    "shape_mismatch": [mine.shape, theirs.shape],
                }
            diff = np.abs(mine.astype(np.int32) - theirs.astype(np.int32))
            return {
                "layer": name,
                "tflite_tensor": runner.tensor_name(f, t),
                "file": f,
                "differing_elements": int(np.count_nonzero(diff)),
                "max_abs_diff": int(diff.max()),
                "first_index": int(np.flatnonzero(diff)[0]),
            }
    return None


def _count_differences(int_model, ints: dict, refs: list[dict]) -> int:
    total = 0
    for i, ref in enumerate(refs):
        for name, f, t in int_model.tensor_map:
            mine = np.asarray(ints[name][i]).reshape(-1)
            total += int(np.count_nonzero(mine != ref[(f, t)].reshape(-1)))
    return total


def _to_model_input(pixels: np.ndarray, dtype) -> np.ndarray:
    """uint8 pixels → the model's input codes (int8 models take ``pixel - 128``)."""
    if np.dtype(dtype) == np.uint8:
        return pixels.astype(np.uint8)
    return (pixels.astype(np.int16) - 128).astype(np.int8)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the check; writes ``workdir/results.json``; exits non-zero unless all are exact."""
    config_validation.validate(config, "tflite_check")
    model_path = resolve_path(config.data_dir, config.model)
    head_path = resolve_path(config.data_dir, config.head) if config.head else None
    int_model = integer.from_tflite(model_path, head_path)
    paths = [model_path] + ([head_path] if head_path else [])
    runner = LiteRTRunner(int_model, paths, config.op_resolver, config.num_threads)
    _, height, width, _ = runner.input_shape
    if height != width:
        raise ValueError(f"non-square model input {runner.input_shape} is not supported")
    if config.image_size and config.image_size != height:
        raise ValueError(f"config.image_size={config.image_size} but the model takes {height}")
    data = eval_input(config, config.eval_data, limit=config.limit, uint8=True, image_size=height)
    log.info("%s on %s: %d images at %d px", int_model.source, data.name, data.num_examples, height)
    num_classes = int_model.layers[-1].out_channels
    score = num_classes == 1001 and config.label_space == "imagenet1001"

    candidates: dict[str, int] = {}
    if config.rounding == "auto":
        first = next(iter(data.make()))
        valid = int(first["mask"].sum())
        images = _to_model_input(first["image"][:valid], runner.input_dtype)
        refs = [runner(img) for img in images]
        for preset in integer.ROUNDING_PRESETS:
            _, ints = integer.run(int_model.with_rounding(preset), images, True)
            candidates[preset] = _count_differences(int_model, ints, refs)
        expected = expected_rounding(config.op_resolver, int_model.dtype)
        rounding = min(candidates, key=lambda k: (candidates[k], k != expected))
        log.info(
            "rounding candidates (differing elements, first batch): %s -> %s", candidates, rounding
        )
    else:
        rounding = config.rounding
    int_model = int_model.with_rounding(rounding)

    n = exact = skipped = 0
    hits = {"int": 0, "litert": 0}
    first_mismatch = None
    for batch in data.make():
        skipped = int(batch.get("skipped", 0))  # corrupt files so far (on_corrupt="skip")
        valid = int(batch["mask"].sum())
        if valid == 0:
            continue
        images = _to_model_input(batch["image"][:valid], runner.input_dtype)
        logits, ints = integer.run(int_model, images, True)
        logits = np.asarray(logits)
        for i in range(valid):
            ref = runner(images[i])
            mismatch = compare_tensors(int_model, ints, ref, i, runner)
            if mismatch is None:
                exact += 1
            elif first_mismatch is None:
                first_mismatch = {"image_index": n + i, **mismatch}
                log.warning("first mismatch: %s", first_mismatch)
            if score:
                label = int(batch["label"][i])
                hits["int"] += int(np.argmax(logits[i]) == label)
                hits["litert"] += int(np.argmax(ref[runner.logits_index()].reshape(-1)) == label)
        n += valid
    if n == 0:
        raise ValueError(f"{data.name}: no images were checked")
    out = {
        "bit_exact_images": exact,
        "n": n,
        "skipped_corrupt": skipped,
        "first_mismatch": first_mismatch,
        "model": model_path,
        "head": head_path,
        "eval_data": data.name,
        "image_size": height,
        "op_resolver": config.op_resolver,
        "rounding": str(int_model.rounding),
        "rounding_preset": rounding,
        "rounding_candidates": candidates,
        "tensors_compared_per_image": len(int_model.tensor_map),
        "litert_version": litert_version(),
        "jax_backend": jax.default_backend(),
        "run": io_utils.run_info(),
    }
    if score:
        out["top1_int"] = 100.0 * hits["int"] / n
        out["top1_litert"] = 100.0 * hits["litert"] / n
        print(
            f"top-1 (1001-way): integer pass {out['top1_int']:.2f}%, "
            f"LiteRT {out['top1_litert']:.2f}%"
        )
    io_utils.write_json(os.path.join(workdir, "results.json"), out)
    print(f"rounding: {rounding} ({int_model.rounding}); op resolver: {config.op_resolver}")
    if first_mismatch is not None:
        print(f"first mismatch: {first_mismatch}")
    if skipped:
        print(f"skipped {skipped} corrupt image file(s) of {data.name}")
    print(f"bit-exact: {exact}/{n}", flush=True)
    if exact != n:
        sys.exit(1)
    return out


def litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return "unknown"
