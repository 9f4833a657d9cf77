"""The ``nnunet`` teacher kind: an nnU-Net v2 trained model folder, loaded through nnunetv2's own code.

A trained model folder is what ``nnUNetv2_train`` writes: ``<Trainer>__<Plans>__<configuration>/`` with
``plans.json``, ``dataset.json`` and ``fold_K/checkpoint_final.pth`` (``K`` = 0..4 or ``all``). medkd checks the
checkpoint loads weights-only (files are data, never code), then hands the folder to
``nnUNetPredictor.initialize_from_trained_model_folder`` (``--teacher-fold``, ``--teacher-checkpoint``): the
network is nnU-Net's, built from its plans by its trainer class.

A ``2d`` configuration runs on medkd's prepared slices, seeing them as nnU-Net saw its training data
(:class:`NnunetSlices`): the prepared values go back to Hounsfield units (the dataset's CT window) and through
nnU-Net's own normalisation classes (the plans' ``normalization_schemes`` with the dataset's foreground intensity
properties, e.g. ``CTNormalization``: clip to the 0.5/99.5 percentiles, z-score), each slice is turned from
medkd's canonical (RAS) orientation to nnU-Net's array axes (SimpleITK's voxel order of the source file, then the
plans' ``transpose_forward``), resized to the plans' spacing, and the softmax output of ``--teacher-label`` comes
back as a foreground logit at the prepared size (:mod:`medkd.teachers.bridge`).

A ``3d_fullres`` (or other 3-D) configuration runs per case, as nnU-Net predicts: its own preprocessing and
sliding-window predictor on each source image (``predict_single_npy_array``), once per case, and the probability
of ``--teacher-label`` reaches the prepared slices by the function that brings the case's label there
(:func:`medkd.data.recipe.prepared_slices`, as ``--teacher-probs`` does): ``case_probs``, no module, so
prediction-map terms only.

Feature taps (``--teacher-taps``) are module paths in nnU-Net's network (``PlainConvUNet`` for the default plans):

- ``encoder.stages.K``: the encoder's stage ``K`` (``K = 0`` full resolution, each next one 2x coarser in-plane);
- ``decoder.stages.K``: the decoder's stage ``K`` (``K = 0`` the coarsest, just above the bottleneck; the last
  one at full resolution);
- ``decoder.seg_layers.K``: the 1x1 convolution giving the class logits after decoder stage ``K``.

Their maps are at nnU-Net's input size (the prepared slices resized to the plans' spacing).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from medkd.compat import torch_at_least
from medkd.errors import MedkdError
from medkd.options import short_text
from medkd.teachers import register_kind
from medkd.teachers.base import LoadedTeacher, TeacherRequest, external_cache_root, hash_files
from medkd.teachers.bridge import (BridgedTeacher, choose_label, dataset_window, median_prepared_spacing,
                                   size_for_spacing)

KIND = "nnunet"
EXPECTS = "an nnU-Net v2 trained model folder (plans.json, dataset.json, fold_K/checkpoint_final.pth)"
EXTRA = "pip install 'medkd[nnunet]'"
CHECKPOINT = "checkpoint_final.pth"
PLANS, DATASET = "plans.json", "dataset.json"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load's switch that overrides weights_only=False


def detect(path: Path) -> bool:
    """A folder with nnU-Net's ``plans.json`` and ``dataset.json`` and at least one ``fold_*`` folder."""
    path = Path(path)
    return (path.is_dir() and (path / PLANS).is_file() and (path / DATASET).is_file()
            and any(p.is_dir() for p in path.glob("fold_*")))


def folds(path: Path, checkpoint: str = CHECKPOINT) -> List[str]:
    """The folds of a model folder that hold ``checkpoint`` (``0``..``4``, ``all``), sorted."""
    return sorted(p.name[len("fold_"):] for p in Path(path).glob("fold_*") if (p / checkpoint).is_file())


