"""Exported models at run time: reading their metadata, running them (ONNX Runtime, TorchScript), checking what
they return. What ``medkd predict MODEL.onnx`` and ``medkd evaluate --onnx`` need, apart from writing a model
(:mod:`medkd.export`); the metadata keys are listed there.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from medkd.errors import MedkdError, ModelError

METADATA_FORMAT = "1"
PREFIX = "medkd."
DEPLOY_HINT = "install the deploy extra: pip install 'medkd[deploy]'"


def require(module: str):
    """Import ``onnx``/``onnxruntime`` or stop with a one-line error naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MedkdError(f"{module} is not installed ({DEPLOY_HINT})") from None




def encode_metadata(meta: Dict[str, Any]) -> Dict[str, str]:
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
        raise MedkdError(f"{source}: invalid metadata: {what} {short_repr(value)} ({short_error(e, 80)})") from None


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
            raise MedkdError(f"{model_file}: cannot load ONNX model ({type(e).__name__}: {short_error(e)})") from None
        return _decode(dict(sess.get_modelmeta().custom_metadata_map), model_file)
    side = sidecar_path(model_file)
    if not side.is_file():
        raise MedkdError(f"{model_file}: TorchScript model without its metadata sidecar {side.name}")
    try:
        props = json.loads(side.read_text())
    except (ValueError, RecursionError) as e:
        raise MedkdError(f"{side}: invalid metadata ({type(e).__name__}: {short_error(e)})") from None
    return _decode(props, model_file)


def short_error(e: Exception, n: int = 140) -> str:
    """An exception's message on one line, at most ``n`` characters (its type's name when it has no message)."""
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


def load_torchscript(path: Path):
    """A TorchScript file on the CPU, in eval mode: :func:`torch.jit.load` (its deprecation warning silenced: it is
    still supported). **A trust decision**: a TorchScript file is a program, whose graph runs whatever operators it
    names (file I/O included), not weights; load only files you trust.

    Raises:
        MedkdError: ``<path>: cannot load TorchScript model (<type>: <reason>)``.
    """
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 -- any failure of a foreign file is one line
        raise MedkdError(f"{path}: cannot load TorchScript model ({type(e).__name__}: {short_error(e)})") from None


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
            raise MedkdError(f"{self.path}: cannot load ONNX model ({type(e).__name__}: {short_error(e)})") from None
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
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.module = load_torchscript(self.path)

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


def probe_exported(model, in_channels: int, size: int) -> None:
    """Run an exported model once on two blank ``(C, S, S)`` slices: a graph whose output is not ``(2, K, S, S)``
    logits fails here (:func:`check_logits`, a :class:`~medkd.errors.ModelError` naming the file), before any input
    is read or any mask written."""
    model(np.zeros((2, in_channels, size, size), dtype=np.float32))
