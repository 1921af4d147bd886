"""Names in data configs, parsed without TensorFlow (config validation reads them up front)."""

from __future__ import annotations

CORRUPT_POLICIES = ("error", "skip")


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """A dataset spec: ``"folder:<path>"`` → ``("folder", (path,))``, ``"tfds:<name>:<split>"`` →
    ``("tfds", (name, split))``; anything else raises ValueError."""
    kind, _, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "folder" and rest:
        return kind, (rest,)
    if kind == "tfds" and rest.count(":") == 1 and all(rest.split(":")):
        return kind, tuple(rest.split(":"))
    raise ValueError(
        f"bad dataset spec {spec!r}: use 'folder:<path under data_dir>' or 'tfds:<name>:<split>'"
    )
