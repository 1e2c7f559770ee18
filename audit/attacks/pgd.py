"""PGD-20 (Madry et al. 2018) as used by ABSLD Appendix A.3 and the Fair-ARD eval code.

Uniform random start in the eps-ball, 20 sign steps of 2/255, cross-entropy loss,
model in eval mode. Scoring ("any" vs "final" iterate) is the base class's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robaudit.audit.attacks.base import SignGradientAttack, register_attack


@register_attack
class PGD(SignGradientAttack):
    """PGD-20: uniform start, 20 steps of 2/255 on cross-entropy."""

    name = "pgd"
    defaults = {"steps": 20, "step_size": 2 / 255, "random_start": "uniform"}
    fixed = {"loss": "ce"}

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none")
