"""The projected ascent steps shared by evaluation attacks and training: L-inf sign
steps, L2 normalised-gradient steps (per-sample renorm) and L1 sparse steps with the exact
L1-ball-and-box projection (ascent_l1.py).

Evaluation attacks (audit/attacks) wrap it with worst-over-iterates tracking and
early stopping; remediation methods call `projected_ascent` for their inner
maximisation (PGD-10 on KL, CE, ...). Both go through `ascent_step` / `project`, so
there is one definition of "a step inside the eps-ball and the [0,1] box" per norm.
"""

from __future__ import annotations

import math

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from robaudit.audit.attacks.ascent_l1 import L1_TOP_FRACTION, l1_project, l1_step, per_sample_l1


def linf_project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip into the eps-ball around x and into [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def linf_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float,
              step_size: float) -> torch.Tensor:
    """One ascent step: x_adv + step_size * sign(grad), projected."""
    return linf_project(x_adv + step_size * grad.sign(), x, eps)


# Threat models of the evaluation attacks and of training. L2 and L1 keep the same contract
# as L-inf: a step ascends, the projection puts the point into the eps-ball around x and
# into [0, 1].
NORMS = ("linf", "l2", "l1")
# Guard against dividing by a zero gradient / zero perturbation (the step is then 0).
_TINY = 1e-12


def _per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    """||t_i||_2 over all but the first dimension, shaped to broadcast against t."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def l2_project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Renorm x_adv - x to L2 norm <= eps per sample, then clip into [0, 1].

    The clip keeps the ball: x is in [0, 1], so clipping a coordinate moves it toward x.
    """
    delta = x_adv - x
    factor = torch.clamp(eps / _per_sample_l2(delta).clamp_min(_TINY), max=1.0)
    return (x + delta * factor).clamp_(0.0, 1.0)


def l2_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float,
            step_size: float) -> torch.Tensor:
    """One L2 ascent step: x_adv + step_size * grad / ||grad||_2 (per sample), projected."""
    return l2_project(x_adv + step_size * grad / _per_sample_l2(grad).clamp_min(_TINY), x, eps)


def per_sample_norm(norm: str, t: torch.Tensor) -> torch.Tensor:
    """||t_i|| in `norm` over all but the first dimension, shaped to broadcast against t."""
    if norm == "linf":
        return t.flatten(1).abs().amax(dim=1).view(-1, *([1] * (t.dim() - 1)))
    return _per_sample_l2(t) if norm == "l2" else per_sample_l1(t)


def project(norm: str, x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
    """`linf_project`, `l2_project` or `l1_project` (eps: a number or per-sample tensor)."""
    if norm == "linf":
        return linf_project(x_adv, x, eps)
    return l2_project(x_adv, x, eps) if norm == "l2" else l1_project(x_adv, x, eps)


def ascent_step(norm: str, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps,
                step_size: float, top_fraction: float = L1_TOP_FRACTION) -> torch.Tensor:
    """`linf_step` (sign steps), `l2_step` (normalised-gradient steps) or `l1_step` (SLIDE's
    sparse steps on the top_fraction largest-|gradient| coordinates)."""
    if norm == "linf":
        return linf_step(x_adv, grad, x, eps, step_size)
    if norm == "l2":
        return l2_step(x_adv, grad, x, eps, step_size)
    return l1_step(x_adv, grad, x, eps, step_size, top_fraction)


def cube_half_side(norm: str, eps, dim: int):
    """Half-side of the largest cube around x inside the eps-ball: eps (linf), eps / sqrt(d)
    (l2), eps / d (l1); a uniform start in that cube stays in the ball for every norm."""
    if norm == "linf":
        return eps
    return eps / math.sqrt(dim) if norm == "l2" else eps / dim


def input_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x_adv: torch.Tensor):
    """(per-sample loss, d sum(loss) / d x_adv) without touching parameter .grad buffers."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x_adv)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), grad


def projected_ascent(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                     eps: float, step_size: float, steps: int,
                     x_start: Optional[torch.Tensor] = None, norm: str = "linf") -> torch.Tensor:
    """Maximise sum(loss_fn(x')) over the eps-ball (in `norm`) around x with `steps` steps
    (`ascent_step`: sign steps under linf).

    loss_fn maps a batch to per-sample losses [B]. `x_start` (projected into the ball,
    e.g. x + 0.001 * N(0,1) for RSLAD/ABSLD) defaults to x. Returns a detached tensor.
    """
    x = x.detach()
    x_adv = project(norm, x_start.detach().clone(), x, eps) if x_start is not None else x.clone()
    for _ in range(steps):
        _, grad = input_grad(loss_fn, x_adv)
        x_adv = ascent_step(norm, x_adv, grad, x, eps, step_size)
    return x_adv.detach()


def cross_entropy_pgd(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                      eps, step_size: float, steps: int, unit_noise: torch.Tensor,
                      norm: str = "linf") -> torch.Tensor:
    """PGD on the per-sample cross-entropy from a uniform start, final iterate (Madry et al.).

    The start is x + (2 u - 1) * h for `unit_noise` u in [0, 1) (per-sample, from
    robaudit.audit.rng, so a sample's start does not depend on its batch), h =
    cube_half_side(norm, eps, d): eps under linf (Madry's start), the cube inscribed in
    the L2 / L1 ball otherwise. eps may be a per-sample tensor broadcastable to x (CFA's
    class-wise margins). Used for training (SAT, CFA-AT), checkpoint selection and FERD's
    teacher attack; the evaluation attacks add worst-over-iterates tracking on top of the
    same step.
    """
    half_side = cube_half_side(norm, eps, x[0].numel())
    return projected_ascent(lambda xa: F.cross_entropy(logits_fn(xa).float(), y, reduction="none"), x,
                            eps=eps, step_size=step_size, steps=steps, norm=norm,
                            x_start=x + (2 * unit_noise - 1) * half_side)
