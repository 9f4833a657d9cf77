"""The ``torchscript`` and ``onnx`` teacher kinds: a model file plus what it expects of its input.

A file alone does not say how its input was normalised, what size it takes or what its output channels mean, so
it comes with that description, found in this order:

1. a sidecar beside it, ``MODEL.onnx.json`` / ``.yaml`` / ``.yml`` (or ``MODEL.json`` / ``.yaml`` / ``.yml``)::

       input_channels: 1                                    # channels the model takes (the slice repeated)
       intensity: {normalise: window, low: -160, high: 240} # or zscore (mean, std; or none: per slice), none, medkd
       size: 128                                            # in-plane input size; or spacing: [0.8, 0.8] (mm)
       size_multiple: 16                                    # with spacing: round the size up to a multiple
       output: softmax                                      # sigmoid (K independent logits) or softmax (K classes)
       classes: {1: liver, 2: tumour}                       # optional names, listed when --teacher-label is missing
       label: 1                                             # optional default of --teacher-label

2. the metadata of a medkd export (``medkd export``: ONNX ``metadata_props``, TorchScript ``MODEL.pt.json``),
   which carries medkd's preprocessing (checked by the reader of :mod:`medkd.exported`).

A TorchScript file is loaded with :func:`~medkd.exported.load_torchscript` (``torch.jit.load``): **a trust
decision**, since a TorchScript file is a program (its graph runs the operators it names, file I/O included), not
weights. An ONNX file runs in ONNX Runtime.

The model runs through :class:`~medkd.teachers.bridge.BridgedTeacher` (intensity, size and output bridged);
only prediction-map terms can be distilled from a file (no module paths to hook: TorchScript runs its compiled
graph, not its submodules' forwards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from medkd.errors import MedkdError
from medkd.exported import PREFIX, _decode, load_torchscript, require, short_error
from medkd.options import MAX_CLASS, MAX_SIZE, check_int
from medkd.teachers import register_kind
from medkd.teachers.base import LoadedTeacher, TeacherRequest, external_cache_root, hash_files, reject_options
from medkd.teachers.bridge import (LAYOUTS, BridgedTeacher, Intensity, choose_label, dataset_window,
                                   intensity_bridge, median_prepared_spacing, size_for_spacing)
from medkd.yamlfile import load_yaml

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".jit", ".torchscript")
ONNX_SUFFIXES = (".onnx",)
SIDECAR_SUFFIXES = (".json", ".yaml", ".yml")
SIDECAR_FIELDS = ("input_channels", "intensity", "size", "spacing", "size_multiple", "output", "classes", "label")
PROBE_BATCH = 2


def sidecars(model_file: Path) -> List[Path]:
    """Where a model file's description may be: ``MODEL.onnx.json`` ... then ``MODEL.json`` ..."""
    p = Path(model_file)
    return [p.with_name(p.name + s) for s in SIDECAR_SUFFIXES] + [p.with_name(p.stem + s) for s in SIDECAR_SUFFIXES]


# ---------------------------------------------------------------------------------------------- description
class Description:
    """What a model file expects and returns (from a sidecar or a medkd export's metadata).

    Attributes:
        channels: Input channels the model takes.
        intensity: Its normalisation.
        size: In-plane input size (``None``: from ``spacing``, else the prepared size).
        spacing: In-plane input spacing in mm (``None``: ``size``).
        multiple: ``size`` from ``spacing`` rounded up to a multiple of this.
        layout: ``sigmoid`` or ``softmax``.
        classes: Class number -> name (for messages).
        label: The default foreground class (``--teacher-label`` overrides it).
        origin: The sidecar's file name, or ``medkd export metadata``.
        extra_files: Files the description was read from (hashed into the record).
        model_kind: What a medkd export says it is (``teacher`` | ``student``); ``None`` for a sidecar.
    """

    def __init__(self, channels: int, intensity: Intensity, size: Optional[int], spacing: Optional[Tuple[float, float]],
                 multiple: int, layout: str, classes: Dict[int, str], label: Optional[int], origin: str,
                 extra_files: List[Path], model_kind: Optional[str] = None):
        self.channels, self.intensity, self.size, self.spacing = channels, intensity, size, spacing
        self.multiple, self.layout, self.classes, self.label = multiple, layout, classes, label
        self.origin, self.extra_files, self.model_kind = origin, extra_files, model_kind

    def record(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"from": self.origin, "input_channels": self.channels,
                               "intensity": self.intensity.record(), "output": self.layout}
        if self.size is not None:
            out["size"] = self.size
        if self.spacing is not None:
            out.update(spacing=list(self.spacing), size_multiple=self.multiple)
        if self.classes:
            out["classes"] = {str(k): v for k, v in self.classes.items()}
        return out


