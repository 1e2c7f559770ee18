"""FGSM (Goodfellow et al. 2015): one signed cross-entropy step of size eps.

Iterate 0 is x itself, or x + 0.001 * N(0, 1) with random_start="normal" (the
optional start of the Fair-ARD eval code); iterate 1 is that point plus
eps * sign(grad), projected. Under iterates="any" the start counts as an iterate.
Under norm="l2" it is FGM: x + eps * grad / ||grad||_2, clipped to [0, 1].
Under norm="l1" it is one SLIDE step of size eps (ascent_l1: sign(grad) on the top 1%
|grad| coordinates the box does not block, L1-normalised, then the exact L1-ball-and-box
projection). Not refused: the exact one-step L1 steepest ascent (all of eps on the single
largest-|grad| coordinate) would be cut to at most 1 by the box and so wastes most of the
budget; the sparse step is the one-step member of the PGD-L1 family run here, which keeps
the `pgd_weaker_than_fgsm` check meaningful under L1 (same direction rule, more steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robaudit.audit.attacks.base import SignGradientAttack, register_attack


@register_attack
class FGSM(SignGradientAttack):
    """FGSM: one cross-entropy sign step of size eps (FGM under l2; one sparse SLIDE step under l1)."""

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
