"""FMN: Fast Minimum-Norm attack (Pintor, Roli, Brendel, Biggio, NeurIPS 2021), L-inf and L2.

For every attacked point FMN looks for the *smallest* perturbation that fools the model:
it takes normalised-gradient steps on the logit difference inside an eps-ball whose
radius it adapts per sample, shrinking it while the iterate is adversarial and growing
it while it is not. The smallest adversarial norm seen over the iterates is the point's
minimal perturbation; from it robaudit draws per-class robustness curves (audit/curves.py).

Followed: the authors' reference code (pralab/Fast-Minimum-Norm-FMN-Attack, src/attacks/fmn.py)
and adv-lib's port (jeromerony/adv_lib, attacks/fast_minimum_norm.py, v0.2.8), step for step:
- loss: logit difference z_y - max_{j != y} z_j (adv-lib's `difference_of_logits`), whose
  negative is ascended; an iterate is adversarial when argmax != y;
- start delta = 0 and radius eps_k = +inf; while no adversarial iterate has been seen the
  radius is the linear estimate of the distance to the boundary, ||delta|| + |loss| / ||grad||_dual
  (dual: L1 for L-inf, L2 for L2; adv-lib's per-sample form: the reference code divides the
  batch's summed loss, a bug adv-lib fixed); afterwards eps_k <- min(eps_k (1 - gamma), best norm)
  when adversarial, eps_k (1 + gamma) when not; eps_k never exceeds the box's largest norm
  ||max(x, 1 - x)||;
- gamma and the step size alpha cosine-annealed from gamma_init = 0.05 to gamma_final = 0.001
  and from alpha_init = 1 to alpha_final = alpha_init / 100 (both codes' defaults);
- step delta <- delta + alpha * grad / ||grad||_2 for both norms, then projection into the
  eps_k-ball (L-inf: clip; L2: rescale when ||delta||_2 > eps_k, as the reference code's
  `clip_lp_norms`: adv-lib 0.2.8 rescales every delta onto the sphere), then clip x + delta
  into [0, 1];
- the best (smallest-norm) adversarial iterate is tracked per sample; points that are
  already adversarial keep being refined, so there is no early stop.
Differences, on purpose: the linear estimate of the distance to the boundary is taken
(1 + gamma) times: on a locally linear model the estimate is exact, a step lands on the
boundary itself, and an argmax tie that goes to y keeps the point there, unfooled, forever
(seen on affine models: every point of one class); the overshoot crosses it, and the radius
shrinks back by (1 - gamma) per adversarial step. After the last step one more forward scores the final iterate
(the codes evaluate iterates 0..steps-1 only), and norms are measured on the rounded
x_adv - x, so the reported norm is exactly the norm of the returned perturbation.
adv-lib itself is not a dependency: its package imports visdom at import time, and
neither it nor secml-torch returns the per-sample norms; benchmarks/bench_fmn.py checks
this implementation against adv-lib's when adv-lib is importable.

steps = 100 (default): the reference code and adv-lib default to 10, the paper's
evaluation runs 1000. With the annealed gamma (mean ~0.026) the radius can shrink or grow
by a factor ~(1 - 0.026)^100 ~ 1/14 in 100 steps, enough to come down from the initial
linear overestimate to the boundary, at 5x the cost of PGD-20 for a whole curve;
benchmarks/bench_fmn.py measures how close it gets to more steps.

What the result means for robaudit (the engine's robust/fooled accounting):
- `eps` is the audited eps of the scan, as for every attack; `robust` = minimal norm > eps,
  so results["attacks"]["fmn"] is the curve at the audited eps and the ensemble ("robust
  against every attack") stays a fixed-eps number;
- `x_adv` is the minimal adversarial iterate when its norm is <= eps (it is then the
  smallest fooling point found inside the ball), else x itself with the clean prediction:
  every returned point lies in the eps-ball, which the base's ball check verifies;
- extras["min_norm"]: the minimal norm found (float64), +inf where no iterate fooled the
  point; points not attacked (clean-wrong ones under score="robust") get 0 (`extra_defaults`);
- `cap_factor`: the curve's grid runs from 0 to cap = cap_factor * eps (default 4x the
  audited eps, e.g. 32/255 for 8/255); the search itself is not bounded by it (its radius
  may grow to the box), so "never fooled" means never fooled at any norm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from robaudit.audit.attacks.ascent import input_grad, per_sample_norm
from robaudit.audit.attacks.base import Attack, SubResult, register_attack
from robaudit.errors import UserError

# Guard against dividing by a zero gradient / zero perturbation.
_TINY = 1e-12
# Dual norm of each threat model (for the linear distance-to-boundary estimate).
_DUAL_P = {"linf": 1.0, "l2": 2.0}


def logit_difference(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample z_y - max_{j != y} z_j: > 0 while the point is classified as y."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    is_true = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y[:, None], True)
    return true_logit - logits.masked_fill(is_true, float("-inf")).amax(dim=1)


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ||delta|| in the threat model's norm ([B])."""
    return per_sample_norm(norm, delta).view(-1)


