"""The training input decodes only the crop window of a JPEG: same window, same interior pixels.

``tf.image.decode_and_crop_jpeg`` differs from decoding the whole image and slicing only in the
window's outer two rows and columns (libjpeg upsamples the chroma from inside the window);
non-JPEG files are decoded whole, exactly as before.
"""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from qfsep_jax.data import pipeline, preprocess

AREA, ASPECT = (0.05, 1.0), (0.75, 1.33)


@pytest.fixture(scope="module")
def jpegs(data_dir):
    # imagenet_calib1000: various sizes (shorter side 224), 4:2:0 chroma.
    files = sorted(glob.glob(os.path.join(data_dir, "imagenet_calib1000", "*", "*")))[::25]
    assert len(files) == 40
    return [tf.io.read_file(f) for f in files]


def _whole_then_slice(image_bytes, seed):
    """The crop as the input made it before: decode everything, sample the window, slice."""
    image = pipeline.decode_image(image_bytes)
    begin, size, _ = preprocess._crop_window(tf.shape(image), seed, AREA, ASPECT)
    return tf.slice(image, begin, size)


def test_fused_crop_is_the_same_window_with_the_same_interior(jpegs):
    differing = 0
    for i, image_bytes in enumerate(jpegs):
        for s in range(3):
            seed = tf.constant([s, i], tf.int64)
            crop, _ = preprocess.train_crop_encoded(image_bytes, seed, AREA, ASPECT)
            ref = _whole_then_slice(image_bytes, seed)
            crop, ref = crop.numpy().astype(int), ref.numpy().astype(int)
            assert crop.shape == ref.shape  # the same window
            np.testing.assert_array_equal(crop[2:-2, 2:-2], ref[2:-2, 2:-2])
            edge = np.abs(crop - ref)
            assert edge.max() <= 64, edge.max()
            differing += bool(edge.max())
    # The edge effect is real (so the comparison above is not vacuous) and confined to it.
    assert 0 < differing < 120


def test_non_jpeg_images_are_decoded_whole_exactly_as_before(jpegs):
    image = pipeline.decode_image(jpegs[0])
    png = tf.io.encode_png(image)
    seed = tf.constant([1, 2], tf.int64)
    got = preprocess.train_preprocess_encoded(png, 32, seed, AREA, ASPECT)
    want = preprocess.train_preprocess(image, 32, seed, AREA, ASPECT)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    # A JPEG gives the same crop geometry and the same flip: close, not equal, after resizing.
    jpeg = preprocess.train_preprocess_encoded(jpegs[0], 32, seed, AREA, ASPECT).numpy()
    assert jpeg.shape == want.shape and np.mean(np.abs(jpeg - want.numpy())) < 0.05


def test_corrupt_bytes_fail_with_tensorflow_s_decode_error():
    seed = tf.constant([0, 0], tf.int64)
    for data in (b"\xff\xd8\xff\xe0 truncated jpeg", b"not an image at all"):
        with pytest.raises(tf.errors.InvalidArgumentError):
            preprocess.train_preprocess_encoded(tf.constant(data), 32, seed, AREA, ASPECT)
