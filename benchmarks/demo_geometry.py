"""Geometry of the demo "patterns" dataset at the demo's eps (issue 15).

Can any classifier be robust on each class at L-inf eps? For every class this prints

- signal: the per-pixel amplitude of the class pattern (contrast x colour; mean and
  dimmest channel), against eps;
- the nearest image of another class (both noise-free, drawn over the generator's
  nuisance parameters: phase, position, ...): its L-inf and L2 distance, and the
  L-inf distance against 2 eps (below 2 eps the midpoint of the two images is within
  eps of both: no classifier can be robust on that pair);
- margin: for that nearest pair a, b, ||a-b||_2^2 / (2 ||a-b||_1), the distance an
  L-inf adversary must cover along the best linear separator, against eps;
- ideal: the clean and PGD robust accuracy of a near-Bayes classifier (the Gaussian
  likelihood of the image under a bank of noise-free templates of each class, with the
  class's pixel noise) attacked with PGD-20 on its margin at eps. A class the ideal
  classifier cannot hold is a geometry problem, not a training problem.

    .venv/bin/python benchmarks/demo_geometry.py                    # the current generator
    .venv/bin/python benchmarks/demo_geometry.py --module old.py    # another version of audit/data/demo.py
    .venv/bin/python benchmarks/demo_geometry.py --eps 8            # eps in 1/255 units

Runs in well under a minute on one CPU thread.

Measured (issue 15, eps 8/255). The first generator (`git show <rev>:audit/data/demo.py`):
dimmest channel 0.040 (1.3 eps, fine-stripes) to 0.119; nearest-pair margin 1.3 eps
(ramp / fine-stripes) to 3.1 eps; the ideal classifier 99.8% robust (ramp 98.3%), i.e.
separable but so thin that the demo CNN was 0% robust on ramp before and after ABSLD.
The redesign: dimmest channel 0.142 (4.5 eps), margins 3.0-4.5 eps, ideal 100% on every
class. On the old data at eps 12/255 the ideal classifier drops to 0% on ramp (margin
0.8 eps): the margin column predicts where even an ideal classifier breaks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_module(path):
    if path is None:
        from robaudit.audit.data import demo
        return demo
    spec = importlib.util.spec_from_file_location("demo_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def noise_free(mod, k: int, n: int, seed: int) -> np.ndarray:
    """n noise-free [H, W, 3] images of class k in [0, 1] drawn over the nuisance parameters."""
    if hasattr(mod, "noise_free_images"):
        return mod.noise_free_images(k, n, np.random.default_rng(seed))
    # The pre-issue-15 generator: clip(0.5 + contrast * pattern(phase) * colour + noise).
    colours = np.random.default_rng(mod.DEMO_SEED).uniform(0.3, 1.0, size=(len(mod.DEMO_CLASSES), 3))
    kind, contrast = mod.DEMO_CLASSES[k]
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, size=n)
    return np.clip(0.5 + contrast * mod._patterns(kind, phase)[..., None] * colours[k], 0, 1)


def class_noise(mod, k: int) -> float:
    return float(mod.class_noise(k)) if hasattr(mod, "class_noise") else float(mod.DEMO_NOISE)


def class_signal(mod, k: int) -> np.ndarray:
    """Per-channel pixel amplitude of class k's pattern."""
    if hasattr(mod, "class_signal"):
        return np.asarray(mod.class_signal(k), dtype=np.float64)
    colours = np.random.default_rng(mod.DEMO_SEED).uniform(0.3, 1.0, size=(len(mod.DEMO_CLASSES), 3))
    return mod.DEMO_CLASSES[k][1] * colours[k]


class TemplateBayes(torch.nn.Module):
    """log p(x | k) = logsumexp_t -||x - T_kt||^2 / (2 s_k^2) - D log s_k over a template bank."""

    def __init__(self, banks, sigmas):
        super().__init__()
        self.t = torch.cat([torch.as_tensor(b).flatten(1) for b in banks]).float()   # [K*P, D]
        self.t2 = (self.t ** 2).sum(1)
        self.k = len(banks)
        self.p = banks[0].shape[0]
        self.s = torch.as_tensor(sigmas, dtype=torch.float32)

    def forward(self, x):
        x = x.flatten(1)
        d2 = (x ** 2).sum(1, keepdim=True) - 2 * x @ self.t.T + self.t2      # [N, K*P]
        d2 = d2.view(len(x), self.k, self.p)
        s2 = (self.s ** 2)[None, :, None]
        return torch.logsumexp(-d2 / (2 * s2), dim=2) - x.shape[1] * torch.log(self.s)[None]


