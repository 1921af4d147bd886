"""Progress bars: every bar of the library, with one way to turn them off.

A library function that shows a bar takes ``progress: bool = True``; ``progress=False`` hides
it. ``TQDM_DISABLE=1`` in the environment hides every bar (jobs and training included), as
tqdm (>= 4.66) reads it whenever the caller does not decide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bar(iterable: Iterable | None = None, progress: bool = True, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar (``leave=False`` unless given), hidden when ``progress`` is False.

    With ``progress=True`` the environment still decides (``TQDM_DISABLE=1`` hides it).
    """
    kwargs.setdefault("leave", False)
    if not progress:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
