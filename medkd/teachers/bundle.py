"""MONAI bundles as teachers: ``--teacher BUNDLE`` where ``BUNDLE/configs/inference.json`` (or ``.yaml``) declares
``network_def`` and ``BUNDLE/models/model.pt`` holds its weights, or ``BUNDLE/models/model.ts`` is its TorchScript.

What is read, and how far it is trusted:

* ``configs/metadata.json`` (plain JSON): the input's channels and spatial shape, the output's channels and their
  names (``network_data_format``);
* ``configs/inference.json``: read as **data**. ``network_def`` is instantiated through :mod:`monai.bundle`
  (:class:`~monai.bundle.ConfigParser`) only after it is checked to hold literal values, ``@id`` references to
  literal values and ``_target_`` names that resolve to :class:`torch.nn.Module` classes of ``monai.networks`` or
  ``torch.nn`` (looked up without being called, every nested one too, and rewritten to the class's full name, so
  ``monai.networks.nets.hovernet.os.system`` or ``monai.networks.utils.save_state`` never pass by their prefix),
  with no argument that makes the network download or read weights of its own (``pretrained``, a URL, a checkpoint
  path: :data:`FETCH_ARGS`): a ``$`` expression (Python run by ``eval``), a ``%`` macro, ``_mode_``/``_requires_``
  keys or any other target are refused with one line naming the key. The ``preprocessing`` transforms are read the
  same way, never instantiated from the file: the intensity transforms medkd can reproduce
  (``ScaleIntensityRanged``, ``NormalizeIntensityd``), the in-plane geometry (``Spacingd`` ``pixdim``, ``Resized``
  ``spatial_size``), ``Orientationd`` with RAS axes (medkd's slices are RAS) and transforms that do not change values
  (loading, channel-first, type) are understood; any other is one line naming its key, e.g.
  ``preprocessing#transforms#3 (CropForegroundd)``. The postprocessing's ``Activationsd`` says whether the output
  is a softmax or sigmoid;
* **the override**: a sidecar beside the bundle folder, ``BUNDLE.json`` (or ``.yaml``), says the preprocessing
  instead, when the bundle's cannot be reproduced (:func:`read_override`): ``intensity`` as for a model file's
  sidecar (``{"normalise": "window", "low": -100, "high": 200}``: :class:`~medkd.teachers.bridge.Intensity`) and
  optionally ``spacing`` (in-plane mm) or ``size``. Its preprocessing section is then not read at all;
* ``models/model.pt``: loaded **weights-only** (``torch.load(..., weights_only=True)``, no pickled code) into the
  network and checked to fit it exactly;
* ``models/model.ts`` (used when ``network_def`` is absent): loaded with :func:`torch.jit.load`. **This is a trust
  decision**: a TorchScript file is a program (its graph runs whatever operators it names, file I/O included), not
  weights; medkd loads it as it loads a ``.ts`` given to ``medkd predict``. Give only TorchScript you trust.

The teacher runs on prepared 2-D slices. A 3-D bundle (``spatial_dims`` 3) is refused with one line: run it once
per case in MONAI and give its probabilities with ``--teacher-probs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from medkd.errors import MedkdError
from medkd.exported import load_torchscript, short_error
from medkd.options import check_int, check_size

KIND = "bundle"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
METADATA = "configs/metadata.json"
WEIGHTS = "models/model.pt"
TORCHSCRIPT = "models/model.ts"
#: Packages a ``network_def`` (and its nested components) may name a ``torch.nn.Module`` class of.
ALLOWED_TARGETS = ("monai.networks.", "torch.nn.")
#: Constructor arguments by which a MONAI network downloads or reads weights of its own (``pretrained=True``, a URL,
#: a hub id, a checkpoint path): a bundle's weights come from ``models/model.pt`` only, so each must be unset.
FETCH_ARGS = ("pretrained", "pretrained_url", "weights", "checkpoint", "path_or_repo_id", "filename")
#: Config keys of a component that MONAI interprets besides its arguments; only these two are data.
COMPONENT_KEYS = ("_target_", "_desc_")
#: Preprocessing transforms that do not change the values the network sees (beyond loading and layout).
NEUTRAL = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToNumpy", "CastToType",
           "ToDevice", "Identity", "SaveImage", "CopyItems", "DeleteItems", "SelectItems"}
#: Intensity transforms medkd reproduces (array form; ``...d`` names map here) -> arguments it reads.
INTENSITY = {"ScaleIntensityRange": ("a_min", "a_max", "b_min", "b_max", "clip"),
             "NormalizeIntensity": ("subtrahend", "divisor", "nonzero", "channel_wise")}
#: Geometric transforms medkd reproduces (``Orientation`` only with RAS axes).
GEOMETRY = ("Orientation", "Resize", "Spacing")


def detect(path: Path) -> bool:
    """A folder with ``configs/metadata.json``, an inference config or ``models/model.ts``: a MONAI bundle."""
    path = Path(path)
    if not path.is_dir():
        return False
    return ((path / METADATA).is_file() or (path / TORCHSCRIPT).is_file()
            or any((path / "configs" / n).is_file() for n in CONFIG_NAMES))


@dataclass
class BundleSpec:
    """What a bundle says about its network, read as data (:func:`read_bundle`).

    Attributes:
        root: The bundle folder.
        config_file: Its inference config (``None``: none; a TorchScript-only bundle).
        network_def: The checked ``network_def`` with references resolved (``None``: use ``model.ts``).
        weights: ``models/model.pt`` (with ``network_def``) or ``models/model.ts``.
        in_channels: Input channels (metadata, else ``network_def``).
        spatial_dims: 2 or 3.
        classes: Output channel names, channel 0 first (``channel_def``; ``class <k>`` where unnamed).
        activation: ``softmax`` (one channel per class) or ``sigmoid`` (independent channels).
        intensity: The intensity transforms in order: ``(name, {argument: literal})`` with ``name`` a key of
            :data:`INTENSITY` (array form).
        pixdim: In-plane spacing in mm the network expects (``Spacingd``), or ``None``.
        size: Fixed in-plane input size (``Resized`` or a fixed metadata ``spatial_shape``), or ``None``.
        multiple: The input size must be a multiple of this (``"16*n"`` in the metadata), 1 if free.
        files: Bundle-relative paths of every file the outputs depend on.
    """

    root: Path
    config_file: Optional[Path]
    network_def: Optional[Dict[str, Any]]
    weights: Path
    in_channels: int
    spatial_dims: int
    classes: List[str]
    activation: str
    intensity: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)
    pixdim: Optional[List[float]] = None
    size: Optional[List[int]] = None
    multiple: int = 1
    files: List[str] = field(default_factory=list)
    override: Optional[Path] = None
    override_intensity: Any = None  # the sidecar's :class:`~medkd.teachers.bridge.Intensity`

    @property
    def torchscript(self) -> bool:
        return self.network_def is None

    @property
    def network_name(self) -> str:
        return str(self.network_def["_target_"]).rsplit(".", 1)[-1] if self.network_def else "torchscript"


# ------------------------------------------------------------------------------------------------ reading


def read_bundle(root: Path) -> BundleSpec:
    """Read a bundle folder as data: its metadata, ``network_def`` (checked), preprocessing and output layout.

    Raises:
        MedkdError: one line naming the file and key: no metadata, no ``network_def`` and no ``model.ts``,
            ``network_def`` without ``models/model.pt``, an expression or a non-MONAI target in ``network_def``,
            a preprocessing transform medkd cannot reproduce, a 3-D bundle.
    """
    root = Path(root)
    meta = _read_json(root / METADATA)
    config_file = next((root / "configs" / n for n in CONFIG_NAMES if (root / "configs" / n).is_file()), None)
    config = _read_config(config_file) if config_file is not None else {}
    net = config.get("network_def")
    ts = root / TORCHSCRIPT
    if net is None and not ts.is_file():
        where = config_file or root / "configs" / CONFIG_NAMES[0]
        raise MedkdError(f"{where}: no network_def (and no {TORCHSCRIPT}): the bundle does not say which network "
                         f"to build")
    files = [METADATA]
    if net is not None:
        net = _literal(net, "network_def", config, config_file, components=True)
        _check_network(net, config_file)
        weights = root / WEIGHTS
        if not weights.is_file():
            if not ts.is_file():
                raise MedkdError(f"{weights}: not found (the weights of network_def in {config_file.name})")
            net, weights = None, ts  # network_def without weights: the bundle's TorchScript
    else:
        weights = ts
    files += [str(config_file.relative_to(root))] if config_file is not None else []
    files.append(str(weights.relative_to(root)))
    fmt = meta.get("network_data_format") or {}
    inp = _first(fmt.get("inputs"), f"{root / METADATA}: network_data_format#inputs")
    out = _first(fmt.get("outputs"), f"{root / METADATA}: network_data_format#outputs")
    spec = BundleSpec(
        root=root, config_file=config_file, network_def=net, weights=weights,
        in_channels=check_int(inp.get("num_channels", (net or {}).get("in_channels", 1)),
                              f"{root / METADATA}: network_data_format#inputs#num_channels", lo=1),
        spatial_dims=_spatial_dims(inp, net, root),
        classes=_classes(out, root),
        activation=_activation(config, config_file, out),
        files=files,
    )
    if spec.spatial_dims != 2:
        raise MedkdError(f"{root}: a {spec.spatial_dims}-D bundle; medkd runs bundles on 2-D slices: run it on each "
                         f"case in MONAI and give its probability volumes with --teacher-probs")
    spec.size, spec.multiple = _shape_rule(inp.get("spatial_shape"), root)
    override = sidecar_of(root)
    if override is not None:
        read_override(spec, override)
    else:
        _read_preprocessing(spec, config, config_file)
    return spec


#: Fields of a bundle's sidecar (:func:`read_override`).
OVERRIDE_FIELDS = ("intensity", "spacing", "size")


def sidecar_of(root: Path) -> Optional[Path]:
    """``BUNDLE.json`` / ``.yaml`` / ``.yml`` beside the bundle folder, if there is one."""
    root = Path(root).resolve()
    return next((root.parent / f"{root.name}{ext}" for ext in (".json", ".yaml", ".yml")
                 if (root.parent / f"{root.name}{ext}").is_file()), None)


def read_override(spec: BundleSpec, path: Path) -> None:
    """Set the bundle's preprocessing from its sidecar ``path``: ``intensity`` (required), ``spacing`` (in-plane
    mm: the slices are resized to it) or ``size`` (pixels).

    Raises:
        MedkdError: one line naming the sidecar and the field.
    """
    from medkd.teachers.bridge import Intensity

    doc = _read_config(path)
    unknown = sorted(set(doc) - set(OVERRIDE_FIELDS))
    if unknown:
        raise MedkdError(f"{path}: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"valid: {', '.join(OVERRIDE_FIELDS)}")
    if "intensity" not in doc:
        raise MedkdError(f"{path}: no intensity (e.g. {{\"normalise\": \"window\", \"low\": -100, \"high\": 200}})")
    if "spacing" in doc and "size" in doc:
        raise MedkdError(f"{path}: give spacing or size, not both")
    spec.override, spec.override_intensity = path, Intensity.from_doc(doc["intensity"], str(path))
    if "spacing" in doc:
        spec.pixdim, spec.size = _numbers(doc["spacing"], f"{path}: spacing", 2), None
    if "size" in doc:
        spec.size, spec.pixdim = [check_size(doc["size"], f"{path}: size")] * 2, None


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise MedkdError(f"{path}: not found (a MONAI bundle has configs/metadata.json)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MedkdError(f"{path}: unreadable JSON ({' '.join(str(e).split())[:100]})") from None
    if not isinstance(doc, dict):
        raise MedkdError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _read_config(path: Path) -> Dict[str, Any]:
    if path.suffix == ".json":
        return _read_json(path)
    from medkd.yamlfile import load_yaml

    doc = load_yaml(path)
    if not isinstance(doc, dict):
        raise MedkdError(f"{path}: expected a mapping, got {type(doc).__name__}")
    return doc


def _first(section: Any, what: str) -> Dict[str, Any]:
    """The first entry of ``inputs``/``outputs`` (``image``/``pred`` by convention)."""
    if not isinstance(section, dict) or not section or not isinstance(next(iter(section.values())), dict):
        raise MedkdError(f"{what} missing or not a mapping of named tensors")
    return next(iter(section.values()))


def _spatial_dims(inp: Dict[str, Any], net: Optional[Dict[str, Any]], root: Path) -> int:
    shape = inp.get("spatial_shape")
    if isinstance(shape, list) and shape:
        return len(shape)
    if net is not None and "spatial_dims" in net:
        return check_int(net["spatial_dims"], f"{root / 'configs'}: network_def#spatial_dims", lo=1)
    return 2


def _classes(out: Dict[str, Any], root: Path) -> List[str]:
    n = check_int(out.get("num_channels", 1), f"{root / METADATA}: network_data_format#outputs#num_channels", lo=1)
    names = out.get("channel_def") if isinstance(out.get("channel_def"), dict) else {}
    return [str(names.get(str(k), names.get(k, f"class {k}"))) for k in range(n)]


def _activation(config: Dict[str, Any], config_file: Optional[Path], out: Dict[str, Any]) -> str:
    """``sigmoid`` when the postprocessing's ``Activations(d)`` says so (or one output channel), else ``softmax``."""
    for key, item in _transforms(config.get("postprocessing"), "postprocessing"):
        if _name(item) == "Activations":
            if item.get("sigmoid") is True:
                return "sigmoid"
            if item.get("softmax") is True:
                return "softmax"
    return "sigmoid" if out.get("num_channels", 1) == 1 else "softmax"


