"""The ablation plan: grid file / preset -> resolved :class:`Cell` configs, each distillation row with a baseline of
its budget (:mod:`medkd.ablate.budget`), the reference rows, names and folders. See :mod:`medkd.ablate` for the
grid format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from medkd.ablate.budget import baseline_config, matched_baseline, natural_steps_per_epoch, steps_per_epoch
from medkd.ablate.names import CELL_RESERVED, extras_text, identity, setting_extras, setting_name, slugify
from medkd.config import (DistillConfig, build_config, config_file, field_names,
                          preset_names, to_dict)
from medkd.config import preset_file as packaged_preset
from medkd.data.prepared import PreparedData
from medkd.errors import MedkdError
from medkd.options import OptionError, check_fraction, check_seed, short_repr
from medkd.yamlfile import load_yaml

GRID_PRESETS = tuple(preset_names("ablate"))  # packaged grids: medkd/presets/ablate-<name>.yaml
DEFAULT_SEEDS = (0, 1, 2)
SPLIT = "test"  # every run of an ablation is evaluated (and compared) on this split

#: Reference rows an ablation can add: the student given every train label (a student row, trained like the
#: others) and the teacher itself (evaluated once on the test split, not trained).
REFERENCES = ("all_labels", "teacher")
#: References of a grid file that does not list its own (the packaged presets list both).
DEFAULT_REFERENCES = ("teacher",)
GRID_KEYS = ("cells", "seeds", "options", "fractions", "references", "description")
#: Options that say what to take of the teacher (which fold, checkpoint, class): one teacher for the whole ablation
#: (every row distils from it and the ``teacher`` row scores it), so they are set on the command line or in the
#: grid's ``options``, never per cell. ``teacher_taps`` may differ per cell (where a feature term taps).
TEACHER_WIDE = ("teacher_label", "teacher_fold", "teacher_checkpoint")


@dataclass
class Cell:
    """One row of the ablation: a resolved distill config (its ``seed`` is set per run)."""

    name: str
    slug: str
    cfg: DistillConfig
    overrides: Dict[str, Any]  # the cell as written in the grid ({} for an added baseline)
    baseline: str = "baseline"  # name of the row this one is compared with (itself for a baseline)
    is_baseline: bool = False
    identity: Dict[str, Any] = field(default_factory=dict)
    setting: str = ""  # the name without fraction and budget: one curve of the label-efficiency figure
    reference: Optional[str] = None  # "all_labels" for that reference row
    key: str = ""  # canonical identity (baselines: how rows find theirs while the plan is built)
    cell_index: Optional[int] = None  # the grid cell it comes from (one per fraction with --fractions)


@dataclass
class Plan:
    cells: List[Cell]
    seeds: List[int]
    source: str
    base: DistillConfig
    notes: List[str] = field(default_factory=list)  # shown before the runs (e.g. a cell merged into the baseline)
    references: List[str] = field(default_factory=list)  # of REFERENCES
    fractions: Optional[List[float]] = None  # --fractions: every cell at each of them

    def runs(self, out: Path) -> List[Tuple[Cell, int, Path]]:
        """(cell, seed, run folder), seed-major."""
        return [(c, s, run_dir(out, c, s)) for s in self.seeds for c in self.cells]


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return Path(out) / "runs" / cell.slug / f"seed{seed}"


def preset_file(name: str):
    """The packaged preset grid ``medkd/presets/ablate-<name>.yaml`` (an ``importlib.resources`` Traversable)."""
    return packaged_preset("ablate", name)


def load_grid_doc(grid: Optional[Path] = None, preset: Optional[str] = None) -> Dict[str, Any]:
    """Read a grid file or preset into ``{"source", "cells", "seeds", "options", "fractions", "references"}``
    (cells not validated yet; ``fractions`` and ``references`` ``None`` when the file does not set them).

    Raises:
        MedkdError: both/neither given, unreadable or malformed file, unknown preset.
    """
    if (grid is None) == (preset is None):
        raise MedkdError("give exactly one of --grid GRID.yaml or --preset quick|study")
    if preset is not None:
        source = f"preset {preset}"
    else:
        source = str(grid)
    doc = load_yaml(preset_file(preset) if preset is not None else Path(grid))
    seeds = options = fractions = references = None
    if isinstance(doc, dict):
        unknown = [k for k in doc if k not in GRID_KEYS]
        if unknown:
            raise MedkdError(f"{source}: unknown top-level key(s) {unknown}; valid: {', '.join(GRID_KEYS)}")
        cells, seeds, options = doc.get("cells"), doc.get("seeds"), doc.get("options") or {}
        if doc.get("fractions") is not None:
            fractions = parse_fractions(doc["fractions"], f"{source}: fractions")
        if "references" in doc:
            references = parse_references(doc["references"] or [], f"{source}: references")
        if not isinstance(options, dict):
            raise MedkdError(f"{source}: 'options' must be a mapping of distill options")
    else:
        cells = doc
    if not isinstance(cells, list) or not cells:
        raise MedkdError(f"{source}: expected a non-empty YAML list of cells (mappings of distill options)")
    for i, c in enumerate(cells):
        if not isinstance(c, dict):
            raise MedkdError(f"{source}: cell {i + 1} must be a mapping of distill options, got {short_repr(c)}")
    if seeds is not None:
        seeds = parse_seeds(seeds, source)
    return {"source": source, "cells": cells, "seeds": seeds, "options": options or {}, "fractions": fractions,
            "references": references}


def parse_fractions(value: Any, source: str = "--fractions") -> List[float]:
    """``"0.1,0.25"`` / ``[0.1, 0.25]`` -> ``[0.1, 0.25]`` (each in (0, 1], unique, order kept).

    Raises:
        MedkdError: not a number, out of range, none given.
    """
    return [float(f) for f in _checked_list(value, check_fraction, "fraction", source, "fractions")]


def parse_references(value: Any, source: str = "references") -> List[str]:
    """A list of :data:`REFERENCES` names (``[]``: none), in that order.

    Raises:
        MedkdError: an unknown name (listing the valid ones).
    """
    items = [value] if isinstance(value, str) else list(value)
    bad = [v for v in items if v not in REFERENCES]
    if bad:
        raise MedkdError(f"{source}: unknown reference(s) {bad}; valid: {', '.join(REFERENCES)}")
    return [r for r in REFERENCES if r in items]


def parse_seeds(value: Any, source: str = "--seeds") -> List[int]:
    """``"0,1,2"`` / ``[0, 1, 2]`` / ``3`` -> ``[0, 1, 2]`` (unique, order kept)."""
    return _checked_list(value, check_seed, "seeds", source, "seeds")


def _checked_list(value: Any, check: Callable[[Any, str], Any], what: str, source: str, plural: str) -> List[Any]:
    """A comma list (text) or a list of values -> each checked by ``check`` (named ``what``), unique, order kept.

    Raises:
        MedkdError: ``<source>: <the check's message>``, or none given.
    """
    items = value.split(",") if isinstance(value, str) else (list(value) if isinstance(value, (list, tuple))
                                                             else [value])
    out: List[Any] = []
    for v in items:
        if isinstance(v, str) and not v.strip():
            continue
        try:
            x = check(_number(v) if isinstance(v, str) else v, what)
        except OptionError as e:
            raise MedkdError(f"{source}: {e}") from None
        if x not in out:
            out.append(x)
    if not out:
        raise MedkdError(f"{source}: no {plural} given")
    return out


def _number(text: str) -> Any:
    """``"3"`` -> 3, ``"3.0"`` -> 3.0; other text is returned as it is (for the validator to name)."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return text


