"""Importers of external model formats (TF-slim GraphDefs and checkpoints).

:func:`load_official` is the paper's float model in one call; TensorFlow is imported only when a
file is read.
"""

from qfsep_jax.importers.tfslim import load_official, load_tfslim

__all__ = ["load_official", "load_tfslim"]
