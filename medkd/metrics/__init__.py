"""Metrics as data: per-case segmentation dicts, their summary, and model efficiency numbers."""

from medkd.metrics.efficiency import checkpoint_size_mb, count_params, flops_per_slice, latency_ms
from medkd.metrics.segmentation import (
    DEFAULT_TOLERANCE_MM,
    EMPTY_MASK_POLICY,
    HD_PERCENTILE,
    METRIC_KEYS,
    OVERLAP_KEYS,
    WORST_CASE,
    case_metrics,
    confusion,
    overlap_from_counts,
    slice_confusion_sum,
    summarize,
    surface_distances,
    to_jsonable,
    worst_case_distance,
)

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "EMPTY_MASK_POLICY",
    "HD_PERCENTILE",
    "METRIC_KEYS",
    "OVERLAP_KEYS",
    "WORST_CASE",
    "case_metrics",
    "checkpoint_size_mb",
    "confusion",
    "count_params",
    "flops_per_slice",
    "latency_ms",
    "overlap_from_counts",
    "slice_confusion_sum",
    "summarize",
    "surface_distances",
    "to_jsonable",
    "worst_case_distance",
]
