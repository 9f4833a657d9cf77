"""``medkd export``: a trained run as a self-contained ONNX (or TorchScript) model with its preprocessing as metadata.

The exported graph maps ``image (B, C, H, W)`` float32 (intensities already mapped to [0, 1] by the recipe below)
to ``logits (B, K, H, W)``; batch and spatial size are dynamic (H and W multiples of ``spatial_multiple``, which
the prepared size always is), except for graphs that only work at the prepared size (TransUNet's position
embeddings): export checks a second size against PyTorch and then fixes H and W (``medkd.spatial = fixed``).
Everything ``medkd predict`` needs travels with the model, as ONNX ``metadata_props`` (TorchScript: a
``<MODEL>.json`` sidecar and the same JSON inside the archive as ``medkd.json``); every value is a string (JSON for
structured values), read back by :func:`medkd.exported.read_metadata`:

==========================  ====================================================================================
key                         value
==========================  ====================================================================================
``medkd.format``            metadata layout version (``"1"``)
``medkd.version``           medkd version that exported the model
``medkd.kind``/``arch``     ``teacher``/``student``; architecture name
``medkd.input_channels``    C (the one prepared channel is repeated when C > 1)
``medkd.prepared_size``     S: each axial slice is resized to S x S before the network
``medkd.spatial_multiple``  H and W must be multiples of this (the model pools that many times)
``medkd.spatial``           ``dynamic``, or ``fixed`` (only S x S; checked at export, e.g. TransUNet)
``medkd.orientation``       ``RAS``: volumes are reoriented (closest canonical) before slicing along axis 2
``medkd.intensity``         JSON: CT -> ``{"rule": "ct_window", "low", "high"}``; MR/other -> 0.5/99.5
                            percentiles of the non-zero voxels of each volume; modality detection rule
``medkd.spacing_policy``    in-plane resize to S x S (antialiased bilinear), slice spacing unchanged; foreground
                            probabilities resized back bilinearly, then thresholded
``medkd.output``            ``sigmoid`` (K = 1) or ``softmax`` (background = channel 0)
``medkd.threshold``         foreground probability threshold (``0.5``)
``medkd.label_value``       value written for foreground in the mask (``1``)
``medkd.postprocessing``    JSON: the run's connected-component rule (:mod:`medkd.postprocess`), chosen on val
``medkd.run_config_sha256`` SHA-256 of the run's ``config.yaml``
``medkd.data_fingerprint``  fingerprint of the prepared dataset the run was trained on
``medkd.training_profile``  JSON: modalities, voxel-spacing and prepared-intensity ranges of the training cases
                            (predict warns about inputs outside them)
``medkd.source_run``        the run folder exported (informative only; predict never reads it)
``medkd.verification``      JSON: slices compared and the max |ONNX Runtime - PyTorch| logit difference
==========================  ====================================================================================

Export verifies itself before anything is written in place: ``onnx.checker``, then ONNX Runtime against PyTorch
eager on real prepared slices of the run's dataset (full batch and a batch of one); above the tolerance the
model is refused with a one-line error. ``--fp16`` stores the weights as float16 (half the file) with a Cast to
float32 before use, so the model still runs on ONNX Runtime's CPU kernels (which lack most float16 convolutions).

onnx and onnxruntime are the optional extra ``medkd[deploy]``; without them export/ONNX predict stop with a
one-line error that names the extra.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import medkd
from medkd import rundir
from medkd.rundir import file_sha256
from medkd.errors import MedkdError
from medkd.exported import (METADATA_FORMAT, OnnxModel, TorchScriptModel, encode_metadata, require, short_error,
                            sidecar_path)

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
#: Max |ONNX Runtime - PyTorch| on logits accepted at export (float32 weights / float16 weights).
TOLERANCE = 1e-3
TOLERANCE_FP16 = 5e-2
#: Prepared slices compared at export.
VERIFY_SLICES = 16
INPUT_NAME, OUTPUT_NAME = "image", "logits"
SPACING_POLICY = ("axial slices of the RAS volume resized in-plane to SxS (antialiased bilinear); slice spacing "
                  "unchanged; foreground probabilities resized back to the original in-plane size (bilinear), "
                  "then thresholded; RAS reorientation undone")


# --------------------------------------------------------------------------------------------------- metadata


def build_metadata(model, ckpt: Dict[str, Any], run: Path, postprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing recipe and provenance of a run, as a dict (values are JSON-able)."""
    from medkd.data.recipe import CT_MIN_HU, MR_PERCENTILES, WINDOW_PRESETS
    from medkd.infer import THRESHOLD
    from medkd.metrics import count_params
    from medkd.checkpoint import trained_size

    data = ckpt.get("data") or {}
    settings = data.get("settings") or {}
    size = trained_size(ckpt)
    if size is None:
        raise MedkdError(f"{run}: checkpoint does not record the preprocess size")
    window = [float(v) for v in (settings.get("window") or WINDOW_PRESETS["abdomen"])]
    config = Path(run) / "config.yaml"
    k = int(getattr(model, "num_classes", ckpt["model_config"].get("num_classes", 1)))
    return {
        "format": METADATA_FORMAT,
        "version": medkd.__version__,
        "kind": ckpt.get("kind"),
        "arch": getattr(model, "arch", ckpt["model_config"].get("name")),
        "params": count_params(model),
        "input_channels": int(getattr(model, "in_channels", 1)),
        "prepared_size": int(size),
        "spatial_multiple": int(getattr(model, "min_size", 1)),
        "spatial": "dynamic",  # "fixed" when the graph only works at prepared_size (checked at export)
        "orientation": "RAS",
        "intensity": {
            "CT": {"rule": "ct_window", "low": window[0], "high": window[1],
                   "window_preset": settings.get("window_preset")},
            "MR": {"rule": "percentile", "percentiles": list(MR_PERCENTILES), "of": "non-zero voxels of each volume"},
            "modality": f"DICOM Modality tag, else CT when the minimum is below {CT_MIN_HU:g} (HU), else MR",
        },
        "spacing_policy": SPACING_POLICY,
        "output": "sigmoid" if k == 1 else "softmax",
        "threshold": THRESHOLD,
        "label_value": 1,
        "postprocessing": postprocessing,
        "run_config_sha256": file_sha256(config) if config.is_file() else None,
        "data_fingerprint": data.get("fingerprint"),
        "training_profile": data.get("profile"),
        "source_run": str(Path(run).resolve()),
        "epoch": ckpt.get("epoch"),
    }


