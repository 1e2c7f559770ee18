"""The L1 threat model's step and projection (ascent.py dispatches to them for norm="l1").

Step: SLIDE, the sparse steepest ascent of Tramer & Boneh (NeurIPS 2019, "Adversarial
training and robustness for multiple perturbations"). The exact L1 steepest-ascent
direction moves one coordinate only, far too little per step; SLIDE moves the coordinates
whose |gradient| is in the top (1 - q) fraction (q = 99th percentile, as cleverhans'
`sparse_l1_descent(grad_sparsity=99)` and foolbox's `SparseL1DescentAttack(quantile=0.99)`),
each by sign(g_i), normalised so the direction has L1 norm 1. Coordinates the [0, 1] box
blocks (at 1 with g_i > 0, at 0 with g_i < 0) are dropped first, as foolbox and
cleverhans' `zero_out_clipped_grads` do and as Croce & Hein 2021 ("Mind the box: l1-APGD
for sparse adversarial attacks on image classifiers", ICML) argue: a step spent on them is
lost to the box clip. (APGD-L1 adapts the fraction during its run; a fixed one keeps our
PGD plain, like PGD's fixed step.)

Projection: exact Euclidean projection onto {x' : ||x' - x||_1 <= eps, x' in [0, 1]}
(Croce & Hein 2021, Lemma/Algorithm for the box-constrained L1 projection; pyautoattack's
`L1_projection` implements it). With z = x' - x and c_i the room the box leaves in
z_i's direction (1 - x_i if z_i >= 0, else x_i), the KKT conditions give, per coordinate,
delta_i = sign(z_i) * clip(|z_i| - lam, 0, c_i): a soft threshold lam >= 0 then the box
clip (the threshold never flips a sign, so only the box bound on z_i's side can bind).
lam = 0 when the box clip alone lands inside the ball; otherwise lam solves
f(lam) = sum_i clip(|z_i| - lam, 0, c_i) = eps. f is piecewise linear and decreasing with
breakpoints |z_i| - c_i (term i starts to fall) and |z_i| (it reaches 0); sorting the 2d
breakpoints gives f at each of them by one cumulative sum, and lam by linear
interpolation on the segment where f crosses eps. Exact up to float64 rounding; done in
float64 so that the cumulative sum over 2d terms does not lose the radius.
"""

from __future__ import annotations

import math

import torch

# Fraction of the coordinates one L1 step moves: SLIDE's 99th percentile of |gradient|.
L1_TOP_FRACTION = 0.01


def per_sample_l1(t: torch.Tensor) -> torch.Tensor:
    """||t_i||_1 over all but the first dimension, shaped to broadcast against t."""
    return t.flatten(1).abs().sum(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _per_sample_radius(eps, batch: int, device) -> torch.Tensor:
    """eps (a number, or a per-sample tensor broadcastable to x, e.g. CFA's) as float64 [B]."""
    radius = torch.as_tensor(eps, dtype=torch.float64, device=device).reshape(-1)
    return radius.expand(batch) if radius.numel() == 1 else radius


def _soft_threshold(magnitude: torch.Tensor, room: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-sample lam with sum_i clip(magnitude_i - lam, 0, room_i) = radius (float64 [B, d] in,
    [B] out); only called for rows whose lam = 0 value exceeds radius."""
    points = torch.cat([magnitude - room, magnitude], dim=1)
    slope = torch.cat([torch.ones_like(magnitude), -torch.ones_like(magnitude)], dim=1)
    points, order = points.sort(dim=1)
    falling = slope.gather(1, order).cumsum(dim=1)           # terms falling just right of each point
    drop = (falling[:, :-1] * points.diff(dim=1)).cumsum(dim=1)
    total = room.sum(dim=1, keepdim=True)                     # f at the first point: every term at its room
    f_at = torch.cat([total, total - drop], dim=1)            # f at each sorted point
    # first point where f <= radius (f is 0 at the last point, so one exists for radius >= 0)
    below = (f_at <= radius[:, None]).to(torch.int8).argmax(dim=1).clamp_min(1)
    left = below - 1
    f_left = f_at.gather(1, left[:, None]).squeeze(1)
    rate = falling.gather(1, left[:, None]).squeeze(1).clamp_min(1.0)
    return points.gather(1, left[:, None]).squeeze(1) + (f_left - radius) / rate


def l1_project(x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
    """The exact Euclidean projection of x_adv onto the L1 eps-ball around x intersected
    with [0, 1] (module docstring). eps: a number or a per-sample tensor."""
    z = (x_adv - x).flatten(1).double()
    x_flat = x.flatten(1).double()
    room = torch.where(z >= 0, 1.0 - x_flat, x_flat).clamp_min(0.0)
    magnitude = z.abs()
    radius = _per_sample_radius(eps, z.shape[0], z.device)
    clipped = torch.minimum(magnitude, room)                 # lam = 0: the box clip alone
    outside = clipped.sum(dim=1) > radius
    if z.device.type == "cpu":   # only the rows that need it (a sync is free on the CPU)
        if bool(outside.any()):
            lam = _soft_threshold(magnitude[outside], room[outside], radius[outside])
            clipped[outside] = torch.minimum((magnitude[outside] - lam[:, None]).clamp_min(0.0), room[outside])
    else:                        # every row, no host sync; row-wise ops, so the same values
        lam = _soft_threshold(magnitude, room, radius)
        thresholded = torch.minimum((magnitude - lam[:, None]).clamp_min(0.0), room)
        clipped = torch.where(outside[:, None], thresholded, clipped)
    delta = torch.copysign(clipped, z)
    return (x_flat + delta).to(x.dtype).view_as(x).clamp_(0.0, 1.0)


def l1_direction(grad: torch.Tensor, x_adv: torch.Tensor,
                 top_fraction: float = L1_TOP_FRACTION) -> torch.Tensor:
    """SLIDE's ascent direction (L1 norm 1, or 0 where nothing can move): sign(g_i) on the
    ceil(top_fraction * d) largest-|g_i| coordinates the box does not block."""
    g = grad.flatten(1)
    at = x_adv.flatten(1)
    blocked = ((at >= 1.0) & (g > 0)) | ((at <= 0.0) & (g < 0))
    g = g.masked_fill(blocked, 0.0)
    d = g.shape[1]
    k = min(d, max(1, math.ceil(top_fraction * d)))
    top = g.abs().topk(k, dim=1).indices
    direction = torch.zeros_like(g).scatter_(1, top, g.gather(1, top).sign())
    moved = direction.abs().sum(dim=1, keepdim=True).clamp_min(1.0)  # zero-gradient picks do not count
    return (direction / moved).view_as(grad)


def l1_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps, step_size: float,
            top_fraction: float = L1_TOP_FRACTION) -> torch.Tensor:
    """One SLIDE step: x_adv + step_size * l1_direction(grad), projected (L1 ball and box)."""
    return l1_project(x_adv + step_size * l1_direction(grad, x_adv, top_fraction), x, eps)
