"""torch.distributed plumbing for torchrun runs (NCCL on GPUs, gloo on CPU).

robaudit does not bring a process pool of its own: `torchrun --nproc-per-node N -m
robaudit scan ...` starts N copies, each calls `init_from_env()`, audits its shard
and rank 0 writes the outputs. Everything here is a no-op in a single process, so
the single-process path and the torchrun path are the same code.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from robaudit.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> Tuple[bool, int]:
    """(started by torchrun with more than one process, this process's LOCAL_RANK), read from
    the environment torchrun sets, so it holds before and after init_process_group."""
    if current().enabled:
        return True, current().local_rank
    return int(os.environ.get("WORLD_SIZE", "1")) > 1, int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (once); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda and ":" in str(device):
            raise UserError(f"--device {device} would put every torchrun rank on the same GPU (NCCL refuses "
                            f"duplicate GPUs); use --device cuda: each rank takes the GPU of its LOCAL_RANK")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("ROBAUDIT_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def current() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def shard_positions(labels: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Positions (ascending) this rank audits: the i-th sample of each class goes to rank i % W.

    Interleaving by class gives every rank a similar mix of easy and hard classes, so
    ranks finish at about the same time; the result depends only on the labels.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if world_size <= 1:
        return np.arange(labels.size, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank_in_class = np.empty(labels.size, dtype=np.int64)
    rank_in_class[order] = np.arange(labels.size) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.flatnonzero(rank_in_class % world_size == rank).astype(np.int64)


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    ctx = current()
    if not ctx.enabled:
        return [obj]
    gathered: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def agree_or_raise(error: BaseException | None) -> None:
    """Collective: if any rank failed, every rank raises one UserError naming the first failure.

    Called at the points where ranks would otherwise wait for each other forever.
    """
    ctx = current()
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    reports = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    for rank, report in enumerate(reports):
        if report is not None:
            if error is not None and isinstance(error, UserError) and rank == ctx.rank:
                raise error
            raise UserError(f"rank {rank} of {ctx.world_size} failed ({report}); no results were written")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process); returns the tensor."""
    if current().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if current().enabled:
        dist.barrier()


# ---------------------------------------------------------------------------- added for remediate
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (pickled; `obj` itself in a single process).

    Lets one rank read a file (a checkpoint, an exported model) and share it, so the
    other ranks never need the output folder (multi-node runs without a shared disk).
    """
    ctx = current()
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors_(tensors: List[torch.Tensor], src: int = 0) -> None:
    """In place: every rank's `tensors` take rank `src`'s values (one broadcast per dtype/device).

    Used for module buffers (BatchNorm running statistics), so all ranks hold one model.
    """
    if not current().enabled or not tensors:
        return
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: the sum of every rank's `tensor`, added in rank order.

    Unlike all_reduce_sum, the result does not depend on the backend's reduction order,
    so it is bitwise the same on every rank (NCCL or gloo, any topology). A copy in a
    single process.
    """
    ctx = current()
    if not ctx.enabled:
        return tensor.clone()
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def on_main(fn: Callable[[], Any], *, share: bool = False) -> Any:
    """fn() on rank 0 only (the one that touches the output folder); a failure there ends every
    rank with one UserError (agree_or_raise); share=True hands fn's result to every rank.
    In a single process simply fn()."""
    ctx = current()
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as err:
            error = err
    agree_keeping_cause(error)
    return broadcast_object(result) if share else result


def agree_keeping_cause(error: BaseException | None) -> None:
    """agree_or_raise, keeping this rank's own failure as the cause (for --debug tracebacks)."""
    try:
        agree_or_raise(error)
    except UserError as raised:
        if error is not None and raised is not error:
            raise raised from error
        raise
