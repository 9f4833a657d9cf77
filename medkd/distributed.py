"""Distributed data parallel training under ``torchrun``, by PyTorch's own conventions (no custom launcher).

``torchrun --nproc-per-node N -m medkd train-teacher|distill ...`` (and multi-node with ``--nnodes`` /
``--rdzv-backend`` / ``--rdzv-endpoint``) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; medkd reads them,
initialises the default process group (NCCL on CUDA, gloo on CPU) and trains one replica per process:

* ``--batch-size`` is the **global** batch (nnU-Net's convention): each of the N processes gets ``batch_size / N``
  samples per step from a ``DistributedSampler`` reseeded every epoch, so a run's optimisation does not depend on
  how many processes share it;
* BatchNorm statistics are synchronised across processes (``SyncBatchNorm`` on CUDA; :class:`CPUSyncBatchNorm` on
  CPU, where PyTorch has none) and the Dice loss is computed over the global batch (:func:`global_sum`), so a step
  with N processes computes the same losses and gradients as one process with the whole batch (up to float
  summation order); the contrastive loss's in-batch negatives are the process's own slices;
* the trainable modules (the model, distillation adapters and heads) are wrapped in ``DistributedDataParallel``; the
  frozen teacher is left out of DDP's parameter and buffer synchronisation;
* only rank 0 claims the run folder, writes files and logs; validation cases are split over the processes and
  their Dice gathered; checkpoints hold the unwrapped modules, so one process can load or resume them, and
  ``--resume`` works under ``torchrun`` too.

The run folder must be on a file system every process sees (as for any multi-node job).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from medkd.errors import MedkdError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (``world_size == 1`` outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group with more than one process is running."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def env() -> DistEnv:
    """The torchrun environment (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), or a single process.

    Raises:
        MedkdError: the variables are malformed.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistEnv()
    try:
        e = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise MedkdError("RANK / WORLD_SIZE / LOCAL_RANK are not integers (start with torchrun)") from None
    if not (0 <= e.rank < e.world_size):
        raise MedkdError(f"RANK={e.rank} is not in [0, WORLD_SIZE={e.world_size})")
    return e


def under_torchrun() -> bool:
    return env().world_size > 1


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[DistEnv]:
    """Inside the ``with`` block this process is part of the torchrun job (no-op for a single process).

    The default process group is created on first use (NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``;
    gloo on CPU) and kept for the life of the process (destroyed at exit): re-creating it in one process would
    reuse the rendezvous store's keys.
    """
    e = env()
    if e.world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60), **kw)
        atexit.register(_destroy)
    yield e


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if env().world_size > 1 and dist.is_initialized():
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its :class:`MedkdError`) to every rank."""
    e = env()
    if not (e.world_size > 1 and dist.is_initialized()):
        return fn()
    box: List[Any] = [None]
    if e.is_main:
        try:
            box[0] = ("ok", fn())
        except MedkdError as err:
            box[0] = ("error", str(err))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise MedkdError(value)
    return value


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if not env().active:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` / ``max``) of a tensor; unchanged for a single process."""
    if env().active:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


class _DiffAllReduce(torch.autograd.Function):
    """Sum over processes with a gradient: backward sums the incoming gradients over processes too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes, differentiably; ``t`` itself for a single process.

    With DDP averaging gradients over N processes, a loss computed on ``global_sum`` statistics (identical on every
    process) gets exactly the single-process gradient: backward sums the N identical upstream gradients (x N) and
    DDP divides by N.
    """
    return _DiffAllReduce.apply(t) if env().active else t


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over every process's batch (CPU / gloo).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this is the same computation (mean and biased variance of the
    global batch for normalising, unbiased variance for the running estimate) with two differentiable sums.
    Same parameters and buffers as ``BatchNorm2d``, so checkpoints load into the plain model.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and env().active):
            return super().forward(x)
        c = x.shape[1]
        n_local = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n_local])  # (2C + 1,)
        stats = global_sum(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise ``module``'s BatchNorm layers across processes (in place; returns ``module``)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            # the same Parameter and buffer objects (as torch's convert_sync_batchnorm): optimizers stay valid
            for k, v in [*child._parameters.items(), *child._buffers.items()]:
                setattr(new, k, v)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module


def wrap(task: nn.Module, device: torch.device, frozen: Optional[str] = None,
         find_unused_parameters: bool = False) -> nn.Module:
    """Prepare ``task`` for DDP: synchronised BatchNorm in the trainable children, the ``frozen`` child (the
    teacher) left out of DDP's synchronisation, then ``DistributedDataParallel``. Returns ``task`` unchanged for a
    single process.
    """
    if not env().active:
        return task
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen_mod = task.get_submodule(frozen) if frozen else None
    for name, child in task.named_children():
        if child is not frozen_mod:
            convert_sync_batchnorm(child, device)
    if frozen_mod is not None:
        ignore = [f"{frozen}.{n}" for n, _ in frozen_mod.named_parameters()]
        ignore += [f"{frozen}.{n}" for n, _ in frozen_mod.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(task, ignore)
    return DDP(task, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)
