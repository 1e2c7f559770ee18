"""Checkpoint selection for the shared loop: the held-out split, per-class clean and PGD robust
accuracy on it, and the score that picks the epoch kept in best.pt.

`val_per_class` images per class are held out of the training split (drawn with the
seed, never the test set). After every epoch the method's eval model is attacked with
PGD-`val_steps` (uniform start, fixed per-sample starts so epochs are compared on equal
terms, final iterate, clean-correct required) and the epoch with the highest avg + worst
class robust accuracy (worst-10% mean for >= 50 classes) is kept. The ABSLD authors
selected on the full test set; reports say that the paper's numbers were selected
differently.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from robaudit.audit.attacks.ascent import cross_entropy_pgd
from robaudit.audit.modes import eval_mode
from robaudit.audit.rng import per_sample_uniform
from robaudit.errors import UserError
from robaudit.remediate.base import TALLY_DTYPE, class_sums

# The hold-out's default: CFA's code holds out 25 images per class on CIFAR-100 and robaudit
# (like CFA) 100 on CIFAR-10; on small data at most this share of the smallest class.
DEFAULT_VAL_PER_CLASS, DEFAULT_VAL_PER_CLASS_MANY, MANY_CLASSES, MAX_VAL_SHARE = 100, 25, 50, 0.1

# rng streams of the validation split and starts, just below the augmentation stream (remediate/common.py).
STREAM_VALIDATION_SPLIT = (1 << 30) - 1
STREAM_VALIDATION_START = (1 << 30) - 2


def split_validation(y: torch.Tensor, index: torch.Tensor, per_class: int, seed: int,
                     num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train positions, validation positions): `per_class` seeded picks per class."""
    if per_class <= 0:
        return torch.arange(len(y)), torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes)
    short = (counts <= per_class).nonzero().flatten()
    if len(short):
        k = int(short[0])
        raise UserError(
            f"class {k} has only {int(counts[k])} training images: --val-per-class {per_class} would "
            f"leave none to train on; pass a smaller --val-per-class (or 0 to select the last epoch)"
        )
    key = per_sample_uniform(seed, index, (1,), stream=STREAM_VALIDATION_SPLIT).flatten()
    by_key = torch.argsort(key, stable=True)
    order = by_key[torch.argsort(y[by_key], stable=True)]          # grouped by class, random within
    sorted_y = y[order]
    block_start = torch.searchsorted(sorted_y, sorted_y, right=False)
    rank = torch.arange(len(y)) - block_start
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[order[rank < per_class]] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def evaluate_per_class(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                       num_classes: int, *, eps: float, step_size: float, steps: int, seed: int,
                       norm: str = "linf",
                       batch_size: int = 256, autocast: Callable = nullcontext,
                       memory_format=torch.contiguous_format,
                       reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class (clean accuracy, PGD robust accuracy) of `model` in eval mode.

    Robust = clean-correct and the final PGD iterate still correct (CE, uniform start
    fixed per sample, so every epoch faces the same starts; steps and ball in `norm`). Absent classes give NaN.
    `reduce` maps the per-class counts [C, 3] (images, clean-correct, robust-correct)
    before the division: under torchrun a sum over ranks, each rank holding a shard.
    """
    device = x.device
    tally = torch.zeros(num_classes, 3, device=device, dtype=TALLY_DTYPE)
    with eval_mode(model):
        for start in range(0, len(y), batch_size):
            xb = x[start:start + batch_size].contiguous(memory_format=memory_format)
            yb, ib = y[start:start + batch_size], index[start:start + batch_size]
            with torch.no_grad(), autocast():
                clean_ok = model(xb).argmax(1) == yb
            u = per_sample_uniform(seed, ib, xb.shape[1:], stream=STREAM_VALIDATION_START,
                                   device=device, dtype=xb.dtype)
            with autocast():
                x_adv = cross_entropy_pgd(model, xb, yb, eps=eps, step_size=step_size, steps=steps, unit_noise=u,
                                          norm=norm)
            with torch.no_grad(), autocast():
                robust = clean_ok & (model(x_adv).argmax(1) == yb)
            columns = torch.stack([torch.ones_like(clean_ok, dtype=torch.float32), clean_ok.float(),
                                   robust.float()], dim=1)
            tally += class_sums(yb, columns, num_classes, dtype=tally.dtype)
    if reduce is not None:
        tally = reduce(tally)
    counts = tally[:, 0]
    nan = torch.full_like(counts, float("nan"))
    clean = torch.where(counts > 0, tally[:, 1] / counts.clamp_min(1), nan)
    robust = torch.where(counts > 0, tally[:, 2] / counts.clamp_min(1), nan)
    return clean.float().cpu(), robust.float().cpu()


def worst_metric(per_class: torch.Tensor) -> float:
    """Worst class accuracy, or for >= 50 classes the mean of the lowest ceil(C/10)."""
    values = per_class[~torch.isnan(per_class)]
    if values.numel() == 0:
        return float("nan")
    if per_class.numel() >= 50:
        k = math.ceil(per_class.numel() / 10)
        return float(values.sort().values[:k].mean())
    return float(values.min())


def selection_score(robust_per_class: torch.Tensor) -> float:
    """Checkpoint selection: avg + worst (worst-10% for >= 50 classes) robust accuracy."""
    values = robust_per_class[~torch.isnan(robust_per_class)]
    return float(values.mean()) + worst_metric(robust_per_class)


def default_val_per_class(y: torch.Tensor, num_classes: int) -> Tuple[int, str]:
    """(images per class to hold out, the rule that gave it) when --val-per-class is not given.

    100 per class, 25 with >= 50 classes (CFA's CIFAR-100 hold-out; 100 would be a fifth of
    CIFAR-100's training set), and never more than 10% of the smallest class, so small data
    keeps 90% for training.
    """
    base = DEFAULT_VAL_PER_CLASS_MANY if num_classes >= MANY_CLASSES else DEFAULT_VAL_PER_CLASS
    smallest = int(torch.bincount(y, minlength=num_classes).min()) if len(y) else 0
    cap = math.floor(MAX_VAL_SHARE * smallest)
    per_class = min(base, cap)
    size = f">= {MANY_CLASSES}" if num_classes >= MANY_CLASSES else f"< {MANY_CLASSES}"
    rule = (f"default: {base} per class ({size} classes), at most {MAX_VAL_SHARE:.0%} of the smallest "
            f"class ({smallest} images)")
    if per_class < 1:
        rule += ": too few images to hold any out, so the last epoch is selected"
    return max(per_class, 0), rule
