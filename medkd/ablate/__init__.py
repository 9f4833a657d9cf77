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
    resolved plan. Runs go seed-major (one seed of every row first). Before the first run, one
    teacher-output mode is planned for all pending runs (:func:`medkd.ablate.plan_outputs.plan_runs`, printed with
    its estimated teacher cost): a disk cache in ``TEACHER_RUN/cache/`` shared by every run, filled in one teacher pass
    for all cells, only when that is cheaper than each run holding its targets in memory or running the teacher live.
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

Statistics (all in ``results.json``; computed by :mod:`medkd.stats`)
    Per row and metric (Dice, IoU, recall, precision, HD95, each the mean over test cases of one run): mean and
    sample std (``ddof=1``) over the row's finished seeds. ``*_rel_gain`` is the relative change vs the row's
    baseline in percent, ``100 * (row - baseline) / |baseline|``, of the means over the **seeds finished in both**
    (seed-matched: a row that lost a seed is not compared with the baseline's other seeds; for HD95 a negative
    change is an improvement).

    Significance: the training run (seed) is the unit of replication -- runs differ by initialisation, data order
    and, unless ``subset_seed`` is set, by the ``fraction`` subset of training cases, and that variation moves all
    test cases of a run together. :func:`medkd.stats.compare` takes, for each seed finished in both the row and its
    baseline, the mean over test cases of the per-case Dice difference (cases where both are defined), and runs a
    two-sided one-sample t-test over those per-seed differences (df = seeds - 1) with a 95 % t interval
    (``dice_diff``, ``dice_diff_ci``). ``p_value`` is raw; ``p_adjusted`` is adjusted over all non-baseline rows
    (``correction``: Holm by default, Benjamini-Hochberg, or none); a row is ``significant`` only when
    ``p_adjusted < 0.05``. With 1 seed no test is possible; with 2 seeds (1 degree of freedom) only a very large,
    very consistent difference can be significant -- ``results["test"]["note"]``, the table caption and
    ``results.md`` say so. Calibration and power by simulation: ``benchmarks/RESULTS.md``.

Subset
    By default each run's ``fraction`` subset of training cases is drawn from its seed (seeds replicate the data
    draw too); ``subset_seed`` (``--subset-seed N``) draws it once for every run, so only training varies.
    ``results["subset"]`` records which.
"""

from medkd.ablate.grid import (
    DEFAULT_SEEDS, GRID_PRESETS, SPLIT, Cell, Plan, baseline_config, build_plan, identity, load_grid_doc,
    parse_seeds, preset_file, run_dir, setting_name, slugify
)
from medkd.ablate.report import (
    ALPHA, CORRECTIONS, LOWER_IS_BETTER, METRICS, compute_results, matched_gain, mean_std, per_case_matrix,
    test_description
)
from medkd.ablate.runner import (
    PendingRun, ablate, config_diff, eval_is_fresh, inputs_newer, parse_shard, run_error, run_state, shard_runs
)

__all__ = [
    "ALPHA", "CORRECTIONS", "DEFAULT_SEEDS", "GRID_PRESETS", "LOWER_IS_BETTER", "METRICS", "SPLIT", "Cell", "PendingRun",
    "Plan",
    "ablate", "baseline_config", "build_plan", "compute_results", "config_diff", "eval_is_fresh", "identity",
    "inputs_newer", "load_grid_doc", "matched_gain", "mean_std", "parse_seeds", "parse_shard", "shard_runs", "per_case_matrix", "preset_file",
    "run_dir", "run_error", "run_state", "setting_name", "slugify", "test_description",
]
