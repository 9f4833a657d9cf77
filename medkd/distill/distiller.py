"""The Distiller: student + frozen teacher + adapters + losses -> a dict of named, weighted loss terms.

    total = w_seg * (Dice + BCE) + sum_scales w_scale * L_loss(adapter(student_feat), teacher_feat) + w_pmd * PMD

The supervised term uses the labelled slices of a batch only; slices without a label (``kd_images="all"``: train
cases outside the student's labelled fraction, mask filled with ``UNLABELLED``) get the distillation terms only,
and label-aware feature losses see the teacher's predicted mask there instead of a label.
Every ``cfg.grad_share_every``-th step of an epoch (``--grad-share-every N``; default 0 = never) the gradient norm of each term on the
student's parameters is measured (one extra backward per term); :meth:`Distiller.epoch_stats` reports each term's
mean share of the summed norms (``gshare_<term>``).

The teacher is frozen by construction (mdistiller ``_base.py``): ``requires_grad=False`` on every parameter,
``train()`` keeps it in eval mode, and its forward runs under ``torch.no_grad()``.
Features are caught by forward hooks on the tap module paths (no model edits).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from medkd.config import DistillConfig
from medkd.data.prepared import UNLABELLED
from medkd.distill.adapters import AdapterSet
from medkd.distill.cache import TEACHER_BATCH, TORCH_STORE_DTYPE, ItemSpec
from medkd.distill.hooks import FeatureExtractor
from medkd.distill.losses import PMDLoss, build_loss
from medkd.errors import MedkdError
from medkd.infer import seg_logits
from medkd.train.losses import SegLoss
from medkd.train.task import Task


def in_teacher_batches(fn: Callable[[torch.Tensor, torch.Tensor], List[Dict[str, torch.Tensor]]],
                       x: torch.Tensor, y: torch.Tensor, size: int = TEACHER_BATCH) -> List[Dict[str, torch.Tensor]]:
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
    parts: List[List[Dict[str, torch.Tensor]]] = []
    with torch.autocast(x.device.type, enabled=False):
        for i in range(0, n, size):
            xc, yc = x[i : i + size], y[i : i + size]
            pad = size - xc.shape[0]
            if pad:
                xc = torch.cat([xc, xc[-1:].expand(pad, *xc.shape[1:])])
                yc = torch.cat([yc, yc[-1:].expand(pad, *yc.shape[1:])])
            parts.append(fn(xc, yc))
    return [{k: torch.cat([p[j][k] for p in parts])[:n] for k in parts[0][j]} for j in range(len(parts[0]))]


def tap_paths(model: nn.Module, scales: Sequence[str], overrides: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The module paths for ``scales``: the model's named taps, overridable by path."""
    paths = {s: model.taps[s] for s in scales}
    paths.update({s: p for s, p in (overrides or {}).items() if s in scales})
    return paths


@torch.no_grad()
def probe_shapes(model: nn.Module, paths: Dict[str, str], in_channels: int, size: int) -> Dict[str, Tuple[int, ...]]:
    """``(C, h, w)`` at each tap, found by one forward pass (works for overridden paths too)."""
    was = model.training
    model.eval()
    with FeatureExtractor(model, paths) as fx:
        model(torch.zeros(1, in_channels, size, size, device=next(model.parameters()).device))
        feats = fx.pop()
    model.train(was)
    return {k: tuple(int(d) for d in v.shape[1:]) for k, v in feats.items()}


def probe_channels(model: nn.Module, paths: Dict[str, str], in_channels: int, size: int) -> Dict[str, int]:
    """Channels at each tap (see :func:`probe_shapes`)."""
    return {k: v[0] for k, v in probe_shapes(model, paths, in_channels, size).items()}


