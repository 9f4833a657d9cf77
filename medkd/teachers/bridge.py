"""From prepared slices to an external model's input, and from its output back to a foreground logit.

A distillation feeds its teacher the prepared slices: ``(B, C, S, S)`` in medkd's intensity scale (CT: the
dataset's window mapped to [0, 1]; MR: each volume's 0.5/99.5 percentiles mapped to [0, 1]). A model trained
elsewhere expects its own normalisation, size and output layout. :class:`BridgedTeacher` wraps it so that it
answers like a medkd teacher, ``(B, C, S, S) -> (B, 1, S, S)`` foreground logits:

1. intensity (:func:`intensity_bridge`): prepared values -> the source scale (Hounsfield units: the manifest's CT
   window, ``x * (high - low) + low``; values outside the window were clipped at preprocessing and stay clipped)
   -> the model's normalisation (:class:`Intensity`: ``window``, ``zscore`` with a fixed mean/std or per slice,
   ``none``, or ``medkd``: medkd's own recipe);
2. size: ``(B, C, S, S)`` resized to the model's input size (bilinear, antialiased when shrinking), its output
   resized back to ``S`` (bilinear, on logits);
3. output layout (:func:`foreground_logit`): ``sigmoid`` (one logit per class: the label's channel) or ``softmax``
   (K channels: ``logit = log p_N - log(1 - p_N)`` for the label ``N``, computed as ``z_N - logsumexp(z_others)``,
   exact and finite).

nnU-Net's and the MONAI bundle's loaders reuse these pieces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from medkd.errors import MedkdError

#: Normalisations an external model may expect (:class:`Intensity`).
NORMALISATIONS = ("medkd", "window", "zscore", "none")
#: Output layouts: ``sigmoid`` (K independent logits), ``softmax`` (K >= 2 mutually exclusive classes).
LAYOUTS = ("sigmoid", "softmax")

Window = Tuple[float, float]


@dataclass(frozen=True)
class Intensity:
    """The intensity normalisation an external model expects.

    Attributes:
        rule: ``medkd`` (medkd's own recipe: CT window ``low``/``high`` -> [0, 1], MR percentiles), ``window``
            (``(clip(HU, low, high) - low) / (high - low)``), ``zscore`` (``(clip(v, low, high) - mean) / std``;
            without ``mean``/``std``: each slice's own), ``none`` (source values as they are).
        low, high: The window (``medkd``, ``window``) or the optional clip before a z-score.
        mean, std: The z-score's fixed statistics (``zscore``; both or neither).
    """

    rule: str
    low: Optional[float] = None
    high: Optional[float] = None
    mean: Optional[float] = None
    std: Optional[float] = None

    @classmethod
    def from_doc(cls, doc: Any, what: str) -> "Intensity":
        """Read ``{"normalise": rule, "low", "high", "mean", "std"}`` (a sidecar's ``intensity``).

        Raises:
            MedkdError: ``<what>: ...`` naming the bad field.
        """
        if not isinstance(doc, dict):
            raise MedkdError(f"{what}: intensity must be a mapping with 'normalise' ({', '.join(NORMALISATIONS)}), "
                             f"got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"normalise", "low", "high", "mean", "std"})
        if unknown:
            raise MedkdError(f"{what}: intensity has unknown field(s) {', '.join(unknown)}; valid: normalise, low, "
                             f"high, mean, std")
        rule = doc.get("normalise")
        if rule not in NORMALISATIONS:
            raise MedkdError(f"{what}: intensity normalise must be one of {', '.join(NORMALISATIONS)}, got {rule!r}")
        vals = {k: _number(doc.get(k), f"{what}: intensity {k}") for k in ("low", "high", "mean", "std")}
        out = cls(rule, **vals)
        out.check(what)
        return out

    def check(self, what: str) -> None:
        """The fields the rule needs are there and consistent.

        Raises:
            MedkdError: ``<what>: intensity ...`` naming what is missing or wrong.
        """
        if self.rule in ("medkd", "window") and (self.low is None or self.high is None):
            raise MedkdError(f"{what}: intensity {self.rule} needs low and high")
        if (self.low is None) != (self.high is None):
            raise MedkdError(f"{what}: intensity needs both low and high, or neither")
        if self.low is not None and not self.high > self.low:
            raise MedkdError(f"{what}: intensity needs high > low, got {self.low:g}, {self.high:g}")
        if self.rule == "zscore" and (self.mean is None) != (self.std is None):
            raise MedkdError(f"{what}: intensity zscore needs both mean and std, or neither (each slice's own)")
        if self.std is not None and not self.std > 0:
            raise MedkdError(f"{what}: intensity std must be > 0, got {self.std:g}")

    def record(self) -> Dict[str, Any]:
        return {"normalise": self.rule, **{k: v for k, v in asdict(self).items() if k != "rule" and v is not None}}


def _number(value: Any, what: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise MedkdError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def dataset_window(data: Any) -> Optional[Window]:
    """The CT window every case of the prepared dataset was normalised with, or ``None`` when the cases have
    their own rules (MR percentiles, or a mix)."""
    windows = set()
    for case in data.cases:
        rule = case.get("intensity") or {}
        if rule.get("rule") != "ct_window":
            return None
        windows.add((float(rule["low"]), float(rule["high"])))
    return windows.pop() if len(windows) == 1 else None


def intensity_bridge(target: Intensity, source: Optional[Window], what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(x)``: prepared values ``(B, C, H, W)`` -> the values ``target`` expects.

    Args:
        target: The model's normalisation.
        source: The prepared dataset's CT window (:func:`dataset_window`), ``None`` for per-case rules.
        what: Names the teacher in errors.

    Raises:
        MedkdError: the model needs source intensities (HU) but the dataset's cases were normalised each with their
            own rule (MR percentiles): those cannot be undone from the slices.
    """
    if target.rule == "medkd" and (source is None or source == (target.low, target.high)):
        return _identity  # medkd's own recipe on the data it prepared (CT with the same window, or MR)
    if target.rule == "zscore" and target.mean is None and target.low is None:
        return _zscore_per_slice  # invariant to the affine map back to the source scale
    if source is None:
        raise MedkdError(f"{what}: its intensity normalisation ({target.rule}"
                         f"{', fixed mean/std' if target.rule == 'zscore' else ''}) needs the source intensities, "
                         f"but the prepared cases were normalised each with their own rule (MR percentiles); a "
                         f"teacher on such data must use per-slice zscore or medkd's own recipe")
    lo, hi = source

    def bridge(x: torch.Tensor) -> torch.Tensor:
        v = x * (hi - lo) + lo  # Hounsfield units (clipped to the window at preprocessing)
        if target.rule in ("window", "medkd"):
            return (v.clamp(target.low, target.high) - target.low) / (target.high - target.low)
        if target.low is not None:
            v = v.clamp(target.low, target.high)
        if target.rule == "zscore":
            return (v - target.mean) / target.std if target.mean is not None else _zscore_per_slice(v)
        return v

    return bridge


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _zscore_per_slice(x: torch.Tensor) -> torch.Tensor:
    """Each slice (and channel) to zero mean, unit variance (a constant slice to zeros)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(1e-8)


def size_for_spacing(prepared_spacing: Sequence[float], size: int, target_spacing: Sequence[float],
                     multiple: int = 1) -> int:
    """The in-plane size that brings ``size x size`` slices of ``prepared_spacing`` (mm, in-plane) to about
    ``target_spacing`` (the larger of the two axes' sizes), rounded up to a multiple of ``multiple``.

    Sizes within a millionth of a multiple count as that multiple: manifest spacings are float32 values
    (8.7 mm is stored as 8.7000002861), which must not push an exact 48 px to the next multiple."""
    n = max(size * float(p) / float(t) for p, t in zip(prepared_spacing, target_spacing))
    return max(multiple, int(math.ceil(n / multiple * (1 - 1e-6))) * multiple)


def median_prepared_spacing(data: Any, split: str = "train") -> Tuple[float, float]:
    """The median in-plane spacing (mm) of the prepared slices of ``split``'s cases (the manifest's
    ``prepared_spacing``, ``(Z, X, Y)`` order). One spacing for every case: a batch mixes cases, so a teacher
    that wants its own spacing sees every slice resized by this one factor."""
    import statistics

    rows = [data.case(c)["prepared_spacing"] for c in data.case_ids(split)] or [
        c["prepared_spacing"] for c in data.cases]
    return (float(statistics.median(r[1] for r in rows)), float(statistics.median(r[2] for r in rows)))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, size, size)``: bilinear, antialiased when shrinking (as preprocessing does);
    unchanged when already that size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def foreground_logit(out: torch.Tensor, layout: str, label: int) -> torch.Tensor:
    """The foreground logit ``(B, 1, H, W)`` of class ``label`` from a model output ``(B, K, H, W)``.

    ``sigmoid``: channel ``label`` as it is (K = 1: ``label`` 0 means that one channel). ``softmax``:
    ``z_N - logsumexp(z_j, j != N)`` = ``log p_N - log(1 - p_N)``.
    """
    if layout == "sigmoid":
        return out[:, label : label + 1]
    others = torch.cat([out[:, :label], out[:, label + 1 :]], dim=1)
    return out[:, label : label + 1] - torch.logsumexp(others, dim=1, keepdim=True)


def choose_label(layout: str, channels: int, label: Optional[int], classes: Optional[Dict[int, str]],
                 what: str) -> int:
    """The output channel of the student's foreground: ``label`` when given, else the only possible one
    (one sigmoid channel: 0; two softmax channels: 1, channel 0 being the background).

    Raises:
        MedkdError: a multi-class output without ``label`` (listing the classes), or ``label`` out of range.
    """
    names = classes or {}
    listing = ", ".join(f"{k} {names[k]}" if k in names else str(k)
                        for k in range(1 if layout == "softmax" else 0, channels))
    if label is None:
        if layout == "sigmoid" and channels == 1:
            return 0
        if layout == "softmax" and channels == 2:
            return 1
        raise MedkdError(f"{what}: a multi-class teacher ({channels} {layout} channels): choose the student's "
                         f"foreground with --teacher-label N; classes: {listing}")
    if layout == "sigmoid" and channels == 1 and label == 1:
        return 0  # the one foreground channel, by its class number
    lo = 1 if layout == "softmax" else 0
    if not lo <= label < channels:
        raise MedkdError(f"{what}: --teacher-label {label} is not a foreground class of its {channels} {layout} "
                         f"channel(s); classes: {listing}")
    return label


class BridgedTeacher(nn.Module):
    """An external model answering like a medkd teacher: prepared ``(B, C, S, S)`` -> ``(B, 1, S, S)`` foreground
    logits (module docstring: intensity, size, output layout).

    The model is ``net`` (a torch module, or a callable such as an ONNX Runtime session wrapper), so its own module
    paths are ``net.<path>``: :attr:`tap_prefix` is what a ``--teacher-taps`` path gets in front. The wrapper holds a
    zero-size parameter, so a teacher without torch parameters still has a device (``next(parameters())``).

    Args:
        net: ``(B, C', s, s)`` -> ``(B, K, s, s)`` outputs (a tuple/list: its first item).
        in_channels: Channels of the prepared batches (the student's).
        prepared_size: ``S``.
        intensity: Prepared values -> the model's (:func:`intensity_bridge`).
        input_size: The model's in-plane size ``s`` (``None``: ``S``).
        layout: ``sigmoid`` or ``softmax``.
        label: Output channel of the student's foreground (:func:`choose_label`).
        net_channels: Channels the model takes (the prepared channel repeated when more; ``None``: ``in_channels``).
    """

    tap_prefix = "net."

    def __init__(self, net: Callable[[torch.Tensor], Any], in_channels: int, prepared_size: int,
                 intensity: Callable[[torch.Tensor], torch.Tensor], input_size: Optional[int], layout: str,
                 label: int, net_channels: Optional[int] = None):
        super().__init__()
        self.net = net
        self.in_channels = int(in_channels)
        self.prepared_size = int(prepared_size)
        self.intensity = intensity
        self.input_size = int(input_size or prepared_size)
        self.layout, self.label = layout, int(label)
        self.net_channels = int(net_channels or in_channels)
        self.taps: Dict[str, str] = {}  # none known: --teacher-taps names them
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = resize(self.intensity(x), self.input_size)
        if v.shape[1] != self.net_channels:
            v = v[:, :1].expand(-1, self.net_channels, -1, -1)  # prepared slices have one channel, repeated
        out = self.net(v)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return resize(foreground_logit(out.float(), self.layout, self.label), self.prepared_size)