def _normalize_cell(cell: Dict[str, Any], where: str, per_cell: bool = True) -> Dict[str, Any]:
    """A cell (or, ``per_cell=False``, the grid's common ``options``) checked: known distill options and ``name``,
    nothing the ablation fixes (:data:`~medkd.ablate.names.CELL_RESERVED`; per cell, :data:`TEACHER_WIDE` too)."""
    names = field_names(DistillConfig)
    out = dict(cell)
    for k in out:
        if k in CELL_RESERVED:
            hint = {"teacher": "--teacher", "teacher_probs": "--teacher-probs"}.get(k, "--seeds")
            raise MedkdError(f"{where}: {k!r} cannot be set per cell (use {hint})")
        if k in TEACHER_WIDE and per_cell:
            flag = "--" + k.replace("_", "-")
            raise MedkdError(f"{where}: {k!r} cannot be set per cell: it chooses the one teacher of the ablation "
                             f"(use {flag}, or the grid's options)")
        if k != "name" and k not in names:
            valid = ", ".join(n for n in names if n not in CELL_RESERVED)
            raise MedkdError(f"{where}: unknown key {k!r}; valid: name, {valid}")
    if "name" in out and (not isinstance(out["name"], str) or not out["name"].strip()):
        raise MedkdError(f"{where}: 'name' must be a non-empty string")
    return out


