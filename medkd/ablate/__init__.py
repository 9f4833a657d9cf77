"""``medkd ablate``: a grid of distill config overrides -> one run folder per cell and seed -> statistics -> tables.

Modules: :mod:`~medkd.ablate.grid` (plan), :mod:`~medkd.ablate.runner` (runs), :mod:`~medkd.ablate.report`
(the results document); the tables and files are rendered by :mod:`medkd.report.ablate_table`.

Grid (``--grid GRID.yaml``)
    A YAML list of mappings whose keys are :class:`~medkd.config.DistillConfig` options (``scales``, ``loss``,
    ``pmd``, ``weights``, ``fraction``, ``student``, ``epochs``, ...) plus an optional ``name``; e.g.
    ``- {scales: [enc, dec], loss: contrastive, pmd: true}``. ``scales`` takes a list, ``"enc,dec"`` or ``none``;
    a cell's ``weights`` are merged over the common weights. ``teacher`` and ``seed`` are not cell keys (the
    teacher is ``--teacher``; seeds are ``--seeds``), nor are ``teacher_label``, ``teacher_fold`` and
    ``teacher_checkpoint`` (they choose the one teacher: ``--teacher-fold`` ... or the grid's ``options``). The file may also be a mapping
    ``{seeds: [...], options: {...}, cells: [...]}`` (the presets use this form): ``options`` apply to every cell
    and are overridden by ``--config``, then by command-line options, then by the cell itself. Unknown keys are
    an error naming the key and the cell. The mapping may also set ``fractions`` (as ``--fractions``) and
    ``references`` (a list of ``all_labels``, ``teacher``; default ``[teacher]``). Presets ``quick`` and
    ``study`` are such files (with both references), packaged in ``medkd/presets/ablate-*.yaml`` (``configs/``
    links to them for copying).

Baseline (equal budgets)
    Every distillation row is compared with the student alone (``scales: none, pmd: false``) with the same
    student, fraction, seeds, training options *and training budget* (:mod:`medkd.ablate.budget`): the same
    epochs, batch size and augmentation, and as many optimizer steps per epoch. A row with ``kd_images=all``
    iterates its labelled subset and the other train cases every epoch, so its baseline gets
    ``steps_per_epoch`` = the row's steps (it draws its labelled subset again, in fresh seeded permutations). Rows
    of equal budgets share a baseline; others get their own (named by their budget when that tells baselines
    apart, e.g. ``baseline [steps/epoch=105]``). A grid cell that *is* a baseline is merged into it. Every run's
    ``summary.json`` records its measured ``budget``; each results row carries them and ``budget_matched``.

References
    ``all_labels``: the student alone given every train label (fraction 1), with the budget of the distillation
    row that takes the most steps, trained like any row (``reference: "all_labels"``; described, not tested).
    ``teacher``: the teacher, of any kind (a medkd run, an nnU-Net folder, a MONAI bundle, a TorchScript/ONNX
    file), evaluated once on the test split as ``medkd evaluate`` scores it (``DIR/references/teacher/eval-test.json``,
    reused while the teacher's identity -- kind, files' SHA-256, fold/checkpoint/label -- is the same;
    ``reference: "teacher"``). With the teacher, every compared row reports ``gap_closed`` = (row - baseline) /
    (teacher - baseline) in mean Dice with two intervals (below). ``--no-references`` leaves both out.

Fractions
    ``--fractions 0.1,0.25,0.5,1`` (or ``fractions:`` in the grid) runs every cell that sets no ``fraction`` at
    each fraction, each against its own equal-budget baseline, and draws ``label_efficiency.png``: test Dice vs
    labelled fraction per setting and its baselines (95 % t intervals over seeds), the teacher as a line, the
    all-labels student as a point.

Setting
    By default the teacher was trained on all train cases (as in the reference study), so on the students'
    "unlabelled" cases it has seen their labels; the captions say so (``results["teacher_training"]``).
    ``medkd train-teacher --fraction F --subset-seed N`` trains it on the labelled subset only (semi-supervised).
    An external teacher's training cases are unknown: ``teacher_training`` has its ``kind`` and no fraction, and
    the captions say medkd does not know them (``results["teacher_source"]``: kind, files, details).

Runs
    ``DIR/runs/<slug>/seed<k>/`` is an ordinary ``medkd distill`` run folder; ``DIR/ablation.yaml`` records the
    resolved plan. Runs go seed-major (one seed of every row first). Before the first run, one
    teacher-output mode is planned for all pending runs (:func:`medkd.ablate.plan_outputs.plan_runs`, printed with
    its estimated teacher cost): a disk cache (``TEACHER_RUN/cache/``; an external teacher's in
    ``DATA/teacher-cache/``) shared by every run, filled in one teacher pass for all cells, only when that is cheaper
    than each run holding its targets in memory or running the teacher live.
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
    ``results.md`` say so. Calibration and power by simulation: ``benchmarks/RESULTS.md``. The p-value and the t
    interval answer "would new training runs beat the baseline *on these test cases*?"; beside them
    ``dice_diff_boot_ci`` and ``gap_closed_boot_ci`` are two-level bootstrap intervals
    (:func:`medkd.stats.bootstrap_diff`: seeds and cases resampled) that also speak to *new patients*. A case
    whose label and prediction are both empty scores Dice 1 in the comparison (never dropped).

Provenance
    ``results.json`` records ``medkd_version`` and, from a git checkout, ``git_commit`` and ``git_dirty``.

Subset
    By default each run's ``fraction`` subset of training cases is drawn from its seed (seeds replicate the data
    draw too); ``subset_seed`` (``--subset-seed N``) draws it once for every run, so only training varies.
    ``results["subset"]`` records which.
"""

from medkd.ablate.budget import (
    baseline_config, matched_baseline, natural_steps_per_epoch, optimizer_steps, steps_per_epoch
)
from medkd.ablate.grid import (
    DEFAULT_SEEDS, GRID_PRESETS, REFERENCES, SPLIT, Cell, Plan, build_plan, load_grid_doc, parse_fractions,
    parse_seeds, preset_file, run_dir
)
from medkd.ablate.names import identity, setting_name, slugify
from medkd.ablate.report import (
    ALPHA, CORRECTIONS, LOWER_IS_BETTER, METRICS, compute_results, matched_gain, mean_std, per_case_matrix,
    test_description
)
from medkd.ablate.runner import PendingRun, ablate, parse_shard, run_error, shard_runs
from medkd.ablate.states import config_diff, eval_is_fresh, inputs_newer, run_state

__all__ = [
    "ALPHA", "CORRECTIONS", "DEFAULT_SEEDS", "GRID_PRESETS", "LOWER_IS_BETTER", "METRICS", "REFERENCES", "SPLIT",
    "Cell", "PendingRun", "Plan", "ablate", "baseline_config", "build_plan", "compute_results", "config_diff",
    "eval_is_fresh", "identity", "inputs_newer", "load_grid_doc", "matched_baseline", "matched_gain", "mean_std",
    "natural_steps_per_epoch", "optimizer_steps", "parse_fractions", "parse_seeds", "parse_shard", "per_case_matrix",
    "preset_file", "run_dir", "run_error", "run_state", "setting_name", "shard_runs", "slugify", "steps_per_epoch",
    "test_description",
]