def read_sidecar(path: Path) -> Description:
    """A sidecar (JSON or YAML, see the module docstring).

    Raises:
        MedkdError: unreadable, not a mapping, an unknown or missing field, a bad value: one line naming the file
            and the field.
    """
    doc = load_yaml(path)
    what = str(path)
    if not isinstance(doc, dict):
        raise MedkdError(f"{what}: a teacher sidecar must be a mapping of {', '.join(SIDECAR_FIELDS)}")
    unknown = sorted(str(k) for k in doc if k not in SIDECAR_FIELDS)
    if unknown:
        raise MedkdError(f"{what}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(SIDECAR_FIELDS)}")
    missing = [k for k in ("input_channels", "intensity", "output") if k not in doc]
    if missing:
        raise MedkdError(f"{what}: missing field(s) {', '.join(missing)} (the model's input channels, intensity "
                         f"normalisation and output layout)")
    channels = check_int(doc["input_channels"], f"{what}: input_channels", lo=1, hi=64)
    if doc.get("output") not in LAYOUTS:
        raise MedkdError(f"{what}: output must be one of {', '.join(LAYOUTS)}, got {doc.get('output')!r}")
    if "size" in doc and "spacing" in doc:
        raise MedkdError(f"{what}: give size or spacing, not both")
    size = check_int(doc["size"], f"{what}: size", lo=8, hi=MAX_SIZE) if "size" in doc else None
    spacing = None
    if "spacing" in doc:
        sp = doc["spacing"]
        if not (isinstance(sp, list) and len(sp) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e3 for v in sp)):
            raise MedkdError(f"{what}: spacing must be two in-plane spacings in mm, e.g. [0.8, 0.8], got {sp!r}")
        spacing = (float(sp[0]), float(sp[1]))
    multiple = check_int(doc.get("size_multiple", 1), f"{what}: size_multiple", lo=1, hi=MAX_SIZE)
    classes = doc.get("classes") or {}
    if not isinstance(classes, dict) or not all(_is_int(k) and isinstance(v, str) for k, v in classes.items()):
        raise MedkdError(f"{what}: classes must map class numbers to names, e.g. {{1: liver}}, got {classes!r}")
    label = check_int(doc["label"], f"{what}: label", lo=0, hi=MAX_CLASS) if doc.get("label") is not None else None
    return Description(channels, Intensity.from_doc(doc["intensity"], what), size, spacing, multiple, doc["output"],
                       {int(k): v for k, v in classes.items()}, label, path.name, [path])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def from_medkd_metadata(meta: Dict[str, Any], origin: str, extra: List[Path]) -> Description:
    """A medkd export's metadata as a description: its CT window (medkd's recipe), its prepared size, its output."""
    ct = (meta.get("intensity") or {}).get("CT") or {}
    low, high = (float(ct["low"]), float(ct["high"])) if ct else (0.0, 1.0)
    layout = meta.get("output") if meta.get("output") in LAYOUTS else "sigmoid"
    kind = meta.get("kind") if meta.get("kind") in ("teacher", "student") else None
    return Description(int(meta["input_channels"]), Intensity("medkd", low, high), int(meta["prepared_size"]), None, 1,
                       layout, {}, None, origin, extra, model_kind=kind)


def describe(path: Path, session: Any = None) -> Description:
    """The description of a model file: its sidecar, else a medkd export's metadata (an ONNX ``session``'s
    ``metadata_props``; a TorchScript export's sidecar holds ``medkd.*`` keys).

    Raises:
        MedkdError: neither (naming where a sidecar goes), or a bad sidecar / metadata.
    """
    for side in sidecars(path):
        if side.is_file():
            doc = load_yaml(side)
            if isinstance(doc, dict) and any(str(k).startswith(PREFIX) for k in doc):  # a medkd TorchScript export
                return from_medkd_metadata(_decode(doc, path), "medkd export metadata", [side])
            return read_sidecar(side)
    if session is not None:
        props = dict(session.get_modelmeta().custom_metadata_map)
        if any(k.startswith(PREFIX) for k in props):
            return from_medkd_metadata(_decode(props, path), "medkd export metadata", [])
    raise MedkdError(f"{path}: no input description: put a sidecar {sidecars(path)[0].name} beside it (input_channels, "
                     f"intensity, size or spacing, output; see medkd/teachers/files.py) or use a medkd export")


def _session(path: Path):
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise MedkdError(f"{path}: cannot load ONNX model ({type(e).__name__}: {short_error(e)})") from None


