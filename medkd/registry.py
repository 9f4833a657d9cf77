"""One generic name -> object registry (timm ``_registry.py`` style), and medkd's two registries.

:data:`MODELS` and :data:`LOSSES` live here, at the bottom of the package, so that the options layer
(:mod:`medkd.options`, :mod:`medkd.config`) can check a name and list the valid ones without importing the
model zoo or the losses: a registry imports its *home* package (the one whose ``__init__`` imports every
registering module) the first time it is read, as a plugin system loads its entry points.

Example:
    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("mse")
    ... class MSELoss: ...
    >>> LOSSES.get("mse")
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional


class Registry:
    """Maps names to objects (classes or factories).

    Args:
        kind: What is registered ("loss", "model"); used in error messages.
        home: The package that registers every entry when imported; read lazily (see the module docstring).
    """

    def __init__(self, kind: str, home: Optional[str] = None):
        self.kind = kind
        self.home = home
        self._items: Dict[str, Any] = {}

    def _load(self) -> Dict[str, Any]:
        if self.home is not None:
            importlib.import_module(self.home)  # registers the entries (a no-op once imported)
        return self._items

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
            return self._load()[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._load())


#: Model factories (:func:`medkd.models.register_model`); each has ``kind`` "teacher" or "student".
MODELS = Registry("model", home="medkd.models")
#: Feature distillation losses (:mod:`medkd.distill.losses`), classes taking ``(channels, **options)``.
LOSSES = Registry("loss", home="medkd.distill.losses")


def model_kind(name: str) -> str:
    """``"teacher"`` or ``"student"``: the kind ``register_model`` gave the registered model ``name``.

    Raises:
        KeyError: unknown name (listing the valid ones).
    """
    return getattr(MODELS.get(name), "kind", "student")


def model_options(name: str) -> List[str]:
    """The model-specific options (``model_kwargs``) the registered model ``name`` takes (from its constructor's
    signature, recorded by ``register_model``).

    Raises:
        KeyError: unknown name.
    """
    return list(getattr(MODELS.get(name), "options", ()))


def model_names(kind: str) -> List[str]:
    """Registered model names of ``kind`` ("teacher" or "student")."""
    return [n for n in MODELS.names() if model_kind(n) == kind]