def _require_nnunet(path: Path) -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as e:
        raise MedkdError(f"{path}: an nnU-Net v2 model folder needs nnunetv2 ({EXTRA})") from e


def choose_fold(path: Path, fold: Optional[str], checkpoint: str) -> str:
    """``--teacher-fold``, or the only fold that holds ``checkpoint``.

    Raises:
        MedkdError: the fold (or checkpoint) is missing, or several folds exist and none was chosen; the line lists
            the folds that exist.
    """
    have = folds(path, checkpoint)
    any_fold = sorted(p.name[len("fold_"):] for p in Path(path).glob("fold_*") if p.is_dir())
    if fold is None:
        if len(have) > 1:
            raise MedkdError(f"{path}: {len(have)} folds hold {checkpoint}: choose one with --teacher-fold "
                             f"({', '.join(have)})")
        if have:
            return have[0]
        if len(any_fold) != 1:
            raise MedkdError(f"{path}: no fold holds {checkpoint} (--teacher-checkpoint); fold folders: "
                             f"{', '.join(any_fold) or 'none'}")
        fold = any_fold[0]  # the one fold: say what it holds
    fold = str(fold)
    if fold in have:
        return fold
    if fold in any_fold:
        present = sorted(p.name for p in (Path(path) / f"fold_{fold}").glob("*.pth"))
        raise MedkdError(f"{path / f'fold_{fold}' / checkpoint}: checkpoint not found (--teacher-checkpoint; "
                         f"fold_{fold} has: {', '.join(present) or 'no .pth file'})")
    raise MedkdError(f"{path}: --teacher-fold {fold}: no fold_{fold} with {checkpoint}; folds with it: "
                     f"{', '.join(have) or 'none'}")


def _checkpoint_globals() -> List[Any]:
    """The non-tensor types an nnU-Net checkpoint holds (numpy scalars in its training log), allowed by name when
    loading it weights-only."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import scalar
    return [np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64)),
            (scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar")]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (nnU-Net's own ``weights_only=False`` too) loads weights-only: tensors, plain
    values and :func:`_checkpoint_globals`, so a model folder is data and never code."""
    old = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with (torch.serialization.safe_globals(_checkpoint_globals()) if torch_at_least(2, 6)
              else contextlib.nullcontext()):
            yield
    finally:
        if old is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = old


def read_checkpoint(file: Path) -> Dict[str, Any]:
    """An nnU-Net checkpoint, loaded weights-only (:func:`weights_only_loads`).

    Raises:
        MedkdError: the file is not a checkpoint that loads weights-only, or lacks nnU-Net's keys.
    """
    try:
        with weights_only_loads():
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure is one line)
        m = re.search(r"(Unsupported global: GLOBAL \S+)", str(e))
        reason = m.group(1) if m else _first_line(str(e))
        raise MedkdError(f"{file}: refused, not a checkpoint medkd can load weights-only ({reason[:160]}): loading "
                         f"a pickled object can run code") from None
    keys = ("network_weights", "trainer_name", "init_args")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt["init_args"], dict):
        raise MedkdError(f"{file}: not an nnU-Net v2 checkpoint (no {', '.join(missing or ['init_args'])})")
    return ckpt


