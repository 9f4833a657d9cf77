"""``medkd export``: a trained run as a self-contained ONNX (or TorchScript) model with its preprocessing as metadata.

The exported graph maps ``image (B, C, H, W)`` float32 (intensities already mapped to [0, 1] by the recipe below)
to ``logits (B, K, H, W)``; batch and spatial size are dynamic (H and W multiples of ``spatial_multiple``, which
the prepared size always is), except for graphs that only work at the prepared size (TransUNet's position
embeddings): export checks a second size against PyTorch and then fixes H and W (``medkd.spatial = fixed``).
Everything ``medkd predict`` needs travels with the model, as ONNX ``metadata_props`` (TorchScript: a
``<MODEL>.json`` sidecar and the same JSON inside the archive as ``medkd.json``); every value is a string (JSON for
structured values), read back by :func:`read_metadata`:

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
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import medkd
from medkd import rundir
from medkd.errors import MedkdError, ModelError

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
#: Max |ONNX Runtime - PyTorch| on logits accepted at export (float32 weights / float16 weights).
TOLERANCE = 1e-3
TOLERANCE_FP16 = 5e-2
#: Prepared slices compared at export.
VERIFY_SLICES = 16
METADATA_FORMAT = "1"
PREFIX = "medkd."
INPUT_NAME, OUTPUT_NAME = "image", "logits"
SPACING_POLICY = ("axial slices of the RAS volume resized in-plane to SxS (antialiased bilinear); slice spacing "
                  "unchanged; foreground probabilities resized back to the original in-plane size (bilinear), "
                  "then thresholded; RAS reorientation undone")
DEPLOY_HINT = "install the deploy extra: pip install 'medkd[deploy]'"


def require(module: str):
    """Import ``onnx``/``onnxruntime`` or stop with a one-line error naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MedkdError(f"{module} is not installed ({DEPLOY_HINT})") from None


