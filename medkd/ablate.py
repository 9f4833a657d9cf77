"""``medkd ablate``: a grid of distill config overrides -> one run folder per cell and seed -> statistics -> tables.

Grid (``--grid GRID.yaml``)
    A YAML list of mappings whose keys are :class:`~medkd.config.DistillConfig` options (``scales``, ``loss``,
    ``pmd``, ``weights``, ``fraction``, ``student``, ``epochs``, ...) plus an optional ``name``; e.g.
    ``- {scales: [enc, dec], loss: contrastive, pmd: true}``. ``scales`` takes a list, ``"enc,dec"`` or ``none``;
    a cell's ``weights`` are merged over the common weights. ``teacher`` and ``seed`` are not cell keys (the
    teacher is ``--teacher``; seeds are ``--seeds``). The file may also be a mapping
    ``{seeds: [...], options: {...}, cells: [...]}`` (the presets use this form): ``options`` apply to every cell
    and are overridden by ``--config``, then by command-line options, then by the cell itself. Unknown keys are
    an error naming the key and the cell. Presets ``quick`` and ``study`` are such files, packaged in
    ``medkd/presets/ablate-*.yaml`` (``configs/`` links to them for copying).

Baseline
    The student alone (``scales: none, pmd: false``) with the same student, fraction, seeds and training options
    is always included (once per distinct student/fraction/training setting in the grid; a grid cell that *is*
    the baseline is merged into it). Every row is compared with its own baseline.

Runs
    ``DIR/runs/<slug>/seed<k>/`` is an ordinary ``medkd distill`` run folder; ``DIR/ablation.yaml`` records the
    resolved plan. Runs go seed-major (one seed of every row first). All runs share the teacher-output cache in
    ``TEACHER_RUN/cache/`` (the teacher computes each training slice once per ablation, however many runs use it).
    Each finished run is evaluated once on the test split (``RUN/eval-test.json``, reused while it is newer than
    ``best.pt`` and was computed on the same data).

Resume
    Rerunning the same command skips runs whose ``summary.json`` exists, resumes ``RUN.partial/`` from its
    ``last.pt`` (or restarts it when it has none), and trains the rest: a killed ablation loses at most the epoch
    in progress. A *finished* run whose recorded config differs from the grid's (e.g. another ``--epochs``) is
    an error naming the run and the differing options; ``overwrite=True`` (``--overwrite``) retrains it instead.
    An unfinished ``.partial`` run with a different config is restarted. A run that fails (e.g. a non-finite
    loss) is reported, the others still run, the results are written from the runs that finished, and the
    ablation then fails (exit 1).

Statistics (all in ``results.json``)
    Per row and metric (Dice, IoU, recall, precision, HD95, each the mean over test cases of one run): mean and
    sample std (``ddof=1``) over seeds, and the relative change vs the baseline in percent,
    ``100 * (row - baseline) / |baseline|`` (``*_rel_gain``; for HD95 a negative change is an improvement).

    Significance: a **paired test over test cases** (the independent unit: patients). Each case's Dice is
    first averaged over the seeds of the row, and over the seeds of its baseline; pairs are the cases where both
    are defined (cases with both masks empty have no Dice, see :mod:`medkd.metrics.segmentation`). Pairing
    case x seed would inflate *n* with correlated observations, so it is not done. The test (``test=``):

    * ``wilcoxon``: two-sided Wilcoxon signed-rank (scipy, exact for small n, zero differences dropped).
      With *n* non-zero pairs its smallest attainable p is ``2 / 2**n``: 0.25 with 3 cases, 0.0625 with 5, so
      it **cannot reach p < 0.05 with fewer than 6 test cases**.
    * ``ttest``: two-sided paired t-test (scipy ``ttest_rel``); assumes roughly normal differences, which few
      cases cannot check.
    * ``auto`` (default): Wilcoxon when there are >= 6 pairs, else the paired t-test; the choice, *n* and this
      caveat are stated in ``results["test"]``, the table caption and ``results.md``.

    A row is ``significant`` when ``p < 0.05`` (no multiple-comparison correction; the p-values are listed so
    one can be applied). A 95 % percentile bootstrap interval (10,000 resamples of cases, seed 0) of the mean
    per-case Dice difference is given as ``dice_diff_ci``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from rich.console import Console
from rich.markup import escape

import medkd
from medkd import rundir
from medkd.config import STUDY_WEIGHTS, DistillConfig, build_config, config_file, field_names, to_dict
from medkd.errors import MedkdError
from medkd.report.progress import BarContext

METRICS = ("dice", "iou", "recall", "precision", "hd95")
LOWER_IS_BETTER = frozenset({"hd95"})
PRESETS = ("quick", "study")
TESTS = ("auto", "wilcoxon", "ttest")
ALPHA = 0.05
WILCOXON_MIN_N = 6  # smallest n for which a two-sided exact Wilcoxon signed-rank test can give p < 0.05
BOOTSTRAP_SAMPLES = 10_000
DEFAULT_SEEDS = (0, 1, 2)
SPLIT = "test"

CELL_RESERVED = ("teacher", "seed")  # fixed by the ablation (--teacher, --seeds)
# options that do not change what a run learns (ignored when comparing a finished run's config)
NON_IDENTITY = ("seed", "device", "num_workers", "cache", "teacher")
ABBR = {"enc": "E", "bottleneck": "B", "dec": "D"}


# ----------------------------------------------------------------------------------------------------------- grid


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

    def runs(self, out: Path) -> List[Tuple[Cell, int, Path]]:
        """(cell, seed, run folder), seed-major."""
        return [(c, s, run_dir(out, c, s)) for s in self.seeds for c in self.cells]


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return Path(out) / "runs" / cell.slug / f"seed{seed}"


def preset_file(name: str):
    """The packaged preset grid ``medkd/presets/ablate-<name>.yaml`` (an ``importlib.resources`` Traversable)."""
    from importlib.resources import files

    if name not in PRESETS:
        raise MedkdError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return files("medkd").joinpath("presets", f"ablate-{name}.yaml")


def load_grid_doc(grid: Optional[Path] = None, preset: Optional[str] = None) -> Dict[str, Any]:
    """Read a grid file or preset into ``{"source", "cells", "seeds", "options"}`` (not validated yet).

    Raises:
        MedkdError: both/neither given, unreadable or malformed file, unknown preset.
    """
    if (grid is None) == (preset is None):
        raise MedkdError("give exactly one of --grid GRID.yaml or --preset quick|study")
    if preset is not None:
        source = f"preset {preset}"
        text = preset_file(preset).read_text()
    else:
        source = str(grid)
        try:
            text = Path(grid).read_text()
        except OSError as e:
            raise MedkdError(f"{grid}: cannot read ({e.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MedkdError(f"{source}: invalid YAML ({' '.join(str(e).split())[:150]})") from None
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
            raise MedkdError(f"{source}: cell {i + 1} must be a mapping of distill options, got {c!r}")
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
            if isinstance(v, bool) or float(v) != int(float(v)):
                raise ValueError
            s = int(float(v))
        except (TypeError, ValueError):
            raise MedkdError(f"{source}: seeds must be integers, got {v!r}") from None
        if s < 0:
            raise MedkdError(f"{source}: seeds must be >= 0, got {s}")
        if s not in out:
            out.append(s)
    if not out:
        raise MedkdError(f"{source}: no seeds given")
    return out


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
    for c in cells:
        if not c.cfg.uses_teacher:
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
    return Plan(cells=all_cells, seeds=parse_seeds(seeds_l), source=source, base=base)


def baseline_config(cfg: DistillConfig) -> DistillConfig:
    """The student alone: ``cfg`` without any distillation (KD-only options back to their defaults)."""
    d = DistillConfig()
    return replace(cfg, scales=[], pmd=False, teacher=None, loss=d.loss, scale_losses={}, loss_options={},
                   temperature=d.temperature, weights=dict(d.weights), taps={})


def identity(d: Dict[str, Any]) -> Dict[str, Any]:
    """The options that decide what a run learns, from ``to_dict(cfg)`` or a run's ``config.yaml``: the config's
    :meth:`~medkd.config.DistillConfig.effective` form without the options that do not change what is learnt."""
    eff = DistillConfig.from_record(d).effective()
    return {k: v for k, v in eff.items() if k not in NON_IDENTITY}


def _canon(d: Dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def setting_name(cfg: DistillConfig, base: DistillConfig) -> str:
    """``"baseline"``, ``"PMD only"``, ``"E+B+D contrastive +PMD"``, plus ``[key=value, ...]`` for options that
    differ from the ablation's common options (e.g. ``"D mse [fraction=0.25]"``)."""
    scales = cfg.effective()["scales"]
    if not scales and not cfg.pmd:
        core = "baseline"
    elif not scales:
        core = "PMD only"
    else:
        core = "+".join(ABBR[s] for s in scales) + f" {cfg.loss}" + (" +PMD" if cfg.pmd else "")
    mine, ref = identity(to_dict(cfg)), identity(to_dict(base))
    extras = []
    for k, v in mine.items():
        if k in ("scales", "pmd", "loss"):
            continue
        r = ref.get(k)
        if k == "weights":
            if not cfg.uses_teacher:
                continue  # the supervised term alone is not weighted
            rw = {**STUDY_WEIGHTS, **base.weights}
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


