"""Golden values and smoke tests for the distillation losses.

Reference values are computed by hand or by straightforward numpy code written independently here
(loops, no calls into medkd's loss functions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medkd.distill.losses import LOSSES, PMDLoss, build_loss, pmd_loss
from medkd.distill.losses.pmd import pmd_cwd_loss
from medkd.distill.losses.contrastive import ContrastiveFeatureLoss


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def rng_feats(b=2, c=3, h=4, w=4, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(b, c, h, w)), r.normal(size=(b, c, h, w))


# ---------------------------------------------------------------- independent numpy references
def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def np_attention(s: np.ndarray, t: np.ndarray) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        a_s = (s[b] ** 2).mean(axis=0).ravel()
        a_t = (t[b] ** 2).mean(axis=0).ravel()
        a_s = a_s / np.sqrt((a_s**2).sum())
        a_t = a_t / np.sqrt((a_t**2).sum())
        total += ((a_s - a_t) ** 2).sum()
    return total / s.shape[0]


def np_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    kls = []
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            ls = np_log_softmax(s[b, c].ravel() / tau)
            lt = np_log_softmax(t[b, c].ravel() / tau)
            kls.append((np.exp(lt) * (lt - ls)).sum())
    return float(np.mean(kls)) * tau**2


def np_pmd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    b, c, h, w = s.shape
    kls = []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if c == 1:
                    ps = 1 / (1 + math.exp(-s[i, 0, y, x] / tau))
                    pt = 1 / (1 + math.exp(-t[i, 0, y, x] / tau))
                    kls.append(pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))
                else:
                    ls = np_log_softmax(s[i, :, y, x] / tau)
                    lt = np_log_softmax(t[i, :, y, x] / tau)
                    kls.append((np.exp(lt) * (lt - ls)).sum())
    return float(np.mean(kls)) * tau**2


def np_pmd_cwd(s: np.ndarray, t: np.ndarray, tau: float) -> float:
    """Channel-wise KL of the spatial softmax of the logit map; a one-logit map z is the channels z, -z."""
    if s.shape[1] == 1:
        s, t = np.concatenate([s, -s], axis=1), np.concatenate([t, -t], axis=1)
    kls = []
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            ps = np.exp(s[b, c] / tau) / np.exp(s[b, c] / tau).sum()
            pt = np.exp(t[b, c] / tau) / np.exp(t[b, c] / tau).sum()
            kls.append(float((pt * np.log(pt / ps)).sum()))
    return float(np.mean(kls)) * tau**2


def np_head(vec: np.ndarray, head: torch.nn.Sequential) -> np.ndarray:
    w1, b1 = head[0].weight.detach().double().numpy(), head[0].bias.detach().double().numpy()
    w2, b2 = head[2].weight.detach().double().numpy(), head[2].bias.detach().double().numpy()
    z = np.maximum(vec @ w1.T + b1, 0.0) @ w2.T + b2
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_ce_rows(logits: np.ndarray) -> float:
    return float(np.mean([-np_log_softmax(logits[i])[i] for i in range(logits.shape[0])]))


def np_info_nce(zs: np.ndarray, zt: np.ndarray, tau: float) -> float:
    logits = zs @ zt.T / tau
    return 0.5 * (np_ce_rows(logits) + np_ce_rows(logits.T))


def np_supcon(zs: np.ndarray, zt: np.ndarray, cls: list, tau: float) -> float:
    def one_way(a, b):
        losses = []
        for i in range(len(cls)):
            lp = np_log_softmax(a[i] @ b.T / tau)
            pos = [j for j in range(len(cls)) if cls[j] == cls[i]]
            losses.append(-sum(lp[j] for j in pos) / len(pos))
        return np.mean(losses)

    return 0.5 * (one_way(zs, zt) + one_way(zt, zs))


def np_prototypes(feat: np.ndarray, mask: np.ndarray):
    """feat (B,C,h,w); mask (B,1,H0,W0) with H0,W0 multiples of h,w -> block-average resize."""
    b, c, h, w = feat.shape
    kh, kw = mask.shape[2] // h, mask.shape[3] // w
    protos, cls = [], []
    for k, name in ((0, "bg"), (1, "fg")):
        for i in range(b):
            m = mask[i, 0].reshape(h, kh, w, kw).mean(axis=(1, 3))
            wgt = m if k == 1 else 1.0 - m
            if wgt.sum() > 1e-6:
                protos.append((feat[i] * wgt).sum(axis=(1, 2)) / wgt.sum())
                cls.append(k)
    return np.array(protos), cls


# ---------------------------------------------------------------- hand-computed golden values
def test_mse_hand_value():
    s = t64([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    loss = build_loss("mse", 1)(s, torch.zeros_like(s), None)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)


def test_cosine_hand_value():
    # 4 pixels, 2 channels: (1,0)v(0,1) -> 1; (1,0)v(1,0) -> 0; (1,0)v(-1,0) -> 2; (1,1)v(1,0) -> 1-1/sqrt2
    s = t64([[[[1, 1], [1, 1]], [[0, 0], [0, 1]]]])
    t = t64([[[[0, 1], [-1, 1]], [[1, 0], [0, 0]]]])
    expected = (1 + 0 + 2 + (1 - 1 / math.sqrt(2))) / 4
    assert build_loss("cosine", 2)(s, t, None).item() == pytest.approx(expected)


def test_attention_hand_value():
    s = t64([[[[1.0, 0.0], [0.0, 0.0]]]])
    t = t64([[[[0.0, 3.0], [0.0, 0.0]]]])
    # a_s = e1, a_t = e2 -> ||e1 - e2||^2 = 2
    assert build_loss("attention", 1)(s, t, None).item() == pytest.approx(2.0)
    assert build_loss("attention", 1)(s, 5 * s, None).item() == pytest.approx(0.0, abs=1e-12)


def test_cwd_hand_value():
    tau = 4.0
    s = t64([[[[0.0, tau * math.log(3.0)]]]])  # p_s = [1/4, 3/4]
    t = t64([[[[0.0, 0.0]]]])  # p_t = [1/2, 1/2]
    expected = tau**2 * (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert build_loss("cwd", 1)(s, t, None).item() == pytest.approx(expected)


def test_pmd_binary_hand_value():
    tau = 4.0
    s = t64([[[[0.0]]]])  # sigma(0) = 1/2
    t = t64([[[[tau * math.log(3.0)]]]])  # sigma(ln 3) = 3/4
    expected = tau**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert pmd_loss(s, t, tau).item() == pytest.approx(expected)
    assert expected > 0


def test_pmd_multiclass_hand_value():
    tau = 2.0
    s = t64([[[[tau * math.log(2.0)]], [[0.0]], [[0.0]]]])  # p_s = [1/2, 1/4, 1/4]
    t = torch.zeros_like(s)  # p_t = [1/3] * 3
    expected = tau**2 * (1 / 3) * math.log(32 / 27)
    assert PMDLoss(tau)(s, t).item() == pytest.approx(expected)


def test_pmd_cwd_binary_hand_value():
    """One logit, two positions: the foreground channel z/T = [0, ln 3] gives p_s = [1/4, 3/4], the background
    channel -z/T gives [3/4, 1/4]; the teacher's zero map gives [1/2, 1/2] for both, so both KLs are equal."""
    tau = 4.0
    s = t64([[[[0.0, tau * math.log(3.0)]]]])  # (1, 1, 1, 2)
    t = torch.zeros_like(s)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert pmd_cwd_loss(s, t, tau).item() == pytest.approx(tau**2 * kl)
    assert PMDLoss(tau, "cwd")(s, t).item() == pytest.approx(tau**2 * kl)
    assert PMDLoss(tau)(s, t).item() == pytest.approx(pmd_loss(s, t, tau).item())  # kl stays the default


