"""The training loss read from the device once per window of steps, not once per step.

`float(loss)` after every step is a host sync: the CPU waits for the GPU to finish the
step before it can queue the next one. A single-process run adds the per-image loss sums on
the device and reads them every `loss_check_interval(device)` steps (and at the end of the
epoch), which is also when a non-finite loss is noticed. On the CPU the interval is 1: a
read costs nothing there, and a NaN stops the run at the batch that made it, as before.
Under torchrun the per-step all-reduce in train._step_totals stays (every rank must hear
of a failure before the gradient all-reduce).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# Steps between loss reads on a GPU. A NaN loss is then noticed at most this many steps
# late (its batches name the window); the last good checkpoint is untouched either way.
LOSS_CHECK_EVERY_CUDA = 25


def loss_check_interval(device) -> int:
    return 1 if torch.device(device).type == "cpu" else LOSS_CHECK_EVERY_CUDA


class LossWindow:
    """Sum of per-image losses over the steps since the last read, kept on the device."""

    def __init__(self, every: int):
        self.every = max(1, int(every))
        self.total: Optional[torch.Tensor] = None
        self.n = 0
        self.first = self.last = 0

    def add(self, batch_mean: torch.Tensor, n: int, step: int) -> None:
        term = batch_mean.double() * n
        if self.total is None:
            self.total, self.n, self.first = term, 0, step
        else:
            self.total = self.total + term
        self.n += n

    def read_if_due(self, step: int, last: bool) -> Tuple[float, int]:
        """(loss sum, images) of the window when `every` steps have gathered or at the epoch's
        end (the window is then emptied); (0.0, 0) otherwise, without touching the device."""
        if self.total is None:
            return 0.0, 0
        self.last = step
        if step - self.first + 1 < self.every and not last:
            return 0.0, 0
        value, n = float(self.total), self.n
        self.total, self.n = None, 0
        return value, n

    @property
    def batches(self) -> str:
        if self.first == self.last:
            return f"batch {self.first + 1}"
        return f"batches {self.first + 1}-{self.last + 1}"
