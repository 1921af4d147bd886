"""Where images come from: local ImageFolder trees (through tfds) and tfds datasets.

A source is named by a spec string:

* ``folder:<path>``: ``<data_dir>/<path>`` is a split directory of class folders; it is read with
  tfds's ``ImageFolder`` builder rooted at its parent (e.g. ``folder:imagenet_val500``,
  ``folder:imagenette/train``). Class folders are ImageNet wnids, mapped by the label space.
* ``tfds:<name>:<split>``: a tfds dataset (``imagenet2012``, ``imagenette``, ``cifar10``) from
  ``tfds_data_dir``; ``imagenet2012`` is prepared from ``manual_dir`` (the ILSVRC2012 tars).

Every source yields raw examples ``{"image_bytes", "label", "filename"}``; decoding happens in
:mod:`qfsep_jax.data.pipeline` so that a corrupt file can be named.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from qfsep_jax.data import labels as labels_lib
from qfsep_jax.data.specs import parse_spec


@dataclasses.dataclass
class Source:
    """Raw examples of one split and how many there are.

    ``random_access``: ``tf.data.experimental.at(dataset, i)`` works (folder trees), which lets
    the training input address examples by index. ``reopen()`` builds a fresh copy of
    ``dataset``: a pipeline that calls ``at`` on a dataset must own it, because TF 2.21 crashes
    (segfault) when a dataset captured by ``at`` is reused after an earlier pipeline's iterator
    over it was deleted.
    """

    dataset: tf.data.Dataset
    num_examples: int
    name: str
    random_access: bool = False
    reopen: Callable[[], tf.data.Dataset] | None = None


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} not found: {path!r}. Set --config.data_dir to the folder holding the "
            "project's data (default ../shared/data)."
        )


def folder_source(data_dir: str, path: str, label_space: str) -> Source:
    """A class-folder split read with ``tfds.ImageFolder``, labels mapped by ``label_space``."""
    split_dir = os.path.normpath(os.path.join(data_dir, path))
    _check_dir(split_dir, "image folder")
    root, split = os.path.dirname(split_dir), os.path.basename(split_dir)
    builder = tfds.ImageFolder(root)
    if split not in builder.info.splits:
        raise ValueError(f"ImageFolder at {root!r} has no split {split!r}")
    num_examples = builder.info.splits[split].num_examples
    if num_examples == 0:
        raise ValueError(f"no .jpg/.jpeg/.png images under {split_dir!r}")
    names = builder.info.features["label"].names
    mapping = labels_lib.wnid_to_index(label_space, data_dir)
    if mapping is None:
        table_values = list(range(len(names)))
    else:
        folders = {d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))}
        unknown = sorted(folders - set(mapping))
        if unknown:
            raise ValueError(
                f"class folders {unknown[:5]} of {split_dir!r} are not in label space "
                f"{label_space!r}"
            )
        table_values = [mapping.get(n, -1) for n in names]
    table = tf.constant(table_values, tf.int64)

    def make() -> tf.data.Dataset:
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        return ds.map(
            lambda ex: {
                "image_bytes": ex["image"],
                "label": tf.gather(table, ex["label"]),
                "filename": ex["image/filename"],
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    return Source(make(), num_examples, f"folder:{path}", random_access=True, reopen=make)


def tfds_source(
    name: str,
    split: str,
    tfds_data_dir: str | None,
    manual_dir: str | None = None,
    shuffle_files: bool = False,
    process_split: tuple[int, int] = (0, 1),
    label_space: str = "folder",
    data_dir: str | None = None,
) -> Source:
    """A split of a prepared (or preparable) tfds dataset, with images left encoded.

    Labels are mapped by class name into ``label_space`` (e.g. tfds ``imagenet2012``'s wnids to
    TF-slim's 1001 classes with ``imagenet1001``, whose label files live in ``data_dir``);
    ``folder`` keeps tfds's own indices.

    ``imagenet2012`` is built from the ILSVRC2012 tar files in ``manual_dir`` on first use.
    ``process_split=(index, count)`` reads only part ``index`` of ``count`` even parts of the
    split (``tfds.even_splits``), so that each training process reads its own files.
    """
    builder = tfds.builder(name, data_dir=tfds_data_dir)
    if not builder.is_prepared():
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=download_config)
    index, count = process_split
    if count > 1:
        split = tfds.even_splits(split, count)[index]
    ds = builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=shuffle_files
    )
    if builder.info.splits:
        num_examples = builder.info.splits[split].num_examples
    else:  # no split metadata (e.g. under tfds.testing.mock_data): count the records
        num_examples = int(ds.cardinality())
        if num_examples < 0:
            raise ValueError(f"tfds {name}:{split} has no split metadata and unknown cardinality")

    table = _label_table(builder.info.features["label"].names, label_space, data_dir, name)

    def to_raw(ex):
        filename = ex.get("file_name", ex.get("id", tf.constant("")))
        label = ex["label"] if table is None else tf.gather(table, ex["label"])
        return {"image_bytes": ex["image"], "label": label, "filename": filename}

    return Source(ds.map(to_raw), num_examples, f"tfds:{name}:{split}")


def _label_table(
    names: list[str], label_space: str, data_dir: str | None, what: str
) -> tf.Tensor | None:
    """tfds class index → label-space index (None: keep tfds's indices)."""
    if label_space == "folder":
        return None
    if data_dir is None:
        raise ValueError(f"label_space {label_space!r} needs data_dir (its labels/ folder)")
    mapping = labels_lib.wnid_to_index(label_space, data_dir)
    unknown = [n for n in names if n not in mapping]
    if unknown:
        raise ValueError(
            f"classes {unknown[:5]} of tfds {what} are not in label space {label_space!r}; "
            "use label_space='folder' to keep tfds's own labels"
        )
    return tf.constant([mapping[n] for n in names], tf.int64)


def make_source(
    spec: str,
    data_dir: str,
    label_space: str = "imagenet1001",
    tfds_data_dir: str | None = None,
    manual_dir: str | None = None,
    shuffle_files: bool = False,
    process_split: tuple[int, int] = (0, 1),
) -> Source:
    """Resolves a source spec (see the module docstring).

    ``process_split`` applies to tfds sources only; folder sources are random-access and the
    training input picks each process's examples by index.
    """
    kind, parts = parse_spec(spec)
    if kind == "folder":
        _check_dir(data_dir, "data directory")
        return folder_source(data_dir, parts[0], label_space)
    name, split = parts
    return tfds_source(
        name,
        split,
        tfds_data_dir,
        manual_dir,
        shuffle_files,
        process_split,
        label_space=label_space,
        data_dir=data_dir,
    )
