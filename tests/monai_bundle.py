"""A real MONAI bundle for the tests, made with MONAI's own tooling (no hand-written imitation of its layout).

:func:`build_bundle` writes what a MONAI user ships:

* ``configs/metadata.json`` and ``configs/inference.json`` through :func:`monai.bundle.init_bundle`, the
  inference config declaring ``network_def`` (a 2-D :class:`monai.networks.nets.UNet`), its ``preprocessing``
  (``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``Orientationd`` RAS -> ``Spacingd`` -> ``ScaleIntensityRanged`` ->
  ``EnsureTyped``) and
  a softmax ``postprocessing``;
* ``models/model.pt``: the network's state dict, written by ``init_bundle`` from the trained network;
* ``models/model.ts`` (optional): :func:`monai.bundle.ckpt_export` of that checkpoint, the bundle's TorchScript.

The network is trained for a few steps on the raw NIfTI cases of the tiny dataset, through the bundle's own
preprocessing (instantiated from ``inference.json`` by :class:`monai.bundle.ConfigParser`) and in its own 48 px
geometry, so it is a genuine (if weak) spleen segmenter and the intensity bridge has something to get right: its
window (``-100..200`` HU to ``-1..1``) differs from medkd's prepared ``[0, 1]`` scaling of the abdomen window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

#: The bundle's CT window (HU) and output range: inside medkd's default abdomen window, so no HU the bundle
#: distinguishes was clipped away at preprocessing.
A_MIN, A_MAX, B_MIN, B_MAX = -100.0, 200.0, -1.0, 1.0
#: The bundle's voxel spacing (mm): the phantom's own, so training needs no resampling; medkd's prepared slices
#: (32 px over the same 48 px field of view) are brought to it by the bundle's ``Spacingd``.
PIXDIM = (5.8, 5.8, 5.0)


def network_def(out_channels: int = 2, spatial_dims: int = 2, in_channels: int = 1) -> Dict:
    return {
        "_target_": "UNet",
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": [8, 16, 32],
        "strides": [2, 2],
        "num_res_units": 1,
        "norm": "batch",
    }


def inference_config(net: Optional[Dict], transforms: Optional[Sequence[Dict]] = None) -> Dict:
    """A MONAI inference config in the shape of the model zoo's 2-D bundles."""
    if transforms is None:
        transforms = [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(PIXDIM), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "@a_min", "a_max": A_MAX,
             "b_min": B_MIN, "b_max": B_MAX, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]
    doc = {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "a_min": A_MIN,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": list(transforms)},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        ]},
    }
    if net is not None:
        doc["network_def"] = net
    return doc


def metadata(classes: Sequence[str] = ("background", "spleen"), spatial_dims: int = 2) -> Dict:
    shape = ["16*n"] * spatial_dims
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "medkd test bundle"},
        "monai_version": "1.6.1",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": "5"},
        "task": "Spleen segmentation of synthetic CT (medkd's phantom)",
        "description": "A 2-D UNet trained for a few steps on axial slices; a test fixture.",
        "authors": "medkd tests",
        "copyright": "public domain",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [B_MIN, B_MAX],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(classes),
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False,
                                 "channel_def": {str(i): c for i, c in enumerate(classes)}}},
        },
    }


def raw_slices(raw: Path, parser, exclude: Sequence[str] = ()) -> tuple:
    """Axial slices of the NIfTI cases of an MSD folder (but ``exclude``, by case id) through the bundle's
    ``preprocessing``: images ``(N, 1, X, Y)`` in the bundle's intensity scale, labels ``(N, X, Y)`` (RAS like the
    images)."""
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    pre = parser.get_parsed_content("preprocessing")
    load = LoadImage(image_only=True)
    xs, ys = [], []
    doc = json.loads((raw / "dataset.json").read_text())
    for entry in doc["training"]:
        img = raw / entry["image"]
        if not img.name.endswith(".nii.gz") or img.name[: -len(".nii.gz")] in exclude:
            continue  # the DICOM case, held-out cases
        x = pre({"image": str(img)})["image"]  # (1, X, Y, Z)
        y = Orientation(axcodes="RAS")(EnsureChannelFirst()(load(str(raw / entry["label"]))))
        xs.append(torch.as_tensor(x).permute(3, 0, 1, 2))  # (Z, 1, X, Y)
        ys.append(torch.as_tensor(y)[0].permute(2, 0, 1))
    return torch.cat(xs).float(), torch.cat(ys).long()


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> None:
    """A few Adam steps of MONAI's Dice + cross-entropy loss on random batches of slices."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (8,), generator=g)
        opt.zero_grad()
        loss = loss_fn(net(x[idx]), y[idx][:, None])
        loss.backward()
        opt.step()
    net.eval()


def build_bundle(
    root: Path,
    raw: Optional[Path] = None,
    steps: int = 150,
    exclude: Sequence[str] = (),
    classes: Sequence[str] = ("background", "spleen"),
    spatial_dims: int = 2,
    torchscript: bool = True,
    with_network_def: bool = True,
    transforms: Optional[Sequence[Dict]] = None,
    seed: int = 0,
) -> Path:
    """Write a MONAI bundle folder ``root`` (must not exist) with ``monai.bundle`` tooling.

    Args:
        raw: MSD folder to train on; ``None`` keeps the network's random initialisation (for tests that check only
            plumbing or errors raised before the network runs).
        steps: training steps when ``raw`` is given (150: Dice ~0.86 on its own training slices).
        exclude: case ids of ``raw`` not to train on (the test split the bundle is scored on).
        classes: output channels' names (``channel_def``); channel 0 is the background.
        torchscript: also write ``models/model.ts`` with :func:`monai.bundle.ckpt_export`.
        with_network_def: ``False`` writes an inference config without ``network_def`` (a TorchScript-only bundle
            when ``torchscript``; else a broken bundle).
        transforms: the inference ``preprocessing`` transforms (default: see the module docstring).
    """
    from monai.bundle import ConfigParser, ckpt_export, init_bundle

    torch.manual_seed(seed)
    net_cfg = network_def(len(classes), spatial_dims)
    infer = inference_config(net_cfg, transforms)
    parser = ConfigParser(infer)
    net = parser.get_parsed_content("network_def")
    if raw is not None:
        x, y = raw_slices(Path(raw), parser, exclude)
        train(net, x, y, steps, seed)
    init_bundle(root, network=net, metadata_str=metadata(classes, spatial_dims), inference_str=infer)
    if torchscript:
        ckpt_export(net_id="network_def", filepath=str(root / "models" / "model.ts"),
                    ckpt_file=str(root / "models" / "model.pt"), meta_file=str(root / "configs" / "metadata.json"),
                    config_file=str(root / "configs" / "inference.json"), bundle_root=str(root))
    if not with_network_def:
        (root / "configs" / "inference.json").write_text(json.dumps(inference_config(None, transforms), indent=4))
    return root


# ------------------------------------------------------------------------------------ broken bundles (bad inputs)


class RunsShell:
    """Pickles as ``os.system(command)``: what a hostile ``model.pt`` would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def _edit_config(root: Path, edit) -> Path:
    path = root / "configs" / "inference.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=4))
    return root


