"""Forward hooks by module path (torchdistill ``core/forward_hook.py``; timm ``_features.py``).

Models need no edits to be distilled: name the modules whose outputs you want and read them
back after a forward pass.

Example:
    >>> with FeatureExtractor(model, {"enc": "encoder.1", "dec": "decoder.0"}) as fx:
    ...     logits = model(x)
    ...     feats = fx.pop()          # {"enc": (B, C, H, W), "dec": ...}; the store is now empty
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The module output itself if it is a tensor, else the first tensor in a tuple/list (depth-first)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return ``model.get_submodule(path)`` with an error that helps fix a typo.

    Args:
        model: The model to search.
        path: Dotted module path, e.g. ``"encoder.1.conv"`` (``""`` is the model itself).

    Returns:
        The submodule.

    Raises:
        ValueError: ``path`` names no module; the message suggests the closest paths (a typo) and lists some
            valid ones.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        prefix = path.rsplit(".", 1)[0] if "." in path else ""
        near = [n for n in names if prefix and n.startswith(prefix)] or names
        shown = ", ".join(near[:12]) + (", ..." if len(near) > 12 else "")
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(
            f"no module at path {path!r} in {type(model).__name__}{hint}; valid module paths include: {shown}"
        ) from None


class FeatureExtractor:
    """Catch the outputs of named submodules with forward hooks.

    A context manager: ``__enter__`` registers the hooks, ``__exit__`` removes them. Outputs are stored
    without detaching (a student needs the graph); callers run the teacher under ``torch.no_grad()``.
    If a module returns a tuple/list, its first tensor element is stored.

    Args:
        model: The model to hook.
        paths: Feature name -> module path as accepted by ``model.get_submodule``
            (e.g. ``{"enc": "encoders.1", "bottleneck": "bottleneck"}``).

    Raises:
        ValueError: a path names no module (checked at construction, before any hook is attached).
    """

    def __init__(self, model: nn.Module, paths: Mapping[str, str]):
        self.model = model
        self.paths: Dict[str, str] = dict(paths)
        self._modules: Dict[str, nn.Module] = {
            name: resolve_module(model, path) for name, path in self.paths.items()
        }
        self._handles: List[RemovableHandle] = []
        self._store: Dict[str, torch.Tensor] = {}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise TypeError(
                    f"module {self.paths[name]!r} ({type(module).__name__}) returned no tensor; cannot hook it"
                )
            self._store[name] = tensor

        return hook

    def register(self) -> "FeatureExtractor":
        """Attach the forward hooks (idempotent). Returns ``self``."""
        if not self._handles:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook handle and drop anything caught."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()

    @property
    def active(self) -> bool:
        """Whether hooks are currently attached."""
        return bool(self._handles)

    def pop(self) -> Dict[str, torch.Tensor]:
        """Return the features caught since the last ``pop`` and clear the store.

        Returns:
            Feature name -> output tensor (usually ``(B, C, H, W)``); names whose module did not run are absent.
        """
        caught, self._store = self._store, {}
        return caught

    def __enter__(self) -> "FeatureExtractor":
        return self.register()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureExtractor({type(self.model).__name__}, {self.paths}, active={self.active})"