# ----------------------------------------------------------------------------------------------------------- runs


def run_state(run: Path, cfg: DistillConfig, data: Path) -> Tuple[str, str]:
    """``("done"|"resume"|"restart"|"new"|"mismatch"|"stray", detail)`` for one planned run folder."""
    run = Path(run)
    partial = rundir.partial_dir(run)
    if (run / rundir.SUMMARY).is_file():
        diff = config_diff(run / rundir.CONFIG, cfg, data) or inputs_newer(run / rundir.SUMMARY, cfg, data)
        return ("mismatch", diff) if diff else ("done", "")
    if run.exists():
        return "stray", f"exists but is not a finished run (no {rundir.SUMMARY})"
    if partial.is_dir():
        diff = config_diff(partial / rundir.CONFIG, cfg, data)
        if diff:
            return "restart", f"unfinished run had another config ({diff})"
        if (partial / rundir.LAST).is_file():
            return "resume", ""
        return "restart", "unfinished run has no completed epoch"
    return "new", ""


def inputs_newer(summary: Path, cfg: DistillConfig, data: Path) -> str:
    """A finished run is stale when its data was re-prepared or its teacher retrained after it finished."""
    t = Path(summary).stat().st_mtime
    if (Path(data) / "manifest.json").is_file() and (Path(data) / "manifest.json").stat().st_mtime > t:
        return f"data {data} was prepared again after this run"
    ckpt = Path(cfg.teacher) / rundir.BEST if cfg.uses_teacher and cfg.teacher else None
    if ckpt is not None and ckpt.is_file() and ckpt.stat().st_mtime > t:
        return f"teacher {cfg.teacher} was trained again after this run"
    return ""


