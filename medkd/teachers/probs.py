"""A teacher given as data: ``--teacher-probs DIR``, per-case foreground probabilities saved by a model the user
already ran (a 3-D nnU-Net, any other pipeline).

Files in ``DIR``, named by case id (the prepared dataset's ``manifest.json``), in the **source image's voxel grid**
(the case's ``source``, with its ``shape`` and ``affine`` in the manifest):

* ``<case>.npz`` with ``probabilities`` ``(K, Z, Y, X)``: what ``nnUNetv2_predict --save_probabilities`` writes,
  in the axis order of nnU-Net's default (SimpleITK) reader, i.e. the source volume's ``(X, Y, Z)`` reversed. Read
  with ``allow_pickle=False``; the ``<case>.pkl`` beside it is never unpickled (a pickle runs code): the grid comes
  from the manifest, and only the shape can be checked.
* ``<case>.nii.gz`` (or ``.nii``): a 3-D foreground probability, or a 4-D ``(X, Y, Z, K)`` stack of K class
  probabilities; its shape and affine must equal the source image's.

When both exist the ``.npz`` is read: nnU-Net writes its argmax mask as ``<case>.nii.gz`` beside it.

Channels: one channel is the foreground probability; with two, channel 1 is the foreground (nnU-Net's softmax:
channel 0 is the background); with more, ``--teacher-label N`` picks the student's foreground class (without it,
one error line lists the classes).

Each case's probability reaches its prepared slice grid through :func:`medkd.data.recipe.prepared_slices`, the
function that brings its label there (orientation, axial rows, in-plane resize; bilinear for probabilities,
nearest for labels), so probabilities equal to the one-hot label serve the label's targets.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from medkd.data.io import read_nifti
from medkd.data.preprocess import check_affine
from medkd.data.prepared import PreparedData
from medkd.data.recipe import prepared_slices
from medkd.errors import DataError, MedkdError
from medkd.rundir import case_file
from medkd.teachers import register_kind
from medkd.teachers.base import LoadedTeacher, TeacherRequest, hash_files, reject_options

#: file suffixes read, in order of preference (nnU-Net writes its mask ``<case>.nii.gz`` beside ``<case>.npz``)
SUFFIXES = (".npz", ".nii.gz", ".nii")
#: how far outside [0, 1] a stored probability may lie (rounding of fp16 files) before it is refused
PROB_ATOL = 1e-3
NPZ_KEY = "probabilities"


def probs_file(directory: Path, case_id: str) -> Path:
    """The file holding ``case_id``'s probabilities in ``directory`` (see :data:`SUFFIXES`).

    Raises:
        DataError: none of ``<case>.npz``, ``<case>.nii.gz``, ``<case>.nii`` is there.
    """
    path = case_file(directory, case_id, SUFFIXES)
    if path is not None:
        return path
    raise DataError(f"{directory}: no probabilities for case {case_id!r} (expected {case_id}.npz or "
                    f"{case_id}.nii.gz)")


def source_grid(data: PreparedData, case_id: str) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The case's source image grid from the manifest: ``(shape (X, Y, Z), affine 4x4)``.

    Raises:
        DataError: the manifest entry has no usable ``shape``/``affine`` (naming manifest.json).
    """
    c = data.case(case_id)
    try:
        shape = tuple(int(v) for v in c["shape"])
        affine = np.asarray(c["affine"], dtype=np.float64)
        ok = len(shape) == 3 and affine.shape == (4, 4) and bool(np.all(np.isfinite(affine)))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{data.root / 'manifest.json'}: case {case_id!r} has no valid source 'shape' and 'affine'")
    return shape, affine  # type: ignore[return-value]


def foreground_channel(k: int, label: Optional[int], path: Path) -> int:
    """Which of ``k`` channels is the student's foreground (see the module docstring).

    Raises:
        MedkdError: ``label`` out of range, or more than two classes and no ``label``.
    """
    if label is not None and not (0 <= label < max(k, 2)):
        raise MedkdError(f"{path}: --teacher-label {label} is not a class of this volume (classes 0-{max(k, 2) - 1})")
    if k == 1:
        if label == 0:
            raise MedkdError(f"{path}: holds one foreground probability; --teacher-label 0 (the background) "
                             f"cannot be the student's foreground")
        return 0
    if label is None:
        if k == 2:
            return 1
        raise MedkdError(f"{path}: {k} classes (channels 0-{k - 1}; channel 0 is the background in nnU-Net's "
                         f"output): choose the student's foreground class with --teacher-label N")
    return label


