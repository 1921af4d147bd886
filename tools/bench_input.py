"""Benchmark: images/s per CPU core of the training and evaluation input pipelines.

    python tools/bench_input.py [--data_dir ../shared/data] [--threads 1] [--reps 5]
        [--batches 40] [--proxy_dir /tmp/qfsep_imagenet_proxy] [--out results.json]

Not a test. The process is pinned to ``--threads`` CPUs before TensorFlow starts (its thread
pools and tf.data's private pool get that many threads), so that the rates are those of that
many cores; with the default of one, images/s is images/s per core. Every rep runs every
measurement once, in turn, so that all see the same machine load; the table gives the median
over reps of images/s (wall clock) and of images per CPU-second of the process (what the work
costs, less disturbed by other processes on a shared machine than the wall clock).

Measurements, on two image sets:

* ``decode+augment``: the per-image work alone on in-memory JPEG bytes, the way the training
  input did it before (``whole``: decode the whole image, then crop) and does it now (``fused``:
  decode only the crop window, :func:`qfsep_jax.data.preprocess.train_preprocess_encoded`);
  inception crop (area 5-100 %), bilinear resize to ``--image_size``, flip, [-1, 1];
* ``train pipeline``: :func:`qfsep_jax.data.train_input.train_batches` end to end, batches of
  128 as numpy float32 (file reads, per-position random access, decode, augment, batching, the
  host copy), what the training loop consumes;
* ``eval pipeline``: :func:`qfsep_jax.data.input.eval_input` batches of 125 (decode, central
  87.5 % crop, bilinear resize, [-1, 1]);
* ``host handoff``: the Python thread's part of ``train_batches`` alone, on batches already
  decoded: tf.data's batch to numpy as a copy (``.numpy()``, what ``train_batches`` did before)
  and as a read-only view of the tensor (``np.asarray``, what it does now). One thread does it
  for the whole host, so more cores do not raise this ceiling.

Image sets: ``imagenette`` (``folder:imagenette/train`` and ``/val``, 224x224 JPEGs of about
10 KB as stored) and, with ``--proxy_dir``, an ImageNet-size proxy made once from
``imagenet_calib1000`` (``make_proxy``: upscaled to 500 px on the longer side, JPEG quality 90,
4:2:0 chroma), since ImageNet's training JPEGs have several times the pixels of 224x224 and
decoding cost grows with them. Upscaled photos hold less detail than real ones, so their
entropy decoding is cheaper: the proxy's decode cost is a lower bound for real ImageNet files.

``--decode_check N`` replaces the timing with a comparison of the two decodings' pixels on N
files of each set (:func:`decode_differences`).

The last table derives the host cores an accelerator host needs: ``cores = chips per host x
images/s per chip / train-pipeline images/s per core``, for accelerator rates given by
``--chip_rates``, on the proxy (imagenette where no proxy is given), assuming that rate scales
linearly with cores (tf.data's parallel map does; the one Python thread's handoff does not,
see its own rows).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import time

# Accelerator hosts: chips (or GPUs) per host and host vCPUs where documented (docs/pod.md has
# the sources). Rates per chip are the user's assumption (--chip_rates).
HOSTS = {
    "TPU v4 host": {"chips": 4, "vcpus": None},
    "TPU v5e host (ct5lp-hightpu-8t)": {"chips": 8, "vcpus": 224},
    "8-GPU host": {"chips": 8, "vcpus": None},
}
DEFAULT_CHIP_RATES = (2000, 5000, 10000, 20000)
TRAIN_BATCH = 128
EVAL_BATCH = 125
PROXY_LONG_SIDE = 500
PROXY_QUALITY = 90


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--threads", type=int, default=1, help="CPUs the process is pinned to")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--proxy_dir", default="", help="where the ImageNet-size proxy is (made)")
    p.add_argument(
        "--chip_rates",
        default=",".join(str(r) for r in DEFAULT_CHIP_RATES),
        help="comma list of assumed training images/s per accelerator chip",
    )
    p.add_argument("--out", default="", help="also write the results as JSON here (atomically)")
    p.add_argument(
        "--decode_check",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing: compare crop-window and whole-image decoding on N files a set",
    )
    args = p.parse_args(argv)
    if args.threads < 1 or args.reps < 1 or args.batches < 1:
        p.error("--threads, --reps and --batches must be positive")
    try:
        args.chip_rates = [float(r) for r in args.chip_rates.split(",")]
    except ValueError:
        p.error(f"--chip_rates must be a comma list of numbers, got {args.chip_rates!r}")
    if not all(r > 0 for r in args.chip_rates):
        p.error("--chip_rates must be positive")
    return args


def pin_threads(threads: int) -> list[int]:
    """Pins this process to ``threads`` of its allowed CPUs (before TensorFlow starts)."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"--threads {threads}: only {len(allowed)} CPUs available")
    os.sched_setaffinity(0, allowed[:threads])
    return allowed[:threads]


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------
# The ImageNet-size proxy.


