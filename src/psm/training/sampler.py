"""A step-indexed sampler: the sample order is a pure function of (seed, global position), so a resumed
run continues exactly where the killed one stopped, on any number of ranks.

Global position ``p = (step · world + rank) · batch + i`` maps to epoch ``p // n`` and to position
``p % n`` of that epoch's seeded permutation. Every sample is seen once per pass over the data, passes
follow each other without a gap, and the sampler yields ``(index, epoch)`` so the dataset draws that
sample's augmentation from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` for steps ``start_step … end_step − 1`` of one rank.

    ``counted_steps`` are steps of the loader's epoch that ran before ``start_step``: they count toward
    ``len()`` but are not yielded again (Lightning adds them to what it fetches when it resumes an epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        end_step: int,
        counted_steps: int = 0,
    ) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_step, self.end_step, self.counted_steps = start_step, end_step, counted_steps
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of pass ``epoch`` over the data."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def __len__(self) -> int:
        return (max(0, self.end_step - self.start_step) + self.counted_steps) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.end_step):
            base = (step * self.world_size + self.rank) * self.batch_size
            for i in range(self.batch_size):
                p = base + i
                epoch = p // self.n
                yield int(self.permutation(epoch)[p % self.n]), epoch