# --------------------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and how it verified."""

    out: Path
    format: str
    metadata: Dict[str, Any]
    max_abs_diff: float
    tolerance: float
    n_slices: int
    size_mb: float
    seconds: float
    files: List[str] = field(default_factory=list)


def _seg_module(model):
    """The network as ``image -> seg logits`` for tracing: teachers' reconstruction output dropped, and the
    model's pad/crop bypassed (those bake the traced size into the graph; inputs must be multiples of
    ``spatial_multiple`` instead)."""
    import torch

    class SegLogits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            fwd = getattr(self.net, "_forward_padded", None)
            out = fwd(x) if fwd is not None else self.net(x)
            return out[0] if isinstance(out, (tuple, list)) else out

    return SegLogits(model).eval()


def verification_slices(data, n: int = VERIFY_SLICES) -> Tuple[np.ndarray, str]:
    """Up to ``n`` real prepared slices ``(n, S, S)``, evenly spaced over the first val case (else test, train)."""
    for split in ("val", "test", "train"):
        ids = data.case_ids(split)
        if ids:
            img = np.asarray(data.image(ids[0]), dtype=np.float32)
            idx = np.unique(np.linspace(0, img.shape[0] - 1, min(n, img.shape[0])).round().astype(int))
            return img[idx], f"{split}:{ids[0]}"
    raise MedkdError(f"{data.root}: no cases to verify the export on")