def config_diff(path: Path, cfg: DistillConfig, data: Path) -> str:
    """What differs between a run's recorded ``config.yaml`` and ``cfg`` (``""`` when they match)."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return f"{path} unreadable"
    if not isinstance(doc, dict):
        return f"{path} malformed"
    try:
        mine, theirs = identity(to_dict(cfg)), identity(doc)
    except MedkdError as e:
        return f"{path} malformed ({e})"
    diffs = [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    if doc.get("data") and str(Path(doc["data"]).resolve()) != str(Path(data).resolve()):
        diffs.append(f"data: {doc['data']} -> {Path(data).resolve()}")
    teacher = doc.get("teacher")
    if cfg.uses_teacher and teacher and str(Path(teacher).resolve()) != str(Path(cfg.teacher).resolve()):
        diffs.append(f"teacher: {doc['teacher']} -> {cfg.teacher}")
    return "; ".join(diffs)


def eval_is_fresh(run: Path, data: Path) -> bool:
    """``RUN/eval-test.json`` exists, is newer than ``best.pt`` and was computed on ``data``."""
    ev, best = rundir.eval_json(run, SPLIT), Path(run) / rundir.BEST
    if not ev.is_file():
        return False
    if best.is_file() and ev.stat().st_mtime < best.stat().st_mtime:
        return False
    try:
        doc = json.loads(ev.read_text())
    except ValueError:
        return False
    return str(doc.get("data")) == str(Path(data).resolve()) and doc.get("split") == SPLIT


class _Progress(BarContext):
    """Overall bar (runs done / total, ETA) above the current run's epoch bar (drawn by the training loop, nested
    under this one); plain lines when stderr is not a terminal (or Rich cannot nest live displays)."""

    def __init__(self, console: Console, total: int, done: int):
        self.console, self.total, self.done = console, total, done
        self.bar = None
        if console.is_terminal and not console.quiet and hasattr(console, "_live_stack"):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]ablation[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                TextColumn("{task.description}"), console=console, transient=False)
            self.task = self.bar.add_task("", total=total, completed=done)

    def start(self, label: str) -> None:
        if self.bar:
            self.bar.update(self.task, description=escape(label))
        else:
            self.console.print(f"\\[{self.done + 1}/{self.total}] {escape(label)}", highlight=False, soft_wrap=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar:
            self.bar.advance(self.task)

    def log(self, msg: str) -> None:
        (self.bar.console if self.bar else self.console).print(msg, highlight=False, soft_wrap=True)


def ablate(
    data: Path,
    teacher: Optional[Path],
    out: Path,
    grid: Optional[Path] = None,
    preset: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
    base_overrides: Optional[Dict[str, Any]] = None,
    console: Optional[Console] = None,
    config: Optional[Path] = None,
    test: str = "auto",
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Run (or resume) an ablation and write ``DIR/results.{json,csv,md,png}``.

    Args:
        data: prepared dataset folder.
        teacher: teacher run folder (shared teacher-output cache in ``TEACHER_RUN/cache/``).
        out: the ablation folder ``DIR``.
        grid: grid YAML file (see the module docstring); exclusive with ``preset``.
        preset: ``"quick"`` or ``"study"``.
        seeds: seeds of every row (default: the grid file's ``seeds``, else 0, 1, 2).
        base_overrides: distill options for every cell unless the cell sets them (``None`` values ignored),
            e.g. ``{"epochs": 4, "device": "cpu", "student": "s2", "fraction": 0.5}``.
        console: logs and progress (stderr); quiet when ``None``.
        config: a distill options YAML applied under ``base_overrides``.
        test: ``"auto"``, ``"wilcoxon"`` or ``"ttest"`` (see the module docstring).
        overwrite: retrain finished runs whose recorded config differs from the grid's (else an error).

    Returns:
        The results document (also ``DIR/results.json``): ``{"baseline": row, "rows": [row, ...], "test": {...},
        ...}``; see :func:`compute_results`.

    Raises:
        MedkdError: bad grid/options (before anything runs), config mismatch of a finished run, failed runs
            (after the results of the other runs are written).
    """
    from medkd.data.prepared import PreparedData
    from medkd.distill.run import distill, load_teacher
    from medkd.evaluate import evaluate_runs
    from medkd.report.ablate_table import write_reports

    console = console or Console(stderr=True, quiet=True)
    if test not in TESTS:
        raise MedkdError(f"unknown test {test!r}; valid: {', '.join(TESTS)}")
    data, out = Path(data), Path(out)
    prepared = PreparedData(data)
    prepared.require_split(SPLIT)
    plan = build_plan(load_grid_doc(grid, preset), teacher, seeds, base_overrides, config)
    if any(c.cfg.uses_teacher for c in plan.cells):
        if teacher is None:
            raise MedkdError("the grid distills from a teacher: give --teacher TEACHER_RUN")
        load_teacher(Path(teacher), next(c.cfg for c in plan.cells if c.cfg.uses_teacher), prepared)
    runs = plan.runs(out)
    states = []
    for cell, seed, run in runs:
        cfg = replace(cell.cfg, seed=seed)
        state, detail = run_state(run, cfg, data)
        if state == "mismatch" and not overwrite:
            raise MedkdError(f"{run}: finished with a different config ({detail}); use another -o DIR, or "
                             f"--overwrite to retrain such runs")
        if state == "stray" and not overwrite:
            raise MedkdError(f"{run}: {detail}; remove it or use --overwrite")
        states.append((cell, seed, run, cfg, state, detail))
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, plan, data, teacher)

    n_done = sum(1 for s in states if s[4] == "done")
    console.print(f"ablation {escape(str(out))}: {len(plan.cells)} row(s) x {len(plan.seeds)} seed(s) = "
                  f"{len(runs)} run(s) ({escape(plan.source)}); {n_done} already finished", highlight=False,
                  soft_wrap=True)
    failed: List[Dict[str, str]] = []
    t0 = time.time()
    with _Progress(console, len(runs), n_done) as progress:
        for cell, seed, run, cfg, state, detail in states:
            label = f"{cell.name} seed {seed}"
            if state != "done":
                progress.start(label)
                if detail:
                    progress.log(escape(f"{run}: {detail}; restarting"))
                try:
                    distill(data, run, cfg, resume=state == "resume",
                            overwrite=state in ("restart", "mismatch", "stray"), console=console)
                except Exception as e:  # one run's failure (bad loss, CUDA error, OOM) must not end the ablation
                    failed.append({"run": str(run), "name": cell.name, "seed": seed, "error": run_error(e)})
                    progress.log(f"[red]failed[/] {escape(label)}: {escape(run_error(e))}")
                    progress.advance()
                    continue
                progress.advance()
            if not eval_is_fresh(run, data):
                try:
                    evaluate_runs([run], prepared, SPLIT, device=cfg.device)
                except Exception as e:
                    failed.append({"run": str(run), "name": cell.name, "seed": seed, "error": f"evaluate: {run_error(e)}"})
                    progress.log(f"[red]evaluation failed[/] {escape(label)}: {escape(run_error(e))}")
    evals = {}
    for cell, seed, run, *_ in states:
        ev = rundir.eval_json(run, SPLIT)
        if ev.is_file() and not any(f["run"] == str(run) for f in failed):
            evals[(cell.name, seed)] = json.loads(ev.read_text())
    results = compute_results(plan, evals, test=test)
    results.update(data=str(data.resolve()), teacher=str(Path(teacher).resolve()) if teacher else None,
                   out=str(out.resolve()), failed=failed, seconds=round(time.time() - t0, 1))
    from medkd.metrics import to_jsonable

    results = to_jsonable(results)  # NaN/inf -> None, as written to results.json
    write_reports(results, out)
    console.print(f"wrote {escape(str(out / 'results.json'))}, results.csv, results.md, results.png", highlight=False,
                  soft_wrap=True)
    if failed:
        raise MedkdError(f"{len(failed)} run(s) failed (first: {failed[0]['run']}: {failed[0]['error']}); "
                         f"results of the others are in {out / 'results.json'}")
    return results


