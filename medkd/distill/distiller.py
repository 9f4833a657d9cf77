"""The Distiller: student + frozen teacher + adapters + losses -> a dict of named, weighted loss terms.

    total = w_seg * (Dice + BCE) + sum_scales w_scale * L_loss(adapter(student_feat), teacher_feat) + w_pmd * PMD
            + w_pl * (Dice + BCE)(student, teacher's mask)

The supervised term uses the labelled slices of a batch only; slices without a label (``kd_images="all"``: train
cases outside the student's labelled fraction, mask filled with ``UNLABELLED``) get the distillation terms only,
and label-aware feature losses see the teacher's predicted mask there instead of a label. With ``pseudo_label``
the term ``pl`` is the supervised loss on those slices with the teacher's mask (``p > 0.5``, i.e. logit > 0) as
the target: the images whose labels the student does not see (on a labelled slice the label is the target of
``seg`` already).

With ``kd_warmup_epochs = N`` every term but ``seg`` is weighted ``min(k / N, 1)`` times its weight in epoch
``k`` (counted from 1, as mdistiller's DKD warm-up): one factor per epoch, set in :meth:`Distiller.on_epoch_start`,
so a resumed run continues the ramp exactly (``kd_ramp`` in ``history.jsonl``).

Every ``cfg.grad_share_every``-th step of an epoch (``--grad-share-every N``; default 0 = never) the gradient norm of each term on the
student's parameters is measured (one extra backward per term); :meth:`Distiller.epoch_stats` reports each term's
mean share of the summed norms (``gshare_<term>``).

The teacher is frozen by construction (mdistiller ``_base.py``): ``requires_grad=False`` on every parameter,
``train()`` keeps it in eval mode, and its forward runs under ``torch.no_grad()``.
Features are caught by forward hooks on the tap module paths (no model edits). What the losses read of the teacher
(the *targets*) comes from a :class:`~medkd.distill.targets.TeacherTargets` given to the constructor: live, memory
or disk, the same numbers in every mode.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from medkd.config import DistillConfig
from medkd.data.prepared import labelled_rows
from medkd.distill.adapters import AdapterSet
from medkd.distill.hooks import FeatureExtractor
from medkd.distill.losses import PMDLoss, build_loss
from medkd.distill.targets import LiveTargets, TeacherTargets, TeacherView, kd_targets
from medkd.errors import MedkdError
from medkd.train.losses import SegLoss
from medkd.train.task import Task


def tap_paths(model: nn.Module, scales: Sequence[str], overrides: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The module paths for ``scales``: the model's named taps (``model.taps``; an external teacher has none),
    overridable by path.

    Raises:
        MedkdError: a scale with neither.
    """
    own = getattr(model, "taps", None) or {}
    paths = {s: (overrides or {}).get(s, own.get(s)) for s in scales}
    missing = [s for s, p in paths.items() if p is None]
    if missing:
        raise MedkdError(f"{type(model).__name__} has no known tap for {', '.join(missing)}: give --teacher-taps "
                         f"{','.join(f'{s}=module.path' for s in missing)}")
    return paths


def teacher_tap_overrides(teacher: nn.Module, cfg: DistillConfig) -> Dict[str, str]:
    """The teacher's tap paths the config sets: ``teacher_taps`` (paths in the teacher's own network, behind the
    module's ``tap_prefix`` when it wraps one, :class:`~medkd.teachers.bridge.BridgedTeacher`), then
    ``taps.teacher`` (paths on the module as loaded)."""
    prefix = getattr(teacher, "tap_prefix", "")
    return {**{s: prefix + p for s, p in (getattr(cfg, "teacher_taps", None) or {}).items()},
            **((cfg.taps or {}).get("teacher") or {})}


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