def called_marker(tmp: Path, how: str) -> Path:
    """The file a hostile ``network_def`` of :func:`broken` creates when it is called."""
    return Path(tmp) / f"called-{how}"


#: ``network_def`` of the bundles whose targets lie under ``monai.networks`` by name only -> marker -> config.
HOSTILE_TARGETS = {
    "attribute-walk": lambda m: {"_target_": "monai.networks.nets.hovernet.os.mkdir", "path": str(m)},
    "plain-function": lambda m: {"_target_": "monai.networks.utils.save_state", "src": {}, "path": str(m)},
    "nested-target": lambda m: {**network_def(), "act": {"_target_": "monai.networks.utils.save_state",
                                                         "src": {}, "path": str(m)}},
}


#: ``network_def`` of real MONAI network classes whose arguments (given, or by default) would download weights.
FETCHING = {
    "pretrained": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                   "pretrained": True},
    "pretrained-by-default": {"_target_": "EfficientNetBN", "model_name": "efficientnet-b0", "spatial_dims": 2,
                              "in_channels": 1, "num_classes": 2},
}


def broken(how: str):
    """``make(tmp) -> bundle folder``: a bundle made with MONAI's tooling (random weights), then broken ``how``.

    ``no-network-def`` (and no ``model.ts``), ``weights-other-net`` (``model.pt`` of a wider UNet),
    ``multi-class`` (three softmax classes), ``3d`` (a 3-D UNet), ``expression`` (a ``$`` expression in
    ``network_def``), ``foreign-target`` (``network_def`` naming ``os.system``), ``crop-foreground`` (a
    preprocessing transform medkd cannot reproduce), ``pickle-code`` (a ``model.pt`` that pickles a call).
    Targets with a name inside ``monai.networks`` that are no network, each of which would create
    ``tmp/called-<how>`` if MONAI built it (:func:`called_marker`): ``attribute-walk``
    (``monai.networks.nets.hovernet.os.mkdir``: ``pydoc.locate`` walks from a module to ``os``),
    ``plain-function`` (``monai.networks.utils.save_state``), ``nested-target`` (a UNet whose ``act`` argument is
    a ``save_state`` component). Networks that would fetch weights of their own (:data:`FETCHING`): ``pretrained``
    (``DenseNet121`` with ``pretrained: true``), ``pretrained-by-default`` (``EfficientNetBN``, pretrained unless
    told otherwise).
    """

    def make(tmp: Path) -> Path:
        root = Path(tmp) / f"bundle-{how}"
        if how == "no-network-def":
            return build_bundle(root, torchscript=False, with_network_def=False)
        if how == "multi-class":
            return build_bundle(root, classes=("background", "spleen", "liver"), torchscript=False)
        if how == "3d":
            return build_bundle(root, spatial_dims=3, torchscript=False)
        build_bundle(root, torchscript=False)
        if how == "weights-other-net":
            from monai.networks.nets import UNet

            wide = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
                        num_res_units=1, norm="batch")
            torch.save(wide.state_dict(), root / "models" / "model.pt")
        elif how == "expression":
            _edit_config(root, lambda d: d["network_def"].update(channels="$[8, 16, 32]"))
        elif how == "foreign-target":
            _edit_config(root, lambda d: d["network_def"].update({"_target_": "os.system"}))
        elif how == "crop-foreground":
            _edit_config(root, lambda d: d["preprocessing"]["transforms"].insert(
                3, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}))
        elif how in FETCHING:
            _edit_config(root, lambda d: d.update(network_def=FETCHING[how]))
        elif how in HOSTILE_TARGETS:
            _edit_config(root, lambda d: d.update(network_def=HOSTILE_TARGETS[how](called_marker(tmp, how))))
        elif how == "pickle-code":
            torch.save({"model.0.conv.unit0.conv.weight": RunsShell("exit 3")}, root / "models" / "model.pt")
        else:
            raise ValueError(how)
        return root

    return make
