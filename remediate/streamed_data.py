"""Training data streamed from files: the shared loop's batches decoded ahead in workers.

An in-memory training split (a float32 tensor) is moved to the device whole, as before.
A lazily decoded one (image folders, Tiny-ImageNet: audit/data/image_folders.LazyImages)
is never held whole: at the start of each epoch the loop knows every batch it will take
(the epoch permutation is a function of (seed, epoch), train.epoch_permutation), so the
batches' positions go to `stream_batches`, which decodes them in DataLoader workers at
most workers * 2 batches ahead of the model, in order; each batch is copied to the
device when its step asks for it. Host memory is therefore bounded by the prefetched
batches, not by the training set (benchmarks/bench_remediate_memory.py). Labels and
dataset indices (8 bytes an image each) stay on the device whole.

The batches are the very batches of the in-memory path (the same positions in the same
order, decoded by the same code as `scan`), and augmentation and attack starts are keyed
by dataset index, so --resume is as exact here as there.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from robaudit.audit.data.image_folders import LazyImages, default_workers, stream_batches


def is_streamed(x) -> bool:
    """True for training images decoded on demand (streamed), False for an in-memory tensor."""
    return isinstance(x, LazyImages)


def rank_batches(order: torch.Tensor, batch_size: int, world: int, rank: int) -> List[torch.Tensor]:
    """This rank's share of each global batch of the epoch, as the loop takes them
    (every world-th image; a last batch smaller than the world is skipped)."""
    shares = []
    for start in range(0, len(order), batch_size):
        global_idx = order[start:start + batch_size]
        if len(global_idx) < world:
            continue
        shares.append(global_idx[rank::world])
    return shares


class StreamedImages:
    """The training images of one run, decoded batch by batch in the epoch's order."""

    def __init__(self, x: LazyImages, train_pos: torch.Tensor, device: torch.device,
                 workers: Optional[int] = None):
        self.x = x
        self.rows = train_pos.cpu().numpy().astype(np.int64)   # training position -> row of x
        self.device = device
        self.workers = default_workers(x) if workers is None else workers
        self._pending: Optional[Iterator[Tuple[torch.Tensor, torch.Tensor]]] = None

    def begin_epoch(self, shares: List[torch.Tensor]) -> None:
        """Start decoding the epoch's batches (`shares`: training positions per step)."""
        self.close()
        cpu_shares = [s.cpu() for s in shares]
        decoded = stream_batches(self.x, [self.rows[s.numpy()] for s in cpu_shares], num_workers=self.workers)
        self._pending = zip(cpu_shares, decoded)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The images of the step's `idx` (training positions), on the device."""
        expected, images = next(self._pending)
        if not torch.equal(expected, idx.cpu()):   # a programming error, never the user's
            raise RuntimeError("streamed training batches are out of step with the loop")
        return images.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the epoch's workers (an interrupted epoch must not leave them decoding)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            del pending