def _read_npz(path: Path, shape: Tuple[int, int, int], label: Optional[int], case_id: str) -> np.ndarray:
    """The foreground channel ``(X, Y, Z)`` of an nnU-Net ``.npz``'s ``probabilities (K, Z, Y, X)``.

    The array's header is checked (shape of the source image, numeric type: an object array, which needs pickle,
    is refused) before any data is read, and only the chosen channel is decoded (a teacher of 100 classes on a CT
    volume holds gigabytes of probabilities; one channel is what the student needs).
    """
    want = (shape[2], shape[1], shape[0])  # SimpleITK order: (Z, Y, X)
    member = f"{NPZ_KEY}.npy"
    try:
        with zipfile.ZipFile(path) as zf:
            if member not in zf.namelist():
                keys = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy")) or "none"
                raise DataError(f"{path}: case {case_id!r}: no {NPZ_KEY!r} array (has {keys}; expected nnU-Net's "
                                f"--save_probabilities output)")
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                stored, fortran, dtype = header(f)
                if len(stored) != 4 or tuple(stored[1:]) != want:
                    raise DataError(f"{path}: case {case_id!r}: probabilities of shape {tuple(stored)} do not match "
                                    f"the source image (expected (K, {', '.join(map(str, want))}): (K, Z, Y, X) of "
                                    f"its {shape[0]}x{shape[1]}x{shape[2]} voxels)")
                _check_dtype(dtype, path, case_id)
                channel = foreground_channel(int(stored[0]), label, path)
                if fortran:  # not what nnU-Net writes: decode the whole (size-checked) array
                    with np.load(path, allow_pickle=False) as npz:
                        return npz[NPZ_KEY][channel].transpose(2, 1, 0)
                n_bytes = int(np.prod(want)) * dtype.itemsize
                f.seek(channel * n_bytes, io.SEEK_CUR)
                data = f.read(n_bytes)
    except MedkdError:
        raise
    except Exception as e:  # a zip/npy fault (bad zip, bad header, truncated member)
        raise DataError(f"{path}: case {case_id!r}: cannot read probabilities ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]})") from None
    if len(data) != n_bytes:
        raise DataError(f"{path}: case {case_id!r}: probabilities are truncated (channel {channel} has "
                        f"{len(data)} of {n_bytes} bytes)")
    return np.frombuffer(data, dtype).reshape(want).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)


def _read_nifti(path: Path, shape: Tuple[int, int, int], affine: np.ndarray, label: Optional[int],
                case_id: str) -> np.ndarray:
    """A 3-D probability or a 4-D ``(X, Y, Z, K)`` stack in the source grid -> the foreground ``(X, Y, Z)``."""
    import nibabel as nib

    try:  # the header's shape, before any voxel is read
        stored = tuple(nib.load(str(path)).shape)
    except Exception:
        stored = None  # read_nifti names what is wrong with the file
    if stored is not None and tuple(stored[:3]) != tuple(shape):
        raise DataError(f"{path}: case {case_id!r}: probability volume of shape {stored} does not match the source "
                        f"image's {tuple(shape)} (save it in the source image's voxel grid)")
    vol = read_nifti(path, channels=True)
    arr = vol.array
    if tuple(arr.shape[:3]) != tuple(shape):
        raise DataError(f"{path}: case {case_id!r}: probability volume of shape {tuple(arr.shape)} does not match "
                        f"the source image's {tuple(shape)} (save it in the source image's voxel grid)")
    check_affine(vol.affine, affine, f"{path}: case {case_id!r}: affine differs from the source image's",
                 "save the probabilities in the source image's voxel grid")
    _check_dtype(arr.dtype, path, case_id)
    if arr.ndim == 3:
        foreground_channel(1, label, path)  # the label must suit one foreground probability
        return arr
    return arr[..., foreground_channel(arr.shape[3], label, path)]


def _check_dtype(dtype: np.dtype, path: Path, case_id: str) -> None:
    if np.dtype(dtype).kind not in "biuf":
        raise DataError(f"{path}: case {case_id!r}: unsupported value type {dtype} (expected probabilities)")


def check_probabilities(p: np.ndarray, path: Path, case_id: str) -> np.ndarray:
    """``p`` as float32 clipped to [0, 1], after checking it holds probabilities.

    Raises:
        DataError: a NaN/inf value, or values outside [0, 1] by more than :data:`PROB_ATOL` (logits or a label
            map are not probabilities), naming the file and the case.
    """
    p = np.asarray(p, dtype=np.float32)
    finite = np.isfinite(p)
    if not finite.all():
        raise DataError(f"{path}: case {case_id!r}: {int(p.size - finite.sum())} NaN/inf value(s)")
    lo, hi = float(p.min()), float(p.max())
    if lo < -PROB_ATOL or hi > 1 + PROB_ATOL:
        raise DataError(f"{path}: case {case_id!r}: values in [{lo:g}, {hi:g}], not probabilities in [0, 1] "
                        f"(logits or a label map?)")
    return np.clip(p, 0.0, 1.0)


