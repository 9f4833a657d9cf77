"""Feature distillation losses, one small file each, registered by name (mdistiller / torchdistill style).

Every feature loss shares one signature:

* constructor ``(channels: int, **options)``; ``channels`` is the *teacher* channel count at the tap
  (the student feature has already been adapted to the teacher's shape). Learnable parts
  (projection heads, temperatures) are built here, never in ``forward``.
* ``forward(student_feat (B, C, H, W), teacher_feat (B, C, H, W), targets (B, 1, H0, W0) float {0,1} | None)``
  returns a scalar tensor.
* what the distiller asks of every loss, declared on :class:`FeatureLoss` (a subclass overrides what differs):
  ``teacher_view(teacher_feat, targets) -> {name: (B, ...)}``, what the loss consumes of the teacher feature
  (default: the map itself, ``{"map": teacher_feat}``, average-pooled by the ``pool`` option of the map losses;
  a loss that pools stores the pooled values); ``view_id``, a string naming that content (part of the
  teacher-output cache key); ``forward_view(student_feat, view, targets)``, the loss from a view (``forward`` is
  ``forward_view(student_feat, teacher_view(teacher_feat, targets), targets)``, so a cached view and the live
  teacher give the same loss); ``label_aware``, whether the view reads the masks; and ``pooling_weights(...)`` +
  ``forward_pooled(...)`` (default ``None``: the loss reads the map), for a loss that reads only weighted pools
  of the student feature, which the distiller then takes from the adapter without building the adapted map.
  The view must not depend on trainable parameters.

Adding a method = one file with ``@LOSSES.register("name")`` + one import line below.
Prediction-map distillation (:mod:`.pmd`) takes logits, not features, so it is not in the registry.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medkd.registry import LOSSES


def check_pair(student_feat: torch.Tensor, teacher_feat: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless both features are ``(B, C, H, W)`` of the same shape."""
    if student_feat.dim() != 4 or student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"{name} loss needs student and teacher features of the same (B, C, H, W) shape; "
            f"got {tuple(student_feat.shape)} and {tuple(teacher_feat.shape)} (adapt the student first)"
        )


class FeatureLoss(nn.Module):
    """Base of the feature losses: one signature, shapes checked once.

    Subclasses set ``name`` and implement ``compute(student_feat, teacher_feat, targets)``.

    Args:
        channels: Teacher channels at the tap (losses without learnable parts ignore it).
        pool: Map losses only: compare both maps average-pooled by this factor (``1`` = full resolution). The
            teacher view, and so a disk or memory cache of it, is then ``pool^2`` times smaller. It changes the
            loss (coarser targets).
    """

    name = "feature"
    #: Whether :meth:`teacher_view` reads the masks (``targets``): then a cached view depends on which slices the
    #: run may label. A subclass whose view reads them sets it (per instance where an option decides).
    label_aware: bool = False

    def __init__(self, channels: int, pool: int = 1):
        super().__init__()
        self.channels = int(channels)
        if int(pool) != pool or pool < 1:
            raise ValueError(f"{self.name} pool must be an integer >= 1, got {pool}")
        self.pool = int(pool)

    def forward(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Args:
            student_feat: Adapted student feature ``(B, C, H, W)``.
            teacher_feat: Teacher feature ``(B, C, H, W)``.
            targets: Masks ``(B, 1, H0, W0)`` in {0, 1}, or ``None`` (used by label-aware losses only).

        Returns:
            Scalar tensor.
        """
        check_pair(student_feat, teacher_feat, self.name)
        return self.forward_view(student_feat, self.teacher_view(teacher_feat, targets), targets)

    def pooled_map(self, feat: torch.Tensor) -> torch.Tensor:
        """``feat`` average-pooled by :attr:`pool` (ceil of the size when it does not divide); itself at 1."""
        if self.pool == 1:
            return feat
        h, w = feat.shape[-2:]
        return F.adaptive_avg_pool2d(feat, (-(-h // self.pool), -(-w // self.pool)))

    @property
    def view_id(self) -> str:
        """Names what :meth:`teacher_view` returns (with any option it depends on)."""
        return "map" if self.pool == 1 else f"map-pool{self.pool}"

    def teacher_view(self, teacher_feat: torch.Tensor, targets: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """What the loss consumes of the teacher feature ``(B, C, H, W)``: per-slice tensors, batch first."""
        return {"map": self.pooled_map(teacher_feat)}

    def forward_view(
        self, student_feat: torch.Tensor, view: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The loss from a teacher view (live or cached). Args as :meth:`forward`, ``view`` from :meth:`teacher_view`."""
        student_feat = self.pooled_map(student_feat)
        check_pair(student_feat, view["map"], self.name)
        return self.compute(student_feat, view["map"], targets)

    def compute(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, targets: Optional[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_options(cls, channels: int, **options: Any) -> "FeatureLoss":
        """Build the loss from a config's ``loss_options``; an option the constructor does not take is a
        ``TypeError`` that lists the valid ones (a bad value is the constructor's ``ValueError``). The options
        layer checks a config by building each loss it uses once, through the registry."""
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [p for p in params if p not in ("self", "channels")]
        unknown = sorted(set(options) - set(valid))
        if unknown and not takes_any:
            raise TypeError(f"loss {cls.name!r} takes no option(s) {', '.join(unknown)}; "
                            f"valid: {', '.join(valid) or '(none)'}")
        return cls(channels, **options)

    def pooling_weights(self, targets: Optional[torch.Tensor], size, batch: int, dtype: torch.dtype,
                        device: torch.device):
        """For a loss that reads only weighted spatial pools of the student feature: ``(weights (B, K, H, W),
        valid (B, K) bool)``, and :meth:`forward_pooled` gives the loss from the ``(B, K, C)`` pools. The
        distiller then asks the adapter for the pools directly
        (:meth:`medkd.distill.adapters.FeatureAdapter.pooled`) instead of building the adapted map. ``None``
        (the default): the loss reads the map."""
        return None

    def forward_pooled(self, pooled: torch.Tensor, valid: torch.Tensor, view: Dict[str, torch.Tensor],
                       targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss from the student pools ``(B, K, C)`` (``valid (B, K)``) that :meth:`pooling_weights` asked for
        and the teacher view. Only called on a loss whose :meth:`pooling_weights` returns weights."""
        raise NotImplementedError(f"{self.name} loss reads the map: it has no pooled form")


def build_loss(name: str, channels: int, **options: Any) -> FeatureLoss:
    """Build the feature loss registered as ``name`` (:meth:`FeatureLoss.from_options`).

    Args:
        name: Registered loss name (see ``LOSSES.names()``).
        channels: Teacher channel count at the tap the loss is applied to.
        **options: Loss-specific options (e.g. ``temperature``).

    Returns:
        The loss module.

    Raises:
        KeyError: unknown name; the message lists the valid names.
        TypeError: an option the loss does not take (the message lists the ones it does), or a registered class
            that is not a :class:`FeatureLoss` (the distiller calls its interface directly).
        ValueError: a bad option value.
    """
    cls = LOSSES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, FeatureLoss)):
        raise TypeError(f"loss {name!r} is registered as {cls!r}, not a FeatureLoss subclass")
    return cls.from_options(channels, **options)


# Import every registering module so registration never depends on import side effects elsewhere.
from medkd.distill.losses import attention, contrastive, cosine, cwd, mse  # noqa: E402,F401
from medkd.distill.losses.pmd import PMDLoss, pmd_loss  # noqa: E402,F401

__all__ = ["LOSSES", "FeatureLoss", "build_loss", "check_pair", "PMDLoss", "pmd_loss"]
