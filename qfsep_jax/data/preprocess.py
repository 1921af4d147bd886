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
    # The op behind TF1's resize_bilinear, called directly: the same kernel without the
    # deprecation warning the compat wrapper logs on every pipeline build.
    image = tf.raw_ops.ResizeBilinear(
        images=image[None],
        size=[image_size, image_size],
        align_corners=False,
        half_pixel_centers=False,
    )[0]
    return tf.clip_by_value(image, 0.0, 1.0)


def eval_preprocess(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """TF-slim eval preprocessing: central crop, resize, scale to [-1, 1]."""
    return scale_to_pm1(eval_crop_resize(image, image_size, crop_fraction))


def eval_preprocess_uint8(image: tf.Tensor, image_size: int, crop_fraction: float) -> tf.Tensor:
    """The same geometry as :func:`eval_preprocess`, as uint8 pixels (for integer-only models)."""
    image = eval_crop_resize(image, image_size, crop_fraction)
    return tf.cast(tf.round(image * 255.0), tf.uint8)


def _crop_window(
    shape: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float],
    aspect_ratio_range: tuple[float, float],
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The inception crop of an image of ``shape`` [h, w, c]: ``(begin, size, flip seed)``."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seeds[0],
        min_object_covered=0.1,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size, seeds[1]


def _finish_train(crop: tf.Tensor, image_size: int, flip_seed: tf.Tensor) -> tf.Tensor:
    """Resize, random flip and [-1, 1] scaling of a uint8 crop."""
    image = to_unit_float(crop)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return scale_to_pm1(tf.clip_by_value(image, 0.0, 1.0))


def train_preprocess(
    image: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Inception-style training crop of a decoded image: random area/aspect crop, resize,
    random flip, [-1, 1].

    ``seed`` is a stateless seed (shape [2] int) so that the pipeline is deterministic and
    resumable at any position. The training input uses :func:`train_preprocess_encoded`: the
    same crop from the encoded bytes, decoding only the crop of a JPEG.
    """
    begin, size, flip_seed = _crop_window(tf.shape(image), seed, area_range, aspect_ratio_range)
    return _finish_train(tf.slice(image, begin, size), image_size, flip_seed)


def train_crop_encoded(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[tf.Tensor, tf.Tensor]:
    """The uint8 inception crop of the image in ``image_bytes`` and the flip seed.

    The window is the one :func:`train_preprocess` samples for the decoded image. A JPEG's shape
    is read from its header and only the window is decoded (``tf.image.decode_and_crop_jpeg``,
    the decoding work of the crop instead of the whole image); its pixels equal those of the
    whole image's decoding except in the window's outer two rows and columns, where libjpeg
    upsamples the chroma from inside the window only (``tools/bench_input.py --decode_check``:
    43-48 % of crops differ, in 0.04-0.11 % of their pixels, by up to 27/255;
    tests/test_train_decode.py). Other formats (PNG, GIF, BMP) are decoded whole and sliced.
    """
    from qfsep_jax.data.pipeline import decode_image

    def jpeg():
        shape = tf.io.extract_jpeg_shape(image_bytes)
        shape = tf.concat([shape[:2], [3]], axis=0)  # decoded with channels=3, as decode_image
        begin, size, flip_seed = _crop_window(shape, seed, area_range, aspect_ratio_range)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), flip_seed

    def other():
        image = decode_image(image_bytes)
        begin, size, flip_seed = _crop_window(tf.shape(image), seed, area_range, aspect_ratio_range)
        return tf.slice(image, begin, size), flip_seed

    crop, flip_seed = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    crop.set_shape([None, None, 3])
    return crop, flip_seed


def train_preprocess_encoded(
    image_bytes: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """:func:`train_preprocess` from the encoded image, decoding only the crop of a JPEG
    (:func:`train_crop_encoded`)."""
    crop, flip_seed = train_crop_encoded(image_bytes, seed, area_range, aspect_ratio_range)
    return _finish_train(crop, image_size, flip_seed)
