"""Model zoo: teachers (``unet`` = T1, ``transunet`` = T2) and students (``s1``, ``s2``).

Every model built by :func:`build_model` has these attributes:

* ``arch``: its registry name; ``kind``: ``"teacher"`` or ``"student"``;
* ``in_channels``, ``num_classes``, ``width``;
* ``taps``: ``{"enc": path, "bottleneck": path, "dec": path}``, module paths for
  ``model.get_submodule(path)`` whose forward outputs are the distillation features
  (``enc`` = deepest encoder block before pooling, ``bottleneck`` = bottleneck block output as a
  map, ``dec`` = last segmentation-decoder block before the 1×1 head);
* ``feature_channels()``: ``{tap: channels}``;
* ``config``: kwargs that rebuild it, ``build_model(**model.config)`` (includes ``name``);
* ``min_size``: smallest H/W accepted (``2**poolings``); other sizes are reflect-padded to a
  multiple of it inside ``forward`` and outputs cropped back.

Forward: teachers return ``(seg_logits (B, num_classes, H, W), recon (B, in_channels, H, W))``,
students return ``seg_logits (B, num_classes, H, W)``.

Reference sizes (3 input channels, 1 class): T1 ``unet`` width 64 = 43,236,036 parameters;
S1 ``s1`` = 57,297; S2 ``s2`` = 227,233.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional

from torch import nn

from medkd.registry import MODELS, model_kind, model_options  # noqa: F401 (model_options: part of the zoo's face)


#: Arguments every factory takes; the others are its model-specific options (``model_kwargs``).
COMMON_ARGS = ("in_channels", "num_classes", "width")


def register_model(name: str, kind: str, options_of: Optional[Callable[..., Any]] = None
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model factory ``fn(in_channels, num_classes, width, **kwargs)`` under ``name``.

    Args:
        name: Registry name.
        kind: ``"teacher"`` or ``"student"``; stored as ``fn.kind`` for :func:`is_teacher`.
        options_of: the callable whose signature lists the model-specific options ``**kwargs`` may hold (e.g. the
            model class the factory passes them to); ``None``: the factory's own named parameters.
    """
    if kind not in ("teacher", "student"):
        raise ValueError(f"model kind must be 'teacher' or 'student', got {kind!r}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        fn.kind = kind  # type: ignore[attr-defined]
        fn.options = _named_params(options_of or fn)  # type: ignore[attr-defined]
        return MODELS.register(name)(fn)

    return deco


def _named_params(fn: Callable[..., Any]) -> tuple:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.name not in COMMON_ARGS and p.name != "self"
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 1, width: Optional[int] = None, **kwargs: Any
) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registry name (see :func:`list_models`).
        in_channels: Image channels.
        num_classes: Segmentation output channels.
        width: First-level channels; ``None`` uses the model's reference default
            (unet 64, transunet 32, s1 16, s2 32).
        **kwargs: Model-specific options (e.g. transunet ``depth``, ``heads``, ``embed_dim``).

    Returns:
        The model, with the attributes listed in this module's docstring.

    Raises:
        KeyError: unknown name; the message lists the valid names.
        TypeError: an option the model does not take.
    """
    factory = MODELS.get(name)
    return factory(in_channels=in_channels, num_classes=num_classes, width=width, **kwargs)


def list_models() -> List[str]:
    """Sorted names of all registered models."""
    return MODELS.names()


def is_teacher(name: str) -> bool:
    """Whether the registered model ``name`` is a teacher (returns ``(seg, recon)``).

    Raises:
        KeyError: unknown name.
    """
    return model_kind(name) == "teacher"


# Import the registering modules last (they import ``register_model`` from here).
from medkd.models import transunet, unet  # noqa: E402,F401
from medkd.models.transunet import TransUNet  # noqa: E402
from medkd.models.unet import UNet  # noqa: E402

__all__ = ["MODELS", "TransUNet", "UNet", "build_model", "is_teacher", "list_models", "model_options",
           "register_model"]
