"""FeatureExtractor (forward hooks by module path) and the student->teacher adapters."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from medkd.distill import AdapterSet, FeatureAdapter, FeatureExtractor


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, "extra"


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(1, 4, 3, padding=1),
            block=nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 8, 3, padding=1, stride=2), act=nn.ReLU())),
            pair=TupleOut(),
            head=nn.Identity(),
        )
    ).eval()


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = small_model()

    def forward(self, x):
        return self.body.head(self.body.pair(self.body.block(self.body.stem(x)))[0])


def test_hooked_output_equals_direct_output():
    model = small_model()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), FeatureExtractor(model, {"enc": "stem", "mid": "block.conv", "top": "block"}) as fx:
        model(x)
        feats = fx.pop()
        stem = model.stem(x)
        conv = model.block.conv(stem)
    assert set(feats) == {"enc", "mid", "top"}
    assert torch.equal(feats["enc"], stem)
    assert torch.equal(feats["mid"], conv)
    assert torch.equal(feats["top"], torch.relu(conv))
    assert feats["mid"].shape == (2, 8, 4, 4)


def test_tuple_output_keeps_first_tensor():
    model = Wrapper()
    x = torch.randn(1, 1, 8, 8)
    with FeatureExtractor(model, {"p": "body.pair"}) as fx:
        model(x)
        feat = fx.pop()["p"]
    assert torch.equal(feat, 2 * model.body.block(model.body.stem(x)))


def test_pop_returns_and_clears():
    model = small_model()
    with FeatureExtractor(model, {"enc": "stem"}) as fx:
        model(torch.randn(1, 1, 8, 8))
        assert "enc" in fx.pop()
        assert fx.pop() == {}
        model(torch.randn(1, 1, 8, 8))
        assert "enc" in fx.pop()


def test_features_keep_the_graph():
    model = small_model().train()
    with FeatureExtractor(model, {"enc": "block.conv"}) as fx:
        model(torch.randn(2, 1, 8, 8))
        fx.pop()["enc"].sum().backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0


def test_handles_removed_after_context():
    model = small_model()
    fx = FeatureExtractor(model, {"enc": "stem", "mid": "block.conv"})
    with fx:
        assert len(model.stem._forward_hooks) == 1 and fx.active
        model(torch.randn(1, 1, 8, 8))
    assert len(model.stem._forward_hooks) == 0
    assert len(model.block.conv._forward_hooks) == 0
    assert not fx.active
    model(torch.randn(1, 1, 8, 8))
    assert fx.pop() == {}


def test_handles_removed_on_error_and_by_remove():
    model = small_model()
    with pytest.raises(RuntimeError):
        with FeatureExtractor(model, {"enc": "stem"}):
            raise RuntimeError("boom")
    assert len(model.stem._forward_hooks) == 0
    fx = FeatureExtractor(model, {"enc": "stem"}).register()
    fx.register()  # idempotent: still one hook
    assert len(model.stem._forward_hooks) == 1
    fx.remove()
    assert len(model.stem._forward_hooks) == 0


def test_bad_path_names_the_path_and_valid_modules():
    model = small_model()
    with pytest.raises(ValueError) as info:
        FeatureExtractor(model, {"enc": "block.nope"})
    message = str(info.value)
    assert "block.nope" in message and "block.conv" in message
    with pytest.raises(ValueError, match="stem"):
        FeatureExtractor(model, {"enc": "encoder"})


@pytest.mark.parametrize("in_size,out_size", [((4, 4), (16, 16)), ((9, 7), (8, 8)), ((8, 8), (8, 8))])
def test_adapter_shape_and_gradients(in_size, out_size):
    adapter = FeatureAdapter(4, 12)
    x = torch.randn(3, 4, *in_size, requires_grad=True)
    y = adapter(x, out_size)
    assert y.shape == (3, 12, *out_size)
    y.pow(2).mean().backward()
    assert x.grad is not None
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert adapter.proj.bias is None


@pytest.mark.parametrize("in_size,out_size", [((4, 4), (16, 16)), ((8, 8), (8, 8)), ((16, 16), (4, 4)),
                                              ((16, 8), (4, 4)), ((8, 4), (4, 8))])
def test_adapter_equals_conv_bn_resize(in_size, out_size):
    """The channel contraction is the 1x1 conv it replaces, and the resizing is block averaging along an axis that
    shrinks by an integer factor (before the conv and BN) and bilinear interpolation along one that grows (after
    them), with torch's own conv2d / batch_norm / avg_pool2d / interpolate: values and gradients."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    adapter = FeatureAdapter(5, 7).train()
    with torch.no_grad():
        adapter.bn.weight.uniform_(0.5, 1.5)
        adapter.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, *in_size, requires_grad=True)
    w, g, b = (t.detach().clone().requires_grad_() for t in (adapter.proj.weight, adapter.bn.weight, adapter.bn.bias))
    xr = x.detach().clone().requires_grad_()

    def bn(z):
        return F.batch_norm(z, None, None, g, b, training=True)

    kernel = tuple(max(1, i // o) for i, o in zip(in_size, out_size))  # block size along each shrinking axis
    ref = bn(F.conv2d(F.avg_pool2d(xr, kernel), w))
    if tuple(ref.shape[-2:]) != out_size:
        ref = F.interpolate(ref, size=out_size, mode="bilinear", align_corners=False)
    y = adapter(x, out_size)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    seed = torch.randn_like(y)
    (y * seed).sum().backward()
    (ref * seed).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.proj.weight.grad, w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_size,out_size", [((64, 64), (16, 16)), ((32, 32), (8, 8)), ((12, 9), (4, 3))])
def test_shrinking_adapter_sends_gradient_to_every_student_position(in_size, out_size):
    """The student's enc and bottleneck maps are 4x the teacher's: bilinear resizing without antialiasing read 2 of
    every 4 rows and columns, so 3/4 of the student positions got no gradient. Area averaging reaches them all."""
    adapter = FeatureAdapter(3, 6).train()
    x = torch.randn(2, 3, *in_size, requires_grad=True)
    adapter(x, out_size).pow(2).mean().backward()
    assert bool((x.grad != 0).all()), f"{int((x.grad == 0).sum())} of {x.numel()} positions got no gradient"


def test_adapter_adaptive_shrink_matches_numpy_windows():
    """A non-integer shrink averages the windows ``[floor(i h / H), ceil((i + 1) h / H))`` of each axis."""
    import math

    import numpy as np

    from medkd.distill.adapters import shrink

    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    got = shrink(x, (4, 3)).numpy()

    def windows(n, m):
        return [(math.floor(i * n / m), math.ceil((i + 1) * n / m)) for i in range(m)]

    ref = np.array([[[[x.numpy()[b, c, r0:r1, c0:c1].mean() for c0, c1 in windows(7, 3)] for r0, r1 in windows(9, 4)]
                     for c in range(3)] for b in range(2)])
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert shrink(x, (9, 7)) is x and shrink(x, (20, 20)) is x  # nothing to shrink
    assert shrink(x, (3, 20)).shape == (2, 3, 3, 7)  # only the axis that shrinks


@pytest.mark.parametrize("in_size,out_size", [((8, 8), (8, 8)), ((16, 16), (4, 4)), ((9, 7), (3, 3)),
                                              ((64, 64), (16, 16))])
def test_adapter_pooled_equals_pooling_the_adapted_map(in_size, out_size):
    """pooled() = weighted pools of forward()'s output: values, gradients (input, conv, BN affine) and the BN
    running statistics, in train and eval mode."""
    import copy

    torch.manual_seed(1)
    a = FeatureAdapter(6, 5).train()
    with torch.no_grad():
        a.bn.weight.uniform_(0.5, 1.5)
        a.bn.bias.uniform_(-0.5, 0.5)
    b = copy.deepcopy(a)
    x = (torch.randn(4, 6, *in_size) * 2 + 0.7).requires_grad_()
    xb = x.detach().clone().requires_grad_()
    wts = torch.rand(4, 3, *out_size)
    wts = wts / wts.sum(dim=(2, 3), keepdim=True)
    wts[:, 2] *= 3.0  # a weighted sum, not an average: BN's shift and bias scale with the weights' mass
    got = a.pooled(x, out_size, wts)
    ref = torch.einsum("bkhw,bchw->bkc", wts, b(xb, out_size))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    seed = torch.randn_like(got)
    (got * seed).sum().backward()
    (ref * seed).sum().backward()
    torch.testing.assert_close(x.grad, xb.grad, rtol=1e-3, atol=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(a.bn.running_mean, b.bn.running_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.bn.running_var, b.bn.running_var, rtol=1e-4, atol=1e-6)
    assert int(a.bn.num_batches_tracked) == int(b.bn.num_batches_tracked) == 1
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.pooled(x, out_size, wts), torch.einsum("bkhw,bchw->bkc", wts, b(x, out_size)),
                                   rtol=1e-4, atol=1e-5)


def test_adapter_pooled_declines_enlargement():
    assert FeatureAdapter(4, 4).pooled(torch.randn(2, 4, 4, 4), (8, 8), torch.ones(2, 1, 8, 8) / 64) is None
    assert FeatureAdapter(4, 4).pooled(torch.randn(2, 4, 8, 4), (4, 8), torch.ones(2, 1, 4, 8) / 32) is None


def test_adapter_set():
    adapters = AdapterSet({"enc": 16, "bottleneck": 64, "dec": 16}, {"enc": 128, "bottleneck": 1024, "dec": 64},
                          ["enc", "dec"])
    assert set(adapters.keys()) == {"enc", "dec"}
    assert adapters["dec"](torch.randn(2, 16, 8, 8), (32, 32)).shape == (2, 64, 32, 32)
    assert "enc.proj.weight" in adapters.state_dict()
    assert len(list(adapters.parameters())) == 6  # conv weight + bn weight/bias, per scale
    with pytest.raises(KeyError, match="bottleneck"):
        AdapterSet({"enc": 16}, {"enc": 128}, ["bottleneck"])