def init_predictor(path: Path, fold: str, checkpoint: str) -> Tuple[Any, str]:
    """``nnUNetPredictor`` initialised from the model folder (on the CPU; the distillation moves the network),
    and the checkpoint's configuration.

    Raises:
        MedkdError: plans without the checkpoint's configuration, a checkpoint whose weights do not fit the network
            the plans describe, or a trainer class nnU-Net cannot find: one line each.
    """
    import json

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    file = path / f"fold_{fold}" / checkpoint
    ckpt = read_checkpoint(file)
    configuration = str(ckpt["init_args"].get("configuration"))
    plans = json.loads((path / PLANS).read_text())
    available = sorted((plans.get("configurations") or {}).keys())
    if configuration not in available:
        raise MedkdError(f"{path / PLANS}: no configuration {configuration!r} (the checkpoint's); the plans have "
                         f"{', '.join(available) or 'none'}")
    try:
        with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints; --json owns stdout
            predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(path), (fold,), checkpoint)
    except RuntimeError as e:
        text = str(e)
        if "state_dict" in text:
            raise MedkdError(f"{file}: its weights do not fit the network its plans describe (trainer "
                             f"{ckpt['trainer_name']}, configuration {configuration}: {_mismatch(text)})") from e
        hint = ("; nnunetv2 imports its trainer modules to find the class, and torchvision does not load beside this "
                "torch: install the torchvision build made for it") if "torchvision" in text else ""
        raise MedkdError(f"{path}: nnU-Net could not build trainer {ckpt['trainer_name']}'s network "
                         f"({_first_line(text)}{hint})") from e
    except Exception as e:  # noqa: BLE001  (nnU-Net's other failures: one line, never a traceback)
        raise MedkdError(f"{path}: nnU-Net could not load fold {fold} ({type(e).__name__}: "
                         f"{_first_line(str(e))})") from e
    return predictor, configuration


def _mismatch(text: str) -> str:
    """The first difference torch's ``load_state_dict`` error names, shortened to one phrase."""
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                  r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if m:
        n = text.count("size mismatch for")
        more = f" (+{n - 1} more)" if n > 1 else ""
        return f"{m.group(1)} is {m.group(2)} in the checkpoint, {m.group(3)} in the network{more}"
    m = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: ([^\n]*)", text)
    if m:
        return f"{m.group(1).lower()} keys {m.group(2)[:120]}"
    return _first_line(text)


def _first_line(text: str) -> str:
    """The first non-empty line of a (torch, nnU-Net) error message, shortened (:func:`medkd.options.short_text`)."""
    lines = [s for s in str(text).strip().splitlines() if s.strip()]
    return short_text(lines[0] if lines else "no reason given", 200)


# ------------------------------------------------------------------------------------------- slices of a 2d model
def slice_orientation(data: Any, transpose_forward: Sequence[int]) -> Tuple[Tuple[bool, bool], bool]:
    """How a prepared slice ``(..., X, Y)`` (canonical RAS) becomes nnU-Net's ``2d`` slice.

    nnU-Net reads a file's voxels as SimpleITK does, an array ``(z, y, x)`` in the file's own voxel order, and a
    ``2d`` configuration slices it along ``transpose_forward[0]``, the remaining two axes in that order. medkd's
    prepared slices are axial in RAS orientation. Both are the same slices when the file's third voxel axis is the
    superior-inferior one and nnU-Net slices along it; the in-plane axes then differ by flips and a transpose.

    Returns:
        ``((flip_X, flip_Y), transpose)``: flip the prepared slice's axes, then swap them.

    Raises:
        MedkdError: nnU-Net slices another axis, or the cases are not all oriented alike.
    """
    import nibabel as nib

    if int(transpose_forward[0]) != 0:
        axis = "zyx"[int(transpose_forward[0])]
        raise MedkdError(f"its 2d configuration slices along the files' {axis} axis (plans' transpose_forward "
                         f"{list(transpose_forward)}: nnU-Net slices across the largest spacing), but medkd's prepared "
                         f"slices are axial; use a model whose 2d slices are axial, or its probabilities "
                         f"(--teacher-probs)")
    found = set()
    for case in data.cases:
        ornt = nib.orientations.io_orientation(np.asarray(case["affine"], dtype=float))
        if int(ornt[2, 0]) != 2:
            raise MedkdError(f"case {case['id']}: its file's third voxel axis is not superior-inferior, so nnU-Net's "
                             f"2d slices are not medkd's axial slices")
        flips = tuple(bool(ornt[[i for i in (0, 1) if int(ornt[i, 0]) == k][0], 1] < 0) for k in (0, 1))
        swapped = int(ornt[0, 0]) == 1  # the file's x axis is the canonical Y axis
        # canonical (X, Y) -> the file's (x, y) [swap when swapped] -> SimpleITK's (y, x) [swap] ->
        # transpose_forward's in-plane order (1, 2) = (y, x) as it is, (2, 1) swaps back
        transpose = swapped ^ True ^ (list(transpose_forward[1:]) == [2, 1])
        found.add((flips, transpose))
    if len(found) != 1:
        raise MedkdError(f"the cases' files are oriented differently ({len(found)} ways): one nnU-Net 2d teacher "
                         f"needs one slice orientation per dataset")
    return found.pop()


