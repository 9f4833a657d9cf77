"""Model zoo: reference parameter counts, shapes at odd sizes, taps, config round trip."""

from __future__ import annotations

import pytest
import torch

from medkd.models import MODELS, build_model, is_teacher, list_models

SMALL = 8  # width for forward tests (fast on CPU)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [("unet", 43_236_036), ("s1", 57_297), ("s2", 227_233)],
)
def test_reference_parameter_counts(name, expected):
    # the reference study's T1 / S1 / S2, 3 input channels, 1 class, default widths
    assert n_params(build_model(name, in_channels=3, num_classes=1)) == expected


def test_registry_contents_and_kinds():
    assert {"unet", "transunet", "s1", "s2"} <= set(list_models())
    assert is_teacher("unet") and is_teacher("transunet")
    assert not is_teacher("s1") and not is_teacher("s2")


def test_student_width_scales():
    m = build_model("s1", width=8)
    assert m.width == 8
    assert m.feature_channels() == {"enc": 16, "bottleneck": 32, "dec": 8}
    assert build_model("s1").feature_channels() == {"enc": 32, "bottleneck": 64, "dec": 16}
    assert build_model("s2").feature_channels() == {"enc": 64, "bottleneck": 128, "dec": 32}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [(37, 45), (64, 64)])
def test_forward_shapes(name, in_channels, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=2, width=SMALL).eval()
    assert model.arch == name
    assert model.in_channels == in_channels and model.num_classes == 2 and model.width == SMALL
    x = torch.randn(2, in_channels, *size)
    with torch.no_grad():
        out = model(x)
    if model.kind == "teacher":
        assert is_teacher(name)
        assert isinstance(out, tuple) and len(out) == 2
        seg, recon = out
        assert seg.shape == (2, 2, *size)
        assert recon.shape == (2, in_channels, *size)
    else:
        assert model.kind == "student"
        assert isinstance(out, torch.Tensor)
        assert out.shape == (2, 2, *size)


@pytest.mark.parametrize("name", list_models())
def test_taps_resolve_and_hooks_catch_features(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, width=SMALL).eval()
    assert set(model.taps) == {"enc", "bottleneck", "dec"}
    channels = model.feature_channels()
    caught = {}
    handles = []
    for tap, path in model.taps.items():
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, i, o, tap=tap: caught.__setitem__(tap, o)))
    h, w = 37, 45
    with torch.no_grad():
        model(torch.randn(2, 1, h, w))
    for hd in handles:
        hd.remove()
    assert set(caught) == {"enc", "bottleneck", "dec"}
    for tap, feat in caught.items():
        assert isinstance(feat, torch.Tensor) and feat.dim() == 4
        assert feat.shape[0] == 2
        assert feat.shape[1] == channels[tap], tap
    # resolutions: dec is full (padded) size, enc at 1/2^(k-1), bottleneck at 1/2^k
    m = model.min_size
    ph, pw = -(-h // m) * m, -(-w // m) * m
    assert caught["dec"].shape[-2:] == (ph, pw)
    assert caught["enc"].shape[-2:] == (ph * 2 // m, pw * 2 // m)
    assert caught["bottleneck"].shape[-2:] == (ph // m, pw // m)


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError) as err:
        build_model("resnet")
    msg = str(err.value)
    for name in ("s1", "s2", "transunet", "unet"):  # the registered models, written out
        assert name in msg
    with pytest.raises(KeyError):
        is_teacher("nope")


@pytest.mark.parametrize("name", list_models())
def test_bad_inputs_raise_value_error(name):
    model = build_model(name, in_channels=1, width=SMALL).eval()
    small = model.min_size - 1
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 1, small, 64))
    with pytest.raises(ValueError, match="4D"):
        model(torch.randn(1, 64, 64))
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(1, 3, 64, 64))
    # the smallest accepted size works
    with torch.no_grad():
        model(torch.randn(1, 1, model.min_size, model.min_size))


@pytest.mark.parametrize("name", list_models())
def test_config_rebuilds_same_architecture(name):
    model = build_model(name, in_channels=3, num_classes=2, width=SMALL)
    assert model.config["name"] == name
    again = build_model(**model.config)
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert again.taps == model.taps and again.feature_channels() == model.feature_channels()


@pytest.mark.parametrize("name", list_models())
def test_deterministic_init(name):
    torch.manual_seed(123)
    a = build_model(name, width=SMALL)
    torch.manual_seed(123)
    b = build_model(name, width=SMALL)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_transunet_options_and_pos_interpolation():
    model = build_model("transunet", width=SMALL, depth=2, heads=4, embed_dim=64, img_size=32).eval()
    assert model.feature_channels()["bottleneck"] == 64
    assert model.config["depth"] == 2 and model.config["embed_dim"] == 64
    assert len(model.bottleneck.transformer.layers) == 2
    with torch.no_grad():  # token grid 4x4 stored, 6x10 used
        seg, recon = model(torch.randn(1, 1, 48, 80))
    assert seg.shape == (1, 1, 48, 80) and recon.shape == (1, 1, 48, 80)
    with pytest.raises(ValueError, match="divisible"):
        build_model("transunet", width=SMALL, heads=3, embed_dim=64)


def test_unet_rejects_unknown_option():
    with pytest.raises(TypeError):
        build_model("s1", depth=3)


def test_registry_is_the_models_registry():
    from medkd.options import students, teachers

    assert MODELS.kind == "model"
    assert list_models() == ["s1", "s2", "transunet", "unet"]  # written out, not read back from the registry
    assert students() == ["s1", "s2"] and teachers() == ["transunet", "unet"]
