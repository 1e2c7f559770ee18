"""robaudit.quick_audit: its cost per call against one training epoch, in one run.

    python benchmarks/bench_quick_audit.py [--audit-n 500] [--train-n 5000] [--steps 5] [--threads 1]

Data: the CIFAR-10 subset (../shared/data/cifar10_subset.npz; --data), or with --synthetic
random 32x32 images (the timings do not depend on the pixels). Model: smallcnn (~61k
parameters) built fresh. Measured, alternated --repeats times in this process (median):
- one plain training epoch over --train-n images (SGD, batch 128, cross-entropy);
- one PGD-7 adversarial-training epoch over the same images (the usual robust training);
- one quick_audit call on a fixed --audit-n subset (clean + PGD---steps, batch 256);
- the same call's parts: the clean pass and PGD alone (`Attack.__call__` on the subset),
  so the engine's own overhead (model checks, hashing, results) is visible.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import robaudit  # noqa: E402
from robaudit.audit.attacks import create_attack  # noqa: E402
from robaudit.audit.models.architectures import create_architecture  # noqa: E402

EPS = 8 / 255


def data(args):
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n = max(args.train_n, args.audit_n)
        return torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10, [str(k) for k in range(10)]
    split = common.load_split(common.data_path(args.data), "train", limit=max(args.train_n, args.audit_n))
    return split.x, split.y, split.classes


def train_epoch(model, x, y, adversarial: bool, seed: int = 0):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    for start in range(0, len(y), 128):
        idx = order[start:start + 128]
        xb, yb = x[idx], y[idx]
        if adversarial:   # PGD-7, step 2/255, uniform start (Madry et al.)
            delta = (torch.rand(xb.shape, generator=g) * 2 - 1) * EPS
            for _ in range(7):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + 2 / 255 * grad.sign()).clamp(-EPS, EPS)
            xb = (xb + delta).clamp(0, 1)
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audit-n", type=int, default=500)
    parser.add_argument("--train-n", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None)
    parser.add_argument("--synthetic", action="store_true")
    common.add_threads_option(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    info = common.machine()
    x, y, classes = data(args)
    train_x, train_y = x[:args.train_n], y[:args.train_n]
    audit_x, audit_y = x[:args.audit_n], y[:args.audit_n]
    torch.manual_seed(0)
    model = create_architecture("smallcnn", num_classes=10)
    pgd = create_attack("pgd", eps=EPS, steps=args.steps)
    times = {"plain_epoch": [], "adv_epoch": [], "quick_audit": [], "clean_pass": [], "pgd_alone": []}
    for _ in range(args.repeats):
        for name, fn in (
                ("plain_epoch", lambda: train_epoch(model, train_x, train_y, adversarial=False)),
                ("adv_epoch", lambda: train_epoch(model, train_x, train_y, adversarial=True)),
                ("quick_audit", lambda: robaudit.quick_audit(model, audit_x, audit_y, steps=args.steps,
                                                             classes=classes)),
                ("clean_pass", lambda: _clean(model, audit_x)),
                ("pgd_alone", lambda: _pgd(model, pgd, audit_x, audit_y))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: common.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.2f}", f"{med[k] / med['plain_epoch']:.2f}", f"{med[k] / med['adv_epoch']:.3f}"]
            for k in times]
    print(common.machine_line(info))
    print(f"# train {args.train_n} images, audit {args.audit_n} images, PGD-{args.steps}, median of {args.repeats}")
    print(common.table(["what", "seconds", "x plain epoch", "x PGD-7 epoch"], rows))
    common.write_result("bench_quick_audit", {"machine": info, "args": vars(args), "seconds": times, "median": med})


def _clean(model, x):
    model.eval()
    with torch.no_grad():
        for start in range(0, len(x), 256):
            model(x[start:start + 256])


def _pgd(model, attack, x, y):
    model.eval()
    for start in range(0, len(x), 256):
        xb, yb = x[start:start + 256], y[start:start + 256]
        with torch.no_grad():
            pred = model(xb).argmax(1)
        attack(model, xb, yb, torch.arange(start, start + len(yb)), pred)


if __name__ == "__main__":
    main()