class NnunetIntensity:
    """Prepared values ``(B, C, S, S)`` -> what nnU-Net's network expects: Hounsfield units (the dataset's CT
    window; values outside it were clipped at preprocessing and stay clipped) through nnU-Net's own normalisation
    class of each channel, run on each slice (an image-statistics scheme such as ``ZScoreNormalization`` sees one
    slice, not nnU-Net's whole volume; ``CTNormalization`` uses the plans' fixed statistics, exactly as nnU-Net).
    """

    def __init__(self, normalizers: Sequence[Any], window: Optional[Tuple[float, float]]):
        self.normalizers = list(normalizers)
        self.window = window

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach().float().cpu().numpy()
        if self.window is not None:
            lo, hi = self.window
            v = v * (hi - lo) + lo
        out = np.empty_like(v, dtype=np.float32)
        for b in range(v.shape[0]):
            for c in range(v.shape[1]):
                norm = self.normalizers[min(c, len(self.normalizers) - 1)]
                out[b, c] = norm.run(v[b, c].copy(), None)
        return torch.from_numpy(out).to(x.device)


def normalizers(predictor: Any, window: Optional[Tuple[float, float]], what: str) -> List[Any]:
    """nnU-Net's normalisation objects of each input channel, as its ``DefaultPreprocessor`` builds them.

    Raises:
        MedkdError: a scheme that needs source intensities (``CTNormalization``) on data whose cases were
            normalised each with their own rule (MR percentiles), or a scheme nnU-Net cannot find.
    """
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cm = predictor.configuration_manager
    props = predictor.plans_manager.foreground_intensity_properties_per_channel
    out = []
    for c, scheme in enumerate(cm.normalization_schemes):
        cls = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "preprocessing" / "normalization"),
                                          scheme, "nnunetv2.preprocessing.normalization")
        if cls is None:
            raise MedkdError(f"{what}: nnU-Net has no normalisation scheme {scheme!r}")
        if window is None and scheme not in ("ZScoreNormalization", "RescaleTo01Normalization"):
            raise MedkdError(f"{what}: its {scheme} needs the source intensities, but the prepared cases were "
                             f"normalised each with their own rule (MR percentiles)")
        out.append(cls(use_mask_for_norm=bool(cm.use_mask_for_norm[c]),
                       intensityproperties=props.get(str(c), {})))
    return out


