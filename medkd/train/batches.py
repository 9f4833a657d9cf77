"""What one epoch feeds the model: the seeded sample order of this process's slices, and the augmentation."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from medkd import distributed
from medkd.config import TrainConfig
from medkd.errors import MedkdError


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Random flips (per sample, both axes) and intensity scale/shift; ``gen`` is seeded per epoch.

    ``gen`` is a CPU generator (the same draws on every device); the draws are moved to ``x``'s device.

    Args:
        x: images ``(B, C, H, W)``; y: masks ``(B, 1, H, W)`` on the same device.
    """
    b = x.shape[0]
    r = torch.rand(b, 4, generator=gen).to(x.device)  # (B, 4): flip H, flip W, scale, shift
    fh, fw = r[:, 0] < 0.5, r[:, 1] < 0.5
    x, y = x.clone(), y.clone()
    x[fh], y[fh] = x[fh].flip(-2), y[fh].flip(-2)
    x[fw], y[fw] = x[fw].flip(-1), y[fw].flip(-1)
    scale = (0.9 + 0.2 * r[:, 2]).view(b, 1, 1, 1)
    shift = (-0.05 + 0.1 * r[:, 3]).view(b, 1, 1, 1)
    return x * scale + shift, y


def pass_steps(n_samples: int, batch_size: int) -> int:
    """Optimizer steps of one pass over ``n_samples`` in one process, as :func:`epoch_loader` makes them:
    ``ceil(n / batch_size)``, less a final batch of 1 (dropped: BatchNorm cannot train on it)."""
    full, rest = divmod(int(n_samples), int(batch_size))
    return full + (1 if rest > 1 else 0)


class BudgetSampler(Sampler):
    """Exactly ``total`` sample indices for one epoch of a fixed budget (``steps_per_epoch x batch_size``):
    seeded permutations of the ``n`` samples back to back (full passes, then the start of one more).

    The permutations come from one generator seeded with ``seed + epoch`` as ``DistributedSampler`` seeds its one
    permutation, so the first pass is the order an epoch without a budget has. With ``world_size`` processes, rank
    ``r`` takes every ``world_size``-th index from ``r`` (``DistributedSampler``'s interleaving): the batches of a
    global step are the same as one process's. ``total`` must divide over the processes.
    """

    def __init__(self, n: int, total: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise MedkdError("no training samples to draw a budget from")
        self.n, self.total, self.seed, self.epoch, self.rank, self.world_size = n, total, seed, epoch, rank, world_size

    def indices(self) -> list:
        """The global order of the epoch (every rank's indices, ``total`` of them)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        out: list = []
        while len(out) < self.total:
            out += torch.randperm(self.n, generator=g).tolist()
        return out[: self.total]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.total // self.world_size


def epoch_loader(train_set: Dataset, cfg: TrainConfig, epoch: int, pin_memory: bool = False,
                 env: Optional[distributed.DistEnv] = None):
    """This process's DataLoader for one epoch, and its augmentation generator.

    Without a budget the sample order is one permutation seeded by ``(cfg.seed, epoch)`` (``DistributedSampler``'s);
    with ``cfg.steps_per_epoch`` it is that many global batches drawn by :class:`BudgetSampler` (the same seeding,
    further permutations back to back). The order comes from its own generator, so DataLoader workers and
    augmentation draws cannot change it, and with N processes the ``cfg.batch_size`` slices of a global step are
    the same as one process's. The augmentation generator is seeded by ``(cfg.seed, epoch, rank)``; it also seeds
    the workers.

    Returns:
        ``(loader, generator)``.

    Raises:
        MedkdError: the global batch size does not divide over the processes.
    """
    e = env or distributed.DistEnv()
    if cfg.batch_size % e.world_size:
        raise MedkdError(f"--batch-size {cfg.batch_size} (the global batch) does not divide over {e.world_size} "
                         f"processes")
    local_bs = cfg.batch_size // e.world_size
    if cfg.steps_per_epoch:
        sampler = BudgetSampler(len(train_set), cfg.steps_per_epoch * cfg.batch_size, cfg.seed, epoch, e.rank,
                                e.world_size)
    else:
        sampler = DistributedSampler(train_set, num_replicas=e.world_size, rank=e.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=False)
        sampler.set_epoch(epoch)
    # modulo 2**64 (what manual_seed takes): the same number for every seed it took before, and no overflow for
    # the largest seeds options.check_seed allows
    gen = torch.Generator().manual_seed((cfg.seed * 100003 + epoch + 7919993 * e.rank) % 2**64)
    # one process: drop a final batch of 1 (BatchNorm cannot train on it; the contrastive loss needs >= 2).
    # Under DDP the BatchNorm statistics are global, so every rank keeps its (equally long) last batch.
    drop_last = e.world_size == 1 and len(sampler) % local_bs == 1
    loader = DataLoader(train_set, batch_size=local_bs, sampler=sampler, generator=gen, drop_last=drop_last,
                        num_workers=cfg.num_workers, pin_memory=pin_memory)
    return loader, gen