def _fp16_weights(model_proto) -> None:
    """Store float32 initializers as float16 and cast them back to float32 before use (in place)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    casts = []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < 16:  # scalars/shapes: not worth a cast
            continue
        name16 = init.name + "__fp16"
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(arr.astype(np.float16), name16))
        casts.append(helper.make_node("Cast", [name16], [init.name], to=TensorProto.FLOAT, name=name16 + "_cast"))
    for i, node in enumerate(casts):
        graph.node.insert(i, node)


#: ONNX opsets export accepts (torch.onnx's TorchScript exporter).
OPSETS = (7, 21)


def check_export_options(fmt: str, opset: int, fp16: bool) -> None:
    """``--format``, ``--opset`` and ``--fp16`` together (the command line makes a bad one a usage error, exit 2).

    Raises:
        OptionError: unknown format, opset outside :data:`OPSETS`, ``--fp16`` without ONNX.
    """
    from medkd.options import OptionError, check_choice, check_int

    check_choice(fmt, FORMATS, "--format")
    check_int(opset, "--opset", lo=OPSETS[0], hi=OPSETS[1])
    if fp16 and fmt != "onnx":
        raise OptionError("--fp16 is only supported with --format onnx", "--fp16")


def export_run(
    run: Path,
    out: Path,
    fmt: str = "onnx",
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    data: Optional[Path] = None,
    overwrite: bool = False,
    tolerance: Optional[float] = None,
    device: str = "cpu",
) -> ExportResult:
    """Export ``RUN/best.pt`` with its preprocessing metadata, verified against PyTorch.

    Args:
        run: a run folder (teacher or student).
        out: the model file to write (``.onnx``; TorchScript: any name, plus ``<out>.json``).
        fmt: ``"onnx"`` or ``"torchscript"``.
        opset: ONNX opset.
        fp16: store weights as float16 (ONNX only).
        data: prepared dataset for the verification slices and, when the run has none yet, the postprocessing
            choice on its val split; default: the dataset recorded in the checkpoint.
        overwrite: replace an existing ``out``.
        tolerance: max |runtime - PyTorch| on logits; default :data:`TOLERANCE` (:data:`TOLERANCE_FP16`).
        device: where the postprocessing choice predicts (export itself runs on the CPU).

    Returns:
        An :class:`ExportResult`.

    Raises:
        MedkdError: bad options, no run / dataset, the extra missing, or verification above the tolerance
            (nothing is written then).
    """
    import torch

    from medkd.data.prepared import PreparedData
    from medkd.evaluate import load_run, run_postprocessing
    from medkd.infer import match_channels, resolve_device, seg_logits
    from medkd.rundir import run_checkpoint
    from medkd.checkpoint import load_checkpoint

    t0 = time.time()
    run, out = Path(run), Path(out)
    check_export_options(fmt, opset, fp16)
    if fmt == "onnx":
        onnx = require("onnx")
        require("onnxruntime")
    files = [out] + ([sidecar_path(out)] if fmt == "torchscript" else [])
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise MedkdError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    if out.is_dir():
        raise MedkdError(f"{out}: is a folder (give a model file name)")
    rundir.require_run_dir(run)
    if data is None:
        root = (load_checkpoint(run_checkpoint(run)).get("data") or {}).get("root")
        if not root:
            raise MedkdError(f"{run}: checkpoint does not record its dataset; give --data")
        data = Path(root)
        if not (data / "manifest.json").is_file():
            raise MedkdError(f"{data}: the run's dataset is gone (needed to verify the export); give --data")
    prepared = PreparedData(Path(data))
    loaded = load_run(run, prepared)
    pp_doc = run_postprocessing(loaded, prepared, resolve_device(device))
    model = loaded.model.to("cpu").eval()
    meta = build_metadata(model, loaded.ckpt, run, {k: pp_doc.get(k) for k in
                                                    ("method", "min_volume_ml", "connectivity", "chosen_on",
                                                     "val_dice_without", "val_dice_with")})
    slices, where = verification_slices(prepared)
    in_ch = meta["input_channels"]
    x = match_channels(torch.from_numpy(slices)[:, None], in_ch).contiguous()  # (N, C, S, S)
    net = _seg_module(model)
    with torch.no_grad():
        ref = seg_logits(model(x)).numpy()  # the model's own forward (with its pad/crop), as PyTorch predicts
    tol = float(tolerance if tolerance is not None else (TOLERANCE_FP16 if fp16 else TOLERANCE))

    out.parent.mkdir(parents=True, exist_ok=True)
    with rundir.atomic_path(out) as tmp:  # the model file appears only once verified
        tmp_side = sidecar_path(tmp)
        try:
            if fmt == "onnx":
                _export_onnx(net, x, tmp, opset, fp16, meta, onnx, target=out)
                runner = OnnxModel(tmp, threads=None)
                if not _other_size_ok(runner, model, x, meta["spatial_multiple"], tol):
                    meta["spatial"] = "fixed"  # e.g. TransUNet's position embeddings: re-export with H, W fixed
                    _export_onnx(net, x, tmp, opset, fp16, meta, onnx, dynamic_spatial=False,
                                 target=out)
                    runner = OnnxModel(tmp, threads=None)
            else:
                _export_torchscript(net, x, tmp, meta, target=out)
                runner = TorchScriptModel(tmp)
                if not _other_size_ok(runner, model, x, meta["spatial_multiple"], tol):
                    meta["spatial"] = "fixed"
            got_full = runner(x.numpy())
            got_one = runner(x[:1].numpy())  # dynamic batch
            diff = float(max(np.max(np.abs(got_full - ref)), np.max(np.abs(got_one - ref[:1]))))
            if not np.isfinite(diff) or diff > tol:
                raise MedkdError(f"{out}: export verification failed: max |{runner.engine} - PyTorch| logit difference "
                                 f"{diff:.3g} > tolerance {tol:g} on {len(x)} prepared slices ({where}); nothing written")
            meta["verification"] = {"engine": runner.engine, "slices": int(len(x)), "from": where,
                                    "max_abs_diff": diff, "tolerance": tol}
            if fmt == "onnx":  # record the verification in the file itself
                proto = onnx.load(str(tmp))
                _set_props(proto, meta)
                onnx.save(proto, str(tmp))
                onnx.checker.check_model(str(tmp))
            else:
                rundir.write_text(sidecar_path(out), json.dumps(encode_metadata(meta), indent=2) + "\n")
        finally:
            if tmp_side.exists():
                tmp_side.unlink()
    return ExportResult(out, fmt, meta, diff, tol, int(len(x)), out.stat().st_size / 2**20,
                        round(time.time() - t0, 2), [str(f) for f in files])


def _set_props(proto, meta: Dict[str, Any]) -> None:
    del proto.metadata_props[:]
    for k, v in encode_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


@contextlib.contextmanager
def _no_mha_fastpath():
    """Trace transformer layers (TransUNet) through their plain ops: the inference fast path
    (``aten::_transformer_encoder_layer_fwd``) has no ONNX/TorchScript-portable form."""
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def _other_size_ok(runner, model, x, multiple: int, tol: float) -> bool:
    """Whether the exported graph also gives PyTorch's logits at another spatial size (S + multiple)."""
    import torch
    import torch.nn.functional as F

    from medkd.infer import seg_logits

    m = max(1, int(multiple))
    xp = F.pad(x[:1], (0, m, 0, m), mode="replicate")  # (1, C, S + m, S + m)
    with torch.no_grad():
        ref = seg_logits(model(xp)).numpy()
    try:
        got = runner(xp.numpy())
    except Exception:
        return False
    return got.shape == ref.shape and float(np.max(np.abs(got - ref))) <= tol