# --------------------------------------------------------------------------------------------------- metadata


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_metadata(model, ckpt: Dict[str, Any], run: Path, postprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing recipe and provenance of a run, as a dict (values are JSON-able)."""
    from medkd.data.preprocess import CT_MIN_HU, MR_PERCENTILES, WINDOW_PRESETS
    from medkd.infer import THRESHOLD
    from medkd.metrics import count_params
    from medkd.rundir import trained_size

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


def _encode(meta: Dict[str, Any]) -> Dict[str, str]:
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _decode(props: Any, source: Path) -> Dict[str, Any]:
    """The medkd metadata of ``source`` from its string properties, every value that predict and evaluate read
    checked by :func:`_parsed` (a tampered or foreign file is refused with one line naming it and the key)."""
    if not isinstance(props, dict):
        raise MedkdError(f"{source}: invalid metadata (expected a mapping of {PREFIX}* keys)")
    meta: Dict[str, Any] = {}
    for key, raw in props.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        try:
            meta[key[len(PREFIX):]] = json.loads(raw)
        except (ValueError, TypeError):  # plain strings are stored as they are ("dynamic", "RAS")
            meta[key[len(PREFIX):]] = raw
        except RecursionError:
            raise MedkdError(f"{source}: invalid metadata: {key} is nested too deeply") from None
    missing = [k for k in ("input_channels", "prepared_size", "intensity", "threshold") if k not in meta]
    if missing:
        raise MedkdError(f"{source}: not a medkd export (metadata {', '.join(PREFIX + k for k in missing)} missing)")
    for key, parse in _metadata_fields().items():
        if key in meta:
            meta[key] = _parsed(meta[key], key, parse, source)
    return meta


def _parsed(value: Any, key: str, parse, source: Path) -> Any:
    """``parse(value, what)`` of one metadata field; any failure is one line naming ``source`` and the key.

    Raises:
        MedkdError: ``<source>: invalid metadata: medkd.<key> must be ..., got <value>`` (the value capped by
            :func:`medkd.options.short_repr`).
    """
    from medkd.options import OptionError, short_repr

    what = PREFIX + key
    try:
        return parse(value, what)
    except OptionError as e:
        raise MedkdError(f"{source}: invalid metadata: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, MedkdError) as e:
        raise MedkdError(f"{source}: invalid metadata: {what} {short_repr(value)} ({_short(e, 80)})") from None


def _metadata_fields() -> Dict[str, Any]:
    """Metadata keys that medkd reads back (predict, evaluate, export) -> parser ``(value, what) -> value`` (raising
    :class:`~medkd.options.OptionError` or ``ValueError``/``TypeError``)."""
    from medkd.options import MAX_SIZE, check_choice, check_in_channels, check_int, check_range, check_size

    return {
        "input_channels": check_in_channels,
        "prepared_size": check_size,
        "spatial_multiple": lambda v, w: check_int(v, w, lo=1, hi=MAX_SIZE),
        "spatial": lambda v, w: check_choice(v, ("dynamic", "fixed"), w),
        "threshold": lambda v, w: float(check_range(v, w, lo=0, hi=1, lo_open=True, hi_open=True)),
        "intensity": _intensity,
        "postprocessing": _postprocessing,
        "training_profile": _profile,
    }


def _mapping(value: Any, what: str) -> dict:
    from medkd.options import OptionError, short_repr

    if not isinstance(value, dict):
        raise OptionError(f"{what} must be a JSON object, got {short_repr(value)}")
    return value


def _numbers(value: Any, what: str, n: int, positive: bool = False) -> Optional[List[float]]:
    """``None`` or a list of ``n`` finite numbers (``> 0`` with ``positive``)."""
    from medkd.options import OptionError, check_range, short_repr

    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise OptionError(f"{what} must be a list of {n} numbers, got {short_repr(value)}")
    return [float(check_range(v, what, lo=0, lo_open=True) if positive else check_range(v, what)) for v in value]


def _intensity(value: Any, what: str) -> dict:
    """The CT window (``CT.low`` < ``CT.high``, finite) when the recipe has one."""
    from medkd.options import OptionError, check_range

    ct = _mapping(_mapping(value, what).get("CT") or {}, f"{what} CT")
    if ct:
        lo = float(check_range(ct.get("low"), f"{what} CT low"))
        hi = float(check_range(ct.get("high"), f"{what} CT high"))
        if not hi > lo:
            raise OptionError(f"{what} CT window must have high > low, got {lo:g}, {hi:g}")
    return value


def _postprocessing(value: Any, what: str) -> Optional[dict]:
    """``None`` or a rule :class:`medkd.postprocess.Postprocessing` accepts, with a finite ``min_volume_ml``."""
    from medkd.options import check_range
    from medkd.postprocess import Postprocessing

    if value is None:
        return None
    doc = _mapping(value, what)
    if doc.get("min_volume_ml") is not None:
        check_range(doc["min_volume_ml"], f"{what} min_volume_ml", lo=0)
    Postprocessing.from_dict(doc)
    return value


def _profile(value: Any, what: str) -> Optional[dict]:
    """``None`` or the training profile predict compares inputs with (modalities, spacing range, intensity range)."""
    from medkd.options import OptionError, short_repr

    if value is None:
        return None
    doc = _mapping(value, what)
    mods = doc.get("modalities")
    if mods is not None and (not isinstance(mods, list) or not all(isinstance(m, str) for m in mods)):
        raise OptionError(f"{what} modalities must be a list of names, got {short_repr(mods)}")
    _numbers(doc.get("spacing_min"), f"{what} spacing_min", 3, positive=True)
    _numbers(doc.get("spacing_max"), f"{what} spacing_max", 3, positive=True)
    _numbers(doc.get("intensity_mean"), f"{what} intensity_mean", 2)
    return value


def sidecar_path(model_file: Path) -> Path:
    """The TorchScript metadata sidecar: ``MODEL.pt`` -> ``MODEL.pt.json``."""
    return Path(model_file).with_name(Path(model_file).name + ".json")


def read_metadata(model_file: Path) -> Dict[str, Any]:
    """The medkd metadata of an exported model (``.onnx``: ``metadata_props``; TorchScript: the sidecar).

    Uses ONNX Runtime's model metadata for ``.onnx`` (the ``onnx`` package is not needed to predict).

    Raises:
        MedkdError: missing file, not a medkd export, or onnxruntime not installed.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise MedkdError(f"{model_file}: model file not found")
    if model_file.suffix.lower() == ".onnx":
        ort = require("onnxruntime")
        try:
            sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MedkdError(f"{model_file}: cannot load ONNX model ({type(e).__name__}: {_short(e)})") from None
        return _decode(dict(sess.get_modelmeta().custom_metadata_map), model_file)
    side = sidecar_path(model_file)
    if not side.is_file():
        raise MedkdError(f"{model_file}: TorchScript model without its metadata sidecar {side.name}")
    try:
        props = json.loads(side.read_text())
    except (ValueError, RecursionError) as e:
        raise MedkdError(f"{side}: invalid metadata ({type(e).__name__}: {_short(e)})") from None
    return _decode(props, model_file)


def _short(e: Exception, n: int = 140) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------- runtime


def check_logits(path: Path, x: np.ndarray, y: Any, metadata: Dict[str, Any]) -> np.ndarray:
    """``y`` if it is what a medkd export returns for the input ``x`` ``(B, C, H, W)``: ``(B, 1, H, W)`` logits for a
    ``sigmoid`` output, ``(B, K >= 2, H, W)`` for ``softmax`` (the ``output`` metadata).

    Raises:
        ModelError: one line naming the model file, the shape it returned and the shape expected.
    """
    b, _, h, w = x.shape
    kind = metadata.get("output")
    k = "1" if kind == "sigmoid" else "K>=2" if kind == "softmax" else "K"
    shape = tuple(getattr(y, "shape", ()))
    ok = isinstance(y, np.ndarray) and y.ndim == 4 and shape[0] == b and shape[2:] == (h, w) and (
        shape[1] == 1 if kind == "sigmoid" else shape[1] >= 2 if kind == "softmax" else shape[1] >= 1)
    if not ok:
        got = f"shape {shape}" if isinstance(y, np.ndarray) else f"a {type(y).__name__}"
        raise ModelError(f"{path}: model output has {got} for a {tuple(x.shape)} input; expected ({b}, {k}, {h}, {w}) "
                         f"logits ({kind or 'no output kind in its metadata'}); not a medkd segmentation export?")
    return y


class OnnxModel:
    """An exported ``.onnx`` model under ONNX Runtime (CPU), callable on ``(B, C, H, W)`` float32 numpy arrays.

    Args:
        path: the model file.
        threads: intra-op threads (``None``: ONNX Runtime's default); inter-op is 1 (sequential graph).
    """

    engine = "onnxruntime"

    def __init__(self, path: Path, threads: Optional[int] = None):
        ort = require("onnxruntime")
        self.path = Path(path)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MedkdError(f"{self.path}: cannot load ONNX model ({type(e).__name__}: {_short(e)})") from None
        self.metadata = _decode(dict(self.session.get_modelmeta().custom_metadata_map), self.path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise MedkdError(f"{self.path}: graph input {inp.name!r} has shape {shape}, expected (batch, channels, "
                             f"height, width)")
        c = self.metadata["input_channels"]
        if isinstance(shape[1], int) and shape[1] != c:
            raise MedkdError(f"{self.path}: graph input takes {shape[1]} channel(s) but metadata "
                             f"{PREFIX}input_channels says {c}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(B, C, H, W)`` float32 -> ``(B, K, H, W)`` float32 logits.

        Raises:
            ModelError: the graph's output is not logits of that shape (:func:`check_logits`).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        return check_logits(self.path, x, self.session.run(None, {self.input_name: x})[0], self.metadata)


def check_model_file(model_file: Path, in_channels: int, size: int, run: Path) -> None:
    """An exported model given beside a run (``evaluate --onnx``) must take the run's input: its channels and, for
    a graph fixed to one size, its prepared size.

    Raises:
        MedkdError: one line naming the model file and what differs.
    """
    m = OnnxModel(Path(model_file))
    meta = m.metadata
    if meta["input_channels"] != in_channels:
        raise MedkdError(f"{model_file}: the model takes {meta['input_channels']} input channel(s) but {run} takes "
                         f"{in_channels} (is it the export of this run?)")
    if meta.get("spatial") == "fixed" and meta["prepared_size"] != size:
        raise MedkdError(f"{model_file}: the model only takes {meta['prepared_size']}x{meta['prepared_size']} slices "
                         f"but {run} is evaluated on {size}x{size}")


class TorchScriptModel:
    """An exported TorchScript model (CPU), callable like :class:`OnnxModel`."""

    engine = "torchscript"

    def __init__(self, path: Path, threads: Optional[int] = None):
        import torch

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
                self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except Exception as e:
            raise MedkdError(f"{self.path}: cannot load TorchScript model ({type(e).__name__}: {_short(e)})") from None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = np.ascontiguousarray(x, dtype=np.float32)
        with torch.no_grad():
            y = self.module(torch.from_numpy(x))
        return check_logits(self.path, x, y.numpy() if isinstance(y, torch.Tensor) else y, self.metadata)


def load_exported(path: Path, threads: Optional[int] = None):
    """:class:`OnnxModel` for ``.onnx`` files, :class:`TorchScriptModel` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MedkdError(f"{path}: model file not found")
    return OnnxModel(path, threads) if path.suffix.lower() == ".onnx" else TorchScriptModel(path, threads)


def ort_latency_ms(model_file: Path, in_shape: Tuple[int, int, int], warmup: int = 3, repeats: int = 10,
                   threads: Optional[int] = None, batch: int = 1) -> float:
    """Median ONNX Runtime (CPU) forward time per slice in ms for ``(batch, *in_shape)`` random inputs."""
    import statistics

    m = OnnxModel(Path(model_file), threads)
    x = np.random.default_rng(0).standard_normal((batch, *in_shape)).astype(np.float32)
    for _ in range(max(0, warmup)):
        m(x)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        m(x)
        times.append((time.perf_counter() - t0) * 1000.0 / batch)
    return float(max(statistics.median(times), 1e-9))


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
    from medkd.rundir import load_checkpoint, run_checkpoint

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
                rundir.write_text(sidecar_path(out), json.dumps(_encode(meta), indent=2) + "\n")
        finally:
            if tmp_side.exists():
                tmp_side.unlink()
    return ExportResult(out, fmt, meta, diff, tol, int(len(x)), out.stat().st_size / 2**20,
                        round(time.time() - t0, 2), [str(f) for f in files])


def _set_props(proto, meta: Dict[str, Any]) -> None:
    del proto.metadata_props[:]
    for k, v in _encode(meta).items():
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
            raise MedkdError(f"{target or path}: ONNX export failed ({type(e).__name__}: {_short(e)})") from None
    proto = onnx.load(str(path))
    if fp16:
        _fp16_weights(proto)
    proto.producer_name, proto.producer_version = "medkd", medkd.__version__
    proto.doc_string = "medkd segmentation model; preprocessing in metadata_props (keys medkd.*)"
    _set_props(proto, meta)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise MedkdError(f"{target or path}: onnx.checker rejected the model ({_short(e)})") from None
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
            raise MedkdError(f"{target or path}: TorchScript trace failed ({type(e).__name__}: {_short(e)})") from None
        doc = json.dumps(_encode(meta), indent=2)
        # saved to memory, then written by Python: torch's own file writer aborts the whole process when a write
        # fails (disk full, file-size limit); Python's write raises an OSError that names the reason
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"medkd.json": doc})
    path.write_bytes(buf.getvalue())
    sidecar_path(path).write_text(doc + "\n")