# ---------------------------------------------------------------- numpy reference on random tensors
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_matches_numpy(seed):
    s, t = rng_feats(3, 4, 5, 3, seed)
    assert build_loss("attention", 4)(t64(s), t64(t), None).item() == pytest.approx(np_attention(s, t))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_numpy(tau):
    s, t = rng_feats(2, 3, 4, 4)
    got = build_loss("cwd", 3, temperature=tau)(t64(s), t64(t), None).item()
    assert got == pytest.approx(np_cwd(s, t, tau))


def test_mse_cosine_match_numpy():
    s, t = rng_feats(2, 3, 4, 4)
    assert build_loss("mse", 3)(t64(s), t64(t), None).item() == pytest.approx(((s - t) ** 2).mean())
    cos = (s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
    assert build_loss("cosine", 3)(t64(s), t64(t), None).item() == pytest.approx((1 - cos).mean())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pmd_matches_numpy(channels, tau):
    s, t = rng_feats(2, channels, 3, 3, seed=channels)
    s, t = 3 * s, 3 * t
    assert pmd_loss(t64(s), t64(t), tau).item() == pytest.approx(np_pmd(s, t, tau))


@pytest.mark.parametrize("channels", [1, 3])
def test_pmd_zero_for_equal_and_positive_otherwise(channels):
    z = torch.randn(2, channels, 5, 5) * 10
    assert pmd_loss(z, z.clone()).item() == 0.0
    assert pmd_loss(z + torch.randn_like(z), z).item() > 0.0


def test_pmd_is_stable_for_extreme_logits():
    s = torch.full((1, 1, 2, 2), -300.0, requires_grad=True)
    t = torch.full((1, 1, 2, 2), 300.0)
    loss = pmd_loss(s, t, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 100
    assert torch.isfinite(s.grad).all()


def test_pmd_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        pmd_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        pmd_cwd_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="kl, cwd"):
        PMDLoss(4.0, "mse")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pmd_cwd_matches_numpy(channels, tau):
    s, t = rng_feats(2, channels, 3, 4, seed=channels)
    s, t = 3 * s, 3 * t
    assert pmd_cwd_loss(t64(s), t64(t), tau).item() == pytest.approx(np_pmd_cwd(s, t, tau))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pmd_cwd_is_the_feature_cwd_on_the_logit_channels(tau):
    """Several logit channels: the feature-level CWD loss of the logit map. One logit z: the feature CWD of the
    two-channel map [z, -z]."""
    s, t = rng_feats(2, 3, 4, 4, seed=5)
    cwd = build_loss("cwd", 3, temperature=tau)
    assert pmd_cwd_loss(t64(s), t64(t), tau).item() == pytest.approx(cwd(t64(s), t64(t), None).item())
    s1, t1 = t64(s[:, :1]), t64(t[:, :1])
    two = build_loss("cwd", 2, temperature=tau)(torch.cat([s1, -s1], 1), torch.cat([t1, -t1], 1), None)
    assert pmd_cwd_loss(s1, t1, tau).item() == pytest.approx(two.item())


def test_pmd_cwd_ignores_a_constant_per_channel_and_has_finite_gradients():
    z = torch.randn(2, 1, 5, 5, dtype=torch.float64) * 10
    assert pmd_cwd_loss(z + 7.0, z).item() == pytest.approx(0.0, abs=1e-12)  # a spatial softmax ignores a constant
    s = torch.full((1, 1, 2, 2), -300.0, requires_grad=True)
    with torch.no_grad():
        s[0, 0, 0, 0] = 300.0
    loss = pmd_cwd_loss(s, torch.full((1, 1, 2, 2), 300.0), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- contrastive
def small_contrastive(channels=3, **kw) -> ContrastiveFeatureLoss:
    torch.manual_seed(0)
    return ContrastiveFeatureLoss(channels, proj_dim=4, hidden_dim=5, **kw).double()


def test_contrastive_slice_term_matches_numpy():
    s, t = rng_feats(3, 3, 4, 4)
    loss = small_contrastive(region=False)
    got = loss(t64(s), t64(t), None).item()
    zs = np_head(s.mean(axis=(2, 3)), loss.student_head)
    zt = np_head(t.mean(axis=(2, 3)), loss.teacher_head)
    assert got == pytest.approx(np_info_nce(zs, zt, 0.1))


def test_contrastive_slice_plus_region_matches_numpy():
    s, t = rng_feats(3, 3, 4, 4, seed=2)
    mask = np.zeros((3, 1, 8, 8))
    mask[0, 0, 2:5, 1:7] = 1  # partly covers several feature cells (area resize -> soft weights)
    mask[1] = 1  # all foreground: no background prototype
    # mask[2] empty: background only
    loss = small_contrastive(region=True, region_weight=0.5)
    got = loss(t64(s), t64(t), t64(mask)).item()
    zs = np_head(s.mean(axis=(2, 3)), loss.student_head)
    zt = np_head(t.mean(axis=(2, 3)), loss.teacher_head)
    ps, cls = np_prototypes(s, mask)
    pt, _ = np_prototypes(t, mask)
    assert cls == [0, 0, 1, 1]
    region = np_supcon(np_head(ps, loss.student_head), np_head(pt, loss.teacher_head), cls, 0.1)
    assert got == pytest.approx(np_info_nce(zs, zt, 0.1) + 0.5 * region)


def test_contrastive_all_empty_masks_is_slice_term():
    s, t = rng_feats(2, 3, 4, 4, seed=3)
    loss = small_contrastive()
    empty = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    value = loss(t64(s), t64(t), empty)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(loss(t64(s), t64(t), None).item())


def test_contrastive_batch_of_one():
    s, t = rng_feats(1, 3, 4, 4, seed=4)
    loss = small_contrastive()
    # no negatives, no mask: cosine distance of the pooled pair
    ps, pt = s.mean(axis=(2, 3))[0], t.mean(axis=(2, 3))[0]
    expected = 1 - ps @ pt / np.linalg.norm(ps) / np.linalg.norm(pt)
    assert loss(t64(s), t64(t), None).item() == pytest.approx(expected)
    # with both classes present, the region term alone is used
    mask = np.zeros((1, 1, 4, 4))
    mask[0, 0, :2] = 1
    protos_s, cls = np_prototypes(s, mask)
    protos_t, _ = np_prototypes(t, mask)
    region = np_supcon(np_head(protos_s, loss.student_head), np_head(protos_t, loss.teacher_head), cls, 0.1)
    assert loss(t64(s), t64(t), t64(mask)).item() == pytest.approx(region)


def test_contrastive_learnable_temperature_gets_gradient():
    loss = ContrastiveFeatureLoss(4, learn_temperature=True)
    s = torch.randn(3, 4, 4, 4, requires_grad=True)
    loss(s, torch.randn(3, 4, 4, 4), None).backward()
    assert loss.log_temperature.grad is not None and loss.log_temperature.grad.abs() > 0


@pytest.mark.parametrize("mode", ["frozen", "identity"])
def test_contrastive_teacher_head_gets_no_gradient(mode):
    """frozen: the teacher head keeps its random initialisation (the trainable head's, drawn from the same seeded
    generator) and is out of the optimizer's reach; identity: there is no teacher head at all."""
    trainable, fixed = small_contrastive(), small_contrastive(teacher_head=mode)
    s, t = rng_feats(4, 3, 4, 4, seed=6)
    mask = np.zeros((4, 1, 4, 4))
    mask[:2, 0, 1:3, 1:3] = 1
    s = t64(s).requires_grad_()
    fixed(s, t64(t), t64(mask)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fixed.student_head.parameters())
    if mode == "frozen":
        assert not any(p.requires_grad for p in fixed.teacher_head.parameters())
        assert all(p.grad is None for p in fixed.teacher_head.parameters())
        for a, b in zip(fixed.teacher_head.parameters(), trainable.teacher_head.parameters()):
            assert torch.equal(a, b)
    else:
        assert list(fixed.teacher_head.parameters()) == []
    assert [n for n, p in fixed.named_parameters() if p.requires_grad] == [
        n for n, _ in fixed.named_parameters() if n.startswith("student_head.")]
    assert f"teacher_head={mode}" in repr(fixed)


def test_contrastive_identity_teacher_head_matches_numpy():
    """The student head maps to the teacher's channels; the teacher embedding is its L2-normalised pooled feature."""
    s, t = rng_feats(3, 3, 4, 4, seed=7)
    loss = small_contrastive(region=False, teacher_head="identity")
    assert loss.student_head[2].out_features == 3
    zs = np_head(s.mean(axis=(2, 3)), loss.student_head)
    gt = t.mean(axis=(2, 3))
    zt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    assert loss(t64(s), t64(t), None).item() == pytest.approx(np_info_nce(zs, zt, 0.1))


def test_contrastive_teacher_view_does_not_depend_on_the_teacher_head():
    """Every teacher_head choice reads the same teacher view (the pooled feature, before any head), so one cached
    view serves them all, and training the loss's parameters leaves it as it was."""
    s, t = rng_feats(4, 3, 4, 4, seed=8)
    mask = t64(np.pad(np.ones((4, 1, 2, 2)), ((0, 0), (0, 0), (1, 1), (1, 1))))
    views = {}
    for mode in ("trainable", "frozen", "identity"):
        loss = small_contrastive(teacher_head=mode)
        before = loss.teacher_view(t64(t), mask)
        opt = torch.optim.SGD([p for p in loss.parameters() if p.requires_grad], lr=1.0)
        loss.forward_view(t64(s), before, mask).backward()
        opt.step()
        after = loss.teacher_view(t64(t), mask)
        assert all(torch.equal(before[k], after[k]) for k in before), mode
        views[mode] = (loss.view_id, before)
        # a cached view gives the live teacher's loss
        assert loss.forward_view(t64(s), before, mask).item() == pytest.approx(loss(t64(s), t64(t), mask).item())
    ids = {v[0] for v in views.values()}
    assert len(ids) == 1
    for mode in ("frozen", "identity"):
        assert all(torch.equal(views[mode][1][k], views["trainable"][1][k]) for k in views["trainable"][1])


def test_contrastive_teacher_head_option_is_checked():
    with pytest.raises(ValueError, match="teacher_head must be one of trainable, frozen, identity"):
        build_loss("contrastive", 4, teacher_head="shared")


def test_contrastive_heads_built_once():
    loss = ContrastiveFeatureLoss(4)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.ones(2, 1, 3, 3))
    after = loss.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- every registered loss
def test_registry_has_the_documented_losses():
    assert {"mse", "cosine", "attention", "cwd", "contrastive"} <= set(LOSSES.names())


def test_unknown_loss_lists_valid_names():
    with pytest.raises(KeyError) as info:
        build_loss("nope", 8)
    for name in ("mse", "contrastive", "cwd"):
        assert name in str(info.value)


def test_unknown_option_is_a_clear_error():
    with pytest.raises(TypeError, match="temperature"):
        build_loss("mse", 8, temperature=2.0)


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_smoke(name, batch):
    torch.manual_seed(batch)
    channels = 6
    loss = build_loss(name, channels)
    s = torch.randn(batch, channels, 5, 4, requires_grad=True)
    t = torch.randn(batch, channels, 5, 4)
    targets = torch.zeros(batch, 1, 20, 16)
    targets[0, 0, 4:12, 3:9] = 1.0  # one slice with foreground, the others empty
    value = loss(s, t, targets)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for pname, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"
    # and without targets
    assert torch.isfinite(loss(s.detach(), t, None))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_rejects_mismatched_shapes(name):
    with pytest.raises(ValueError, match="same"):
        build_loss(name, 4)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 6, 6), None)


