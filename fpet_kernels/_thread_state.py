"""Per-forward scratch state that is private to each thread and survives ``copy.deepcopy`` / pickling (empty)."""
from __future__ import annotations

import threading
from typing import Any


class ThreadState:
    """Named per-thread slots; an empty slot holds None. A copy or an unpickled object starts with every slot empty."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self._local, name, default)

    def set(self, name: str, value: Any) -> None:
        setattr(self._local, name, value)

    def pop(self, name: str, default: Any = None) -> Any:
        value = getattr(self._local, name, None)
        setattr(self._local, name, None)
        return default if value is None else value

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()
