"""`robaudit demo`: the whole audit offline, with nothing to download.

The "patterns" dataset is generated from a fixed seed: ten classes of 32x32 colour
gratings and shapes with a random phase and pixel noise per image. Classes differ in
contrast on purpose, so that a model adversarially trained on them ends up with a
visible class disparity, the thing robaudit exists to show. A small CNN is trained
with PGD adversarial training (about a minute on 2 CPU cores) and then audited
through the same engine as `robaudit scan`.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from robaudit.audit.attacks.ascent import cross_entropy_pgd
from robaudit.audit.modes import eval_mode
from robaudit.audit.rng import per_sample_uniform

log = logging.getLogger(__name__)

DEMO_SEED = 20261122
IMAGE_SIZE = 32
# name, contrast: low-contrast classes have small margins and become the weak classes.
DEMO_CLASSES = [
    ("h-stripes", 0.30), ("v-stripes", 0.28), ("diagonal", 0.26), ("anti-diagonal", 0.24),
    ("checker", 0.22), ("ring", 0.20), ("dot", 0.18), ("cross", 0.16),
    ("ramp", 0.13), ("fine-stripes", 0.10),
]
DEMO_NOISE = 0.15
DEMO_TRAIN_PER_CLASS = 200
DEMO_TEST_PER_CLASS = 60


def _patterns(kind: str, phase: np.ndarray) -> np.ndarray:
    """[N] phases in [0, 2pi) -> [N, H, W] patterns in [-1, 1]."""
    h = w = IMAGE_SIZE
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    p = phase[:, None, None]
    shift = (phase[:, None, None] / (2 * np.pi) - 0.5) * 0.3  # shapes move with the phase
    if kind == "h-stripes":
        return np.sin(2 * np.pi * 3 * yy[None] + p)
    if kind == "v-stripes":
        return np.sin(2 * np.pi * 3 * xx[None] + p)
    if kind == "fine-stripes":
        return np.sin(2 * np.pi * 6 * yy[None] + p)
    if kind == "diagonal":
        return np.sin(2 * np.pi * 3 * (xx + yy)[None] / np.sqrt(2) + p)
    if kind == "anti-diagonal":
        return np.sin(2 * np.pi * 3 * (xx - yy)[None] / np.sqrt(2) + p)
    if kind == "checker":
        return np.sign(np.sin(2 * np.pi * 2 * xx[None] + p) * np.sin(2 * np.pi * 2 * yy[None] + p))
    r = np.sqrt((xx[None] - 0.5 - shift) ** 2 + (yy[None] - 0.5 + shift) ** 2)
    if kind == "ring":
        return np.where(np.abs(r - 0.28) < 0.07, 1.0, -1.0)
    if kind == "dot":
        return np.where(r < 0.2, 1.0, -1.0)
    if kind == "cross":
        return np.where((np.abs(xx[None] - 0.5 - shift) < 0.08) | (np.abs(yy[None] - 0.5 + shift) < 0.08), 1.0, -1.0)
    if kind == "ramp":
        return np.clip((xx[None] - 0.5) * 2 + np.cos(p) * 0.3, -1, 1)
    raise ValueError(kind)


def make_demo_arrays(split: str):
    """(x uint8 [N,32,32,3], y int64 [N], class names), deterministic for each split."""
    per_class = DEMO_TRAIN_PER_CLASS if split == "train" else DEMO_TEST_PER_CLASS
    rng = np.random.default_rng(DEMO_SEED + (0 if split == "train" else 1))
    colours = np.random.default_rng(DEMO_SEED).uniform(0.3, 1.0, size=(len(DEMO_CLASSES), 3))
    xs, ys = [], []
    for k, (kind, contrast) in enumerate(DEMO_CLASSES):
        phase = rng.uniform(0, 2 * np.pi, size=per_class)
        pattern = _patterns(kind, phase)[..., None] * colours[k][None, None, None, :]
        noise = rng.normal(0, DEMO_NOISE, size=pattern.shape)
        img = np.clip(0.5 + contrast * pattern + noise, 0, 1)
        xs.append((img * 255).round().astype(np.uint8))
        ys.append(np.full(per_class, k, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(y))  # interleave classes like a real dataset
    return x[order], y[order], [name for name, _ in DEMO_CLASSES]


def train_demo_model(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, num_classes: int, *,
                     epochs: int = 6, eps: float = 8 / 255, steps: int = 3, seed: int = 0,
                     batch_size: int = 128) -> torch.nn.Module:
    """PGD adversarial training (Madry et al.) of the small CNN, shortened for a demo."""
    from robaudit.audit.architectures import create_architecture

    torch.manual_seed(seed)
    model = create_architecture("smallcnn", num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    total = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="demo: adversarial training", file=sys.stderr, disable=None, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            b = order[start:start + batch_size]
            xb, yb = x[b], y[b]
            with eval_mode(model):
                x_adv = cross_entropy_pgd(model, xb, yb, eps=eps, step_size=2.5 * eps / steps, steps=steps,
                                          unit_noise=per_sample_uniform(seed + epoch, index[b], xb.shape[1:]))
            loss = F.cross_entropy(model(x_adv), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()