def make_proxy(
    src_dir: str, out_dir: str, long_side: int = PROXY_LONG_SIDE, quality: int = PROXY_QUALITY
) -> str:
    """Upscaled copies of the class-folder JPEGs in ``src_dir`` under ``out_dir/train``.

    Each image is resized (bicubic) so that its longer side is ``long_side`` and saved as JPEG
    at ``quality`` with 4:2:0 chroma subsampling. Made once: an existing ``out_dir/train`` with
    a ``DONE`` marker is reused. Returns the split directory.
    """
    from PIL import Image

    split = os.path.join(out_dir, "train")
    marker = os.path.join(out_dir, "DONE")
    if os.path.exists(marker):
        return split
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"proxy source {src_dir!r} not found (set --data_dir)")
    count = 0
    for wnid in sorted(os.listdir(src_dir)):
        cls = os.path.join(src_dir, wnid)
        if not os.path.isdir(cls):
            continue
        os.makedirs(os.path.join(split, wnid), exist_ok=True)
        for name in sorted(os.listdir(cls)):
            with Image.open(os.path.join(cls, name)) as im:
                im = im.convert("RGB")
                scale = long_side / max(im.size)
                size = (round(im.size[0] * scale), round(im.size[1] * scale))
                big = im.resize(size, Image.BICUBIC)
                big.save(
                    os.path.join(split, wnid, os.path.splitext(name)[0] + ".JPEG"),
                    quality=quality,
                    subsampling=2,
                )
            count += 1
    if count == 0:
        raise ValueError(f"no images under {src_dir!r}")
    with open(marker, "w") as f:
        f.write(f"{count} images, longer side {long_side}, quality {quality}\n")
    return split


def image_stats(split_dir: str) -> dict:
    """Count, mean pixels and mean file size of the images under a class-folder split."""
    from PIL import Image

    sizes, pixels = [], []
    for root, _, files in os.walk(split_dir):
        for name in files:
            path = os.path.join(root, name)
            sizes.append(os.path.getsize(path))
            with Image.open(path) as im:
                pixels.append(im.size[0] * im.size[1])
    if not sizes:
        raise ValueError(f"no images under {split_dir!r}")
    return {
        "images": len(sizes),
        "mean_pixels": statistics.mean(pixels),
        "mean_kb": statistics.mean(sizes) / 1024,
    }


# ---------------------------------------------------------------------------------------------
# Measurements. Each returns a zero-argument callable that builds a fresh iterator and the
# number of images one of its items holds.


