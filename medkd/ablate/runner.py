"""Running an ablation: the state of each planned run folder (done / resume / restart / new / stale), training
and evaluating what is missing, then writing the reports. See :mod:`medkd.ablate`."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from rich.console import Console
from rich.markup import escape

from medkd import rundir
from medkd.ablate.grid import SPLIT, Plan, build_plan, identity, load_grid_doc
from medkd.ablate.report import CORRECTIONS, METRICS, compute_results
from medkd.config import DistillConfig, to_dict
from medkd.yamlfile import load_yaml
from medkd.errors import MedkdError
from medkd.options import short_repr
from medkd.report.progress import Bars


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
        doc = load_yaml(Path(path)) or {}
    except MedkdError:
        return f"{path} unreadable"
    if not isinstance(doc, dict):
        return f"{path} malformed"
    try:
        mine, theirs = identity(to_dict(cfg)), identity(doc)
    except MedkdError as e:
        return f"{path} malformed ({e})"
    diffs = [f"{k}: {short_repr(theirs.get(k))} -> {short_repr(v)}" for k, v in mine.items() if theirs.get(k) != v]
    if doc.get("data") and str(Path(doc["data"]).resolve()) != str(Path(data).resolve()):
        diffs.append(f"data: {doc['data']} -> {Path(data).resolve()}")
    teacher = doc.get("teacher")
    if cfg.uses_teacher and teacher and str(Path(teacher).resolve()) != str(Path(cfg.teacher).resolve()):
        diffs.append(f"teacher: {doc['teacher']} -> {cfg.teacher}")
    return "; ".join(diffs)


def eval_problem(doc: Any) -> str:
    """What keeps an ``eval-test.json`` document from being an evaluate result the report can use (``""``: nothing).

    The report reads the top-level metrics, ``pooled`` and ``per_case``; a document without them would silently
    drop its seed from the row.
    """
    if not isinstance(doc, dict):
        return f"not an evaluate result (a JSON {type(doc).__name__}, expected an object)"
    missing = [k for k in ("split", "data", *METRICS, "pooled", "per_case") if k not in doc]
    if missing:
        return f"not an evaluate result (no {', '.join(missing)})"
    cases = doc["per_case"]
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) and "id" in c for c in cases):
        return "not an evaluate result (per_case is not a list of cases with an id)"
    return ""


def eval_state(run: Path, data: Path) -> Tuple[bool, str]:
    """Whether ``RUN/eval-test.json`` can be used as it is (exists, is newer than ``best.pt``, was computed on
    ``data`` and is a well-formed result), and, when it exists but is damaged, one line saying why (else ``""``)."""
    ev, best = rundir.eval_json(run, SPLIT), Path(run) / rundir.BEST
    if not ev.is_file():
        return False, ""
    if best.is_file() and ev.stat().st_mtime < best.stat().st_mtime:
        return False, ""
    try:
        doc = json.loads(ev.read_text())
    except (OSError, ValueError) as e:
        return False, f"{ev}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    problem = eval_problem(doc)
    if problem:
        return False, f"{ev}: {problem}"
    return str(doc.get("data")) == str(Path(data).resolve()) and doc.get("split") == SPLIT, ""


def eval_is_fresh(run: Path, data: Path) -> bool:
    """``RUN/eval-test.json`` exists, is newer than ``best.pt``, was computed on ``data`` and is well formed."""
    return eval_state(run, data)[0]


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
) -> Optional[Dict[str, Any]]:
    """Run (or resume) an ablation, or one shard of it, and write ``DIR/results.{json,csv,md,png}``.

    Every run is trained and evaluated under its run-folder claim (:mod:`medkd.claim`): a run another live process
    holds is skipped, and a run is re-checked once claimed, so shards that overlap or are restarted never train a
    run twice. Shard ``(i, n)`` trains the runs ``k`` of the seed-major plan with ``k % n == i - 1``
    (:func:`shard_runs`); the shard that finds every planned run finished and evaluated writes the results (the last
    to finish), the others return ``None``. ``report_only`` trains nothing: it evaluates finished runs that lack
    ``eval-test.json`` and writes the results from the finished runs.

    Args:
        data: prepared dataset folder.
        teacher: teacher run folder (its ``cache/`` holds the shared teacher-output cache when the plan uses one).
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

    Returns:
        The results document (also ``DIR/results.json``): ``{"baseline": row, "rows": [row, ...], "test": {...},
        ...}``; see :func:`compute_results`. ``None`` for a shard that finished its runs while others are still
        missing (the last shard, or ``report_only``, writes the results).

    Raises:
        MedkdError: bad grid/options (before anything runs), config mismatch of a finished run, failed runs
            (after the results of the other runs are written), planned runs missing when the results are written.
    """
    from medkd.claim import Claim, ClaimedError, describe
    from medkd.locks import exclusive_lock
    from medkd.data.prepared import PreparedData
    from medkd.distill.inputs import load_teacher
    from medkd.distill.run import distill
    from medkd.evaluate import evaluate_runs
    from medkd.report.ablate_table import write_reports

    console = console or Console(stderr=True, quiet=True)
    from medkd.distributed import under_torchrun

    if under_torchrun():
        raise MedkdError("ablate trains one run per process: start it without torchrun (one `medkd ablate ... "
                         "--shard I/N` per GPU or node instead, see the README)")
    if correction not in CORRECTIONS:
        raise MedkdError(f"unknown correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    data, out = Path(data), Path(out)
    prepared = PreparedData(data)
    prepared.require_split(SPLIT)
    plan = build_plan(load_grid_doc(grid, preset), teacher, seeds, base_overrides, config)
    if any(c.cfg.uses_teacher for c in plan.cells):
        if teacher is None:
            raise MedkdError("the grid distills from a teacher: give --teacher TEACHER_RUN")
        load_teacher(Path(teacher), next(c.cfg for c in plan.cells if c.cfg.uses_teacher), prepared)
    runs = plan.runs(out)
    mine = [] if report_only else shard_runs(runs, *shard)
    states = []
    for cell, seed, run in mine:
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
    part = f"; shard {shard[0]}/{shard[1]}: {len(mine)} of them" if shard[1] > 1 and not report_only else ""
    console.print(f"ablation {escape(str(out))}: {len(plan.cells)} row(s) x {len(plan.seeds)} seed(s) = "
                  f"{len(runs)} run(s) ({escape(plan.source)}){part}; {n_done} already finished", highlight=False,
                  soft_wrap=True)
    for note in plan.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    # one teacher-output mode for all pending runs that leave it to auto: a shared disk cache only when cheaper
    auto = [i for i, s in enumerate(states)
            if s[4] != "done" and s[3].uses_teacher and s[3].teacher_outputs == "auto" and not s[3].augment]
    outputs_plan, outputs_note = None, None
    if auto:
        from medkd.ablate.plan_outputs import plan_runs

        mode, outputs_plan = plan_runs([states[i][3] for i in auto], Path(teacher), prepared, console)
        outputs_note = f"ablation plan for {len(auto)} run(s): {outputs_plan['reason']}"
        for i in auto:
            cell, seed, run, cfg, state, detail = states[i]
            states[i] = (cell, seed, run, replace(cfg, teacher_outputs=mode), state, detail)
    failed: List[Dict[str, str]] = []
    busy: List[str] = []
    t0 = time.time()
    if report_only:  # evaluate finished runs that lack their evaluation; train nothing
        states = [(c, s, r, replace(c.cfg, seed=s), "done", "") for c, s, r in runs
                  if (r / rundir.SUMMARY).is_file() and not eval_is_fresh(r, data)]
    with Bars(console, "[bold]ablation[/]", len(states), n_done if not report_only else 0, unit="runs",
              transient=False, nested=True) as progress:
        for cell, seed, run, cfg, state, detail in states:
            label = f"{cell.name} seed {seed}"
            try:
                claim = Claim(run).acquire()
            except ClaimedError as e:
                busy.append(str(run))
                progress.log(f"{escape(label)}: in progress in {escape(describe(e.owner))}; skipped")
                progress.advance()
                continue
            try:
                if state != "done":  # look again now that it is ours: another process may have finished it
                    state, detail = run_state(run, cfg, data)
                    if state == "mismatch" and not overwrite:  # finished meanwhile by a run with another config
                        failed.append({"run": str(run), "name": cell.name, "seed": seed,
                                       "error": f"finished by another process with a different config ({detail})"})
                        continue
                if state != "done":
                    progress.start(label, announce=True)
                    if detail:
                        progress.log(escape(f"{run}: {detail}; restarting"))
                    try:
                        distill(data, run, cfg, resume=state == "resume",
                                overwrite=state in ("restart", "mismatch", "stray"), console=console,
                                outputs_note=outputs_note)
                    except Exception as e:  # one run's failure (bad loss, CUDA error, OOM) must not end the ablation
                        failed.append({"run": str(run), "name": cell.name, "seed": seed, "error": run_error(e)})
                        progress.log(f"[red]failed[/] {escape(label)}: {escape(run_error(e))}")
                        progress.advance()
                        continue
                    progress.advance()
                fresh, damaged = eval_state(run, data)
                if not fresh:
                    if damaged:  # never a silent drop of this seed: say so and evaluate again
                        progress.log(f"note: {escape(damaged)}; evaluating again")
                    try:
                        evaluate_runs([run], prepared, SPLIT, device=cfg.device)
                    except Exception as e:
                        failed.append({"run": str(run), "name": cell.name, "seed": seed,
                                       "error": f"evaluate: {run_error(e)}"})
                        progress.log(f"[red]evaluation failed[/] {escape(label)}: {escape(run_error(e))}")
            finally:
                claim.release()
    missing = [str(r) for _, _, r in runs if not ((r / rundir.SUMMARY).is_file() and eval_is_fresh(r, data))]
    if shard[1] > 1 and not report_only and missing:  # not the last shard: leave the results to the last one
        console.print(f"shard {shard[0]}/{shard[1]} done ({len(mine)} run(s)); {len(missing)} planned run(s) are not "
                      f"finished yet: the last shard to finish (or `--report-only`) writes the results",
                      highlight=False, soft_wrap=True)
        if failed:
            raise MedkdError(f"{len(failed)} run(s) failed (first: {failed[0]['run']}: {failed[0]['error']})")
        return None
    evals = {}
    for cell, seed, run in runs:
        if eval_is_fresh(run, data) and not any(f["run"] == str(run) for f in failed):  # the others are pending
            evals[(cell.name, seed)] = json.loads(rundir.eval_json(run, SPLIT).read_text())
    results = compute_results(plan, evals, correction=correction)
    results.update(data=str(data.resolve()), teacher=str(Path(teacher).resolve()) if teacher else None,
                   out=str(out.resolve()), failed=failed, seconds=round(time.time() - t0, 1),
                   teacher_outputs=outputs_plan)
    from medkd.metrics import to_jsonable

    results["pending"] = sorted(set(missing) - {f["run"] for f in failed})
    results = to_jsonable(results)  # NaN/inf -> None, as written to results.json
    with exclusive_lock(out / ".results.lock"):  # shards finishing together write one after the other
        write_reports(results, out)
    console.print(f"wrote {escape(str(out / 'results.json'))}, results.csv, results.md, results.png", highlight=False,
                  soft_wrap=True)
    if failed:
        raise MedkdError(f"{len(failed)} run(s) failed (first: {failed[0]['run']}: {failed[0]['error']}); "
                         f"results of the others are in {out / 'results.json'}")
    if results["pending"]:
        raise MedkdError(f"{len(results['pending'])} planned run(s) are not finished (first: "
                         f"{results['pending'][0]}); results of the finished ones are in {out / 'results.json'}")
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


def _write_plan(out: Path, plan: Plan, data: Path, teacher: Optional[Path]) -> None:
    doc = {
        "source": plan.source, "data": str(Path(data).resolve()),
        "teacher": str(Path(teacher).resolve()) if teacher else None, "seeds": plan.seeds,
        "rows": [{"name": c.name, "folder": f"runs/{c.slug}", "baseline": c.baseline, "grid": c.overrides,
                  "config": {k: v for k, v in to_dict(c.cfg).items() if k != "seed"}} for c in plan.cells],
    }
    rundir.write_text(out / "ablation.yaml", yaml.safe_dump(doc, sort_keys=False))
