"""Importers of external model formats (TF-slim GraphDefs and checkpoints)."""