def _shape_rule(shape: Any, root: Path) -> Tuple[Optional[List[int]], int]:
    """Metadata ``spatial_shape`` -> (fixed size or ``None``, multiple): ``[256, 256]`` fixed, ``["16*n", ...]``
    any multiple of 16, ``["*", ...]`` anything."""
    if not isinstance(shape, list) or not shape:
        return None, 1
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        return [int(v) for v in shape[:2]], 1
    multiple = 1
    for v in shape:
        text = str(v).replace(" ", "")
        if text == "*":
            continue
        if text.endswith("*n") and text[:-2].isdigit() and int(text[:-2]) > 0:
            multiple = max(multiple, int(text[:-2]))
            continue
        raise MedkdError(f"{root / METADATA}: network_data_format#inputs spatial_shape {shape!r:.60} is neither "
                         f"sizes nor 'k*n' patterns")
    return None, multiple


# ----------------------------------------------------------------------------------- config values as data


def _literal(value: Any, key: str, config: Dict[str, Any], path: Optional[Path], components: bool = False,
             depth: int = 0) -> Any:
    """``value`` with ``@id`` references replaced by the literal they name; expressions and macros refused.

    Args:
        components: nested ``{"_target_": ...}`` mappings are allowed (``network_def``); else values only.

    Raises:
        MedkdError: ``<config>: <key>: ...`` for a ``$`` expression, a ``%`` macro, a reference to nothing, an
            interpreted component key (``_mode_``, ``_requires_``, ``_disabled_``), or a component where values
            are expected.
    """
    where = f"{path}: {key}"
    if depth > 20:
        raise MedkdError(f"{where}: nested or referenced too deeply")
    if isinstance(value, str):
        if value.startswith("$"):
            raise MedkdError(f"{where}: {value!r:.60} is an expression (Python code); medkd reads bundle configs "
                             f"as data and runs none of it")
        if value.startswith("%"):
            raise MedkdError(f"{where}: {value!r:.60} is a macro (another file's content); not supported")
        if value.startswith("@"):
            return _literal(_lookup(config, value[1:], where), value[1:], config, path, components, depth + 1)
        return value
    if isinstance(value, list):
        return [_literal(v, f"{key}#{i}", config, path, components, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        special = [k for k in value if isinstance(k, str) and k.startswith("_") and k.endswith("_")]
        bad = [k for k in special if k not in COMPONENT_KEYS or not components]
        if bad:
            raise MedkdError(f"{where}: {bad[0]!r} is not read as data (medkd builds only plain MONAI networks "
                             f"from a bundle config)")
        return {k: _literal(v, f"{key}#{k}", config, path, components, depth + 1) for k, v in value.items()}
    return value


def _lookup(config: Dict[str, Any], ref: str, where: str) -> Any:
    """The config item ``a#b#0`` names."""
    item: Any = config
    for part in ref.split("#"):
        if isinstance(item, dict) and part in item:
            item = item[part]
        elif isinstance(item, list) and part.isdigit() and int(part) < len(item):
            item = item[int(part)]
        else:
            raise MedkdError(f"{where}: reference @{ref} names nothing in the config")
    return item


def _check_network(net: Any, path: Optional[Path], key: str = "network_def") -> None:
    """Every ``_target_`` in ``net``, nested ones included, names a :class:`torch.nn.Module` class defined in
    ``monai.networks`` or ``torch.nn`` (:func:`_resolve_target`); each is rewritten in place to that class's full
    name, so what is checked is what :class:`~monai.bundle.ConfigParser` builds."""
    if isinstance(net, list):
        for i, v in enumerate(net):
            _check_network(v, path, f"{key}#{i}")
        return
    if not isinstance(net, dict):
        return
    if key == "network_def" and "_target_" not in net:
        raise MedkdError(f"{path}: network_def has no _target_ (the network class)")
    if "_target_" in net:
        full, why = _resolve_target(net["_target_"])
        if full is None:
            raise MedkdError(f"{path}: {key}#_target_ {net['_target_']!r:.60} is not a network of monai.networks "
                             f"or torch.nn ({why}; medkd builds only those from a bundle config)")
        net["_target_"] = full
        _check_fetching(full, net, path, key)
    for k, v in net.items():
        if k not in COMPONENT_KEYS:
            _check_network(v, path, f"{key}#{k}")


def _check_fetching(full: str, args: Dict[str, Any], path: Optional[Path], key: str) -> None:
    """The network class ``full`` built with ``args`` reads no weights from elsewhere: each of its
    :data:`FETCH_ARGS` parameters, as given or by default, is unset (``None``/``false``/empty).

    Raises:
        MedkdError: ``<config>: <key>#pretrained: True would make DenseNet121 fetch or read weights ...``.
    """
    import inspect
    from pydoc import locate

    try:
        params = inspect.signature(locate(full)).parameters
    except (TypeError, ValueError):  # no signature to read: nothing to check
        return
    for name in FETCH_ARGS:
        if name not in params:
            continue
        value = args.get(name, params[name].default)
        if value is inspect.Parameter.empty or value in (None, False, "", 0):
            continue
        raise MedkdError(f"{path}: {key}#{name}: {value!r:.60} would make {full.rsplit('.', 1)[-1]} fetch or read "
                         f"weights outside the bundle{'' if name in args else ' (its default)'}; medkd loads "
                         f"{WEIGHTS} only: set {name} to null or false")


def _resolve_target(target: Any) -> Tuple[Optional[str], str]:
    """``(full name, "")`` of the :class:`torch.nn.Module` class a ``_target_`` names, or ``(None, why not)``.

    The name is looked up, never called, the way MONAI looks it up (a short name through
    :class:`~monai.bundle.ComponentLocator`, then :func:`pydoc.locate`), but only after it is seen to lie under
    :data:`ALLOWED_TARGETS`, so nothing outside MONAI's networks and ``torch.nn`` is imported. ``pydoc.locate``
    walks attributes (``monai.networks.nets.hovernet.os.system`` is ``os.system``), so a name's prefix proves
    nothing: the object must be a ``torch.nn.Module`` subclass defined in ``monai.networks`` or ``torch.nn``.
    """
    import inspect
    from pydoc import locate

    import torch

    if not isinstance(target, str) or not target or "__" in target or target.startswith("."):
        return None, "not a dotted class name"
    if "." not in target:
        import monai.networks.nets  # noqa: F401 -- the locator searches only imported MONAI modules
        from monai.bundle import ComponentLocator

        module = ComponentLocator().get_component_module_name(target)
        if isinstance(module, list):
            module = module[0] if module else None
        if module is None:
            return None, "no MONAI component of that name"
        target = f"{module}.{target}"
    if not target.startswith(ALLOWED_TARGETS):
        return None, "a name outside them"
    try:
        obj = locate(target)
    except Exception:  # noqa: BLE001 -- pydoc.ErrorDuringImport: a module that fails to import
        obj = None
    if obj is None:
        return None, "nothing of that name"
    if inspect.ismodule(obj):
        return None, f"it names the module {obj.__name__}"
    full = f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if not inspect.isclass(obj):
        return None, f"it names the {'function' if callable(obj) else 'value'} {full}"
    if not issubclass(obj, torch.nn.Module):
        return None, f"it names the class {full}, not a torch.nn.Module"
    if not full.startswith(ALLOWED_TARGETS):
        return None, f"it names the class {full}, defined elsewhere"
    return full, ""


def _name(item: Dict[str, Any]) -> str:
    """A transform's class name in array form: ``monai.transforms.ScaleIntensityRanged`` -> ``ScaleIntensityRange``."""
    name = str(item.get("_target_", "")).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in (*NEUTRAL, *INTENSITY, *GEOMETRY, "Activations",
                                                             "AsDiscrete") else name


def _transforms(section: Any, key: str):
    """``(key, item)`` of every transform of a ``Compose`` (or a plain list) in a config section."""
    if isinstance(section, dict) and "transforms" in section:
        section, key = section["transforms"], f"{key}#transforms"
    if not isinstance(section, list):
        return
    for i, item in enumerate(section):
        if isinstance(item, dict):
            yield f"{key}#{i}", item


def _read_preprocessing(spec: BundleSpec, config: Dict[str, Any], path: Optional[Path]) -> None:
    """Fill ``spec.intensity``, ``pixdim`` and ``size`` from the config's ``preprocessing`` transforms.

    Raises:
        MedkdError: ``<config>: preprocessing#transforms#<i> (<Name>): ...`` for a transform medkd does not
            reproduce, an ``Orientationd`` other than RAS, or an argument that is not a literal.
    """
    if path is None:  # a TorchScript-only bundle: metadata is all there is
        return
    section = config.get("preprocessing")
    if section is None:
        raise MedkdError(f"{path}: no preprocessing: medkd cannot tell which intensities the network expects")
    for key, item in _transforms(section, "preprocessing"):
        raw = str(item.get("_target_", "?"))
        name = _name(item)
        if name in NEUTRAL:  # arguments unread (a device, a dtype): nothing of them reaches the values
            continue
        args = _literal({k: v for k, v in item.items() if k not in COMPONENT_KEYS}, f"{key} ({raw})", config, path)
        if name in INTENSITY:
            spec.intensity.append((name, {k: args[k] for k in INTENSITY[name] if k in args}))
        elif name == "Orientation":
            if str(args.get("axcodes", "")).upper() != "RAS":
                raise MedkdError(f"{path}: {key} ({raw}): axcodes {args.get('axcodes')!r:.20}; medkd's slices are "
                                 f"RAS, only Orientationd axcodes 'RAS' is reproduced")
        elif name == "Spacing":
            spec.pixdim = _numbers(args.get("pixdim"), f"{path}: {key} ({raw}) pixdim", spec.spatial_dims)
        elif name == "Resize":
            size = _numbers(args.get("spatial_size"), f"{path}: {key} ({raw}) spatial_size", spec.spatial_dims)
            spec.size = [int(v) for v in size[:2]]
        else:
            raise MedkdError(f"{path}: {key} ({raw}): a preprocessing transform medkd cannot reproduce on prepared "
                             f"slices (understood: {', '.join(sorted([*INTENSITY, *GEOMETRY]))}"
                             f" and type/layout transforms); or describe it in {spec.root.name}.json beside the "
                             f"bundle")


def _numbers(value: Any, what: str, n: int) -> List[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * n
    if (not isinstance(value, list) or len(value) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
        raise MedkdError(f"{what} must be {n} positive numbers, got {value!r:.60}")
    return [float(v) for v in value[:2]]


# ------------------------------------------------------------------------------------------------ loading


def load(path: Path, request: Any, data: Any) -> Any:
    """Load the bundle at ``path`` as a teacher of ``data`` (:class:`~medkd.teachers.base.LoadedTeacher`).

    The network (``network_def`` + weights-only ``model.pt``, else ``model.ts``) is wrapped in a
    :class:`~medkd.teachers.bridge.BridgedTeacher`: prepared slices -> source intensities -> the bundle's own
    intensity transforms (MONAI's, with the arguments read from the config) -> its input size -> its output ->
    the foreground logit of ``--teacher-label`` (default: the one foreground class).

    Raises:
        MedkdError: ``--teacher-fold`` or ``--teacher-checkpoint`` given (a bundle has one network and one weights
            file); as :func:`read_bundle`; weights that do not fit ``network_def``; an unreadable TorchScript; an
            output with another channel count than the metadata's; a multi-class output without
            ``--teacher-label`` (listing the classes); intensities the prepared data cannot give back.
    """
    from medkd.rundir import file_sha256
    from medkd.teachers.base import LoadedTeacher, external_cache_root, hash_files, reject_options
    from medkd.teachers.bridge import BridgedTeacher, choose_label

    reject_options(Path(path), KIND, request, ("fold", "checkpoint"))
    spec = read_bundle(Path(path))
    what = f"{spec.root} (MONAI bundle)"
    label = choose_label(spec.activation, len(spec.classes), request.label, dict(enumerate(spec.classes)), what)
    net = build_network(spec)
    size = input_size(spec, data)
    check_output(net, spec, size)
    module = BridgedTeacher(net, request.in_channels, data.size, intensity_steps(spec, data, what), size,
                            spec.activation, label, net_channels=spec.in_channels)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    files = hash_files(spec.root, [spec.root / f for f in spec.files])
    if spec.override is not None:  # beside the bundle: named as the sidecar's path from inside it
        files[f"../{spec.override.name}"] = file_sha256(spec.override)
    details = {"network": spec.network_name, "weights": str(spec.weights.relative_to(spec.root)),
               "format": "torchscript" if spec.torchscript else "state_dict", "classes": spec.classes,
               "label": label, "layout": spec.activation, "input_size": size,
               "intensity": ([{"transform": n, **a} for n, a in spec.intensity] if spec.override is None else
                             {"sidecar": spec.override.name, **spec.override_intensity.record()}),
               "pixdim": spec.pixdim}
    return LoadedTeacher(kind=KIND, source=Path(path), module=module, in_channels=request.in_channels, files=files,
                         details=details, taps_ok=not spec.torchscript, default_taps=None,
                         cache_key_file=spec.weights, cache_root=external_cache_root(data.root, KIND, files, details))


def build_network(spec: BundleSpec):
    """The bundle's network on the CPU, in eval mode: ``network_def`` through :class:`monai.bundle.ConfigParser`
    with ``models/model.pt`` loaded weights-only, or ``models/model.ts`` (:func:`torch.jit.load`: see the module
    docstring on trust).

    Raises:
        MedkdError: the network cannot be built from its arguments, the weights are unreadable or do not fit.
    """
    from medkd.checkpoint import load_weights

    if spec.torchscript:
        return load_torchscript(spec.weights)
    from monai.bundle import ConfigParser

    try:
        net = ConfigParser({"network_def": spec.network_def}).get_parsed_content("network_def")
    except Exception as e:  # noqa: BLE001 -- bad arguments of a MONAI network: one line naming the config
        raise MedkdError(f"{spec.config_file}: network_def could not be built ({short_error(e)})") from None
    state = _state_dict(load_weights(spec.weights), spec.weights)  # torch.load(..., weights_only=True)
    _check_fit(net, state, spec)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _state_dict(obj: Any, path: Path) -> Dict[str, Any]:
    """The state dict of a bundle checkpoint: the file itself, or its ``model``/``state_dict`` entry (what MONAI's
    ``CheckpointSaver`` writes)."""
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("model", "state_dict", "network"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return _state_dict(obj[key], path)
    raise MedkdError(f"{path}: not a state dict of tensors (nor one under 'model' or 'state_dict')")


def _check_fit(net, state: Dict[str, Any], spec: BundleSpec) -> None:
    """The weights fit ``network_def`` exactly: the same names and shapes."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(v)} {w}" for v, w in ((missing, "missing"), (unexpected, "unexpected"),
                                          (shapes, "of another shape")) if v]
    if shapes:
        k = shapes[0]
        example = f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
    else:
        example = (missing or unexpected)[0]
    raise MedkdError(f"{spec.weights}: weights do not fit network_def {spec.network_name} of "
                     f"{spec.config_file.name} ({', '.join(parts)}; e.g. {example})")


def input_size(spec: BundleSpec, data: Any) -> int:
    """The in-plane size the network sees: the bundle's fixed size, else the size that brings the prepared slices
    to its ``Spacingd`` pixdim, else the prepared size; rounded up to the metadata's multiple."""
    from medkd.teachers.bridge import median_prepared_spacing, size_for_spacing

    if spec.size is not None:
        if spec.size[0] != spec.size[1]:
            raise MedkdError(f"{spec.root}: input size {spec.size} is not square; medkd's slices are")
        return int(spec.size[0])
    if spec.pixdim is not None:
        return size_for_spacing(median_prepared_spacing(data), data.size, spec.pixdim, spec.multiple)
    return -(-int(data.size) // spec.multiple) * spec.multiple


def check_output(net, spec: BundleSpec, size: int) -> None:
    """One forward pass on zeros: the network returns ``(1, K, size, size)`` with the metadata's ``K``."""
    import torch

    try:
        with torch.no_grad():
            out = net(torch.zeros(1, spec.in_channels, size, size))
    except Exception as e:  # noqa: BLE001 -- a network that cannot run on a 2-D slice of this size
        raise MedkdError(f"{spec.weights}: the network fails on a {spec.in_channels}x{size}x{size} input "
                         f"({short_error(e)})") from None
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.ndim != 4 or out.shape[1] != len(spec.classes) or tuple(out.shape[-2:]) != (size, size):
        raise MedkdError(f"{spec.weights}: output shape {list(out.shape)}, expected [1, {len(spec.classes)}, "
                         f"{size}, {size}] ({len(spec.classes)} channel(s) in {METADATA})")


def intensity_steps(spec: BundleSpec, data: Any, what: str):
    """Prepared values ``(B, C, H, W)`` -> what the network expects: back to source intensities
    (:func:`~medkd.teachers.bridge.intensity_bridge`), then the bundle's intensity transforms, MONAI's own
    (``ScaleIntensityRange``, ``NormalizeIntensity``) with the config's arguments, slice by slice.

    A bundle whose only intensity transform is a per-image ``NormalizeIntensityd`` needs no source intensities (a
    z-score does not change under the affine map between prepared and source values), so it also runs on data
    prepared with per-case percentiles (MR).
    """
    import torch
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange
    from monai.utils import convert_to_tensor

    from medkd.teachers.bridge import Intensity, dataset_window, intensity_bridge

    if spec.override is not None:
        return intensity_bridge(spec.override_intensity, dataset_window(data), what)
    per_image = [n for n, a in spec.intensity
                 if n == "NormalizeIntensity" and a.get("subtrahend") is None and a.get("divisor") is None]
    to_source = (None if spec.intensity and len(per_image) == len(spec.intensity)
                 else intensity_bridge(Intensity("none"), dataset_window(data), what))
    steps = []
    for name, args in spec.intensity:
        try:
            steps.append((ScaleIntensityRange if name == "ScaleIntensityRange" else NormalizeIntensity)(**args))
        except Exception as e:  # noqa: BLE001 -- arguments of the wrong type
            raise MedkdError(f"{spec.config_file}: {name}d arguments {args} ({short_error(e)})") from None

    def intensity(x: torch.Tensor) -> torch.Tensor:
        v = to_source(x) if to_source is not None else x
        for step in steps:  # per slice: NormalizeIntensity's statistics are one image's
            # MONAI returns MetaTensors: plain tensors on, so none reaches the network, the targets or the losses
            v = torch.stack([convert_to_tensor(step(s), track_meta=False) for s in v]).to(x.dtype)
        return v

    return intensity


def _register() -> None:
    from medkd.teachers import register_kind

    register_kind(KIND, detect, load, expects="a MONAI bundle folder (configs/inference.json with network_def and "
                                              "models/model.pt, or models/model.ts)")


_register()
