"""Data: sources (ImageFolder trees, tfds datasets), preprocessing and batched pipelines."""