def source_probs(path: Path, data: PreparedData, case_id: str, label: Optional[int]) -> np.ndarray:
    """The case's foreground probability in its source grid, ``(X, Y, Z)`` float32 in [0, 1], checked.

    Raises:
        DataError/MedkdError: one line naming the file and the case (shape or grid of another image, not
            probabilities, unreadable, no foreground class chosen).
    """
    shape, affine = source_grid(data, case_id)
    if path.name.endswith(".npz"):
        p = _read_npz(path, shape, label, case_id)
    else:
        p = _read_nifti(path, shape, affine, label, case_id)
    return check_probabilities(p, path, case_id)


def prepared_probs(directory: Path, data: PreparedData, case_id: str, label: Optional[int]) -> np.ndarray:
    """The case's foreground probability on its prepared slice grid: ``(n_slices, S, S)`` float32 in [0, 1].

    Raises:
        DataError/MedkdError: a missing or bad file (see :func:`probs_file`, :func:`source_probs`).
    """
    path = probs_file(directory, case_id)
    p = source_probs(path, data, case_id, label)
    _, affine = source_grid(data, case_id)
    out = np.clip(prepared_slices(p, affine, data.size, is_label=False), 0.0, 1.0)  # (Z, S, S)
    want = data.expected_shape(case_id, "lbl")
    if tuple(out.shape) != tuple(want):
        raise DataError(f"{path}: case {case_id!r}: gives {tuple(out.shape)} slices, the prepared case has "
                        f"{tuple(want)} (was the dataset prepared from another image?)")
    return out


# ---------------------------------------------------------------------------------------------------- the kind
KIND = "probs"
EXPECTS = "--teacher-probs DIR: a folder of <case>.npz (nnU-Net --save_probabilities) or <case>.nii.gz files"


def detect(path: Path) -> bool:
    """Never from ``--teacher``: saved probabilities are given with ``--teacher-probs DIR`` (a folder of
    predictions beside their masks would be ambiguous). Registered so that an unrecognised ``--teacher`` path is
    told where probabilities go."""
    return False


def load(path: Path, request: TeacherRequest, data: PreparedData) -> LoadedTeacher:
    """``--teacher-probs DIR`` as a :class:`~medkd.teachers.base.LoadedTeacher` whose ``case_probs`` reads a
    case's file on demand (:func:`prepared_probs`); no module (prediction-map terms only), no disk cache (the files
    are the stored outputs).

    ``files`` holds the SHA-256 of the file of every train case in ``DIR`` (a case without a file fails when a
    run reads it, naming the case).

    Raises:
        MedkdError: ``--teacher-fold``/``--teacher-checkpoint``/``--teacher-taps`` given (nothing here for them),
            ``DIR`` is not a folder, or holds no file for any train case.
    """
    directory = Path(path)
    reject_options(directory, KIND, request, ("fold", "checkpoint", "taps"))
    if not directory.is_dir():
        raise MedkdError(f"{directory}: --teacher-probs must be a folder of per-case probability files "
                         f"(<case>.npz or <case>.nii.gz)")
    found = {}
    for cid in data.case_ids("train"):
        try:
            found[cid] = probs_file(directory, cid)
        except DataError:
            continue
    if not found:
        raise MedkdError(f"{directory}: no probability file for any train case of {data.root} (expected "
                         f"<case>.npz or <case>.nii.gz named by the manifest's case ids, e.g. "
                         f"{data.case_ids('train')[0] if data.case_ids('train') else 'case_000'}.npz)")
    formats = sorted({"npz" if p.name.endswith(".npz") else "nifti" for p in found.values()})
    label = request.label

    def case_probs(case_id: str) -> np.ndarray:
        return prepared_probs(directory, data, case_id, label)

    return LoadedTeacher(kind=KIND, source=directory, module=None, in_channels=int(request.in_channels),
                         files=hash_files(directory, found.values()),
                         details={"format": ",".join(formats), "train_cases": len(found),
                                  **({"label": label} if label is not None else {})},
                         taps_ok=False, default_taps=None, cache_key_file=None, cache_root=None,
                         case_probs=case_probs)


register_kind(KIND, detect, load, EXPECTS)
