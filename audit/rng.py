"""Per-sample randomness that does not depend on batching, sharding or device.

Every random number an attack draws is a pure function of (seed, dataset index,
stream, element position): a counter-based hash evaluated with integer tensor ops.
So a sample gets the same random start whether it sits in batch 0 or batch 7, on
rank 0 or rank 3, and no Python loop over samples is needed.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer finaliser (Wellons). int64 products may wrap, but the low 32
    # bits of a wrapped product are exact, and we mask to them after every multiply.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def per_sample_uniform(seed: int, index: torch.Tensor, shape, stream: int = 0,
                       device=None, dtype=torch.float32) -> torch.Tensor:
    """U[0,1) tensor of shape (len(index), *shape); row i depends only on (seed, index[i], stream)."""
    device = device if device is not None else index.device
    index = index.to(device=device, dtype=torch.int64).reshape(-1, 1)
    numel = 1
    for s in shape:
        numel *= int(s)
    pos = torch.arange(numel, device=device, dtype=torch.int64).reshape(1, -1)
    key = _mix32(torch.full_like(index, int(seed) & _MASK32) ^ _mix32(torch.full_like(index, int(stream) + 0x9E3779B9)))
    h = _mix32(key ^ _mix32(index + 0x632BE5AB))
    h = _mix32(h.expand(-1, numel) ^ _mix32(pos * 0x2545F491 + 0x1B873593))
    h = _mix32(h + pos)
    # 24 high-quality bits -> float in [0, 1)
    u = (h >> 8).to(torch.float64) / float(1 << 24)
    return u.to(dtype).reshape(index.shape[0], *shape)


def per_sample_normal(seed: int, index: torch.Tensor, shape, stream: int = 0,
                      device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0,1) via Box-Muller from two independent per-sample uniform streams."""
    u1 = per_sample_uniform(seed, index, shape, stream=2 * stream + 1001, device=device, dtype=torch.float64)
    u2 = per_sample_uniform(seed, index, shape, stream=2 * stream + 1002, device=device, dtype=torch.float64)
    u1 = u1.clamp_min(1.0 / (1 << 25))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.to(dtype)
