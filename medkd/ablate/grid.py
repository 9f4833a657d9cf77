"""The ablation plan: grid file / preset -> resolved :class:`Cell` configs (+ baselines), names and folders.
See :mod:`medkd.ablate` for the grid format."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from medkd.config import (DEFAULT_WEIGHTS, DistillConfig, build_config, config_file, field_names,
                          preset_names, run_identity, to_dict)
from medkd.config import preset_file as packaged_preset
from medkd.errors import MedkdError
from medkd.options import OptionError, check_seed, short_repr
from medkd.yamlfile import load_yaml

GRID_PRESETS = tuple(preset_names("ablate"))  # packaged grids: medkd/presets/ablate-<name>.yaml
DEFAULT_SEEDS = (0, 1, 2)
SPLIT = "test"  # every run of an ablation is evaluated (and compared) on this split

CELL_RESERVED = ("teacher", "seed")  # fixed by the ablation (--teacher, --seeds): not part of a row's identity
ABBR = {"enc": "E", "bottleneck": "B", "dec": "D"}


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


@dataclass
class Plan:
    cells: List[Cell]
    seeds: List[int]
    source: str
    base: DistillConfig
    notes: List[str] = field(default_factory=list)  # shown before the runs (e.g. a cell merged into the baseline)

    def runs(self, out: Path) -> List[Tuple[Cell, int, Path]]:
        """(cell, seed, run folder), seed-major."""
        return [(c, s, run_dir(out, c, s)) for s in self.seeds for c in self.cells]


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return Path(out) / "runs" / cell.slug / f"seed{seed}"


def preset_file(name: str):
    """The packaged preset grid ``medkd/presets/ablate-<name>.yaml`` (an ``importlib.resources`` Traversable)."""
    return packaged_preset("ablate", name)


def load_grid_doc(grid: Optional[Path] = None, preset: Optional[str] = None) -> Dict[str, Any]:
    """Read a grid file or preset into ``{"source", "cells", "seeds", "options"}`` (not validated yet).

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
    seeds = options = None
    if isinstance(doc, dict):
        unknown = [k for k in doc if k not in ("cells", "seeds", "options", "description")]
        if unknown:
            raise MedkdError(f"{source}: unknown top-level key(s) {unknown}; valid: cells, seeds, options, description")
        cells, seeds, options = doc.get("cells"), doc.get("seeds"), doc.get("options") or {}
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
    return {"source": source, "cells": cells, "seeds": seeds, "options": options or {}}


def parse_seeds(value: Any, source: str = "--seeds") -> List[int]:
    """``"0,1,2"`` / ``[0, 1, 2]`` / ``3`` -> ``[0, 1, 2]`` (unique, order kept)."""
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: List[int] = []
    for v in items:
        if isinstance(v, str) and not v.strip():
            continue
        try:
            s = check_seed(_number(v) if isinstance(v, str) else v, "seeds")
        except OptionError as e:
            raise MedkdError(f"{source}: {e}") from None
        if s not in out:
            out.append(s)
    if not out:
        raise MedkdError(f"{source}: no seeds given")
    return out