def build_plan(
    grid_doc: Dict[str, Any],
    teacher: Optional[Path],
    seeds: Optional[Sequence[int]] = None,
    base_overrides: Optional[Dict[str, Any]] = None,
    config: Optional[Path] = None,
    *,
    data: Optional[PreparedData] = None,
    fractions: Optional[Sequence[float]] = None,
    references: Optional[Sequence[str]] = None,
    teacher_probs: Optional[Path] = None,
) -> Plan:
    """Resolve every cell's config (defaults < grid options < ``config`` < ``base_overrides`` < cell), give each
    distillation row a baseline of its budget, add the references, name the rows. Every cell is validated before
    anything runs.

    Args:
        grid_doc: from :func:`load_grid_doc`.
        teacher: the teacher run (every distillation row's ``teacher``).
        teacher_probs: instead of ``teacher``, a folder of the teacher's saved probabilities (every distillation
            row's ``teacher_probs``; there is no teacher model to evaluate, so no ``teacher`` reference).
        seeds: the seeds (default: the grid's, else :data:`DEFAULT_SEEDS`).
        base_overrides: options for every cell unless the cell sets them.
        config: a distill options YAML under ``base_overrides``.
        data: the prepared dataset, to count the steps of rows that iterate more slices than the student alone
            (``kd_images=all``; :func:`medkd.ablate.budget.matched_baseline`). Needed only for such rows.
        fractions: every cell (and baseline) at each labelled fraction; cells that set ``fraction`` keep it
            (default: the grid's ``fractions``, else none).
        references: of :data:`REFERENCES` (default: the grid's ``references``, else :data:`DEFAULT_REFERENCES`);
            ``teacher`` is kept only with a teacher and distillation rows, ``all_labels`` with distillation rows.

    Raises:
        MedkdError: unknown/invalid key (naming the cell), duplicate settings, ``fraction`` given with
            ``fractions``, a budget to count without ``data``.
    """
    source = grid_doc["source"]
    seeds_l = parse_seeds(list(seeds) if seeds is not None else (grid_doc.get("seeds") or list(DEFAULT_SEEDS)))
    fractions = list(fractions) if fractions is not None else grid_doc.get("fractions")
    wanted = list(references) if references is not None else grid_doc.get("references")
    wanted = parse_references(DEFAULT_REFERENCES if wanted is None else wanted)
    if fractions and (base_overrides or {}).get("fraction") is not None:
        raise MedkdError("give --fraction or --fractions, not both")
    resolve = _resolver(grid_doc, teacher, base_overrides, config, teacher_probs)
    base = resolve({}, f"{source}: common options")
    bases = [resolve({"fraction": f}, f"{source}: fractions") for f in fractions] if fractions else [base]
    cells = _grid_cells(grid_doc, resolve, fractions)
    notes: List[str] = []
    baselines = _baselines(cells, bases, data, seeds_l, source, notes)
    kd_cells = [c for c in cells if c.cfg.uses_teacher]
    refs = _all_labels(kd_cells, baselines, data, seeds_l, notes) if "all_labels" in wanted else []
    # the student alone with the common options first, then in order of appearance
    first = _canon(identity(to_dict(baseline_config(bases[0]))))
    ordered_b = sorted(baselines.values(), key=lambda b: b.key != first)
    _name_rows(ordered_b, kd_cells, refs, base, show=("fraction",) if fractions else ())
    if not kd_cells:
        notes.append(f"{source}: no distillation cell, so no row is compared with the baseline")
    kept = [r for r in wanted if kd_cells and (r != "teacher" or teacher is not None)]
    return Plan(cells=[*ordered_b, *kd_cells, *refs], seeds=seeds_l, source=source, base=base, notes=notes,
                references=kept, fractions=list(fractions) if fractions else None)


