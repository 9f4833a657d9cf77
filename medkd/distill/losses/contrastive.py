"""Contrastive feature distillation: slice-level InfoNCE plus a label-aware region term.

Two terms, both on by default (``loss = slice_weight * slice + region_weight * region``):

* **Slice-level InfoNCE** (van den Oord et al. 2018; as in CRD, Tian et al. 2020): each slice's
  global-average-pooled student feature is pulled towards the *same slice's* teacher embedding and pushed
  away from the other slices in the batch. This is the reference study's idea. It needs at least two
  slices in the batch (the others are the negatives); it is defined for any batch size ``>= 2``, so a last
  partial batch is fine (the study's code assumed a fixed batch size).
* **Region-level supervised contrast** (SupCon, Khosla et al. 2020), ``region=True``: for every slice the
  label mask (resized to the feature size by area averaging, so small structures that vanish under
  nearest-neighbour resizing still weigh in) gives a foreground and a background prototype
  (masked average pooling). Each student prototype is contrasted against all teacher prototypes of the
  batch; those of the same class (foreground/background) are the positives. A slice with an empty mask
  contributes only its background prototype. This term is what makes the loss *supervised*: it uses the
  label, and it is well defined on empty slices and on a batch of one slice (as long as the batch holds
  both classes). It is on by default because slice-level InfoNCE alone only asks the student to tell
  slices apart, which neighbouring slices of one volume barely are, while the region term asks it to
  separate organ from background as the teacher does.

Degenerate batches, by design rather than error:

* region term without negatives (``targets`` is ``None``, or every prototype in the batch is of one class,
  e.g. all masks empty): the region term is skipped;
* batch of one slice: the slice term has no negatives and is skipped; if the region term is also
  unavailable, the loss falls back to the cosine distance ``1 - cos(gap(s), gap(t))`` of the pooled
  features of the pair, so a last batch of one slice still gives a meaningful, finite value.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from medkd.distill.losses import LOSSES, FeatureLoss


def info_nce(z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: torch.Tensor | float,
             normalize: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE between paired embeddings.

    ``logits = z_s z_t^T / tau``; row ``i``'s positive is column ``i``. Loss
    ``= (CE(logits, arange) + CE(logits^T, arange)) / 2``. Its chance value is ``log N``, so its scale grows
    with the batch; ``normalize`` divides by ``log N`` (0 = every pair found, 1 = chance), whatever the batch.

    Args:
        z_student: ``(N, D)`` L2-normalised.
        z_teacher: ``(N, D)`` L2-normalised, row ``i`` paired with ``z_student[i]``.
        temperature: ``tau``.
        normalize: Divide by ``log N``.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: ``N < 2`` (no negatives).
    """
    n = z_student.shape[0]
    if n < 2:
        raise ValueError(f"InfoNCE needs at least 2 samples (the others are the negatives); got {n}")
    logits = z_student @ z_teacher.t() / temperature  # (N, N)
    labels = torch.arange(n, device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return loss / math.log(n) if normalize else loss


def supcon_cross(
    z_student: torch.Tensor, z_teacher: torch.Tensor, classes: torch.Tensor, temperature: torch.Tensor | float,
    normalize: bool = False,
) -> torch.Tensor:
    """Symmetric supervised contrast (Khosla et al. 2020, L_out) between student and teacher views.

    Anchors are student rows, the contrast set all teacher rows (and vice versa). For anchor ``i``:
    ``l_i = -1/|P(i)| sum_{p in P(i)} log softmax_j(z_s[i] . z_t[j] / tau)[p]`` with
    ``P(i) = {j : classes[j] == classes[i]}``. Result ``= (mean_i l_i^{s->t} + mean_i l_i^{t->s}) / 2``.

    ``l_i >= log |P(i)|`` (equality when the anchor spreads its mass evenly over its positives), and at chance
    ``l_i = log N``: the raw loss never goes below ``mean_i log |P(i)|`` (about 1.9 for 8 background and 4
    foreground prototypes), which is why it "barely moves". ``normalize`` reports
    ``(l_i - log |P(i)|) / (log N - log |P(i)|)`` per anchor instead: 0 at the optimum, 1 at chance, for any
    batch and class balance.

    Args:
        z_student: ``(N, D)`` L2-normalised.
        z_teacher: ``(N, D)`` L2-normalised.
        classes: ``(N,)`` integer class of each row (shared by both views).
        temperature: ``tau``.
        normalize: Remove the floor and divide by the chance value, per anchor.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: fewer than two distinct classes (no negatives).
    """
    if classes.numel() == 0 or bool(classes.amin() == classes.amax()):
        raise ValueError("supervised contrast needs at least two classes in the batch (no negatives otherwise)")
    logits = z_student @ z_teacher.t() / temperature  # (N, N)
    positive = (classes[:, None] == classes[None, :]).to(logits.dtype)  # (N, N), symmetric
    n_pos = positive.sum(dim=1)  # (N,)

    n = logits.shape[0]

    def one_way(lg: torch.Tensor) -> torch.Tensor:
        log_prob = F.log_softmax(lg, dim=1)  # (N, N)
        l_i = -(positive * log_prob).sum(dim=1) / n_pos  # (N,)
        if normalize:
            l_i = (l_i - n_pos.log()) / (math.log(n) - n_pos.log())
        return l_i.mean()

    return 0.5 * (one_way(logits) + one_way(logits.t()))


def select_prototypes(pooled: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2, C)`` pooled + ``(B, 2)`` valid -> ``(prototypes (N, C), classes (N,))``, background rows first."""
    protos = pooled.transpose(0, 1).reshape(-1, pooled.shape[-1])  # (2B, C): bg rows then fg rows
    classes = torch.arange(2, device=pooled.device).repeat_interleave(pooled.shape[0])  # (2B,)
    keep = valid.t().reshape(-1)  # (2B,)
    return protos[keep], classes[keep]


def feature_mask(targets: torch.Tensor, size, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, H0, W0)`` (or ``(B, H0, W0)``) mask -> ``(B, 1, h, w)`` foreground fraction (area resize)."""
    if targets.dim() == 3:
        targets = targets[:, None]
    mask = (targets > 0.5).to(dtype)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def _head(channels: int, hidden_dim: int, proj_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim))