def kd_targets(y: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
    """Masks for label-aware losses ``(B, 1, H, W)``: the label of a labelled slice, the teacher's mask
    (``logits > 0``) on a slice whose label the student may not see (``UNLABELLED``)."""
    labelled = y.flatten(1).amin(dim=1) != UNLABELLED  # (B,)
    if bool(labelled.all()) or logits is None:
        return y
    return torch.where(labelled[:, None, None, None], y, (logits[:, :1] > 0).to(y.dtype))


class LiveTeacher:
    """The ``live`` teacher-output mode: the teacher runs on every training batch."""

    mode = "live"

    def __init__(self, task: "Distiller"):
        self.task = task

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.task.teacher_targets(x, y)


class Distiller(Task):
    """Distillation task for :func:`medkd.train.loop.fit`.

    Args:
        student: the student model (saved alone in ``best.pt``).
        teacher: the trained teacher, or ``None`` for plain supervised training (``scales=[]``, ``pmd=False``).
        cfg: the distill config (scales, loss, weights, temperature, taps).
        size: slice size (to probe tap channels).

    Teacher targets (what the losses read of the teacher, see :meth:`teacher_targets`) come from ``self.outputs``:
    the live teacher by default; :mod:`medkd.distill.teacher_outputs` swaps in a disk or memory cache.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], cfg: DistillConfig, size: int):
        super().__init__()
        self.model = student
        self.cfg = cfg
        self.size = size
        # a zero weight switches a term off (no hooks, adapter or loss are built for it)
        self.weights = cfg.effective_weights()
        self.scales = [s for s in cfg.effective()["scales"] if self.weights[s] > 0]
        self.use_seg = self.weights["seg"] > 0
        self.outputs = LiveTeacher(self)
        self.seg_loss = SegLoss(student.num_classes)
        self.teacher_forwards = 0  # teacher batches run live (tests and benchmarks count them)
        self._step = 0  # steps in the current epoch (reset by on_epoch_start)
        self._gnorm: Dict[str, float] = {}
        self._gnorm_n = 0
        if cfg.uses_teacher and teacher is None:
            raise ValueError("scales or pmd need a teacher")
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.teacher = teacher
        s_paths = tap_paths(student, self.scales, cfg.taps.get("student"))
        self.s_hooks = FeatureExtractor(student, s_paths).register() if self.scales else None
        self.t_hooks = None
        if teacher is not None:
            self.t_paths = tap_paths(teacher, self.scales, cfg.taps.get("teacher"))
            self.t_hooks = FeatureExtractor(teacher, self.t_paths).register() if self.scales else None
            s_ch = probe_channels(student, s_paths, student.in_channels, size)
            self.t_shapes = probe_shapes(teacher, self.t_paths, teacher.in_channels, size)
            t_ch = {k: v[0] for k, v in self.t_shapes.items()}
            self.adapters = AdapterSet(s_ch, t_ch, self.scales)
            self.losses = nn.ModuleDict({
                s: build_loss(cfg.scale_losses.get(s, cfg.loss), t_ch[s], **cfg.loss_options) for s in self.scales
            })
        else:
            self.adapters, self.losses = AdapterSet({}, {}, []), nn.ModuleDict()
        self.pmd = PMDLoss(cfg.temperature) if cfg.pmd and self.weights["pmd"] > 0 else None
        if not (self.use_seg or self.scales or self.pmd is not None):
            raise MedkdError("every loss term has weight 0: nothing to train (check --weights)")

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen forever
        return self

    @torch.no_grad()
    def run_teacher(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Teacher outputs at the taps + its seg logits: ``{scale: (B,C,h,w), "logits": (B,K,H,W)}``."""
        self.teacher_forwards += 1
        logits = seg_logits(self.teacher(x))
        feats = self.t_hooks.pop() if self.t_hooks else {}
        return {**feats, "logits": logits}

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What the active losses read of the teacher, per slice, rounded to the storage dtype (fp16).

        ``{"<scale>.<part>": (B, ...)}`` from each scale's loss view (e.g. ``dec.gap``, ``dec.proto`` for the
        contrastive loss, ``enc.map`` for mse) and ``logits`` ``(B, K, H, W)`` when PMD is on. Every mode (live,
        disk, memory) serves exactly these numbers, so the mode never changes the training: the teacher runs in
        batches of :data:`TEACHER_BATCH` slices (:func:`in_teacher_batches`), so a slice's targets do not depend on
        the batch it came in.

        Args:
            x: ``(B, C, H, W)`` images (channels already matched), y: ``(B, 1, H, W)`` masks.
        """
        return in_teacher_batches(lambda xc, yc: [self.targets_from(xc, yc, self.run_teacher(xc))], x, y)[0]

    @torch.no_grad()
    def targets_from(self, x: torch.Tensor, y: torch.Tensor, raw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """:meth:`teacher_targets` from the teacher's outputs ``raw`` on ``x`` (:meth:`run_teacher`'s form), e.g. of
        one forward shared by several distillers; the caller runs the teacher in :func:`in_teacher_batches`."""
        logits = raw["logits"].to(TORCH_STORE_DTYPE)
        targets = kd_targets(y, logits)
        t: Dict[str, torch.Tensor] = {}
        for s in self.scales:
            view = (self.losses[s].teacher_view(raw[s].float(), targets) if hasattr(self.losses[s], "teacher_view")
                    else {"map": raw[s]})
            t.update({f"{s}.{k}": v for k, v in view.items()})
        if self.pmd is not None or self.cfg.kd_on_unlabelled:  # the teacher's mask stands in for missing labels
            t["logits"] = logits
        return {k: v.to(TORCH_STORE_DTYPE) for k, v in t.items()}

    @property
    def label_aware(self) -> bool:
        """Whether a loss's teacher view depends on the masks (e.g. the contrastive region prototypes)."""
        for s in self.scales:
            loss = self.losses[s]
            if hasattr(loss, "teacher_view"):
                c, h, w = self.t_shapes[s]
                f = torch.zeros(2, c, h, w)
                m = torch.zeros(2, 1, self.size, self.size)
                if set(loss.teacher_view(f, None)) != set(loss.teacher_view(f, m)):
                    return True
        return False

    def target_specs(self) -> Dict[str, ItemSpec]:
        """Item name -> (what it stores, per-slice shape): the cache items this distiller reads."""
        p = next(self.teacher.parameters())
        size = self.size
        x = torch.zeros(2, self.teacher.in_channels, size, size, device=p.device)
        y = torch.zeros(2, 1, size, size, device=p.device)
        y[0, :, : size // 2] = 1  # a mask with both classes, so label-dependent views are built
        was = self.teacher_forwards
        shapes = {k: tuple(v.shape[1:]) for k, v in self.teacher_targets(x, y).items()}
        self.teacher_forwards = was
        specs = {}
        for name, shape in shapes.items():
            if name == "logits":
                specs[name] = ("seg-logits", shape)
            else:
                s, part = name.split(".", 1)
                view_id = getattr(self.losses[s], "view_id", "map")
                specs[name] = (f"tap={self.t_paths[s]} view={view_id} part={part}", shape)
        return specs

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Args: x ``(B,C,H,W)`` images, y ``(B,1,H,W)`` masks (``UNLABELLED`` on unlabelled slices), index ``(B,)``
        dataset indices.

        Returns:
            Weighted terms: ``seg``, one per scale (``enc``/``bottleneck``/``dec``), ``pmd``; terms whose weight
            is 0 are left out, and so is ``seg`` for a batch without a labelled slice.
        """
        w = self.weights
        s_logits = self.model(x)
        s_feats = self.s_hooks.pop() if self.s_hooks else {}
        labelled = y.flatten(1).amin(dim=1) != UNLABELLED  # (B,)
        all_labelled = bool(labelled.all())
        terms = {}
        if self.use_seg and bool(labelled.any()):
            z = s_logits.float()  # fp32 under CUDA autocast
            dice, bce = self.seg_loss(z, y) if all_labelled else self.seg_loss(z[labelled], y[labelled])
            terms["seg"] = w["seg"] * (dice + bce) if self.cfg.uses_teacher else dice + bce
        if self.scales or self.pmd is not None:
            t = self.outputs.get(x, y, index)
            targets = kd_targets(y, t.get("logits"))  # the label where there is one, the teacher's mask elsewhere
            for s in self.scales:
                view = {k[len(s) + 1:]: v.float() for k, v in t.items() if k.startswith(s + ".")}
                terms[s] = w[s] * self._feature_term(s, s_feats[s], view, targets)
            if self.pmd is not None:
                terms["pmd"] = w["pmd"] * self.pmd(s_logits.float(), t["logits"].float())
        if self.training and torch.is_grad_enabled():
            every = self.cfg.grad_share_every
            if every and self._step % every == 0 and len(terms) > 1:
                self._measure_grad_share(terms)
            self._step += 1
        return terms

    def _feature_term(self, s: str, feat: torch.Tensor, view: Dict[str, torch.Tensor],
                      targets: torch.Tensor) -> torch.Tensor:
        """Scale ``s``'s loss on the student feature ``feat``. A loss that reads only pools of the adapted feature
        (:meth:`~medkd.distill.losses.FeatureLoss.pooling_weights`) gets them from the adapter without the adapted
        map being built; any other loss gets the adapted map."""
        loss, adapter, size = self.losses[s], self.adapters[s], self.t_shapes[s][1:]
        pooling = loss.pooling_weights(targets, size, feat.shape[0], torch.float32, feat.device) \
            if hasattr(loss, "pooling_weights") else None
        if pooling is not None:
            pooled = adapter.pooled(feat, size, pooling[0])
            if pooled is not None:
                return loss.forward_pooled(pooled, pooling[1], view, targets)
        sf = adapter(feat, size)
        return loss.forward_view(sf, view, targets) if hasattr(loss, "forward_view") else loss(sf, view["map"], targets)

    def _measure_grad_share(self, terms: Dict[str, torch.Tensor]) -> None:
        """Accumulate each term's gradient norm on the student's parameters (not the adapters/heads)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norms = {}
        for name, v in terms.items():
            grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) if v.requires_grad else []
            norms[name] = math.sqrt(sum(float((g.detach().float() ** 2).sum()) for g in grads if g is not None))
        total = sum(norms.values())
        if total > 0:
            for name, n in norms.items():
                self._gnorm[name] = self._gnorm.get(name, 0.0) + n / total
            self._gnorm_n += 1

    def on_epoch_start(self, epoch: int) -> None:
        """Restart the step count (every ``grad_share_every``-th step of an epoch measures) and the shares."""
        self._step, self._gnorm, self._gnorm_n = 0, {}, 0

    def epoch_stats(self) -> Dict[str, float]:
        """``{"gshare_<term>": mean share of the summed gradient norms}`` since :meth:`on_epoch_start`."""
        return {f"gshare_{k}": round(v / self._gnorm_n, 4) for k, v in self._gnorm.items()} if self._gnorm_n else {}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.s_hooks:
            self.s_hooks.pop()
        return out

    def trainable_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Adapters and loss heads: saved beside the student (``distill_heads.pt`` and inside ``last.pt``)."""
        return {"adapters": self.adapters.state_dict(), "losses": self.losses.state_dict()}

    def load_trainable_state(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        if state:
            self.adapters.load_state_dict(state["adapters"])
            self.losses.load_state_dict(state["losses"])