def _resolver(grid_doc: Dict[str, Any], teacher: Optional[Path], base_overrides: Optional[Dict[str, Any]],
              config: Optional[Path], teacher_probs: Optional[Path] = None
              ) -> Callable[[Dict[str, Any], str], DistillConfig]:
    """``resolve(cell, where)``: the cell's config from the layers defaults < grid options < ``config`` <
    ``base_overrides`` < cell, validated (errors name ``where``)."""
    source = grid_doc["source"]
    teacher_s = str(Path(teacher).resolve()) if teacher else None
    probs_s = str(Path(teacher_probs).resolve()) if teacher_probs else None
    options = _normalize_cell(grid_doc.get("options") or {}, f"{source}: options", per_cell=False)
    options.pop("name", None)
    # a --config file may be a run's config.yaml: its teacher and seed are the ablation's to set
    from_file = {k: v for k, v in config_file(DistillConfig, config).items() if k not in CELL_RESERVED} \
        if config is not None else {}
    common = {k: v for k, v in (base_overrides or {}).items() if k not in CELL_RESERVED}

    def resolve(cell: Dict[str, Any], where: str) -> DistillConfig:
        layers = [options, from_file, common, {k: v for k, v in cell.items() if k != "name"},
                  {"teacher": teacher_s, "teacher_probs": probs_s}]
        try:
            return build_config(DistillConfig, layers=layers)
        except MedkdError as e:
            raise MedkdError(f"{where}: {e}") from None

    return resolve


def _grid_cells(grid_doc: Dict[str, Any], resolve: Callable[[Dict[str, Any], str], DistillConfig],
                fractions: Optional[Sequence[float]]) -> List[Cell]:
    """The grid's cells, resolved and checked for duplicates; with ``fractions``, each cell that does not set its
    own ``fraction`` once per fraction (fraction-major order)."""
    source = grid_doc["source"]
    raw_cells = [(i, _normalize_cell(raw, f"{source}: cell {i + 1}"), raw) for i, raw in enumerate(grid_doc["cells"])]
    expanded = []
    for k, f in enumerate(fractions or [None]):
        for i, cell, raw in raw_cells:
            if f is not None and "fraction" not in cell:
                expanded.append((i, {**cell, "fraction": f}, raw))
            elif k == 0:
                expanded.append((i, cell, raw))
    cells: List[Cell] = []
    seen: Dict[str, int] = {}
    for i, cell, raw in expanded:
        where = f"{source}: cell {i + 1}"
        cfg = resolve(cell, where)
        ident = identity(to_dict(cfg))
        key = _canon(ident)
        if key in seen:
            at = f" (at fraction {cfg.fraction:g})" if fractions else ""
            raise MedkdError(f"{where}: same setting as cell {seen[key] + 1}{at}")
        seen[key] = i
        cells.append(Cell(name=str(cell.get("name") or ""), slug="", cfg=cfg, overrides=dict(raw), identity=ident,
                          cell_index=i))
    return cells


def _baselines(cells: List[Cell], bases: Sequence[DistillConfig], data: Optional[PreparedData], seeds: List[int],
               source: str, notes: List[str]) -> Dict[str, Cell]:
    """``{key: baseline}``: one per distinct budget-matched no-KD setting of the distillation rows (each row's
    ``baseline`` set to that key), the grid cells that use no teacher merged into an equal one; when there is
    neither, the student alone with the common options (at each fraction)."""
    baselines: Dict[str, Cell] = {}

    def add(cfg: DistillConfig) -> str:
        ident = identity(to_dict(cfg))
        key = _canon(ident)
        if key not in baselines:
            baselines[key] = Cell(name="", slug="", cfg=cfg, overrides={}, is_baseline=True, identity=ident, key=key)
        return key

    for c in cells:
        if c.cfg.uses_teacher:
            try:
                c.baseline = add(matched_baseline(c.cfg, data, seeds))
            except ValueError as e:
                raise MedkdError(f"{source}: cell {c.overrides}: {e}") from None
    for i, c in enumerate(cells):  # a grid cell that is itself a baseline merges into it (keeping name/overrides)
        if not c.cfg.uses_teacher:
            notes.append(f"{source}: cell {i + 1} uses no teacher, so it is the no-KD baseline row (which ablate "
                         f"always runs), not a setting compared with it")
            b = baselines[add(c.cfg)]
            b.overrides, b.name = c.overrides, c.name or b.name
    if not baselines:
        for cfg in bases:
            add(baseline_config(cfg))
    return baselines