def _timed(make_iter, per_item: int, batches: int, warmup: int = 4) -> dict:
    """Images/s and images per CPU-second over ``batches`` items after ``warmup`` items.

    The pipelines work ahead (the training input decodes four batches at once, and prefetches):
    work done before the window for batches inside it, and after it for later ones, biases a
    short window; over 40 batches the bias is a few per cent at most (measured: 8 batches
    after 2 gave the training pipeline 1.6x the per-image rate of its own decode+augment).
    """
    it = make_iter()
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    n = batches * per_item
    return {"images_per_sec": n / wall, "images_per_cpu_sec": n / max(cpu, 1e-9)}


def augment_measurements(files: list[str], image_size: int, threads: int) -> dict:
    """``decode+augment whole`` and ``fused`` on in-memory bytes (see the module docstring)."""
    import tensorflow as tf

    from qfsep_jax.data import pipeline, preprocess

    blobs = []
    for path in files:
        with open(path, "rb") as f:
            blobs.append(f.read())
    area, aspect = (0.05, 1.0), (0.75, 1.33)

    def seed(i):
        return tf.stack([tf.constant(0, tf.int64), i])

    def whole(i, b):
        return preprocess.train_preprocess(
            pipeline.decode_image(b), image_size, seed(i), area, aspect
        )

    def fused(i, b):
        return preprocess.train_preprocess_encoded(b, image_size, seed(i), area, aspect)

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads

    def maker(fn):
        def make():
            ds = tf.data.Dataset.from_tensor_slices(blobs).repeat().enumerate()
            ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(TRAIN_BATCH)
            return iter(ds.prefetch(2).with_options(options))

        return make

    return {"decode+augment whole": maker(whole), "decode+augment fused": maker(fused)}


def pipeline_measurements(
    data_dir: str, train_spec: str, eval_spec: str, label_space: str, image_size: int, rep_offset
) -> dict:
    """``train pipeline``, ``eval pipeline`` and ``host copy`` for one image set."""
    import ml_collections
    import numpy as np

    from configs import base
    from qfsep_jax.data import input as data_input
    from qfsep_jax.data import sources, train_input

    source = sources.make_source(train_spec, data_dir, label_space=label_space)
    stream = train_input.TrainStream(seed=0, global_batch=TRAIN_BATCH, image_size=image_size)

    def train_iter():
        return train_input.train_batches(source, stream, start_step=10 * rep_offset())

    config = base.data_config()
    config = ml_collections.ConfigDict(
        {
            **config.to_dict(),
            "data_dir": data_dir,
            "label_space": label_space,
            "image_size": image_size,
            "eval_batch_size": EVAL_BATCH,
        }
    )
    evaluation = data_input.eval_input(config, eval_spec)

    def eval_iter():  # fresh passes one after another (never cached batches)
        return itertools.chain.from_iterable(evaluation.make() for _ in itertools.count())

    decoded = train_input.train_dataset(source, stream, 0).take(2).cache().repeat()

    def handoff(convert):
        def make():
            return ({k: convert(v) for k, v in batch.items()} for batch in decoded)

        return make

    return {
        "train pipeline": (train_iter, TRAIN_BATCH),
        "eval pipeline": (eval_iter, EVAL_BATCH),
        "host handoff copy (.numpy)": (handoff(lambda t: t.numpy()), TRAIN_BATCH),
        "host handoff view (np.asarray)": (handoff(np.asarray), TRAIN_BATCH),
    }