def run_error(e: BaseException) -> str:
    """One line for a failed run: the message of a :class:`MedkdError`, else the exception type and its first line
    (e.g. ``RuntimeError: CUDA out of memory ...``)."""
    if isinstance(e, MedkdError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _write_plan(out: Path, plan: Plan, data: Path, teacher: Optional[Path]) -> None:
    doc = {
        "source": plan.source, "data": str(Path(data).resolve()),
        "teacher": str(Path(teacher).resolve()) if teacher else None, "seeds": plan.seeds,
        "rows": [{"name": c.name, "folder": f"runs/{c.slug}", "baseline": c.baseline, "grid": c.overrides,
                  "config": {k: v for k, v in to_dict(c.cfg).items() if k != "seed"}} for c in plan.cells],
    }
    rundir.write_text(out / "ablation.yaml", yaml.safe_dump(doc, sort_keys=False))


# ----------------------------------------------------------------------------------------------------- statistics


def _finite(v: Any) -> Optional[float]:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def mean_std(values: Iterable[Any]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std (``ddof=1``) of the finite values; std is ``None`` with fewer than 2 values."""
    v = [f for f in (_finite(x) for x in values) if f is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def rel_gain(value: Optional[float], ref: Optional[float]) -> Optional[float]:
    """``100 * (value - ref) / |ref|`` (percent); ``None`` when undefined."""
    if value is None or ref is None or ref == 0:
        return None
    return 100.0 * (value - ref) / abs(ref)


def per_case_mean(evals: Sequence[Dict[str, Any]], metric: str = "dice") -> Dict[str, float]:
    """Case id -> the metric averaged over runs (seeds), over the runs where it is defined."""
    acc: Dict[str, List[float]] = {}
    for ev in evals:
        for c in ev.get("per_case") or []:
            v = _finite(c.get(metric))
            if v is not None:
                acc.setdefault(str(c["id"]), []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def choose_test(test: str, n: int) -> str:
    if test == "auto":
        return "wilcoxon" if n >= WILCOXON_MIN_N else "ttest"
    return test


def paired_test(a: Sequence[float], b: Sequence[float], test: str = "auto") -> Dict[str, Any]:
    """Two-sided paired test of ``a`` vs ``b`` (same order = same case).

    Returns:
        ``{"test": "wilcoxon"|"ttest", "n": n, "statistic", "p_value"}``; ``p_value`` is 1.0 when every
        difference is zero and ``None`` when undefined (n < 2; or, for the t-test, identical non-zero
        differences, where the variance is zero).
    """
    from scipy import stats

    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a_ - b_
    n = int(d.size)
    name = choose_test(test, n)
    res: Dict[str, Any] = {"test": name, "n": n, "statistic": None, "p_value": None}
    if n == 0:
        return res
    if np.all(d == 0):
        res["p_value"] = 1.0
        return res
    if name == "wilcoxon":
        r = stats.wilcoxon(a_, b_, zero_method="wilcox", alternative="two-sided")
        res.update(statistic=float(r.statistic), p_value=float(r.pvalue))
    else:
        if n < 2 or float(np.ptp(d)) <= 1e-12:  # identical differences: zero variance, t undefined
            return res
        r = stats.ttest_rel(a_, b_, alternative="two-sided")
        res.update(statistic=float(r.statistic), p_value=float(r.pvalue))
    return res


def bootstrap_ci(diffs: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                 seed: int = 0) -> Optional[List[float]]:
    """Percentile bootstrap interval of the mean of ``diffs`` (resampling cases); ``None`` for < 2 values."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def test_description(name: str, n: int) -> Dict[str, Any]:
    """The test used, in words, with the small-sample caveat."""
    words = {"wilcoxon": "two-sided Wilcoxon signed-rank test (exact for small n; zero differences dropped)",
             "ttest": "two-sided paired t-test"}[name]
    note = ""
    if n < WILCOXON_MIN_N:
        min_p = 2.0 / 2 ** n if n else 1.0
        note = (f"only {n} test case(s): a two-sided Wilcoxon signed-rank test cannot reach p < {ALPHA} "
                f"(its smallest p is {min_p:.3g})")
        note += "; the paired t-test used instead assumes normal differences, which so few cases cannot check" \
            if name == "ttest" else ", so no row can be significant"
    return {"name": name, "description": words, "alpha": ALPHA, "alternative": "two-sided", "n_cases": n,
            "unit": "test case: per-case Dice averaged over seeds, paired with the baseline's",
            "correction": "none", "bootstrap": f"95% percentile CI of the mean per-case Dice difference, "
                                                 f"{BOOTSTRAP_SAMPLES} resamples of cases",
            "note": note}


def compute_results(plan: Plan, evals: Dict[Tuple[str, int], Dict[str, Any]], test: str = "auto") -> Dict[str, Any]:
    """Statistics from evaluate dicts.

    Args:
        plan: the resolved ablation plan (rows, seeds).
        evals: ``{(row name, seed): evaluate dict}`` (``per_case`` and the top-level metric means are used);
            missing entries (failed runs) are left out of that row.
        test: ``"auto"``, ``"wilcoxon"`` or ``"ttest"``.

    Returns:
        ``{"schema", "kind": "ablation", "split", "seeds", "grid", "metrics", "test", "baseline", "rows", ...}``.
        Each row: ``name``, ``slug``, ``is_baseline``, ``baseline`` (its reference row), ``scales``, ``loss``,
        ``pmd``, ``student``, ``fraction``, ``epochs``, ``overrides``, ``seeds`` (those with results),
        ``runs``, ``params``, ``<m>_mean``, ``<m>_std``, ``<m>_rel_gain`` (percent), ``<m>_per_seed`` for every
        metric, ``pooled_dice_mean``, ``dice_diff`` (mean per-case Dice difference vs the baseline),
        ``dice_diff_ci``, ``n_pairs``, ``test``, ``statistic``, ``p_value``, ``significant``.
    """
    rows: List[Dict[str, Any]] = []
    per_case: Dict[str, Dict[str, float]] = {}
    for c in plan.cells:
        got = [(s, evals[(c.name, s)]) for s in plan.seeds if (c.name, s) in evals]
        cfg, eff = c.cfg, c.cfg.effective()
        row: Dict[str, Any] = {
            "name": c.name, "slug": c.slug, "is_baseline": c.is_baseline, "baseline": c.baseline,
            "scales": eff["scales"], "loss": eff.get("loss"),
            "pmd": cfg.pmd, "student": cfg.student, "fraction": cfg.fraction, "epochs": cfg.epochs,
            "overrides": c.overrides, "seeds": [s for s, _ in got],
            "runs": [f"runs/{c.slug}/seed{s}" for s, _ in got],
            "params": next((ev.get("params") for _, ev in got if ev.get("params") is not None), None),
        }
        for m in METRICS:
            vals = [_finite(ev.get(m)) for _, ev in got]
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
            row[f"{m}_per_seed"] = vals
        row["pooled_dice_mean"] = mean_std([(ev.get("pooled") or {}).get("dice") for _, ev in got])[0]
        per_case[c.name] = per_case_mean([ev for _, ev in got], "dice")
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    n_cases_all = []
    for r in rows:
        ref = by_name[r["baseline"]]
        for m in METRICS:
            r[f"{m}_rel_gain"] = rel_gain(r[f"{m}_mean"], ref[f"{m}_mean"])
        if r["is_baseline"]:
            r.update(dice_diff=0.0 if r["dice_mean"] is not None else None, dice_diff_ci=None, n_pairs=None,
                     test=None, statistic=None, p_value=None, significant=False)
            continue
        mine, theirs = per_case[r["name"]], per_case[ref["name"]]
        ids = sorted(set(mine) & set(theirs))
        a, b = [mine[i] for i in ids], [theirs[i] for i in ids]
        t = paired_test(a, b, test)
        n_cases_all.append(len(ids))
        diffs = [x - y for x, y in zip(a, b)]
        r.update(dice_diff=float(np.mean(diffs)) if diffs else None, dice_diff_ci=bootstrap_ci(diffs),
                 n_pairs=len(ids), test=t["test"], statistic=t["statistic"], p_value=t["p_value"],
                 significant=bool(t["p_value"] is not None and t["p_value"] < ALPHA))
    n = min(n_cases_all) if n_cases_all else 0
    test_doc = test_description(choose_test(test, n), n)
    test_doc["requested"] = test
    primary = next((r for r in rows if r["is_baseline"]), None)
    base = plan.base
    return {
        "schema": 1, "kind": "ablation", "split": SPLIT, "grid": plan.source, "seeds": plan.seeds,
        "metrics": list(METRICS),
        "options": {"student": base.student, "student_width": base.student_width, "fraction": base.fraction,
                    "epochs": base.epochs, "batch_size": base.batch_size, "lr": base.lr, "device": base.device,
                    "in_channels": base.in_channels},
        "test": test_doc,
        "baseline": primary,
        "rows": rows,
        "medkd_version": medkd.__version__,
    }
