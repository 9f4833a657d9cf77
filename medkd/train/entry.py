"""What every training entry point (``train_teacher``, ``distill``) does around its work: the process group, the
claim on the run folder, and the cleanup of a run that failed before its first epoch."""

from __future__ import annotations

import functools
import inspect
import shutil
from pathlib import Path
from typing import Any, Callable, List

from medkd import distributed, rundir
from medkd.claim import Claim
from medkd.infer import resolve_device


def claims_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(..., run, cfg, ...)`` (arguments named ``run`` and ``cfg``) as a training entry point:

    * under torchrun, inside the job's process group (:func:`medkd.distributed.session`, device from ``cfg``);
    * holding the claim on ``run`` (rank 0 claims for the job): a second process training into the same folder
      fails at once (:class:`medkd.claim.ClaimedError`) naming the owner;
    * when ``fn`` fails before any epoch finished, its ``RUN.partial`` (nothing to resume) is removed (by rank 0).
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs).arguments
        run = Path(bound["run"])
        held: List[Claim] = []
        with distributed.session(resolve_device(bound["cfg"].device)) as env:
            distributed.on_main(lambda: held.append(Claim(run).acquire()))
            try:
                return fn(*args, **kwargs)
            except BaseException:
                work = rundir.partial_dir(run)
                if env.is_main and work.is_dir() and not (work / rundir.LAST).is_file():
                    shutil.rmtree(work, ignore_errors=True)
                raise
            finally:
                for claim in held:
                    claim.release()

    return wrapper