def decode_differences(
    files: list[str], sizes: tuple[int, ...] = (224, 32), crops: int = 3
) -> dict:
    """How the crop-window decoding's pixels differ from decoding the whole image.

    For ``crops`` seeds per file: the uint8 crop (:func:`preprocess.train_crop_encoded`) against
    the same window sliced from the whole decoded image, and the finished training image at each
    of ``sizes`` px against :func:`preprocess.train_preprocess` of the whole decoded image.
    """
    import numpy as np
    import tensorflow as tf

    from qfsep_jax.data import pipeline, preprocess

    area, aspect = (0.05, 1.0), (0.75, 1.33)
    n = differing = 0
    max_diff = interior_max = 0
    fractions = []
    finished = {size: {"images": 0, "differing": 0, "fraction_of_values": []} for size in sizes}
    for i, path in enumerate(files):
        image_bytes = tf.io.read_file(path)
        whole = pipeline.decode_image(image_bytes)
        for s in range(crops):
            seed = tf.constant([s, i], tf.int64)
            crop, _ = preprocess.train_crop_encoded(image_bytes, seed, area, aspect)
            begin, size, _ = preprocess._crop_window(tf.shape(whole), seed, area, aspect)
            d = np.abs(crop.numpy().astype(int) - tf.slice(whole, begin, size).numpy().astype(int))
            n += 1
            differing += bool(d.max())
            max_diff = max(max_diff, int(d.max()))
            interior_max = max(interior_max, int(d[2:-2, 2:-2].max()) if d[2:-2, 2:-2].size else 0)
            fractions.append(float(np.mean(d > 0)))
            for px, row in finished.items():
                a = preprocess.train_preprocess_encoded(image_bytes, px, seed, area, aspect)
                b = preprocess.train_preprocess(whole, px, seed, area, aspect)
                dv = np.abs(a.numpy() - b.numpy())
                row["images"] += 1
                row["differing"] += bool(dv.max() > 0)
                row["fraction_of_values"].append(float(np.mean(dv > 0)))
    for row in finished.values():
        row["mean_fraction_of_values"] = float(np.mean(row.pop("fraction_of_values")))
    return {
        "crops": n,
        "crops_differing": differing,
        "max_difference_of_255": max_diff,
        "max_difference_inside_2px_margin": interior_max,
        "mean_fraction_of_pixels_differing": float(np.mean(fractions)),
        "finished_images": {str(k): v for k, v in finished.items()},
    }


# ---------------------------------------------------------------------------------------------
# Derived numbers.


