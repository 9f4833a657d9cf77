"""``medkd ablate``: a grid of distill config overrides -> one run folder per cell and seed -> statistics -> tables.

Modules: :mod:`~medkd.ablate.grid` (plan), :mod:`~medkd.ablate.runner` (runs), :mod:`~medkd.ablate.report`
(the results document); the tables and files are rendered by :mod:`medkd.report.ablate_table`.

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

from medkd.ablate.grid import (PRESETS, DEFAULT_SEEDS, SPLIT, Cell, Plan, run_dir, preset_file, load_grid_doc, parse_seeds, build_plan, baseline_config, identity, setting_name, slugify)
from medkd.ablate.report import (METRICS, LOWER_IS_BETTER, TESTS, ALPHA, compute_results, mean_std, rel_gain, per_case_mean, paired_test, bootstrap_ci, test_description)
from medkd.ablate.runner import (ablate, run_state, inputs_newer, config_diff, eval_is_fresh, run_error)

__all__ = ["PRESETS", "DEFAULT_SEEDS", "SPLIT", "Cell", "Plan", "run_dir", "preset_file", "load_grid_doc", "parse_seeds", "build_plan", "baseline_config", "identity", "setting_name", "slugify", "METRICS", "LOWER_IS_BETTER", "TESTS", "ALPHA", "compute_results", "mean_std", "rel_gain", "per_case_mean", "paired_test", "bootstrap_ci", "test_description", "ablate", "run_state", "inputs_newer", "config_diff", "eval_is_fresh", "run_error"]
