"""Training input: a pure function of (seed, step), process slices, epochs, corrupt images, tfds."""

import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from qfsep_jax.data import pipeline, sources, train_input

WNIDS = ("n01440764", "n02102040")


@pytest.fixture(scope="module")
def imagenette(data_dir):
    return sources.make_source("folder:imagenette/train", data_dir, label_space="imagenette")


def take(source, stream, start, n):
    it = train_input.train_batches(source, stream, start)
    return [next(it) for _ in range(n)]


def small_tree(root, data_dir, per_class=6, corrupt=False):
    """``root/train/<wnid>/*.JPEG``: real Imagenette images (and a broken file if asked)."""
    for wnid in WNIDS:
        src = os.path.join(data_dir, "imagenette", "train", wnid)
        dst = root / "train" / wnid
        dst.mkdir(parents=True)
        for name in sorted(os.listdir(src))[:per_class]:
            shutil.copy(os.path.join(src, name), dst / name)
    if corrupt:
        (root / "train" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    return sources.make_source("folder:train", str(root), label_space="folder")


def test_stream_is_a_pure_function_of_seed_and_step(imagenette):
    stream = train_input.TrainStream(seed=3, global_batch=8, image_size=32, num_classes=10)
    first = take(imagenette, stream, 0, 4)
    resumed = take(imagenette, stream, 2, 2)
    for a, b in zip(first[2:], resumed, strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    b = first[0]
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() < 0.0 < b["image"].max() <= 1.0
    assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < 10)).all()
    assert not np.array_equal(first[0]["image"], first[1]["image"])
    other = take(imagenette, train_input.TrainStream(seed=4, global_batch=8, image_size=32), 0, 1)
    assert not np.array_equal(other[0]["image"], first[0]["image"])


def test_processes_read_slices_of_the_same_global_batch(imagenette):
    whole = take(imagenette, train_input.TrainStream(seed=0, global_batch=8, image_size=32), 1, 1)
    parts = [
        take(
            imagenette,
            train_input.TrainStream(
                seed=0, global_batch=8, image_size=32, process_index=i, process_count=2
            ),
            1,
            1,
        )[0]
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole[0]["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole[0]["label"])


def test_each_epoch_visits_every_image_once(tmp_path, data_dir):
    source = small_tree(tmp_path, data_dir)
    n = source.num_examples
    assert n == 12
    stream = train_input.TrainStream(seed=0, global_batch=4, image_size=32)
    raw = train_input._raw_stream(source, stream, 0).take(2 * n)
    names = [
        ex["filename"].decode()
        for ex in raw.map(lambda e: {"filename": e["filename"]}).as_numpy_iterator()
    ]
    files = {
        os.path.join(str(tmp_path), "train", w, f)
        for w in WNIDS
        for f in os.listdir(tmp_path / "train" / w)
    }
    assert set(names[:n]) == set(names[n:]) == files
    assert names[:n] != names[n:], "each epoch has its own order"


def test_corrupt_image_error_names_the_file(tmp_path, data_dir):
    source = small_tree(tmp_path, data_dir, corrupt=True)
    stream = train_input.TrainStream(seed=0, global_batch=13, image_size=32)
    with pytest.raises(pipeline.CorruptImageError, match="broken.JPEG"):
        take(source, stream, 0, 1)


def test_corrupt_image_skipped_and_counted(tmp_path, data_dir):
    source = small_tree(tmp_path, data_dir, corrupt=True)
    stream = train_input.TrainStream(seed=0, global_batch=13, image_size=32, on_corrupt="skip")
    batches = take(source, stream, 0, 2)  # two epochs of 13 files, one broken
    assert [int(b["skipped"]) for b in batches] == [1, 2]
    for b in batches:
        assert b["image"].shape == (13, 32, 32, 3) and np.isfinite(b["image"]).all()
    # Resuming at step 1 with the count carried over gives the same batch and count.
    it = train_input.train_batches(source, stream, 1, skipped_before=1)
    again = next(it)
    assert int(again["skipped"]) == 2
    np.testing.assert_array_equal(again["image"], batches[1]["image"])


def test_label_outside_the_class_count_is_rejected(imagenette):
    stream = train_input.TrainStream(seed=0, global_batch=8, image_size=32, num_classes=1)
    with pytest.raises(ValueError, match="outside"):
        take(imagenette, stream, 0, 1)


def test_tfds_streaming_source_is_resumable(data_dir):
    with tfds.testing.mock_data(num_examples=24):
        stream = train_input.TrainStream(seed=5, global_batch=8, image_size=32, shuffle_buffer=24)
        source = sources.make_source("tfds:cifar10:train", data_dir, label_space="folder")
        assert source.num_examples == 24 and not source.random_access
        first = take(source, stream, 0, 5)  # crosses the epoch boundary (3 steps per epoch)
        source = sources.make_source("tfds:cifar10:train", data_dir, label_space="folder")
        resumed = take(source, stream, 2, 3)
        # TF's global seed (set by other libraries or tests) must not change the stream.
        tf.random.set_seed(0)
        try:
            source = sources.make_source("tfds:cifar10:train", data_dir, label_space="folder")
            seeded = take(source, stream, 2, 3)
        finally:
            tf.random.set_seed(None)
    for a, b, c in zip(first[2:], resumed, seeded, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], c["image"])
    assert first[0]["image"].shape == (8, 32, 32, 3)
    assert not np.array_equal(first[0]["image"], first[3]["image"])


def test_prefetch_to_devices_lays_out_per_device_shards(imagenette):
    devices = jax.local_devices()[:8]
    stream = train_input.TrainStream(seed=0, global_batch=16, image_size=32)
    batches = train_input.train_batches(imagenette, stream, 0)
    device_batch, host = next(train_input.prefetch_to_devices(batches, devices, size=2))
    assert device_batch["image"].shape == (8, 2, 32, 32, 3)
    assert device_batch["image"].sharding.device_set == set(devices)
    assert host["step"] == 0 and host["skipped"] == 0
    with pytest.raises(ValueError, match="does not split"):
        train_input.shard_batch({"image": np.zeros((6, 2))}, 4)


def test_bad_stream_settings_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        train_input.TrainStream(seed=0, global_batch=10, process_count=3)
    with pytest.raises(ValueError, match="on_corrupt"):
        train_input.TrainStream(seed=0, global_batch=8, on_corrupt="ignore")
    with pytest.raises(ValueError, match="process"):
        train_input.TrainStream(seed=0, global_batch=8, process_index=2, process_count=2)