def summarize(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over reps (and the per-rep values) of each measurement's rates."""
    out = {}
    for name, reps in samples.items():
        out[name] = {
            key: statistics.median(r[key] for r in reps)
            for key in ("images_per_sec", "images_per_cpu_sec")
        }
        out[name]["reps"] = reps
    return out


def cores_needed(chip_rate: float, chips: int, per_core: float) -> float:
    """Host cores that feed ``chips`` accelerators at ``chip_rate`` images/s each."""
    if per_core <= 0:
        raise ValueError(f"per-core rate must be positive, got {per_core}")
    return chips * chip_rate / per_core


def cores_table(per_core: float, chip_rates: list[float]) -> list[dict]:
    """One row per host type and assumed chip rate."""
    rows = []
    for host, spec in HOSTS.items():
        for rate in chip_rates:
            rows.append(
                {
                    "host": host,
                    "chips": spec["chips"],
                    "vcpus": spec["vcpus"],
                    "images_per_sec_per_chip": rate,
                    "cores_needed": cores_needed(rate, spec["chips"], per_core),
                }
            )
    return rows


def markdown(result: dict) -> str:
    """The result's tables as markdown."""
    lines = [
        "| image set | measurement | images/s (wall) | images per CPU-second |",
        "|---|---|---|---|",
    ]
    for set_name, rows in result["image_sets"].items():
        for name, r in rows["rates"].items():
            fmt = ".2f" if "/" in name else ".0f"  # the ratio row
            lines.append(
                f"| {set_name} | {name} | {r['images_per_sec']:{fmt}} | "
                f"{r['images_per_cpu_sec']:{fmt}} |"
            )
    lines += [
        "",
        f"Cores needed (train pipeline, {result['cores_basis']}: "
        f"{result['per_core']:.0f} images per CPU-second):",
        "",
        "| host | chips | assumed images/s per chip | host images/s | cores needed | host vCPUs |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["cores_needed"]:
        vcpus = row["vcpus"] if row["vcpus"] is not None else "?"
        lines.append(
            f"| {row['host']} | {row['chips']} | {row['images_per_sec_per_chip']:.0f} | "
            f"{row['chips'] * row['images_per_sec_per_chip']:.0f} | {row['cores_needed']:.0f} | "
            f"{vcpus} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = _parse(argv)
    cpus = pin_threads(args.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.set_visible_devices([], "GPU")

    from qfsep_jax.io_utils import run_info, write_json

    image_sets = {
        "imagenette": (
            "folder:imagenette/train",
            "folder:imagenette/val",
            "imagenette",
            args.data_dir,
        )
    }
    if args.proxy_dir:
        split = make_proxy(os.path.join(args.data_dir, "imagenet_calib1000"), args.proxy_dir)
        image_sets["imagenet-size proxy"] = (
            "folder:train",
            "folder:train",
            "folder",
            os.path.dirname(split),
        )
    if args.decode_check:
        checks = {}
        for name, (train_spec, _, _, root) in image_sets.items():
            split_dir = os.path.join(root, train_spec.split(":", 1)[1])
            files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(split_dir) for f in fs)
            step = max(1, len(files) // args.decode_check)
            checks[name] = decode_differences(files[::step][: args.decode_check])
            print(name, json.dumps(checks[name], indent=1), flush=True)
        command = "python tools/bench_input.py " + " ".join(sys.argv[1:] if argv is None else argv)
        result = {"decode_check": checks, "run": run_info(), "command": command}
        if args.out:
            write_json(args.out, result)
        return result
    rep = {"i": 0}
    measurements, stats = {}, {}
    for name, (train_spec, eval_spec, labels, root) in image_sets.items():
        split_dir = os.path.join(root, train_spec.split(":", 1)[1])
        stats[name] = image_stats(split_dir)
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(split_dir) for f in fs)[:512]
        for key, make in augment_measurements(files, args.image_size, args.threads).items():
            measurements[(name, key)] = (make, TRAIN_BATCH)
        more = pipeline_measurements(
            root, train_spec, eval_spec, labels, args.image_size, lambda: rep["i"]
        )
        for key, value in more.items():
            measurements[(name, key)] = value
    samples: dict = {k: [] for k in measurements}
    for i in range(args.reps):
        rep["i"] = i
        for key, (make, per_item) in measurements.items():
            r = _timed(make, per_item, args.batches)
            samples[key].append(r)
            print(
                f"rep {i} {key[0]:>20} {key[1]:<22} {r['images_per_sec']:7.0f} img/s "
                f"{r['images_per_cpu_sec']:7.0f} img/CPU-s",
                flush=True,
            )
    result: dict = {"image_sets": {}}
    for name in image_sets:
        rates = summarize({k[1]: v for k, v in samples.items() if k[0] == name})
        whole = rates["decode+augment whole"]["reps"]
        fused = rates["decode+augment fused"]["reps"]
        rates["fused/whole (median of per-rep ratios)"] = {
            key: statistics.median(f[key] / w[key] for f, w in zip(fused, whole, strict=True))
            for key in ("images_per_sec", "images_per_cpu_sec")
        }
        result["image_sets"][name] = {"stats": stats[name], "rates": rates}
    basis = "imagenet-size proxy" if args.proxy_dir else "imagenette"
    per_core = result["image_sets"][basis]["rates"]["train pipeline"]["images_per_cpu_sec"]
    result.update(
        {
            "cores_basis": basis,
            "per_core": per_core,
            "cores_needed": cores_table(per_core, args.chip_rates),
            "settings": {
                "threads": args.threads,
                "cpus": cpus,
                "reps": args.reps,
                "batches": args.batches,
                "image_size": args.image_size,
                "train_batch": TRAIN_BATCH,
                "eval_batch": EVAL_BATCH,
                "tensorflow": tf.__version__,
                "load_average_at_end": os.getloadavg(),
            },
            "command": "python tools/bench_input.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "run": run_info(),
        }
    )
    table = markdown(result)
    print(table)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