def margin_pgd(model, x, y, eps, steps=20, seed=0):
    """PGD on the margin (true score - best other score), random start, sign steps."""
    g = torch.Generator().manual_seed(seed)
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    step = max(eps / 4, 1e-8)
    best = x.clone()
    best_ok = torch.ones(len(y), dtype=torch.bool)
    for _ in range(steps + 1):
        x_adv.requires_grad_(True)
        s = model(x_adv)
        true = s.gather(1, y[:, None])[:, 0]
        other = s.scatter(1, y[:, None], float("-inf")).amax(1)
        m = true - other
        ok = m.detach() > 0
        newly = best_ok & ~ok
        best[newly] = x_adv.detach()[newly]
        best_ok &= ok
        grad, = torch.autograd.grad(m.sum(), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() - step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return best_ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default=None, help="path to a version of audit/data/demo.py (default: installed)")
    ap.add_argument("--eps", type=float, default=None, help="eps in 1/255 (default: the module's DEMO_EPS or 8)")
    ap.add_argument("--bank", type=int, default=96, help="noise-free templates per class")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    mod = load_module(args.module)
    eps = args.eps / 255 if args.eps is not None else float(getattr(mod, "DEMO_EPS", 8 / 255))
    names = [c[0] for c in mod.DEMO_CLASSES]
    k_n = len(names)
    banks = [noise_free(mod, k, args.bank, seed=1000 + k) for k in range(k_n)]
    flat = [torch.as_tensor(b, dtype=torch.float64).flatten(1) for b in banks]

    # Nearest different-class pair, in L-inf and in L2, over the banks.
    rows = []
    for i in range(k_n):
        others = torch.cat([flat[j] for j in range(k_n) if j != i])
        owner = [j for j in range(k_n) if j != i for _ in range(args.bank)]
        linf = torch.cdist(flat[i], others, p=float("inf"))
        l2 = torch.cdist(flat[i], others, p=2)
        a_inf, b_inf = divmod(int(linf.argmin()), linf.shape[1])
        a2, b2 = divmod(int(l2.argmin()), l2.shape[1])
        diff = flat[i][a2] - others[b2]
        margin = float((diff ** 2).sum() / (2 * diff.abs().sum()))
        sig = class_signal(mod, i)
        rows.append(dict(cls=names[i], signal_mean=float(sig.mean()), signal_min=float(sig.min()),
                         noise=class_noise(mod, i),
                         nearest_linf=float(linf.min()), nearest_linf_to=names[owner[b_inf]],
                         nearest_l2=float(l2.min()), nearest_l2_to=names[owner[b2]], margin=margin))

    # The near-Bayes template classifier, clean and under PGD-20 at eps, on the test split.
    x, y, _ = mod.make_demo_arrays("test")
    xt = torch.as_tensor(x, dtype=torch.float32).div(255)   # [N, H, W, 3], like the banks
    yt = torch.as_tensor(y)
    model = TemplateBayes(banks, [class_noise(mod, k) for k in range(k_n)])
    clean_ok, robust_ok = [], []
    for s in range(0, len(yt), 200):
        xb, yb = xt[s:s + 200], yt[s:s + 200]
        with torch.no_grad():
            clean_ok.append(model(xb).argmax(1) == yb)
        robust_ok.append(margin_pgd(model, xb, yb, eps))
    clean_ok, robust_ok = torch.cat(clean_ok), torch.cat(robust_ok)
    for k, row in enumerate(rows):
        row["ideal_clean"] = float(clean_ok[yt == k].float().mean())
        row["ideal_robust"] = float(robust_ok[yt == k].float().mean())

    print(f"demo geometry at eps = {eps * 255:.1f}/255 = {eps:.4f} (2 eps = {2 * eps:.4f}); "
          f"{args.bank} templates per class; module {args.module or 'robaudit.audit.data.demo'}")
    head = (f"{'class':<14} {'signal':>6} {'(min)':>6} {'/eps':>5} {'noise':>5}  {'nearest Linf':>12} "
            f"{'/2eps':>5} {'to':<13} {'L2':>6} {'margin':>6} {'/eps':>5}  {'ideal clean':>11} {'robust':>6}")
    print(head)
    for r in rows:
        print(f"{r['cls']:<14} {r['signal_mean']:6.3f} {r['signal_min']:6.3f} {r['signal_min'] / eps:5.1f} "
              f"{r['noise']:5.2f}  {r['nearest_linf']:12.3f} {r['nearest_linf'] / (2 * eps):5.1f} "
              f"{r['nearest_linf_to']:<13} {r['nearest_l2']:6.2f} {r['margin']:6.3f} {r['margin'] / eps:5.1f}  "
              f"{100 * r['ideal_clean']:10.1f}% {100 * r['ideal_robust']:5.1f}%")
    worst = min(rows, key=lambda r: r["ideal_robust"])
    print(f"ideal classifier: robust {100 * float(robust_ok.float().mean()):.1f}% overall, worst class "
          f"{worst['cls']} {100 * worst['ideal_robust']:.1f}%  ({time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(eps=eps, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
