"""Entry point: ``python launch/main.py --config configs/<x>.py --workdir <dir>``.

The config's ``job`` field picks what runs; the logic lives in the library. The config is
validated (:mod:`qfsep_jax.config_validation`) before the workdir is created: a bad value, or an
override of a field the config does not have, is one line on stderr (exit status 2) and leaves
nothing behind. ``--verbosity=1`` (``-v 1``) shows the traceback instead.

``python launch/main.py --list`` (or no arguments at all) prints the jobs and the configs, one
line each, and exits 0; ``--help`` shows the same list.
"""

import ast
import importlib
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from qfsep_jax import malloc_tuning

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])

JOBS = {
    "table1": "qfsep_jax.jobs.table1:run",
    "train": "qfsep_jax.train:train_and_evaluate",
    "tflite_check": "qfsep_jax.jobs.tflite_check:run",
    "analyze": "qfsep_jax.jobs.analyze:run",
    "figure5": "qfsep_jax.jobs.figure5:run",
    "agreement": "qfsep_jax.jobs.agreement:run",
    "export_tflite": "qfsep_jax.jobs.export_tflite:run",
}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].strip() or "(no description)"


def _module_docs(path: str) -> tuple[ast.Module, str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return tree, _first_line(ast.get_docstring(tree))


def _job_line(target: str) -> str:
    """The first docstring line of a job's module (else its function), read without importing."""
    module, fn = target.split(":")
    tree, line = _module_docs(os.path.join(REPO, *module.split(".")) + ".py")
    if ast.get_docstring(tree):
        return line
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == fn:
            return _first_line(ast.get_docstring(node))
    return line


def listing() -> str:
    """The jobs (``config.job``) and every ``configs/*.py`` with ``get_config``, one line each."""
    lines = ["jobs (the config's `job` field):"]
    width = max(map(len, JOBS))
    lines += [f"  {name:<{width}}  {_job_line(target)}" for name, target in sorted(JOBS.items())]
    configs = []
    folder = os.path.join(REPO, "configs")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree, line = _module_docs(os.path.join(folder, name))
        if any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
            configs.append((f"configs/{name}", line))
    width = max(len(c) for c, _ in configs)
    lines.append("configs (--config configs/<x>.py --workdir <dir>):")
    lines += [f"  {c:<{width}}  {line}" for c, line in configs]
    return "\n".join(lines)


def _listing_wanted(argv) -> bool:
    """``--list``, or no arguments at all."""
    return argv[1:] == [] or any(a in ("--list", "-list") for a in argv[1:])


def _traceback_wanted(argv) -> bool:
    """``--verbosity`` >= 1, read from argv (also when flag parsing itself failed)."""
    for i, arg in enumerate(argv[1:], 1):
        m = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
        if m:
            value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else "0")
            return value.lstrip("-").isdigit() and int(value) >= 1
    return False


def _config_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, with an override of a missing config field as one line."""
    if _listing_wanted(argv):
        print(listing())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        if _traceback_wanted(argv):
            raise
        _config_error(str(err))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # ml_collections raises these (chained three deep) for an override of a missing field.
        if _traceback_wanted(argv):
            raise
        name = str(err).strip("\"'")
        bad = [a for a in argv[1:] if a.startswith("--config.") and name in re.split(r"[.=]", a)]
        if bad:
            _config_error(f"{bad[0]}: the config has no field {name!r}")
        _config_error(f"--config: {type(err).__name__}: {err}")


def main(argv):
    from qfsep_jax.config_validation import ConfigError, validate

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    config = _CONFIG.value
    job = config.get("job")
    if job not in JOBS:
        raise app.UsageError(f"config.job={job!r} is not one of {sorted(JOBS)}")
    module, fn = JOBS[job].split(":")
    try:
        validate(config, job)  # before anything is written
        os.makedirs(_WORKDIR.value, exist_ok=True)
        malloc_tuning.tune_malloc()  # reuse XLA's per-step scratch memory, no page faults
        logging.info("job %s, workdir %s\n%s", job, _WORKDIR.value, config)
        # The job raises ConfigError itself only before it writes (a refused restart).
        getattr(importlib.import_module(module), fn)(config, _WORKDIR.value)
    except ConfigError as err:
        if flags.FLAGS.verbosity >= 1:
            raise
        _config_error(str(err))


if __name__ == "__main__":
    __doc__ = f"{__doc__}\n{listing()}\n"  # absl's --help and --helpfull print it
    app.run(main, flags_parser=_parse_flags)