def kd_ramp(epoch: int, warmup_epochs: int) -> float:
    """The factor of the KD terms' weights in epoch ``epoch`` (0-based): ``min((epoch + 1) / N, 1)``, ``1`` when
    ``N = warmup_epochs`` is 0. Never 0, so the first step's check still sees every term (``check_first_step``)."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


class DistillTerms:
    """Which terms a distillation trains and what its feature terms are built from: per distilled scale the tap
    paths on both models, the teacher's feature shape there, an adapter (student feature -> teacher shape) and the
    loss.

    Built once, before the teacher targets are set up (they read the losses' views, :meth:`teacher_view`) and
    before the :class:`Distiller` that trains the adapters and losses: adapters first, then losses, which fixes the
    random draws of a seeded run. A zero weight switches a term off (no hooks, adapter or loss are built for it).
    The teacher is frozen here (``requires_grad=False``, eval mode).

    Args:
        student: The student model.
        teacher: The trained teacher, or ``None`` for plain supervised training (no scale, no PMD, no pseudo-labels)
            or for a per-case teacher (``per_case``).
        cfg: The distill config (scales, loss, weights, taps).
        size: Slice size (to probe the taps' shapes).
        per_case: The teacher gives per-case probabilities only (``--teacher-probs``): its ``logits`` come from a
            :class:`~medkd.distill.targets.ProbTargets`; prediction-map terms only (no scale).
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], cfg: DistillConfig, size: int,
                 per_case: bool = False):
        self.weights = cfg.effective_weights()
        self.scales = [s for s in cfg.effective()["scales"] if self.weights[s] > 0]
        self.pmd = cfg.pmd and self.weights["pmd"] > 0
        self.pl = cfg.uses_pseudo_labels and self.weights["pl"] > 0
        if cfg.uses_teacher and teacher is None and not (per_case and not self.scales):
            raise ValueError("scales need a teacher module; pmd or pseudo-labels need a teacher or its probabilities")
        if not (self.weights["seg"] > 0 or self.scales or self.pmd or self.pl):
            raise MedkdError("every loss term has weight 0: nothing to train (check --weights)")
        self.teacher, self.size = teacher, size
        self.s_paths = tap_paths(student, self.scales, cfg.taps.get("student"))
        self.t_paths: Dict[str, str] = {}
        self.t_shapes: Dict[str, Tuple[int, ...]] = {}
        # the teacher's mask stands in for the labels the student may not see (label-aware losses, pseudo-labels)
        self.logits = self.pmd or cfg.kd_on_unlabelled
        if teacher is None:
            self.adapters, self.losses = AdapterSet({}, {}, []), nn.ModuleDict()
            return
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.t_paths = tap_paths(teacher, self.scales, teacher_tap_overrides(teacher, cfg))
        s_ch = probe_channels(student, self.s_paths, student.in_channels, size)
        self.t_shapes = probe_shapes(teacher, self.t_paths, teacher.in_channels, size)
        t_ch = {k: v[0] for k, v in self.t_shapes.items()}
        self.adapters = AdapterSet(s_ch, t_ch, self.scales)
        self.losses = nn.ModuleDict({
            s: build_loss(cfg.scale_losses.get(s, cfg.loss), t_ch[s], **cfg.loss_options) for s in self.scales
        })

    def teacher_view(self) -> TeacherView:
        """What these terms read of the teacher (hooks on its taps; see :class:`~medkd.distill.targets.TeacherView`)."""
        return TeacherView(self.teacher, self.t_paths, self.losses, self.logits, self.size)