@pytest.mark.parametrize("name", ["mse", "cosine", "cwd"])
def test_map_loss_pool_compares_block_means(name):
    """``pool: p`` = the same loss on both maps averaged over p x p blocks (numpy block means), its view p^2 smaller."""
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 2, 3, 8, 12)).astype(np.float32)
    def blocks(a, p):
        b, c, h, w = a.shape
        return a.reshape(b, c, h // p, p, w // p, p).mean(axis=(3, 5))
    pooled = build_loss(name, 3, pool=4)
    full = build_loss(name, 3)
    want = full(torch.from_numpy(blocks(s, 4)), torch.from_numpy(blocks(t, 4)))
    got = pooled(torch.from_numpy(s), torch.from_numpy(t))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    view = pooled.teacher_view(torch.from_numpy(t))
    assert tuple(view["map"].shape) == (2, 3, 2, 3) and pooled.view_id == "map-pool4" and full.view_id == "map"
    assert got.item() != pytest.approx(full(torch.from_numpy(s), torch.from_numpy(t)).item(), rel=1e-3)


@pytest.mark.parametrize("name,options", [(n, {}) for n in LOSSES.names()] + [("contrastive", {"region": False})])
def test_label_aware_is_declared_truthfully(name, options):
    """``label_aware`` (declared, never probed by the distiller) says whether the teacher view reads the masks:
    a view that reads them differs with and without a mask."""
    loss = build_loss(name, 3, **options)
    feat = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1
    without, with_mask = loss.teacher_view(feat, None), loss.teacher_view(feat, mask)
    reads = set(without) != set(with_mask) or any(not torch.equal(without[k], with_mask[k]) for k in without)
    assert loss.label_aware == reads


def test_registered_losses_must_be_feature_losses(monkeypatch):
    """The distiller calls the FeatureLoss interface directly: a registered class outside it is refused by name."""
    class Plain(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()

    monkeypatch.setitem(LOSSES._items, "plain", Plain)
    with pytest.raises(TypeError, match="'plain'.*not a FeatureLoss"):
        build_loss("plain", 8)


def test_a_map_loss_has_no_pooled_form():
    loss = build_loss("mse", 3)
    assert loss.pooling_weights(None, (4, 4), 2, torch.float32, torch.device("cpu")) is None
    with pytest.raises(NotImplementedError, match="mse"):
        loss.forward_pooled(torch.zeros(2, 1, 3), torch.ones(2, 1, dtype=torch.bool), {})


def test_pool_is_a_map_loss_option_only():
    with pytest.raises(TypeError, match="pool"):
        build_loss("contrastive", 8, pool=2)
    with pytest.raises(ValueError, match="pool"):
        build_loss("mse", 8, pool=0)


def test_contrastive_fp16_feature_with_an_empty_mask_has_finite_gradients():
    """Under fp16 autocast the pooling weights of an absent prototype (1 / area, area ~ 0) must not overflow to inf:
    0 * inf = NaN gradients would stall a GradScaler run silently (the loss itself stays finite)."""
    torch.manual_seed(0)
    loss = ContrastiveFeatureLoss(8)
    feat = torch.randn(3, 8, 16, 16).half().requires_grad_()
    targets = torch.zeros(3, 1, 32, 32)
    targets[1, :, 4:20, 4:20] = 1  # slices 0 and 2 have no foreground
    view = loss.teacher_view(torch.randn(3, 8, 16, 16), targets)
    value = loss.forward_view(feat, view, targets)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(feat.grad).all()
