"""Running an ablation: the state of each planned run folder (done / resume / restart / new / stale), training
and evaluating what is missing, then writing the reports. See :mod:`medkd.ablate`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from rich.console import Console
from rich.markup import escape

from medkd import evaluate, rundir
from medkd.ablate.grid import SPLIT, Cell, Plan, build_plan, load_grid_doc
from medkd.ablate.plan_outputs import plan_runs
from medkd.ablate.report import CORRECTIONS, compute_results
from medkd.ablate.states import eval_is_fresh, eval_problem, eval_state, run_state
from medkd.claim import Claim, ClaimedError, describe
from medkd.config import DistillConfig, to_dict
from medkd.data.prepared import PreparedData
from medkd.distill import run as distill_run
from medkd.distill.inputs import load_teacher
from medkd.distributed import under_torchrun
from medkd.errors import MedkdError
from medkd.locks import exclusive_lock
from medkd.metrics import to_jsonable
from medkd.report.ablate_files import write_reports
from medkd.report.ablate_plots import has_label_efficiency
from medkd.report.progress import Bars


@dataclass
class PendingRun:
    """One planned run this process may train and evaluate: its row, seed, folder, config (the row's with the
    seed, and the planned teacher-output mode) and the state of its folder (:func:`run_state`)."""

    cell: Cell
    seed: int
    run: Path
    cfg: DistillConfig
    state: str = "new"
    detail: str = ""
    teacher_files: Optional[Dict[str, str]] = None  # the teacher's files (SHA-256) now: a run of others is stale

    @property
    def label(self) -> str:
        return f"{self.cell.name} seed {self.seed}"

    def failure(self, error: str) -> Dict[str, Any]:
        """The ``failed`` entry of the results for this run."""
        return {"run": str(self.run), "name": self.cell.name, "seed": self.seed, "error": error}


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
    correction: str = "holm",
    overwrite: bool = False,
    shard: Tuple[int, int] = (1, 1),
    report_only: bool = False,
    fractions: Optional[Sequence[float]] = None,
    references: Optional[Sequence[str]] = None,
    teacher_probs: Optional[Path] = None,
) -> Optional[Dict[str, Any]]:
    """Run (or resume) an ablation, or one shard of it, and write ``DIR/results.{json,csv,md,png}`` (and
    ``label_efficiency.png`` with several fractions).

    Plan (:func:`~medkd.ablate.grid.build_plan`), then claim, train and evaluate each pending run, then report.
    Every run is trained and evaluated under its run-folder claim (:mod:`medkd.claim`): a run another live process
    holds is skipped, and a run is re-checked once claimed, so shards that overlap or are restarted never train a
    run twice. Shard ``(i, n)`` trains the runs ``k`` of the seed-major plan with ``k % n == i - 1``
    (:func:`shard_runs`); the shard that finds every planned run finished and evaluated writes the results (the last
    to finish), the others return ``None``. ``report_only`` trains nothing: it evaluates finished runs that lack
    ``eval-test.json`` and writes the results from the finished runs.

    Args:
        data: prepared dataset folder.
        teacher: the teacher, of any kind :func:`medkd.teachers.open_teacher` reads (a medkd run, whose ``cache/``
            holds the shared teacher-output cache when the plan uses one; an nnU-Net folder, a MONAI bundle, a
            TorchScript/ONNX file, whose cache lives in ``DATA/teacher-cache/``). ``--teacher-label``,
            ``--teacher-fold`` and ``--teacher-checkpoint`` (``base_overrides`` or the grid's ``options``) say what
            to take of it, for every run and for the ``teacher`` reference row.
        out: the ablation folder ``DIR``.
        grid: grid YAML file (see the module docstring); exclusive with ``preset``.
        preset: ``"quick"`` or ``"study"``.
        seeds: seeds of every row (default: the grid file's ``seeds``, else 0, 1, 2).
        base_overrides: distill options for every cell unless the cell sets them (``None`` values ignored),
            e.g. ``{"epochs": 4, "device": "cpu", "student": "s2", "fraction": 0.5}``.
        console: logs and progress (stderr); quiet when ``None``.
        config: a distill options YAML applied under ``base_overrides``.
        correction: ``"holm"`` (default), ``"bh"`` or ``"none"``: multiple-comparison adjustment over all
            non-baseline rows (see the module docstring).
        overwrite: retrain finished runs whose recorded config differs from the grid's (else an error).
        shard: ``(i, n)``: train the i-th of n deterministic slices of the plan (1-based).
        report_only: train nothing; aggregate the finished runs.
        fractions: run every cell (that does not set its own ``fraction``) at each of these labelled fractions,
            each against its own baseline (default: the grid's ``fractions``, else none).
        references: reference rows, of ``all_labels`` and ``teacher`` (default: the grid's ``references``, else
            ``teacher``; ``[]``: none). The teacher is evaluated once on the test split
            (``DIR/references/teacher/eval-test.json``), an external teacher as ``medkd evaluate`` scores it.
        teacher_probs: instead of ``teacher``, a folder of the teacher's saved per-case probabilities
            (``--teacher-probs``, :mod:`medkd.teachers.probs`): every run reads them into memory; there is no teacher
            model, so no ``teacher`` reference row.

    Returns:
        The results document (also ``DIR/results.json``): ``{"baseline": row, "rows": [row, ...], "test": {...},
        ...}``; see :func:`compute_results`. ``None`` for a shard that finished its runs while others are still
        missing (the last shard, or ``report_only``, writes the results).

    Raises:
        MedkdError: bad grid/options (before anything runs), config mismatch of a finished run, failed runs
            (after the results of the other runs are written), planned runs missing when the results are written.
    """
    console = console or Console(stderr=True, quiet=True)
    if under_torchrun():
        raise MedkdError("ablate trains one run per process: start it without torchrun (one `medkd ablate ... "
                         "--shard I/N` per GPU or node instead, see the README)")
    if correction not in CORRECTIONS:
        raise MedkdError(f"unknown correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    if teacher is not None and teacher_probs is not None:
        raise MedkdError("give either --teacher or --teacher-probs, not both")
    data, out = Path(data), Path(out)
    prepared = PreparedData(data)
    prepared.require_split(SPLIT)
    plan = build_plan(load_grid_doc(grid, preset), teacher, seeds, base_overrides, config, data=prepared,
                      fractions=fractions, references=references, teacher_probs=teacher_probs)
    source = _check_teacher(plan, teacher, prepared)
    files = (source or {}).get("files")
    runs = plan.runs(out)
    mine = [] if report_only else shard_runs(runs, *shard)
    pending = [_pending(cell, seed, run, data, overwrite, files) for cell, seed, run in mine]
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, plan, data, teacher, teacher_probs)
    _announce(console, plan, out, runs, pending, shard, report_only)
    outputs_plan, outputs_note = _plan_teacher_outputs(pending, teacher, prepared, console)
    if report_only:  # evaluate finished runs that lack their evaluation; train nothing
        pending = [PendingRun(c, s, r, replace(c.cfg, seed=s), "done", teacher_files=files) for c, s, r in runs
                   if (r / rundir.SUMMARY).is_file() and not eval_is_fresh(r, data)]
    t0 = time.time()
    failed: List[Dict[str, Any]] = []
    n_done = 0 if report_only else sum(1 for p in pending if p.state == "done")
    with Bars(console, "[bold]ablation[/]", len(pending), n_done, unit="runs", transient=False,
              nested=True) as progress:
        for p in pending:
            failed += _claim_train_evaluate(p, data, prepared, overwrite, outputs_note, console, progress)
    missing = [str(r) for _, _, r in runs if not ((r / rundir.SUMMARY).is_file() and eval_is_fresh(r, data))]
    if shard[1] > 1 and not report_only and missing:  # not the last shard: leave the results to the last one
        console.print(f"shard {shard[0]}/{shard[1]} done ({len(mine)} run(s)); {len(missing)} planned run(s) are not "
                      f"finished yet: the last shard to finish (or `--report-only`) writes the results",
                      highlight=False, soft_wrap=True)
        if failed:
            raise MedkdError(f"{len(failed)} run(s) failed (first: {failed[0]['run']}: {failed[0]['error']})")
        return None
    teacher_eval = None
    if "teacher" in plan.references:
        teacher_eval, error = _teacher_reference(Path(teacher), prepared, out, plan.base, console, source)
        if error:
            failed.append({"run": str(teacher), "name": "teacher", "seed": None, "error": error})
    results = _report(plan, runs, data, teacher, out, correction, failed, missing, outputs_plan, time.time() - t0,
                      teacher_eval, teacher_probs, source)
    figure = ", label_efficiency.png" if has_label_efficiency(results) else ""
    console.print(f"wrote {escape(str(out / 'results.json'))}, results.csv, results.md, results.png{figure}",
                  highlight=False, soft_wrap=True)
    if failed:
        raise MedkdError(f"{len(failed)} run(s) failed (first: {failed[0]['run']}: {failed[0]['error']}); "
                         f"results of the others are in {out / 'results.json'}")
    if results["pending"]:
        raise MedkdError(f"{len(results['pending'])} planned run(s) are not finished (first: "
                         f"{results['pending'][0]}); results of the finished ones are in {out / 'results.json'}")
    return results


def _check_teacher(plan: Plan, teacher: Optional[Path], prepared: PreparedData) -> Optional[Dict[str, Any]]:
    """A grid that distils needs a teacher that fits the data (checked before anything runs). Returns its record
    (:meth:`medkd.teachers.LoadedTeacher.record`: kind, source, SHA-256 of its files, details), ``None`` without
    a distillation row; the model itself is not kept (each run loads its own)."""
    kd = next((c.cfg for c in plan.cells if c.cfg.uses_teacher), None)
    if kd is None:
        return None
    if teacher is None and not kd.teacher_probs:
        raise MedkdError("the grid distills from a teacher: give --teacher TEACHER_RUN (or --teacher-probs DIR)")
    return load_teacher(kd, prepared, teacher=Path(teacher) if teacher is not None else None).record()


def _pending(cell: Cell, seed: int, run: Path, data: Path, overwrite: bool,
             teacher_files: Optional[Dict[str, str]] = None) -> PendingRun:
    """A planned run of this process with the state of its folder (``teacher_files``: the teacher's files now,
    :func:`~medkd.ablate.states.inputs_newer`).

    Raises:
        MedkdError: the run finished with another config, or its folder is not a run (unless ``overwrite``).
    """
    p = PendingRun(cell, seed, run, replace(cell.cfg, seed=seed), teacher_files=teacher_files)
    p.state, p.detail = run_state(run, p.cfg, data, teacher_files)
    if p.state == "mismatch" and not overwrite:
        raise MedkdError(f"{run}: finished with a different config ({p.detail}); use another -o DIR, or "
                         f"--overwrite to retrain such runs")
    if p.state == "stray" and not overwrite:
        raise MedkdError(f"{run}: {p.detail}; remove it or use --overwrite")
    return p


def _announce(console: Console, plan: Plan, out: Path, runs: Sequence[Tuple[Cell, int, Path]],
              pending: Sequence[PendingRun], shard: Tuple[int, int], report_only: bool) -> None:
    """The plan in one line (rows x seeds, this shard's share, finished runs), then the plan's notes."""
    n_done = sum(1 for p in pending if p.state == "done")
    part = f"; shard {shard[0]}/{shard[1]}: {len(pending)} of them" if shard[1] > 1 and not report_only else ""
    console.print(f"ablation {escape(str(out))}: {len(plan.cells)} row(s) x {len(plan.seeds)} seed(s) = "
                  f"{len(runs)} run(s) ({escape(plan.source)}){part}; {n_done} already finished", highlight=False,
                  soft_wrap=True)
    for note in plan.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


def _plan_teacher_outputs(pending: List[PendingRun], teacher: Optional[Path], prepared: PreparedData,
                          console: Console) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """One teacher-output mode for the pending runs that leave it to ``auto``: a shared disk cache only when
    cheaper (:func:`medkd.ablate.plan_outputs.plan_runs`). Sets it on those runs' configs; returns the plan's
    record and the note each run prints. Runs on saved probabilities (``teacher_probs``) have nothing to plan: each
    reads them into memory (:func:`medkd.distill.teacher_outputs.setup_case_targets`)."""
    auto = [p for p in pending if p.state != "done" and p.cfg.uses_teacher and p.cfg.teacher_outputs == "auto"
            and not p.cfg.augment and not p.cfg.teacher_probs]
    if not auto:
        return None, None
    mode, record = plan_runs([p.cfg for p in auto], Path(teacher), prepared, console)
    for p in auto:
        p.cfg = replace(p.cfg, teacher_outputs=mode)
    return record, f"ablation plan for {len(auto)} run(s): {record['reason']}"


def _claim_train_evaluate(p: PendingRun, data: Path, prepared: PreparedData, overwrite: bool,
                          outputs_note: Optional[str], console: Console, progress: Bars) -> List[Dict[str, Any]]:
    """Claim one run, train it unless it is done (looking again once claimed), evaluate it unless its evaluation is
    fresh. A run another process holds is skipped. Returns the failures (``[]`` or one entry)."""
    try:
        claim = Claim(p.run).acquire()
    except ClaimedError as e:
        progress.log(f"{escape(p.label)}: in progress in {escape(describe(e.owner))}; skipped")
        progress.advance()
        return []
    try:
        if p.state != "done":  # look again now that it is ours: another process may have finished it
            p.state, p.detail = run_state(p.run, p.cfg, data, p.teacher_files)
            if p.state == "mismatch" and not overwrite:  # finished meanwhile by a run with another config
                return [p.failure(f"finished by another process with a different config ({p.detail})")]
        if p.state != "done":
            error = _train(p, data, outputs_note, console, progress)
            if error:
                return [p.failure(error)]
        return _evaluate(p, data, prepared, progress)
    finally:
        claim.release()


def _train(p: PendingRun, data: Path, outputs_note: Optional[str], console: Console, progress: Bars) -> str:
    """Train (resume, restart) one claimed run. Returns ``""`` or the one-line reason it failed."""
    progress.start(p.label, announce=True)
    if p.detail:
        progress.log(escape(f"{p.run}: {p.detail}; restarting"))
    try:
        distill_run.distill(data, p.run, p.cfg, resume=p.state == "resume",
                            overwrite=p.state in ("restart", "mismatch", "stray"), console=console,
                            outputs_note=outputs_note)
    except Exception as e:  # one run's failure (bad loss, CUDA error, OOM) must not end the ablation
        progress.log(f"[red]failed[/] {escape(p.label)}: {escape(run_error(e))}")
        progress.advance()
        return run_error(e)
    progress.advance()
    return ""


def _evaluate(p: PendingRun, data: Path, prepared: PreparedData, progress: Bars) -> List[Dict[str, Any]]:
    """Evaluate one finished run on the test split unless its ``eval-test.json`` is fresh. Returns the failures."""
    fresh, damaged = eval_state(p.run, data)
    if fresh:
        return []
    if damaged:  # never a silent drop of this seed: say so and evaluate again
        progress.log(f"note: {escape(damaged)}; evaluating again")
    try:
        evaluate.evaluate_runs([p.run], prepared, SPLIT, device=p.cfg.device)
    except Exception as e:
        progress.log(f"[red]evaluation failed[/] {escape(p.label)}: {escape(run_error(e))}")
        return [p.failure(f"evaluate: {run_error(e)}")]
    return []


def _teacher_reference(teacher: Path, prepared: PreparedData, out: Path, cfg: DistillConfig, console: Console,
                       source: Optional[Dict[str, Any]] = None) -> Tuple[Optional[Dict[str, Any]], str]:
    """The teacher's evaluation on the test split, once per ablation: ``DIR/references/teacher/eval-test.json``.

    Any teacher kind is scored by :func:`medkd.evaluate.evaluate_runs`, as ``medkd evaluate`` scores it (an external
    teacher with ``cfg``'s ``teacher_label``, ``teacher_fold`` and ``teacher_checkpoint``). The file records the
    teacher's identity (``teacher_identity``: kind, source, SHA-256 of its files, details such as its fold or
    label) and is reused while it is fresh: the same identity, the same data and split, well formed. Nothing is
    written into the teacher's folder.

    Args:
        source: the teacher's record (:meth:`medkd.teachers.LoadedTeacher.record`), as the ablation opened it;
            ``None``: opened here.

    Returns:
        ``(evaluate dict or None, "" or why it failed)``.
    """
    path = rundir.eval_json(out / "references" / "teacher", SPLIT)
    try:
        if source is None:
            source = load_teacher(cfg, prepared, teacher=Path(teacher)).record()
        doc = _read_json(path) if path.is_file() else None
        if doc is not None and not eval_problem(doc) and doc.get("teacher_identity") == _identity(source) \
                and doc.get("data") == str(prepared.root.resolve()) and doc.get("split") == SPLIT:
            return doc, ""
        console.print(f"evaluating the {escape(source['kind'])} teacher {escape(str(teacher))} on the {SPLIT} split "
                      f"(reference row)", highlight=False, soft_wrap=True)
        doc = evaluate.evaluate_runs([teacher], prepared, SPLIT, device=cfg.device, save=False,
                                     teacher_label=cfg.teacher_label, teacher_fold=cfg.teacher_fold,
                                     teacher_checkpoint=cfg.teacher_checkpoint)[0]
    except Exception as e:  # the students' results are still written
        console.print(f"[red]teacher evaluation failed[/]: {escape(run_error(e))}", highlight=False, soft_wrap=True)
        return None, f"evaluate: {run_error(e)}"
    doc = {**doc, "teacher_identity": _identity(source)}
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(path, doc)
    return doc, ""


def _identity(source: Dict[str, Any]) -> Dict[str, Any]:
    """What makes a teacher the same teacher: its kind, source, files (SHA-256) and details (as JSON reads them)."""
    return json.loads(json.dumps({k: source.get(k) for k in ("kind", "source", "files", "details")}, default=str))


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _report(plan: Plan, runs: Sequence[Tuple[Cell, int, Path]], data: Path, teacher: Optional[Path], out: Path,
            correction: str, failed: List[Dict[str, Any]], missing: List[str],
            outputs_plan: Optional[Dict[str, Any]], seconds: float,
            teacher_eval: Optional[Dict[str, Any]] = None, teacher_probs: Optional[Path] = None,
            source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Compute the results from the evaluated runs (failed ones left out) and write every report format
    (``source``: the teacher's record, :func:`_check_teacher`)."""
    failed_runs = {f["run"] for f in failed}
    evals, budgets = {}, {}
    for cell, seed, run in runs:
        if eval_is_fresh(run, data) and str(run) not in failed_runs:  # the others are pending
            evals[(cell.name, seed)] = json.loads(rundir.eval_json(run, SPLIT).read_text())
            budgets[(cell.name, seed)] = (_read_json(run / rundir.SUMMARY) or {}).get("budget")
    medkd_run = teacher and (source or {}).get("kind", "medkd") == "medkd"
    teacher_summary = _read_json(Path(teacher) / rundir.SUMMARY) if medkd_run else None
    results = compute_results(plan, evals, correction=correction, teacher_eval=teacher_eval,
                              teacher_summary=teacher_summary, budgets=budgets, teacher_source=source)
    results.update(data=str(data.resolve()), teacher=str(Path(teacher).resolve()) if teacher else None,
                   teacher_probs=str(Path(teacher_probs).resolve()) if teacher_probs else None,
                   out=str(out.resolve()), failed=failed, seconds=round(seconds, 1), teacher_outputs=outputs_plan)
    results["pending"] = sorted(set(missing) - failed_runs)
    results = to_jsonable(results)  # NaN/inf -> None, as written to results.json
    with exclusive_lock(out / ".results.lock"):  # shards finishing together write one after the other
        write_reports(results, out)
    return results


def parse_shard(value: Optional[str]) -> Tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N`` (``None`` -> ``(1, 1)``).

    Raises:
        MedkdError: malformed.
    """
    if value is None:
        return 1, 1
    try:
        i, n = (int(v) for v in str(value).split("/"))
    except ValueError:
        raise MedkdError(f"--shard must be I/N (e.g. 2/4), got {value!r}") from None
    if not 1 <= i <= n:
        raise MedkdError(f"--shard I/N needs 1 <= I <= N, got {value!r}")
    return i, n


def shard_runs(runs: Sequence[Tuple[Any, int, Path]], i: int, n: int) -> List[Tuple[Any, int, Path]]:
    """The i-th (1-based) of n deterministic, disjoint slices of the seed-major plan: runs ``k`` with
    ``k % n == i - 1`` (round robin, so every shard gets a share of every seed)."""
    return [r for k, r in enumerate(runs) if k % n == i - 1]


def run_error(e: BaseException) -> str:
    """One line for a failed run: the message of a :class:`MedkdError`, else the exception type and its first line
    (e.g. ``RuntimeError: CUDA out of memory ...``)."""
    if isinstance(e, MedkdError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _write_plan(out: Path, plan: Plan, data: Path, teacher: Optional[Path],
                teacher_probs: Optional[Path] = None) -> None:
    doc = {
        "source": plan.source, "data": str(Path(data).resolve()),
        "teacher": str(Path(teacher).resolve()) if teacher else None,
        "teacher_probs": str(Path(teacher_probs).resolve()) if teacher_probs else None, "seeds": plan.seeds,
        "fractions": plan.fractions, "references": plan.references,
        "rows": [{"name": c.name, "folder": f"runs/{c.slug}", "baseline": c.baseline, "setting": c.setting,
                  "reference": c.reference, "grid": c.overrides,
                  "config": {k: v for k, v in to_dict(c.cfg).items() if k != "seed"}} for c in plan.cells],
    }
    rundir.write_text(out / "ablation.yaml", yaml.safe_dump(doc, sort_keys=False))
