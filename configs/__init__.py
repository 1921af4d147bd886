"""Experiment configs: ``get_config()`` files layered on :mod:`configs.base`."""
