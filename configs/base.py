"""Shared config blocks. Every job config starts from :func:`data_config`."""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    """Fields every job reads to find and preprocess images."""
    c = ml_collections.ConfigDict()
    c.data_dir = "../shared/data"  # shared data and weights (read-only), see its README.md
    c.label_space = "imagenet1001"  # imagenet1001 | imagenet1000 | imagenette | folder
    c.image_size = 224
    c.crop_fraction = 0.875  # TF-slim eval: central 87.5 % crop, then bilinear resize
    c.eval_batch_size = 50
    c.on_corrupt = "error"  # error | skip
    c.tfds_data_dir = ""  # for tfds:... sources; empty = tfds default
    c.manual_dir = ""  # ILSVRC2012 tars for tfds imagenet2012
    return c
