"""The library's layers import downward only: quant < models < integer < quantized < ptq < jobs.

Every ``import`` of a ``qfsep_jax`` module (at module level or inside a function) is read from
the source, so a lazy import that runs upward or in a circle fails here too.
"""

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "qfsep_jax")

# Level of each module or package, lowest first. A module may import modules of a lower level
# and of its own package; nothing imports a higher level.
LEVELS = {
    "qfsep_jax.io_utils": 0,
    "qfsep_jax.tree_utils": 0,
    "qfsep_jax.padding": 0,
    "qfsep_jax.paper": 0,
    "qfsep_jax.malloc_tuning": 0,
    "qfsep_jax.distributed": 0,
    "qfsep_jax.metrics_log": 0,
    "qfsep_jax.precision": 0,
    "qfsep_jax.progress": 0,
    "qfsep_jax.data": 1,
    "qfsep_jax.quant": 1,
    "qfsep_jax.models": 2,
    "qfsep_jax.importers": 3,
    "qfsep_jax.evaluation": 3,
    "qfsep_jax.integer": 3,
    "qfsep_jax.quantized": 4,
    "qfsep_jax.ptq": 5,
    "qfsep_jax.checkpointing": 5,
    "qfsep_jax.analysis": 6,
    "qfsep_jax.config_validation": 6,
    "qfsep_jax.train": 7,
    "qfsep_jax.jobs": 8,
}


def _unit(module: str) -> str:
    """The LEVELS entry a module belongs to (its package, or itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LEVELS:
            return name
    raise AssertionError(f"{module} has no level in LEVELS: add it")


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                if rel != "qfsep_jax.__init__":  # the package docstring, no imports
                    yield rel.removesuffix(".__init__"), path


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_library_imports_run_downward_only():
    bad = []
    for module, path in _modules():
        own = _unit(module)
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top in ("configs", "launch", "tools", "tests"):
                bad.append(f"{module} imports {imported} (outside the library)")
                continue
            if top != "qfsep_jax" or imported == "qfsep_jax":
                continue
            try:
                unit = _unit(imported)
            except AssertionError:
                continue  # a name imported from a package's __init__, e.g. a function
            if unit != own and LEVELS[unit] >= LEVELS[own]:
                bad.append(
                    f"{module} (level {LEVELS[own]}) imports {imported} (level {LEVELS[unit]})"
                )
    assert not bad, "\n".join(sorted(bad))


def test_every_module_has_a_level():
    for module, _ in _modules():
        _unit(module)


def test_the_check_sees_an_upward_import(tmp_path):
    # Negative control: a lazy upward import inside a function is found.
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from qfsep_jax.jobs import table1\n")
    assert "qfsep_jax.jobs" in _imports(str(path))