# ---------------------------------------------------------------------------------------------- networks
class OnnxNet(nn.Module):
    """An ONNX Runtime session (CPU) as a module: ``(B, C, H, W)`` tensor -> its first output as a tensor on the
    input's device. Not differentiable (a teacher is not).

    A graph exported with a fixed batch ``n`` (often 1) runs in chunks of ``n`` slices, the last one padded with
    zeros and its padding dropped from the output, so it answers any batch.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.session = _session(self.path)
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        if len(self.input_shape) != 4:
            raise MedkdError(f"{self.path}: graph input {inp.name!r} has shape {self.input_shape}, expected (batch, "
                             f"channels, height, width)")

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the graph is fixed at (``None``: free)."""
        n = self.input_shape[0]
        return n if isinstance(n, int) and n > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().float().cpu().numpy())  # (B, C, H, W)
        n = self.fixed_batch
        if n is None or n == a.shape[0]:
            out = self._run(a)
        else:
            parts = []
            for i in range(0, a.shape[0], n):
                chunk = a[i:i + n]
                pad = np.zeros((n - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
                parts.append(self._run(np.concatenate([chunk, pad]) if len(pad) else chunk)[:chunk.shape[0]])
            out = np.concatenate(parts)
        return torch.from_numpy(out).to(x.device)

    def _run(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: a})[0], dtype=np.float32)


@torch.no_grad()
def probe_channels(net: nn.Module, path: Path, channels: int, size: int) -> int:
    """Run the model once on blank input; returns its output channels K.

    Raises:
        MedkdError: it fails, or its output is not ``(B, K, size, size)`` logits.
    """
    x = torch.zeros(PROBE_BATCH, channels, size, size)
    try:
        out = net(x)
    except MedkdError:
        raise
    except Exception as e:
        raise MedkdError(f"{path}: the model fails on a {tuple(x.shape)} input ({type(e).__name__}: "
                         f"{short_error(e)}); check input_channels and size in its description") from None
    out = out[0] if isinstance(out, (tuple, list)) else out
    shape = tuple(getattr(out, "shape", ()))
    if not (isinstance(out, torch.Tensor) and out.ndim == 4 and shape[0] == PROBE_BATCH and shape[2:] == (size, size)):
        raise MedkdError(f"{path}: model output has shape {shape} for a {tuple(x.shape)} input; expected "
                         f"({PROBE_BATCH}, K, {size}, {size}) segmentation logits")
    return int(shape[1])


# ---------------------------------------------------------------------------------------------- the kinds
def _input_size(desc: Description, data: Any) -> int:
    if desc.size is not None:
        return desc.size
    if desc.spacing is not None:
        return size_for_spacing(median_prepared_spacing(data), data.size, desc.spacing, desc.multiple)
    return data.size


def _load(kind: str, path: Path, request: TeacherRequest, data: Any) -> LoadedTeacher:
    reject_options(path, kind, request, ("fold", "checkpoint"))
    net = OnnxNet(path) if kind == "onnx" else None
    desc = describe(path, net.session if net is not None else None)
    what = str(path)
    net = net if net is not None else load_torchscript(path)
    if kind == "onnx" and isinstance(net.input_shape[1], int) and net.input_shape[1] != desc.channels:
        raise MedkdError(f"{path}: graph input takes {net.input_shape[1]} channel(s) but its description "
                         f"({desc.origin}) says input_channels {desc.channels}")
    size = _input_size(desc, data)
    k = probe_channels(net, path, desc.channels, size)
    label = choose_label(desc.layout, k, request.label if request.label is not None else desc.label, desc.classes,
                         what)
    module = BridgedTeacher(net, request.in_channels, data.size, intensity_bridge(desc.intensity, dataset_window(data),
                                                                                   what),
                            size, desc.layout, label, net_channels=desc.channels)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    files = hash_files(path, [path, *desc.extra_files])
    details = {"format": kind, "description": desc.record(), "input_size": size, "output_channels": k,
               "foreground_channel": label, **({"model_kind": desc.model_kind} if desc.model_kind else {})}
    return LoadedTeacher(kind=kind, source=path, module=module, in_channels=request.in_channels, files=files,
                         details=details, taps_ok=False, default_taps=None, cache_key_file=path,
                         cache_root=external_cache_root(data.root, kind, files, details))


def _detect(suffixes):
    return lambda path: Path(path).is_file() and Path(path).suffix.lower() in suffixes


register_kind("torchscript", _detect(TORCHSCRIPT_SUFFIXES), lambda p, r, d: _load("torchscript", p, r, d),
              f"a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)}) with a sidecar or medkd export metadata")
register_kind("onnx", _detect(ONNX_SUFFIXES), lambda p, r, d: _load("onnx", p, r, d),
              "an .onnx file with a sidecar or medkd export metadata")