#: What embeds the teacher side (the ``teacher_head`` option): a trained head, a random head fixed at its
#: initialisation, or none (the teacher's pooled feature itself).
TEACHER_HEADS = ("trainable", "frozen", "identity")


@LOSSES.register("contrastive")
class ContrastiveFeatureLoss(FeatureLoss):
    """Contrastive distillation: InfoNCE (van den Oord et al., "Representation Learning with Contrastive
    Predictive Coding", 2018) over slices, plus supervised region contrast (Khosla et al., "Supervised
    Contrastive Learning", NeurIPS 2020). See the module docstring for the variants and fallbacks.

    Student and teacher sides have separate projection heads (``Linear - ReLU - Linear`` to ``proj_dim``,
    then L2 normalisation); the teacher network itself is not trained. The same heads embed slice features and
    region prototypes. A trained teacher head can move the teacher's embedding towards the student's instead
    of the reverse; ``teacher_head`` fixes it: ``"frozen"`` keeps the randomly initialised head (drawn from the
    run's seeded generator like every other module, then ``requires_grad=False``: a fixed random projection of
    the teacher feature), ``"identity"`` has no teacher head (the student head maps to the teacher's ``C``
    channels and the teacher side is its L2-normalised pooled feature; ``proj_dim`` is unused). Either way the
    teacher side depends on nothing the run trains. The teacher view (what is cached) is the same pooled feature
    for every choice.

    Args:
        channels: Teacher channels ``C`` at the tap (the student feature is already adapted to ``C``).
        proj_dim: Embedding size (default 128).
        hidden_dim: Hidden width of the heads (default 256).
        temperature: ``tau`` of the logits (default 0.1).
        learn_temperature: Learn ``log tau`` (initialised at ``log(temperature)``, ``tau`` clamped to
            ``[0.01, 1]``).
        region: Add the label-aware region term (default ``True``).
        slice_weight: Weight of the slice-level InfoNCE term.
        region_weight: Weight of the region term.
        normalize: Report both terms on a batch-independent scale (0 = optimum, 1 = chance; see
            :func:`info_nce` and :func:`supcon_cross`).
        teacher_head: ``"trainable"`` (default), ``"frozen"`` or ``"identity"`` (:data:`TEACHER_HEADS`; see above).
    """

    name = "contrastive"
    label_aware = True  # the region prototypes pool the mask

    def __init__(
        self,
        channels: int,
        proj_dim: int = 128,
        hidden_dim: int = 256,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        region: bool = True,
        slice_weight: float = 1.0,
        region_weight: float = 1.0,
        normalize: bool = False,
        teacher_head: str = "trainable",
    ):
        super().__init__(channels)
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
        if teacher_head not in TEACHER_HEADS:
            raise ValueError(f"contrastive teacher_head must be one of {', '.join(TEACHER_HEADS)}, got {teacher_head!r}")
        self.region = bool(region)
        self.label_aware = self.region  # without the region term the view reads no mask
        self.slice_weight = float(slice_weight)
        self.region_weight = float(region_weight)
        self.normalize = bool(normalize)
        self.teacher_head_mode = teacher_head
        if teacher_head == "identity":
            self.student_head = _head(self.channels, hidden_dim, self.channels)
            self.teacher_head: nn.Module = nn.Identity()
        else:
            self.student_head = _head(self.channels, hidden_dim, proj_dim)
            self.teacher_head = _head(self.channels, hidden_dim, proj_dim)
            self.teacher_head.requires_grad_(teacher_head == "trainable")
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.register_buffer("log_temperature", torch.tensor(math.log(temperature)), persistent=False)
        self.learn_temperature = bool(learn_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        """Current ``tau`` (scalar tensor)."""
        tau = self.log_temperature.exp()
        return tau.clamp(0.01, 1.0) if self.learn_temperature else tau

    def embed(self, student_vec: torch.Tensor, teacher_vec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Project ``(N, C)`` student/teacher vectors to L2-normalised ``(N, proj_dim)`` embeddings."""
        return (
            F.normalize(self.student_head(student_vec), dim=1),
            F.normalize(self.teacher_head(teacher_vec), dim=1),
        )

    @property
    def view_id(self) -> str:
        return "contrastive-pooled(gap" + (",region" if self.region else "") + ")"

    def teacher_view(self, teacher_feat: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """All the loss reads of the teacher: the pooled feature ``gap (B, C)`` and, with the region term and
        a mask, the region prototypes ``proto (B, 2, C)`` (background, foreground; zero where absent).
        Both come before the trainable heads, so they can be cached: 2-3 C numbers per slice instead of C*h*w.
        """
        pooled, _ = self.pools(teacher_feat, targets)  # (B, K, C): the same pools as the student side's
        view = {"gap": pooled[:, 0]}  # (B, C)
        if pooled.shape[1] == 3:
            view["proto"] = pooled[:, 1:]  # (B, 2, C)
        return view

    @staticmethod
    def _region_rows(pooled: torch.Tensor, valid: torch.Tensor, teacher_pooled: torch.Tensor):
        """Student and teacher region prototypes ``(N, C)`` each and their classes ``(N,)`` from the pooled
        ``(B, 2, C)`` (background, foreground) and ``valid (B, 2)``, or ``None`` when the batch holds a single
        class (no negatives)."""
        if not (bool(valid[:, 0].any()) and bool(valid[:, 1].any())):
            return None
        # both sides selected at once: the same mask gives the same prototypes on the student and teacher side
        both, classes = select_prototypes(torch.cat([pooled, teacher_pooled.to(pooled.dtype)], dim=2), valid)
        c = pooled.shape[-1]
        return both[:, :c], both[:, c:], classes  # (N, C), (N, C), (N,)

    def pooling_weights(self, targets: Optional[torch.Tensor], size, batch: int, dtype: torch.dtype,
                        device: torch.device, eps: float = 1e-6):
        """The pools this loss reads of a feature (student and teacher alike): ``weights (B, K, h, w)`` and
        ``valid (B, K)``.

        ``k = 0`` is the global average; with the region term and a mask, ``k = 1, 2`` are the background and
        foreground masked averages (the mask resized to ``h, w`` by area; a prototype whose area is below ``eps``
        pixels is not valid, and its weights are 0).
        """
        h, w = int(size[0]), int(size[1])
        uniform = torch.full((batch, 1, h, w), 1.0 / (h * w), dtype=dtype, device=device)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
        if not (self.region and targets is not None):
            return uniform, ones
        mask = feature_mask(targets, (h, w), dtype)  # (B, 1, h, w) foreground fraction
        fg_area = mask.sum(dim=(2, 3))  # (B, 1)
        area = torch.cat([h * w - fg_area, fg_area], dim=1)  # (B, 2): [bg, fg]
        scale = torch.where(area > eps, 1.0 / area.clamp_min(eps), torch.zeros_like(area))  # absent: weight 0
        weights = torch.cat([uniform, (1.0 - mask) * scale[:, 0, None, None, None], mask * scale[:, 1, None, None, None]], dim=1)
        return weights, torch.cat([ones, area > eps], dim=1)

    def forward_view(self, student_feat: torch.Tensor, view, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Slice-level InfoNCE (B >= 2) + region SupCon (when ``targets`` has both classes); see the module doc.

        Args:
            student_feat: Adapted student feature ``(B, C, h, w)``.
            view: :meth:`teacher_view` of the teacher feature (``gap`` and, for the region term, ``proto``).
            targets: Masks ``(B, 1, H0, W0)`` or ``None``.
        """
        gap_t = view["gap"]  # (B, C)
        if student_feat.dim() != 4 or tuple(student_feat.shape[:2]) != tuple(gap_t.shape):
            raise ValueError(f"contrastive loss: student feature {tuple(student_feat.shape)} does not match the "
                             f"teacher's pooled feature {tuple(gap_t.shape)} (adapt the student first)")
        return self.forward_pooled(*self.pools(student_feat, targets), view, targets)

    def pools(self, feat: torch.Tensor, targets: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (B, K, C), valid (B, K))``: ``feat (B, C, h, w)`` pooled with :meth:`pooling_weights`, in at
        least fp32 (in fp16 1/area overflows and 1/(h*w) loses digits)."""
        dtype = torch.promote_types(feat.dtype, torch.float32)
        weights, valid = self.pooling_weights(targets, feat.shape[-2:], feat.shape[0], dtype, feat.device)
        return torch.einsum("bkhw,bchw->bkc", weights, feat.to(dtype)), valid

    def forward_pooled(self, pooled: torch.Tensor, valid: torch.Tensor, view, targets: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """The loss from the student pools of :meth:`pooling_weights` (``(B, K, C)``, ``valid (B, K)``) and the
        teacher view: what :meth:`forward_view` computes, whether the pools come from the adapted map or from
        :meth:`medkd.distill.adapters.FeatureAdapter.pooled`."""
        gap_t = view["gap"]  # (B, C)
        if tuple(pooled[:, 0].shape) != tuple(gap_t.shape):
            raise ValueError(f"contrastive loss: student pools {tuple(pooled.shape)} do not match the teacher's "
                             f"pooled feature {tuple(gap_t.shape)} (adapt the student first)")
        gap_s = pooled[:, 0]  # (B, C)
        gap_t = gap_t.to(gap_s.dtype)
        n = gap_s.shape[0]
        use_slice = n >= 2 and self.slice_weight != 0.0
        rows = self._region_rows(pooled[:, 1:], valid[:, 1:], view["proto"]) if pooled.shape[1] == 3 else None
        if not use_slice and rows is None:  # one slice and no usable region term: cosine distance of the pooled pair
            cos = F.cosine_similarity(gap_s, gap_t, dim=1)
            return (1.0 - cos).mean()
        # one pass of each head over the slice rows and the region rows together (the heads are row-wise)
        s_rows, t_rows = [gap_s] if use_slice else [], [gap_t] if use_slice else []
        if rows is not None:
            s_rows.append(rows[0])
            t_rows.append(rows[1])
        zs, zt = self.embed(torch.cat(s_rows), torch.cat(t_rows))  # (n + N, D) or (n, D) or (N, D)
        loss = None
        if use_slice:
            loss = self.slice_weight * info_nce(zs[:n], zt[:n], self.temperature, self.normalize)
            zs, zt = zs[n:], zt[n:]
        if rows is not None:
            region = self.region_weight * supcon_cross(zs, zt, rows[2], self.temperature, self.normalize)
            loss = region if loss is None else loss + region
        return loss

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, region={self.region}, learn_temperature={self.learn_temperature}, "
            f"slice_weight={self.slice_weight}, region_weight={self.region_weight}, normalize={self.normalize}, "
            f"teacher_head={self.teacher_head_mode}"
        )
