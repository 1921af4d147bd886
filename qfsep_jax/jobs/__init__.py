"""Jobs that launch/main.py runs, one module each, chosen by ``config.job``."""
