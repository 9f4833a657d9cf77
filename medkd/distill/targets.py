"""Teacher targets: what the distillation terms read of the frozen teacher, per slice, and where they come from.

:class:`TeacherView` computes them from the teacher: at each distilled scale the loss's
:meth:`~medkd.distill.losses.FeatureLoss.teacher_view` of the teacher feature (e.g. ``dec.gap`` and ``dec.proto``
for the contrastive loss, ``enc.map`` for mse), plus the teacher's seg ``logits`` where PMD reads them or where its
mask stands in for a label the student may not see. The values are rounded to the storage dtype (fp16) and the
teacher runs in batches of exactly :data:`~medkd.distill.cache.TEACHER_BATCH` slices with autocast off
(:func:`in_teacher_batches`), so a slice's targets are the same bits whatever batch it came in.

During training the Distiller reads them through one interface, :class:`TeacherTargets` (``get(x, y, index)``),
served from one of three places (``--teacher-outputs``; :mod:`medkd.distill.teacher_outputs` picks one and sets
it up):

* :class:`LiveTargets`: the teacher runs on every training batch; nothing is stored.
* :class:`MemoryTargets`: every training slice's targets, computed once before the first epoch
  (:func:`fill_memory`) and held in tensors, row = dataset index.
* :class:`DiskTargets`: rows of the on-disk :class:`~medkd.distill.cache.TeacherCache`, kept for later runs on
  the same teacher and data.

All three serve the same numbers for the same slice, so the mode never changes the training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from medkd.data.prepared import labelled_rows
from medkd.distill.cache import TEACHER_BATCH, TORCH_STORE_DTYPE, ItemSpec, Key, TeacherCache
from medkd.distill.hooks import FeatureExtractor
from medkd.distill.losses import FeatureLoss
from medkd.infer import match_channels, seg_logits

Targets = Dict[str, torch.Tensor]  # item name -> (B, ...)


def kd_targets(y: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
    """Masks for label-aware losses ``(B, 1, H, W)``: the label of a labelled slice, the teacher's mask
    (``logits > 0``) on a slice whose label the student may not see (``UNLABELLED``)."""
    labelled = labelled_rows(y)  # (B,)
    if bool(labelled.all()) or logits is None:
        return y
    return torch.where(labelled[:, None, None, None], y, (logits[:, :1] > 0).to(y.dtype))


def in_teacher_batches(fn: Callable[[torch.Tensor, torch.Tensor], List[Targets]],
                       x: torch.Tensor, y: torch.Tensor, size: int = TEACHER_BATCH) -> List[Targets]:
    """Apply ``fn`` to ``x``/``y`` in batches of exactly ``size`` slices (:data:`~medkd.distill.cache.TEACHER_BATCH`:
    a slice's teacher outputs then do not depend on the batch it came in) and join the results.

    The last batch is padded by repeating its last slice (dropped from the result). Runs with CUDA autocast off:
    the targets are the fp32 teacher's, the same inside the training step (live) as in a fill outside it.

    Args:
        fn: ``(x (size, C, H, W), y (size, 1, H, W)) -> [{name: (size, ...)}, ...]``.
        x: ``(B, C, H, W)`` images; y: ``(B, 1, H, W)`` masks.

    Returns:
        ``[{name: (B, ...)}, ...]``, one dict per dict ``fn`` returns.
    """
    n = x.shape[0]
    parts: List[List[Targets]] = []
    with torch.autocast(x.device.type, enabled=False):
        for i in range(0, n, size):
            xc, yc = x[i : i + size], y[i : i + size]
            pad = size - xc.shape[0]
            if pad:
                xc = torch.cat([xc, xc[-1:].expand(pad, *xc.shape[1:])])
                yc = torch.cat([yc, yc[-1:].expand(pad, *yc.shape[1:])])
            parts.append(fn(xc, yc))
    return [{k: torch.cat([p[j][k] for p in parts])[:n] for k in parts[0][j]} for j in range(len(parts[0]))]


class TeacherView:
    """The frozen teacher as the distillation terms see it: its features at the taps (caught by forward hooks, no
    model edits), each scale's loss view of them, and its seg logits.

    Args:
        teacher: The trained teacher, frozen (eval mode, no gradients).
        paths: Scale -> module path of the teacher's tap, in the run's scale order.
        losses: Scale -> the feature loss at that scale (its ``teacher_view``, ``view_id`` and ``label_aware``).
        logits: Keep the teacher's seg logits among the targets (PMD reads them; with ``--kd-images all`` they
            give the mask of the slices without a label).
        size: Slice size (to find the targets' shapes).
    """

    def __init__(self, teacher: nn.Module, paths: Mapping[str, str], losses: Mapping[str, FeatureLoss],
                 logits: bool, size: int):
        self.teacher = teacher
        self.paths = dict(paths)
        self.losses = losses
        self.logits = logits
        self.size = size
        self.hooks = FeatureExtractor(teacher, self.paths).register() if self.paths else None
        self.forwards = 0  # teacher batches run (tests count those of a run's training)

    @property
    def label_aware(self) -> bool:
        """Whether a loss's view reads the masks (e.g. the contrastive region prototypes)."""
        return any(self.losses[s].label_aware for s in self.paths)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> Targets:
        """Teacher outputs at the taps + its seg logits: ``{scale: (B, C, h, w), "logits": (B, K, H, W)}``."""
        self.forwards += 1
        logits = seg_logits(self.teacher(x))
        feats = self.hooks.pop() if self.hooks else {}
        return {**feats, "logits": logits}

    @torch.no_grad()
    def targets(self, x: torch.Tensor, y: torch.Tensor) -> Targets:
        """The targets of the slices ``x (B, C, H, W)`` (channels already matched), ``y (B, 1, H, W)``:
        ``{"<scale>.<part>": (B, ...)}`` and ``logits`` ``(B, K, H, W)``, fp16 (see the module docstring)."""
        return in_teacher_batches(lambda xc, yc: [self.targets_from(xc, yc, self.run(xc))], x, y)[0]

    @torch.no_grad()
    def targets_from(self, x: torch.Tensor, y: torch.Tensor, raw: Targets) -> Targets:
        """:meth:`targets` from the teacher's outputs ``raw`` on ``x`` (:meth:`run`'s form), e.g. of one forward
        shared by several views (:func:`joint_targets`); the caller runs the teacher in :func:`in_teacher_batches`."""
        logits = raw["logits"].to(TORCH_STORE_DTYPE)
        masks = kd_targets(y, logits)
        t: Targets = {}
        for s in self.paths:
            t.update({f"{s}.{k}": v for k, v in self.losses[s].teacher_view(raw[s].float(), masks).items()})
        if self.logits:
            t["logits"] = logits
        return {k: v.to(TORCH_STORE_DTYPE) for k, v in t.items()}

    def specs(self) -> Dict[str, ItemSpec]:
        """Item name -> (what it stores, per-slice shape): the cache items these targets fill."""
        p = next(self.teacher.parameters())
        size = self.size
        x = torch.zeros(2, self.teacher.in_channels, size, size, device=p.device)
        y = torch.zeros(2, 1, size, size, device=p.device)
        y[0, :, : size // 2] = 1  # a mask with both classes, so label-dependent views are built
        was = self.forwards
        shapes = {k: tuple(v.shape[1:]) for k, v in self.targets(x, y).items()}
        self.forwards = was
        specs = {}
        for name, shape in shapes.items():
            if name == "logits":
                specs[name] = ("seg-logits", shape)
            else:
                s, part = name.split(".", 1)
                specs[name] = (f"tap={self.paths[s]} view={self.losses[s].view_id} part={part}", shape)
        return specs

    def close(self) -> None:
        """Remove the hooks from the teacher."""
        if self.hooks:
            self.hooks.remove()


def joint_targets(views: Sequence[TeacherView], x: torch.Tensor, y: torch.Tensor) -> List[Targets]:
    """The targets of several views of one teacher (e.g. an ablation's cells) from one teacher forward: every
    view's hooks catch their taps during the first view's :meth:`~TeacherView.run`."""
    first = views[0]
    raw = first.run(x)
    feats = {first.paths[s]: raw[s] for s in first.paths}  # module path -> feature
    for v in views[1:]:
        if v.hooks:
            feats.update({v.paths[s]: f for s, f in v.hooks.pop().items()})
    return [v.targets_from(x, y, {**{s: feats[v.paths[s]] for s in v.paths}, "logits": raw["logits"]})
            for v in views]


# ---------------------------------------------------------------------------------------------------- serving
class TeacherTargets(ABC):
    """Where the Distiller's teacher targets come from during training."""

    mode: str  # the ``--teacher-outputs`` mode served: live, memory or disk

    @abstractmethod
    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Targets:
        """The targets of a training batch: ``x (B, C, H, W)`` images, ``y (B, 1, H, W)`` masks, ``index (B,)``
        their dataset indices. Returns ``{item: (B, ...)}`` fp16 on ``x``'s device."""


class LiveTargets(TeacherTargets):
    """The ``live`` mode: the teacher runs on every training batch."""

    mode = "live"

    def __init__(self, view: TeacherView):
        self.view = view

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Targets:
        return self.view.targets(x, y)


class MemoryTargets(TeacherTargets):
    """The ``memory`` mode: targets of every training slice in tensors, row = dataset index (:func:`fill_memory`)."""

    mode = "memory"

    def __init__(self, tensors: Targets):
        self.tensors = tensors

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Targets:
        return {k: v[index.to(v.device)].to(x.device, non_blocking=True) for k, v in self.tensors.items()}  # (B, ...)


class DiskTargets(TeacherTargets):
    """The ``disk`` mode: rows of a filled :class:`~medkd.distill.cache.TeacherCache`, keyed by ``(case id, slice)``.

    Args:
        cache: The cache, filled for the training slices.
        index_keys: Dataset index -> ``(case id, slice)``.
        live: Serves a batch whose rows are not filled (not expected after the fill; the same numbers).
    """

    mode = "disk"

    def __init__(self, cache: TeacherCache, index_keys: Sequence[Key], live: LiveTargets):
        self.cache, self.index_keys, self.live = cache, index_keys, live

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Targets:
        keys = [self.index_keys[int(i)] for i in index]
        if self.cache.missing(keys):
            return self.live.get(x, y, index)
        return self.cache.get(keys, x.device)


#: probabilities are clamped to [PROB_EPS, 1 - PROB_EPS] before their logit (a 0/1 map gives finite logits)
PROB_EPS = 1e-4


def prob_logits(p: torch.Tensor) -> torch.Tensor:
    """Foreground logits of probabilities: ``log p - log(1 - p)`` of ``p`` clamped to
    ``[PROB_EPS, 1 - PROB_EPS]`` (|logit| <= 9.21), in the storage dtype (fp16) like every target."""
    p = p.float().clamp(PROB_EPS, 1.0 - PROB_EPS)
    return (torch.log(p) - torch.log1p(-p)).to(TORCH_STORE_DTYPE)


class ProbTargets(TeacherTargets):
    """A per-case teacher's targets (``--teacher-probs``): its foreground probabilities on the prepared grid, read
    once per training case before the first epoch and held as fp16 ``logits`` ``(N, 1, H, W)``, row = dataset
    index. Only prediction-map terms read them (PMD, CWD on logits, the pseudo-labels ``logits > 0``).

    Args:
        logits: ``(N, 1, H, W)`` fp16, row ``i`` = slice ``i`` of the training set (:meth:`from_cases`).
    """

    mode = "memory"

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    @classmethod
    def from_cases(cls, case_probs: Callable[[str], np.ndarray], train_set) -> "ProbTargets":
        """Read every case of ``train_set`` (a :class:`~medkd.data.prepared.SliceDataset`) through
        ``case_probs(case id) -> (n_slices, H, W)`` float32 in [0, 1] and keep its logits by dataset index.

        Raises:
            DataError: a case's probabilities have another number of slices or size than the prepared case.
        """
        size = train_set.data.size
        logits = torch.empty((len(train_set), 1, size, size), dtype=TORCH_STORE_DTYPE)
        rows: Dict[str, List[int]] = {}
        for i, (cid, _) in enumerate(train_set.index):
            rows.setdefault(cid, []).append(i)
        for cid, idx in rows.items():
            p = torch.from_numpy(case_probs(cid))
            train_set.data.check_case_probs(cid, p)
            logits[idx, 0] = prob_logits(p[[train_set.index[i][1] for i in idx]])
        return cls(logits)

    @property
    def nbytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Targets:
        return {"logits": self.logits[index.to(self.logits.device)].to(x.device, non_blocking=True)}  # (B, 1, H, W)


# ---------------------------------------------------------------------------------------------------- filling
def batch_slices(batch_size: int, n_slices: int) -> int:
    """Slices in a training batch: the batch size, or all ``n_slices`` when the batch size is larger (the loader
    then gives one batch of the whole set). What measuring and filling allocate per batch, so that a huge
    ``--batch-size`` never builds a batch larger than the data."""
    return max(1, min(int(batch_size), int(n_slices)))


def slice_batch(dataset, ids: Sequence[int], in_channels: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slices ``ids`` of ``dataset`` as one batch ``(x (B, in_channels, H, W), y (B, 1, H, W))`` on ``device``."""
    items = [dataset[i] for i in ids]
    x = match_channels(torch.stack([a for a, _, _ in items]).to(device), in_channels)
    return x, torch.stack([m for _, m, _ in items]).to(device)


def targets_of(view: TeacherView, dataset, in_channels: int, device: torch.device) -> Callable[[List[int]], Targets]:
    """``compute(dataset indices) -> {item: (n, ...)}``: the view's targets for those slices of ``dataset``."""

    def compute(ids: List[int]) -> Targets:
        return view.targets(*slice_batch(dataset, ids, in_channels, device))

    return compute


def fill_memory(view: TeacherView, train_set, cfg, device: torch.device, specs: Dict[str, ItemSpec],
                storage: torch.device, pinned: bool) -> Targets:
    """Run the teacher once over the training slices and keep the targets on ``storage`` (pinned host memory when
    ``pinned``), row = dataset index."""
    n = len(train_set)
    held = {k: torch.empty((n, *shape), dtype=TORCH_STORE_DTYPE, device=storage) for k, (_, shape) in specs.items()}
    if pinned:
        held = {k: v.pin_memory() for k, v in held.items()}
    compute = targets_of(view, train_set, cfg.in_channels, device)
    step = max(2, 2 * batch_slices(cfg.batch_size, n))
    for i in range(0, n, step):
        ids = list(range(i, min(n, i + step)))
        for k, v in compute(ids).items():
            held[k][i : i + len(ids)] = v.to(storage)
    return held
