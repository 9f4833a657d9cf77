"""The names of an ablation's rows (``"PMD only +unlabelled"``, ``"D mse [fraction=0.25]"``) and their folder
slugs, from their configs and the ablation's common options."""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Sequence

from medkd.config import DEFAULT_WEIGHTS, DistillConfig, run_identity, to_dict

CELL_RESERVED = ("teacher", "teacher_probs", "seed")  # fixed by the ablation (--teacher or --teacher-probs,
# --seeds): not part of a row's identity
ABBR = {"enc": "E", "bottleneck": "B", "dec": "D"}
#: How an option reads in a row's name when it differs (default: its own name).
NAME_LABELS = {"steps_per_epoch": "steps/epoch"}


def identity(d: Dict[str, Any]) -> Dict[str, Any]:
    """A row's identity, from ``to_dict(cfg)`` or a run's ``config.yaml``: the run identity
    (:func:`medkd.config.run_identity`, the same one ``--resume`` holds fixed) without what the ablation fixes for
    every row (:data:`CELL_RESERVED`)."""
    ident = run_identity(DistillConfig.from_record(d))
    return {k: v for k, v in ident.items() if k not in CELL_RESERVED}


def setting_name(cfg: DistillConfig, base: DistillConfig, show: Sequence[str] = (), hide: Sequence[str] = ()) -> str:
    """``"baseline"``, ``"PMD only"``, ``"E+B+D contrastive +PMD"``, ``"PMD only +unlabelled"`` (``kd_images=all``),
    plus ``[key=value, ...]`` for options that differ from the ablation's common options
    (e.g. ``"D mse [fraction=0.25]"``, ``"baseline [steps/epoch=105]"``); options in ``show`` are named even when
    they do not differ, those in ``hide`` never."""
    scales = cfg.effective()["scales"]
    if not cfg.uses_teacher:
        core = "baseline"
    elif not scales and not cfg.pmd:
        core = "pseudo-labels only"
    elif not scales:
        core = "PMD only"
    else:
        core = "+".join(ABBR[s] for s in scales) + f" {cfg.loss}" + (" +PMD" if cfg.pmd else "")
    if cfg.uses_pseudo_labels and (scales or cfg.pmd):
        core += " +PL"
    if cfg.kd_on_unlabelled:  # named in every row, so a gain from the extra images is never misattributed
        core += " +unlabelled"
    return core + extras_text(setting_extras(cfg, base, show, hide))


def setting_extras(cfg: DistillConfig, base: DistillConfig, show: Sequence[str] = (),
                   hide: Sequence[str] = ()) -> List[str]:
    """The ``key=value`` items of :func:`setting_name`: identity options of ``cfg`` that differ from ``base``'s
    (and those in ``show``), less those in ``hide``."""
    mine, ref = identity(to_dict(cfg)), identity(to_dict(base))
    extras = []
    for k, v in sorted(mine.items(), key=lambda kv: kv[0] not in show):  # those always named first
        if k in ("scales", "pmd", "loss", "kd_images", "pseudo_label") or k in hide:  # in the core name
            continue
        r = ref.get(k)
        label = NAME_LABELS.get(k, k)
        if k == "weights":
            if not cfg.uses_teacher:
                continue  # the supervised term alone is not weighted
            rw = {**DEFAULT_WEIGHTS, **base.weights}
            extras += [f"w_{n}={_short(x)}" for n, x in v.items() if float(rw.get(n, math.nan)) != x]
        elif isinstance(v, dict):
            extras += [f"{label}.{n}={_short(x)}" for n, x in v.items() if (r or {}).get(n) != x]
        elif v != r or k in show:
            extras.append(f"{label}={_short(v)}")
    return extras


def extras_text(extras: Sequence[str]) -> str:
    return f" [{', '.join(extras)}]" if extras else ""


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