def _all_labels(kd_cells: List[Cell], baselines: Dict[str, Cell], data: Optional[PreparedData], seeds: List[int],
                notes: List[str]) -> List[Cell]:
    """The ``all_labels`` reference row: the student alone given every train label (fraction 1) with the budget of
    the distillation row that plans the most optimizer steps (so no row has more updates than this ceiling; one
    pass over every train case when that is the budget, or without ``data``), compared with that row's baseline.
    ``[]`` without distillation rows, or when one of the baselines is that row already (a note says so)."""
    if not kd_cells:
        return []

    def per_epoch(c: Cell) -> Optional[int]:
        if data is None:
            return c.cfg.steps_per_epoch
        return max(steps_per_epoch(replace(c.cfg, seed=s), data) for s in seeds)

    top = max(kd_cells, key=lambda c: c.cfg.epochs * (per_epoch(c) or 1))  # the first of the largest
    cfg = replace(baseline_config(top.cfg), fraction=1.0, subset_seed=None, steps_per_epoch=None)
    steps = per_epoch(top)
    if steps is not None and (data is None or steps != natural_steps_per_epoch(cfg, data)):
        cfg = replace(cfg, steps_per_epoch=steps)
    ident = identity(to_dict(cfg))
    key = _canon(ident)
    if key in baselines:
        notes.append("the all-labels reference (the student alone at fraction 1 with the largest budget of the "
                     "distillation rows) is a baseline row of this plan already: not added again")
        return []
    return [Cell(name="", slug="", cfg=cfg, overrides={}, baseline=top.baseline, identity=ident, key=key,
                 reference="all_labels")]


def _name_rows(baselines: List[Cell], kd_cells: List[Cell], refs: List[Cell], base: DistillConfig,
               show: Sequence[str]) -> None:
    """Names (the core setting plus what differs from the common options; a baseline's budget only when it tells
    baselines apart), settings (names without fraction and budget), unique slugs, and each row's ``baseline``
    as a name."""
    hide = ("steps_per_epoch",)
    for b in baselines:
        b.name = b.name or setting_name(b.cfg, base, show=show, hide=hide)
    names = [b.name for b in baselines]
    for b in baselines:
        if names.count(b.name) > 1 and not b.overrides.get("name"):
            b.name = setting_name(b.cfg, base, show=show)
    for c in kd_cells:
        c.name = c.name or setting_name(c.cfg, base, show=show)
    for r in refs:
        r.name = "all labels" + extras_text(setting_extras(r.cfg, base, hide=("fraction", "subset_seed")))
    rows = [*baselines, *kd_cells, *refs]
    first_of: Dict[Optional[int], Cell] = {}
    for c in rows:  # a grid cell's setting is named once, at its first fraction (+unlabelled is lost at 1)
        first = first_of.setdefault(c.cell_index, c) if c.cell_index is not None else c
        c.setting = (first.overrides.get("name") or setting_name(first.cfg, base, hide=("fraction", *hide)))
    for r in refs:
        r.setting = "all labels"
    names_seen: Dict[str, int] = {}
    for c in rows:
        n = names_seen.get(c.name, 0) + 1
        names_seen[c.name] = n
        if n > 1:
            c.name = f"{c.name} ({n})"
    slugs: Dict[str, int] = {}
    for c in rows:
        s = slugify(c.name)
        slugs[s] = slugs.get(s, 0) + 1
        c.slug = s if slugs[s] == 1 else f"{s}-{slugs[s]}"
    bname = {b.key: b.name for b in baselines}
    for b in baselines:
        b.baseline = b.name
    for c in [*kd_cells, *refs]:
        c.baseline = bname[c.baseline]


def _canon(d: Dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)
