"""FGSM (Goodfellow et al. 2015): one signed cross-entropy step of size eps.

Iterate 0 is x itself, or x + 0.001 * N(0, 1) with random_start="normal" (the
optional start of the Fair-ARD eval code); iterate 1 is that point plus
eps * sign(grad), projected. Under iterates="any" the start counts as an iterate.
Under norm="l2" it is FGM: x + eps * grad / ||grad||_2, clipped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robaudit.audit.attacks.base import SignGradientAttack, register_attack


@register_attack
class FGSM(SignGradientAttack):
    """FGSM: one cross-entropy sign step of size eps (FGM, an L2-normalised step, under l2)."""

    name = "fgsm"
    defaults = {"random_start": "none"}
    fixed = {"steps": 1, "step_size": "eps", "loss": "ce"}

    @property
    def steps(self) -> int:
        return 1

    @property
    def step_size(self) -> float:
        return self.eps

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none")