def _number(text: str) -> Any:
    """``"3"`` -> 3, ``"3.0"`` -> 3.0; other text is returned as it is (for the validator to name)."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return text


def _normalize_cell(cell: Dict[str, Any], where: str) -> Dict[str, Any]:
    names = field_names(DistillConfig)
    out = dict(cell)
    for k in out:
        if k in CELL_RESERVED:
            hint = "--teacher" if k == "teacher" else "--seeds"
            raise MedkdError(f"{where}: {k!r} cannot be set per cell (use {hint})")
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
) -> Plan:
    """Resolve every cell's config (defaults < grid options < ``config`` < ``base_overrides`` < cell), add the
    baseline(s), name the rows. Every cell is validated before anything runs.

    Raises:
        MedkdError: unknown/invalid key (naming the cell), duplicate settings, duplicate names.
    """
    source = grid_doc["source"]
    teacher_s = str(Path(teacher).resolve()) if teacher else None
    options = _normalize_cell(grid_doc.get("options") or {}, f"{source}: options")
    options.pop("name", None)
    # a --config file may be a run's config.yaml: its teacher and seed are the ablation's to set
    from_file = {k: v for k, v in config_file(DistillConfig, config).items() if k not in CELL_RESERVED} \
        if config is not None else {}
    common = {k: v for k, v in (base_overrides or {}).items() if k not in CELL_RESERVED}

    def resolve(cell: Dict[str, Any], where: str) -> DistillConfig:
        layers = [options, from_file, common, {k: v for k, v in cell.items() if k != "name"}, {"teacher": teacher_s}]
        try:
            return build_config(DistillConfig, layers=layers)
        except MedkdError as e:
            raise MedkdError(f"{where}: {e}") from None

    base = resolve({}, f"{source}: common options")
    cells: List[Cell] = []
    seen: Dict[str, int] = {}
    for i, raw in enumerate(grid_doc["cells"]):
        where = f"{source}: cell {i + 1}"
        cell = _normalize_cell(raw, where)
        cfg = resolve(cell, where)
        ident = identity(to_dict(cfg))
        key = _canon(ident)
        if key in seen:
            raise MedkdError(f"{where}: same setting as cell {seen[key] + 1}")
        seen[key] = i
        cells.append(Cell(name=str(cell.get("name") or ""), slug="", cfg=cfg, overrides=dict(raw), identity=ident))

    # baselines: one per distinct non-KD setting, listed first in order of appearance
    baselines: Dict[str, Cell] = {}
    for c in [Cell("", "", base, {}), *cells]:
        bcfg = baseline_config(c.cfg)
        bkey = _canon(identity(to_dict(bcfg)))
        if bkey not in baselines:
            baselines[bkey] = Cell(name="", slug="", cfg=bcfg, overrides={}, is_baseline=True,
                                   identity=identity(to_dict(bcfg)))
        c.baseline = bkey
    # a grid cell that is itself a baseline merges into it (keeping its name/overrides)
    kd_cells: List[Cell] = []
    notes: List[str] = []
    for i, c in enumerate(cells):
        if not c.cfg.uses_teacher:
            notes.append(f"{source}: cell {i + 1} uses no teacher, so it is the no-KD baseline row (which ablate "
                         f"always runs), not a setting compared with it")
            b = baselines[c.baseline]
            b.overrides, b.name = c.overrides, c.name or b.name
        else:
            kd_cells.append(c)
    ordered_b = [b for b in baselines.values() if b is baselines[_canon(identity(to_dict(baseline_config(base))))]]
    ordered_b += [b for b in baselines.values() if b not in ordered_b]
    # names: the core setting plus what differs from the common options
    for b in ordered_b:
        b.name = b.name or setting_name(b.cfg, base)
    for c in kd_cells:
        c.name = c.name or setting_name(c.cfg, base)
    all_cells = ordered_b + kd_cells
    names_seen: Dict[str, int] = {}
    for c in all_cells:
        n = names_seen.get(c.name, 0) + 1
        names_seen[c.name] = n
        if n > 1:
            c.name = f"{c.name} ({n})"
    slugs: Dict[str, int] = {}
    for c in all_cells:
        s = slugify(c.name)
        slugs[s] = slugs.get(s, 0) + 1
        c.slug = s if slugs[s] == 1 else f"{s}-{slugs[s]}"
    bname = {k: b.name for k, b in baselines.items()}
    for b in ordered_b:
        b.baseline = b.name
    for c in kd_cells:
        c.baseline = bname[c.baseline]
    seeds_l = list(seeds) if seeds is not None else (grid_doc.get("seeds") or list(DEFAULT_SEEDS))
    if not kd_cells:
        notes.append(f"{source}: no distillation cell, so no row is compared with the baseline")
    return Plan(cells=all_cells, seeds=parse_seeds(seeds_l), source=source, base=base, notes=notes)


def baseline_config(cfg: DistillConfig) -> DistillConfig:
    """The student alone: ``cfg`` without any distillation (KD-only options back to their defaults)."""
    d = DistillConfig()
    return replace(cfg, scales=[], pmd=False, teacher=None, loss=d.loss, scale_losses={}, loss_options={},
                   temperature=d.temperature, weights=dict(d.weights), taps={})


def identity(d: Dict[str, Any]) -> Dict[str, Any]:
    """A row's identity, from ``to_dict(cfg)`` or a run's ``config.yaml``: the run identity
    (:func:`medkd.config.run_identity`, the same one ``--resume`` holds fixed) without what the ablation fixes for
    every row (:data:`CELL_RESERVED`)."""
    ident = run_identity(DistillConfig.from_record(d))
    return {k: v for k, v in ident.items() if k not in CELL_RESERVED}


def _canon(d: Dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def setting_name(cfg: DistillConfig, base: DistillConfig) -> str:
    """``"baseline"``, ``"PMD only"``, ``"E+B+D contrastive +PMD"``, ``"PMD only +unlabelled"`` (``kd_images=all``),
    plus ``[key=value, ...]`` for options that differ from the ablation's common options
    (e.g. ``"D mse [fraction=0.25]"``)."""
    scales = cfg.effective()["scales"]
    if not scales and not cfg.pmd:
        core = "baseline"
    elif not scales:
        core = "PMD only"
    else:
        core = "+".join(ABBR[s] for s in scales) + f" {cfg.loss}" + (" +PMD" if cfg.pmd else "")
    if cfg.kd_on_unlabelled:  # named in every row, so a gain from the extra images is never misattributed
        core += " +unlabelled"
    mine, ref = identity(to_dict(cfg)), identity(to_dict(base))
    extras = []
    for k, v in mine.items():
        if k in ("scales", "pmd", "loss", "kd_images"):  # kd_images=all is in the core name
            continue
        r = ref.get(k)
        if k == "weights":
            if not cfg.uses_teacher:
                continue  # the supervised term alone is not weighted
            rw = {**DEFAULT_WEIGHTS, **base.weights}
            extras += [f"w_{n}={_short(x)}" for n, x in v.items() if float(rw.get(n, math.nan)) != x]
        elif isinstance(v, dict):
            extras += [f"{k}.{n}={_short(x)}" for n, x in v.items() if (r or {}).get(n) != x]
        elif v != r:
            extras.append(f"{k}={_short(v)}")
    return core + (f" [{', '.join(extras)}]" if extras else "")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v))
    return str(v)


def slugify(name: str) -> str:
    """Folder name of a row: ``"E+B+D contrastive +PMD" -> "e-b-d-contrastive-pmd"``."""
    s = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")
    return s or "cell"
