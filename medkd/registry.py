"""One generic name -> object registry (timm ``_registry.py`` style).

Example:
    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("mse")
    ... class MSELoss: ...
    >>> LOSSES.get("mse")
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterator, List


class Registry:
    """Maps names to objects (classes or factories).

    Args:
        kind: What is registered ("loss", "model"); used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator registering ``obj`` under ``name``. A duplicate name warns and replaces."""

        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                warnings.warn(f"{self.kind} {name!r} registered twice; the later one wins", stacklevel=2)
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        """Return the object registered as ``name``.

        Raises:
            KeyError: unknown name; the message lists the valid names.
        """
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
