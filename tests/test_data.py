"""Data sources and evaluation batches: labels, padding, sharding, bad inputs."""

import os
import shutil

import numpy as np
import pytest

from qfsep_jax.data import labels, pipeline, preprocess, sources
from tests.conftest import require


def _prep(image):
    return preprocess.eval_preprocess(image, 32, 0.875)


def test_val500_labels_are_tfslim_1001_way(data_dir):
    src = sources.make_source("folder:imagenet_val500", data_dir, "imagenet1001")
    assert src.num_examples == 500
    wnids = labels.read_lines(os.path.join(data_dir, "labels", "imagenet_synsets.txt"))
    expected = {wnids.index(w) + 1 for w in os.listdir(os.path.join(data_dir, "imagenet_val500"))}
    seen, n = set(), 0
    for batch in pipeline.batches(src, _prep, 64):
        valid = batch["mask"] > 0
        seen |= set(batch["label"][valid].tolist())
        n += int(valid.sum())
        assert batch["image"].shape == (64, 32, 32, 3)
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert n == 500 and seen == expected
    assert 1 in seen  # n01440764 (tench) is TF-slim class 1; 0 is background


def test_padding_and_shards_count_each_image_once(data_dir):
    src = sources.make_source("folder:imagenette/val", data_dir, "imagenette")
    counts = []
    for shard in [(0, 3), (1, 3), (2, 3)]:
        batches = list(pipeline.batches(src, _prep, 8, limit=10, shard=shard))
        assert all(b["image"].shape[0] == 8 for b in batches)
        counts.append(int(sum(b["mask"].sum() for b in batches)))
        last = batches[-1]
        assert np.all(last["label"][last["mask"] == 0] == 0)
    assert counts == [10, 10, 10]
    assert sum(int(b["mask"].sum()) for b in pipeline.batches(src, _prep, 16, limit=21)) == 21


def _tiny_tree(tmp_path, data_dir):
    cls = tmp_path / "split" / "n01440764"
    cls.mkdir(parents=True)
    good = os.path.join(data_dir, "imagenet_val500", "n01440764")
    for name in sorted(os.listdir(good))[:3]:
        shutil.copy(os.path.join(good, name), cls / name)
    with open(os.path.join(good, sorted(os.listdir(good))[3]), "rb") as f:
        data = f.read()
    (cls / "broken.JPEG").write_bytes(b"not a jpeg at all" + data[5000:6000])
    return str(tmp_path)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, data_dir):
    root = _tiny_tree(tmp_path, data_dir)
    src = sources.make_source("folder:split", root, "folder")
    with pytest.raises(pipeline.CorruptImageError, match="broken.JPEG"):
        list(pipeline.batches(src, _prep, 2))
    batches = list(pipeline.batches(src, _prep, 2, on_corrupt="skip"))
    assert sum(int(b["mask"].sum()) for b in batches) == 3
    assert int(batches[-1]["skipped"]) == 1
    with pytest.raises(ValueError, match="on_corrupt"):
        next(pipeline.batches(src, _prep, 2, on_corrupt="ignore"))


def test_bad_paths_and_specs(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        sources.make_source("folder:imagenet_val500", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="image folder"):
        sources.make_source("folder:no_such_split", data_dir)
    with pytest.raises(ValueError, match="bad dataset spec"):
        sources.make_source("imagenet_val500", data_dir)
    with pytest.raises(ValueError, match="label space"):
        sources.make_source("folder:imagenet_calib1000", data_dir, "imagenette")
    with pytest.raises(ValueError, match="label_space"):
        labels.wnid_to_index("coco", data_dir)
    assert labels.num_classes("imagenet1001", require(".")) == 1001


def test_tfds_imagenet_validation_maps_to_tfslim_labels(data_dir):
    # The real-ImageNet path (tfds imagenet2012, prepared from manual_dir), on tfds's mock data.
    import tensorflow_datasets as tfds

    from configs import reproduce_table1
    from qfsep_jax.data.input import eval_input

    config = reproduce_table1.get_config()
    config.data_dir = data_dir
    config.image_size = 32
    with tfds.testing.mock_data(num_examples=12):
        raw = sources.make_source("tfds:imagenet2012:validation", data_dir, label_space="folder")
        raw_labels = [int(ex["label"]) for ex in raw.dataset]
        data = eval_input(config, "tfds:imagenet2012:validation", batch_size=5)
        batches = list(data.make())
    assert data.num_examples == 12 and len(batches) == 3
    labels_1001 = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels_1001, np.asarray(raw_labels) + 1)
    assert batches[0]["image"].shape == (5, 32, 32, 3)