class Distiller(Task):
    """Distillation task for :func:`medkd.train.loop.fit`.

    Args:
        student: The student model (saved alone in ``best.pt``).
        cfg: The distill config (weights, PMD temperature, grad-share interval).
        terms: The run's terms, adapters and losses (:class:`DistillTerms`), trained here.
        targets: Where the teacher targets come from (:mod:`medkd.distill.targets`; :func:`medkd.distill.run.distill`
            sets up the mode the config asks for). Default: the live teacher of ``terms``.
    """

    def __init__(self, student: nn.Module, cfg: DistillConfig, terms: DistillTerms,
                 targets: Optional[TeacherTargets] = None):
        super().__init__()
        self.model = student
        self.cfg = cfg
        self.weights = terms.weights
        self.scales = terms.scales
        self.use_seg = self.weights["seg"] > 0
        if targets is None and terms.teacher is not None:
            targets = LiveTargets(terms.teacher_view())
        self.targets = targets
        self.seg_loss = SegLoss(student.num_classes)
        self._step = 0  # steps in the current epoch (reset by on_epoch_start)
        self._gnorm: Dict[str, float] = {}
        self._gnorm_n = 0
        self.teacher = terms.teacher
        self.s_hooks = FeatureExtractor(student, terms.s_paths).register() if self.scales else None
        self.t_shapes = terms.t_shapes
        self.adapters, self.losses = terms.adapters, terms.losses
        self.pmd = PMDLoss(cfg.temperature, cfg.pmd_loss) if terms.pmd else None
        self.pl = terms.pl
        self.kd_factor = kd_ramp(0, cfg.kd_warmup_epochs)  # this epoch's factor of the KD weights (on_epoch_start)

    def frozen_child(self) -> Optional[str]:
        return "teacher" if self.teacher is not None else None

    def term_names(self) -> List[str]:
        return [*(["seg"] if self.use_seg else []), *self.scales, *(["pmd"] if self.pmd is not None else []),
                *(["pl"] if self.pl else [])]

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen forever
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Args: x ``(B,C,H,W)`` images, y ``(B,1,H,W)`` masks (``UNLABELLED`` on unlabelled slices), index ``(B,)``
        dataset indices.

        Returns:
            Weighted terms: ``seg``, one per scale (``enc``/``bottleneck``/``dec``), ``pmd``, ``pl``; terms whose
            weight is 0 are left out, and so is ``seg`` for a batch without a labelled slice and ``pl`` for a batch
            without an unlabelled one.
        """
        w = {k: v if k == "seg" else v * self.kd_factor for k, v in self.weights.items()}  # the KD warm-up
        s_logits = self.model(x)
        s_feats = self.s_hooks.pop() if self.s_hooks else {}
        labelled = labelled_rows(y)  # (B,)
        all_labelled = bool(labelled.all())
        terms = {}
        if self.use_seg and bool(labelled.any()):
            z = s_logits.float()  # fp32 under CUDA autocast
            dice, bce = self.seg_loss(z, y) if all_labelled else self.seg_loss(z[labelled], y[labelled])
            terms["seg"] = w["seg"] * (dice + bce) if self.cfg.uses_teacher else dice + bce
        if self.scales or self.pmd is not None or self.pl:
            t = self.targets.get(x, y, index)
            targets = kd_targets(y, t.get("logits"))  # the label where there is one, the teacher's mask elsewhere
            for s in self.scales:
                view = {k[len(s) + 1:]: v.float() for k, v in t.items() if k.startswith(s + ".")}
                terms[s] = w[s] * self._feature_term(s, s_feats[s], view, targets)
            if self.pmd is not None:
                terms["pmd"] = w["pmd"] * self.pmd(s_logits.float(), t["logits"].float())
            if self.pl and not all_labelled:
                dice, bce = self.seg_loss(s_logits.float()[~labelled], targets[~labelled])
                terms["pl"] = w["pl"] * (dice + bce)
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
        pooling = loss.pooling_weights(targets, size, feat.shape[0], torch.float32, feat.device)
        if pooling is not None:
            pooled = adapter.pooled(feat, size, pooling[0])
            if pooled is not None:
                return loss.forward_pooled(pooled, pooling[1], view, targets)
        return loss.forward_view(adapter(feat, size), view, targets)

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
        """Set this epoch's term weights (:func:`kd_ramp`); restart the step count (every ``grad_share_every``-th
        step of an epoch measures) and the shares."""
        self.kd_factor = kd_ramp(epoch, self.cfg.kd_warmup_epochs)
        self._step, self._gnorm, self._gnorm_n = 0, {}, 0

    def epoch_stats(self) -> Dict[str, float]:
        """``{"gshare_<term>": mean share of the summed gradient norms}`` since :meth:`on_epoch_start`, and with a
        KD warm-up the epoch's factor of the KD weights (``kd_ramp``)."""
        stats = {f"gshare_{k}": round(v / self._gnorm_n, 4) for k, v in self._gnorm.items()} if self._gnorm_n else {}
        if self.cfg.kd_warmup_epochs and self.cfg.uses_teacher:
            stats["kd_ramp"] = round(self.kd_factor, 4)
        return stats

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