class OrientedNetwork(nn.Module):
    """nnU-Net's network on prepared-orientation slices: flip/transpose in, the same back out."""

    def __init__(self, network: nn.Module, flips: Tuple[bool, bool], transpose: bool):
        super().__init__()
        self.network = network
        self.flips = [d for d, f in zip((-2, -1), flips) if f]
        self.transpose = bool(transpose)

    def _to_nnunet(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flip(x, self.flips) if self.flips else x
        return x.transpose(-2, -1) if self.transpose else x

    def _from_nnunet(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(-2, -1) if self.transpose else x
        return torch.flip(x, self.flips) if self.flips else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(self._to_nnunet(x))
        out = out[0] if isinstance(out, (tuple, list)) else out  # deep supervision: the full-resolution output
        return self._from_nnunet(out)


class NnunetSlices(BridgedTeacher):
    """An nnU-Net ``2d`` network answering like a medkd teacher (module docstring); taps are paths in nnU-Net's
    network (``encoder.stages.2``)."""

    tap_prefix = "net.network."


def network_stride(predictor: Any) -> int:
    """The product of the network's in-plane strides: its input size must be a multiple of it."""
    kwargs = predictor.configuration_manager.network_arch_init_kwargs or {}
    strides = kwargs.get("strides") or [[1, 1]]
    total = 1
    for s in strides:
        total *= int(max(s if isinstance(s, (list, tuple)) else [s]))
    return total


def build_2d_module(predictor: Any, request: TeacherRequest, data: Any, what: str) -> Tuple[NnunetSlices, Dict]:
    """The prepared-slice module of a ``2d`` nnU-Net and the facts it was built from."""
    channels = len(predictor.dataset_json.get("channel_names") or predictor.dataset_json.get("modality") or {})
    if channels != request.in_channels:
        raise MedkdError(f"{what}: nnU-Net takes {channels} input channel(s), distill config has "
                         f"in_channels={request.in_channels}")
    label, classes, layout = _label_and_classes(predictor, request, what)
    window = dataset_window(data)
    intensity = NnunetIntensity(normalizers(predictor, window, what), window)
    try:
        flips, transpose = slice_orientation(data, predictor.plans_manager.transpose_forward)
    except MedkdError as e:
        raise MedkdError(f"{what}: {e}") from None
    spacing = [float(s) for s in predictor.configuration_manager.spacing]  # nnU-Net's slice axes, its order
    prepared = median_prepared_spacing(data)  # canonical (X, Y)
    prepared = prepared[::-1] if transpose else prepared
    input_size = size_for_spacing(prepared, data.size, spacing, multiple=network_stride(predictor))
    net = OrientedNetwork(predictor.network, flips, transpose)
    module = NnunetSlices(net, request.in_channels, data.size, intensity, input_size, layout, label,
                          net_channels=channels)
    facts = {"label": label, "classes": classes, "layout": layout, "input_size": input_size,
             "spacing": spacing, "normalization": list(predictor.configuration_manager.normalization_schemes),
             "orientation": {"flip": list(flips), "transpose": transpose}}
    return module, facts


# ------------------------------------------------------------------------------------------ cases of a 3-D model
def _label_and_classes(predictor: Any, request: TeacherRequest, what: str) -> Tuple[int, Dict[int, str], str]:
    lm = predictor.label_manager
    layout = "sigmoid" if lm.has_regions else "softmax"
    classes = {int(v): str(k) for k, v in (predictor.dataset_json.get("labels") or {}).items()
               if isinstance(v, int) and v > 0}
    return choose_label(layout, lm.num_segmentation_heads, request.label, classes, what), classes, layout


def per_case_probs(predictor: Any, request: TeacherRequest, data: Any,
                   what: str) -> Tuple[Callable[[str], np.ndarray], Dict[str, Any]]:
    """``case_probs(case id) -> (n_slices, S, S)`` float32 in [0, 1] of a 3-D nnU-Net, and the facts recorded.

    Each call reads the case's source image (medkd's reader: the voxel grid of the manifest's ``shape`` and
    ``affine``), runs nnU-Net's preprocessing and sliding-window prediction on it (``predict_single_npy_array``:
    the array in nnU-Net's ``(C, z, y, x)`` order with its spacing) and brings the probability of the chosen class
    to the prepared slices by :func:`medkd.data.recipe.prepared_slices` (as labels and ``--teacher-probs``).

    Raises:
        MedkdError: a multi-channel model (medkd's cases have one image), a multi-class model without
            ``--teacher-label``.
    """
    from medkd.data.io import read_volume
    from medkd.data.recipe import prepared_slices
    from medkd.errors import DataError
    from medkd.infer import resolve_device
    from medkd.teachers.probs import check_probabilities, source_grid

    channels = len(predictor.dataset_json.get("channel_names") or {})
    if channels != 1:
        raise MedkdError(f"{what}: a 3-D nnU-Net of {channels} input channels; medkd's cases have one image each")
    label, classes, layout = _label_and_classes(predictor, request, what)
    device = resolve_device(request.device)
    predictor.device = device
    predictor.perform_everything_on_device = device.type == "cuda"
    predictor.network.to(device)

    def case_probs(case_id: str) -> np.ndarray:
        case = data.case(case_id)
        vol = read_volume(Path(case["source"]))
        shape, affine = source_grid(data, case_id)
        if tuple(vol.array.shape) != tuple(shape):
            raise DataError(f"{case['source']}: case {case_id!r}: image of shape {tuple(vol.array.shape)}, the "
                            f"manifest says {tuple(shape)} (was the dataset prepared from another image?)")
        image = np.ascontiguousarray(vol.array.transpose(2, 1, 0)[None], dtype=np.float32)  # (1, z, y, x)
        spacing = [float(v) for v in vol.spacing[::-1]]
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            _, probs = predictor.predict_single_npy_array(image, {"spacing": spacing}, None, None, True)
        p = np.asarray(probs[label], dtype=np.float32).transpose(2, 1, 0)  # back to the source's (x, y, z)
        p = check_probabilities(p, Path(case["source"]), case_id)
        out = np.clip(prepared_slices(p, affine, data.size, is_label=False), 0.0, 1.0)
        want = data.expected_shape(case_id, "lbl")
        if tuple(out.shape) != tuple(want):
            raise DataError(f"{case['source']}: case {case_id!r}: gives {tuple(out.shape)} slices, the prepared "
                            f"case has {tuple(want)}")
        return out

    facts = {"label": label, "classes": classes, "layout": layout, "per_case": "nnU-Net sliding window",
             "spacing": [float(s) for s in predictor.configuration_manager.spacing],
             "patch_size": [int(v) for v in predictor.configuration_manager.patch_size]}
    return case_probs, facts


def load(path: Path, request: TeacherRequest, data: Any) -> LoadedTeacher:
    """Load an nnU-Net v2 trained model folder as a teacher of the prepared dataset ``data``.

    Raises:
        MedkdError: nnunetv2 not installed, missing fold or checkpoint, plans without the configuration, weights of
            another architecture, a multi-class model without ``--teacher-label``, ``--teacher-taps`` on a 3-D model,
            slices nnU-Net cuts otherwise than medkd: one line each.
    """
    path = Path(path)
    _require_nnunet(path)
    checkpoint = request.checkpoint or CHECKPOINT
    fold = choose_fold(path, request.fold, checkpoint)
    predictor, configuration = init_predictor(path, fold, checkpoint)
    what = str(path)
    ckpt_file = path / f"fold_{fold}" / checkpoint
    files = hash_files(path, [path / PLANS, path / DATASET, ckpt_file])
    base = {"fold": fold, "checkpoint": checkpoint, "configuration": configuration, "trainer": predictor.trainer_name}
    if len(predictor.configuration_manager.patch_size) != 2:
        case_probs, facts = per_case_probs(predictor, request, data, what)
        if request.taps:
            raise MedkdError(f"{what}: --teacher-taps: a {configuration} nnU-Net teacher gives per-case "
                             f"probabilities only (prediction-map terms), no modules to tap")
        details = {**base, **facts}  # the store of its per-case outputs (medkd.distill.case_store) lives here
        return LoadedTeacher(kind=KIND, source=path, module=None, in_channels=request.in_channels, files=files,
                             details=details, taps_ok=False, default_taps=None, cache_key_file=None,
                             cache_root=external_cache_root(Path(data.root), KIND, files, details),
                             case_probs=case_probs)
    module, facts = build_2d_module(predictor, request, data, what)
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    details = {**base, **facts}
    return LoadedTeacher(kind=KIND, source=path, module=module, in_channels=request.in_channels, files=files,
                         details=details, taps_ok=True, default_taps=None, cache_key_file=ckpt_file,
                         cache_root=external_cache_root(Path(data.root), KIND, files, details))


register_kind(KIND, detect, load, EXPECTS)
