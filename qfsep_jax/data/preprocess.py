"""Image preprocessing in TF ops (runs inside tf.data): TF-slim eval and inception-style train."""

from __future__ import annotations

import tensorflow as tf


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 HWC → float32 in [0, 1]."""
    return tf.image.convert_image_dtype(image, tf.float32)


def scale_to_pm1(image: tf.Tensor) -> tf.Tensor:
    """[0, 1] → [-1, 1], as TF-slim's inception preprocessing does."""
    return (image - 0.5) * 2.0


def eval_crop_resize(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """TF-slim eval geometry: central crop of ``crop_fraction`` then bilinear resize.

    The resize is TF1's ``resize_bilinear(align_corners=False)`` (no half-pixel centers), the
    one TF-slim's ``preprocess_for_eval`` used. Returns float32 in [0, 1].
    """
    image = to_unit_float(image)
    if crop_fraction < 1.0:
        image = tf.image.central_crop(image, crop_fraction)
    image = tf.compat.v1.image.resize_bilinear(
        image[None], [image_size, image_size], align_corners=False
    )[0]
    return tf.clip_by_value(image, 0.0, 1.0)


def eval_preprocess(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """TF-slim eval preprocessing: central crop, resize, scale to [-1, 1]."""
    return scale_to_pm1(eval_crop_resize(image, image_size, crop_fraction))


def eval_preprocess_uint8(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """The same geometry as :func:`eval_preprocess`, as uint8 pixels (for integer-only models)."""
    image = eval_crop_resize(image, image_size, crop_fraction)
    return tf.cast(tf.round(image * 255.0), tf.uint8)


def train_preprocess(
    image: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Inception-style training crop: random area/aspect crop, resize, random flip, [-1, 1].

    ``seed`` is a stateless seed (shape [2] int) so that the pipeline is deterministic and
    resumable at any position.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seeds[0],
        min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    image = to_unit_float(image)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    return scale_to_pm1(tf.clip_by_value(image, 0.0, 1.0))