def _export_onnx(net, x, path: Path, opset: int, fp16: bool, meta: Dict[str, Any], onnx,
                 dynamic_spatial: bool = True, target: Optional[Path] = None) -> None:
    """Export ``net`` to ``path`` (a temp file); messages name ``target``, the file the user asked for."""
    import warnings

    import torch

    dyn = {0: "batch", 2: "height", 3: "width"} if dynamic_spatial else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad(), _no_mha_fastpath():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks that the export bypasses
        try:
            torch.onnx.export(net, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamic_axes={INPUT_NAME: dyn, OUTPUT_NAME: dyn}, dynamo=False,
                              do_constant_folding=True)
        except OSError:
            raise  # the file cannot be written: rundir.atomic_path names the target, not this temp file
        except Exception as e:
            raise MedkdError(f"{target or path}: ONNX export failed ({type(e).__name__}: {short_error(e)})") from None
    proto = onnx.load(str(path))
    if fp16:
        _fp16_weights(proto)
    proto.producer_name, proto.producer_version = "medkd", medkd.__version__
    proto.doc_string = "medkd segmentation model; preprocessing in metadata_props (keys medkd.*)"
    _set_props(proto, meta)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise MedkdError(f"{target or path}: onnx.checker rejected the model ({short_error(e)})") from None
    onnx.save(proto, str(path))


def _export_torchscript(net, x, path: Path, meta: Dict[str, Any], target: Optional[Path] = None) -> None:
    """Trace ``net`` into ``path`` (a temp file) and its sidecar; messages name ``target``."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad(), _no_mha_fastpath():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(net, x, check_trace=False)
        except Exception as e:
            raise MedkdError(f"{target or path}: TorchScript trace failed ({type(e).__name__}: {short_error(e)})") from None
        doc = json.dumps(encode_metadata(meta), indent=2)
        # saved to memory, then written by Python: torch's own file writer aborts the whole process when a write
        # fails (disk full, file-size limit); Python's write raises an OSError that names the reason
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"medkd.json": doc})
    path.write_bytes(buf.getvalue())
    sidecar_path(path).write_text(doc + "\n")
