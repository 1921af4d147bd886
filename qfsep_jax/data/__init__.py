"""Data: sources (ImageFolder trees, tfds datasets), preprocessing and batched pipelines.

Config-free helpers (TensorFlow is imported on their first call, not with this package):
:func:`eval_batches` (padded batches of a source), :func:`load_images` (a source as NumPy
arrays) and :func:`class_names` (human-readable names of a label space).
"""

from qfsep_jax.data.input import EvalInput, eval_batches, load_images
from qfsep_jax.data.labels import LABEL_SPACES, class_names

__all__ = ["LABEL_SPACES", "EvalInput", "class_names", "eval_batches", "load_images"]