def _project(delta: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    """delta into the per-sample ball of `radius` ([B]) around 0."""
    view = radius.view(-1, *([1] * (delta.dim() - 1)))
    if norm == "linf":
        return torch.max(torch.min(delta, view), -view)
    length = perturbation_norm(delta, "l2").view_as(view).clamp_min(_TINY)
    return delta * torch.clamp(view / length, max=1.0)


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    return end + (start - end) * (1.0 + math.cos(math.pi * step / steps)) / 2.0


class MinimalNorm(NamedTuple):
    """What one FMN run found, per sample."""
    x_best: torch.Tensor     # the smallest-norm adversarial iterate (x where none was found)
    norm: torch.Tensor       # float64 [B]: its ||x_best - x||; +inf where none was found
    pred: torch.Tensor       # int64 [B]: the prediction at x_best (at x where none was found)


def fmn_minimal(model, x: torch.Tensor, y: torch.Tensor, *, norm: str, steps: int,
                alpha_init: float, alpha_final: float, gamma_init: float,
                gamma_final: float, name: str = "fmn") -> MinimalNorm:
    """Run FMN on (x, y) (module docstring); batch-vectorised, deterministic, no early stop."""
    n, view = x.shape[0], (-1, *([1] * (x.dim() - 1)))
    delta = torch.zeros_like(x)
    radius = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    box_norm = perturbation_norm(torch.max(x, 1.0 - x), norm)  # the largest norm [0, 1] allows
    best_norm = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
    x_best = x.clone()
    best_pred = torch.empty(n, dtype=torch.long, device=x.device)
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    captured = {}

    def loss_fn(x_in: torch.Tensor) -> torch.Tensor:
        logits = model(x_in)
        if not logits.requires_grad:
            raise UserError(f"the model gives no input gradients, so the white-box attack {name!r} "
                            "cannot run on it; use the black-box attack 'square'")
        captured["logits"] = logits
        return -logit_difference(logits.float(), y)   # ascended: grows as the point nears the boundary

    for step in range(steps + 1):
        x_cur = x + delta
        last = step == steps
        if last:
            logits = model(x_cur).detach()
        else:
            loss, grad = input_grad(loss_fn, x_cur)
            logits = captured.pop("logits").detach()
        pred = logits.argmax(dim=1)
        cur_norm = perturbation_norm(x_cur - x, norm)   # measured on the rounded iterate
        is_adv = pred != y
        better = is_adv & (cur_norm.double() < best_norm)
        best_norm = torch.where(better, cur_norm.double(), best_norm)
        x_best = torch.where(better.view(view), x_cur, x_best)
        best_pred = torch.where(better, pred, best_pred)
        found |= is_adv
        if last:
            break
        gamma = _cosine(gamma_init, gamma_final, step, steps)
        alpha = _cosine(alpha_init, alpha_final, step, steps)
        to_boundary = loss.abs() / grad.flatten(1).norm(p=_DUAL_P[norm], dim=1).clamp_min(_TINY)
        radius = torch.where(
            is_adv, torch.min(radius * (1.0 - gamma), best_norm.to(radius.dtype)),
            torch.where(found, radius * (1.0 + gamma), (cur_norm + to_boundary.to(radius.dtype)) * (1.0 + gamma)))
        radius = torch.min(radius, box_norm)
        step_dir = grad / grad.flatten(1).norm(p=2, dim=1).clamp_min(_TINY).view(view)
        delta = _project(delta + alpha * step_dir, radius, norm)
        delta = (x + delta).clamp_(0.0, 1.0) - x
    none_found = torch.isinf(best_norm)
    if bool(none_found.any()):
        with torch.no_grad():
            best_pred = torch.where(none_found, model(x).argmax(dim=1), best_pred)
    return MinimalNorm(x_best.detach(), best_norm, best_pred)


@register_attack
class FMN(Attack):
    """FMN: minimal-norm attack (100 steps); its per-sample minimal norms give per-class robustness curves."""

    name = "fmn"
    white_box = True
    norms = ("linf", "l2")
    defaults = {"steps": 100, "alpha_init": 1.0, "alpha_final": 0.01, "gamma_init": 0.05,
                "gamma_final": 0.001, "cap_factor": 4.0}
    fixed = {"loss": "logit-difference"}
    extra_defaults = {"min_norm": 0.0}

    def _validate(self) -> None:
        if self.steps < 1:
            raise UserError(f"attack 'fmn': steps must be >= 1, got {self.steps}")
        if not (self.alpha_init > 0 and 0 <= self.alpha_final <= self.alpha_init):
            raise UserError("attack 'fmn': step sizes need alpha_init > 0 and 0 <= alpha_final <= alpha_init, "
                            f"got {self.alpha_init} and {self.alpha_final}")
        if not (0 <= self.gamma_final <= self.gamma_init < 1):
            raise UserError("attack 'fmn': radius factors need 0 <= gamma_final <= gamma_init < 1, "
                            f"got {self.gamma_init} and {self.gamma_final}")
        if not (math.isfinite(self.cap_factor) and self.cap_factor >= 1):
            raise UserError(f"attack 'fmn': cap_factor must be >= 1 (the curve must reach the audited "
                            f"eps), got {self.cap_factor}")
        if self.eps <= 0:
            raise UserError("attack 'fmn' needs --eps > 0: its curve runs from 0 to cap_factor * eps")

    @property
    def cap(self) -> float:
        """Largest eps of the robustness curve's grid."""
        return self.cap_factor * self.eps

    def params(self):
        out = super().params()
        out["cap"] = self.cap   # read by audit/curves.py
        return out

    def _attack(self, model, x, y, index, clean_pred):
        found = fmn_minimal(model, x, y, norm=self.norm, steps=self.steps, alpha_init=self.alpha_init,
                            alpha_final=self.alpha_final, gamma_init=self.gamma_init,
                            gamma_final=self.gamma_final, name=self.name)
        within = found.norm <= self.eps   # float64 on both sides, as audit/curves.py compares
        x_adv = torch.where(within.view(-1, *([1] * (x.dim() - 1))), found.x_best, x)
        pred = torch.where(within, found.pred, clean_pred)
        return SubResult(x_adv, pred, extras={"min_norm": found.norm})
