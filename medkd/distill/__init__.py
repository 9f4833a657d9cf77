"""Distillation building blocks: hooks (FeatureExtractor), adapters, losses.

Kept light: the distiller and cache live in their own modules and import from here.
"""

from medkd.distill.adapters import AdapterSet, FeatureAdapter
from medkd.distill.hooks import FeatureExtractor, resolve_module
from medkd.distill.losses import LOSSES, PMDLoss, build_loss, pmd_loss

__all__ = [
    "AdapterSet",
    "FeatureAdapter",
    "FeatureExtractor",
    "resolve_module",
    "LOSSES",
    "PMDLoss",
    "build_loss",
    "pmd_loss",
]
