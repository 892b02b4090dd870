"""Where the random numbers of a training step come from: derived from (seed, position) alone.

Nothing depends on a random generator's running state, so a run resumed from step N draws the
same samples, crops, flips, DiffLoss timesteps and noise at step N + 1 as an uninterrupted run,
whatever the number of data-loader workers.
"""
from __future__ import annotations

import itertools

import numpy as np
from torch.utils.data import Dataset, DistributedSampler, Sampler


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


class SeededSampler(Sampler):
    """An endless stream of ``(index, item_seed)`` for this process.

    Each epoch is a ``DistributedSampler`` permutation (this rank's share, reshuffled per
    epoch); ``start`` skips the samples this rank already consumed, without loading them.
    """

    def __init__(self, dataset: Dataset, *, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        if len(self.inner) == 0:
            raise ValueError(f"the training set has {len(dataset)} items, fewer than the "
                             f"{world} processes")
        self.seed, self.start = seed, start

    def __iter__(self):
        epoch, offset = divmod(self.start, len(self.inner))
        while True:
            self.inner.set_epoch(epoch)
            for index in itertools.islice(iter(self.inner), offset, None):
                yield index, derive_seed(self.seed, epoch, index)
            epoch, offset = epoch + 1, 0
