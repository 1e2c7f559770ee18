"""ARD (Goldblum et al., AAAI 2020) and the ARD-based Fair-ARD (Yue et al. 2023): distil a robust
teacher's temperature-softened clean predictions onto the student's adversarial examples.

Each is a per-batch loss of the shared loop (remediate/base.py RemediationMethod,
remediate/train.py). Formulas follow ../shared/specs/methods.md ("Fair-ARD" and its note on
the ARD-based rows) and were checked against the authors' code:
goldblum/AdversariallyRobustDistillation main.py (ARD) and NISP-official/Fair-ARD Fair-ARD.py
(Fair-ARD). Comments marked (code) reproduce that code where the papers are silent.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from robaudit.audit.attacks.ascent import cross_entropy_pgd
from robaudit.audit.modes import eval_mode
from robaudit.errors import UserError
from robaudit.remediate.base import METHODS, RemediationMethod, kl_per_sample, unwrap
from robaudit.remediate.distillation import FairARDReweighting, kappa_counting

# Defaults of both codes' argparse (ARD main.py, Fair-ARD.py): --alpha 1.0, --temp 30.
ARD_ALPHA = 1.0
ARD_TEMPERATURE = 30.0
KL_REDUCTIONS = ("elementwise", "batchmean")

# Both codes' CIFAR-10 schedule: SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128,
# 200 epochs, `if epoch in [100, 150]` (0-based, before the epoch: milestone m takes effect
# from epoch m + 1). As written, adjust_learning_rate multiplies the *initial* lr each time,
# so the code's lr is 0.01 again after 150 rather than 0.001; Fair-ARD's SGD is Nesterov.
ARD_SCHEDULE = {"epochs": 200, "lr": 0.1, "milestones": (100, 150), "weight_decay": 2e-4, "batch_size": 128,
                "source": "goldblum/AdversariallyRobustDistillation main.py: 200 epochs, lr 0.1 /10 at 100 "
                          "and 150, weight decay 2e-4, batch 128 (CIFAR-10)"}
FAIR_ARD_SCHEDULE = {**ARD_SCHEDULE,
                     "source": "NISP-official/Fair-ARD Fair-ARD.py: 200 epochs, lr 0.1 /10 at 100 and 150, "
                               "weight decay 2e-4, batch 128 (Nesterov SGD in the code)"}


def ard_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes."""
    return kl_per_sample(student_logits.float() / temperature,
                         F.softmax(teacher_logits.float() / temperature, dim=1))


@METHODS.register("ard", help="ARD (Goldblum et al. 2020): distil the teacher's T-softened clean outputs onto x'")
class ARD(RemediationMethod):
    """ARD (Goldblum et al., AAAI 2020).

    x' = PGD-`steps` on CE(s(x'), y) from a uniform start in the eps-ball (main.py
    AttackPGD: cross-entropy on the label, not the KL), the student in eval mode like the
    other methods here (the code attacks in train mode). Then, student in train mode,
    two passes x' first as the code, teacher z_t on the clean x:

        L = alpha * T^2 * KL(softmax(z_t(x) / T) || softmax(z_s(x') / T)) + (1 - alpha) * CE(z_s(x), y)

    alpha = 1, T = 30 (code defaults; with alpha = 1 the CE term vanishes, its forward
    still runs, as in the code, for the BatchNorm statistics and the clean tallies).
    The KL's reduction, where the paper writes a per-sample KL: `kl_reduction="elementwise"`
    (default, code: nn.KLDivLoss()'s mean over the B x C elements, i.e. the batch-mean KL
    divided by C, the scale the code trained at) or "batchmean" (the formula literally:
    the batch mean of per-sample KLs, C times larger).
    """

    name = "ard"
    paper_schedule = ARD_SCHEDULE

    def __init__(self, num_classes: int, *, alpha: float = ARD_ALPHA, temperature: float = ARD_TEMPERATURE,
                 kl_reduction: str = "elementwise", **common):
        super().__init__(num_classes, **common)
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise UserError(f"temperature must be positive, got {temperature}")
        if kl_reduction not in KL_REDUCTIONS:
            raise UserError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {kl_reduction!r}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.kl_reduction = kl_reduction

    def options(self) -> dict:
        return {**super().options(), "alpha": self.alpha, "temperature": self.temperature,
                "kl_reduction": self.kl_reduction}

    # Overridden by Fair-ARD.
    def sample_weights(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def _new_kappa(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def _inner(self, student, x, y, index, epoch, kappa: Optional[torch.Tensor]) -> torch.Tensor:
        net = unwrap(student)
        with eval_mode(net):
            x_adv = cross_entropy_pgd(kappa_counting(net, y, kappa), x, y, eps=self.eps,
                                      step_size=self.step_size, steps=self.steps,
                                      unit_noise=self._unit_noise(x, index, epoch), norm=self.norm)
        student.train()
        return x_adv

    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        return self._inner(student, x, y, index, epoch, None)

    def loss(self, student, teacher_logits, x, y, index, epoch):
        if teacher_logits is None:
            raise ValueError(f"{self.name} distils a teacher: teacher_logits are required")
        self._ensure_device(x.device)
        kappa = self._new_kappa(y)
        x_adv = self._inner(student, x, y, index, epoch, kappa)
        logits_adv = student(x_adv)
        logits_nat = student(x)
        kl = ard_kl(logits_adv, teacher_logits, self.temperature)
        ce = F.cross_entropy(logits_nat.float(), y, reduction="none")
        weights = self.sample_weights(y)
        if weights is not None:   # Fair-ARD.py weights both terms per sample (code)
            kl, ce = kl * weights, ce * weights
        kl_term = kl.mean() / (self.num_classes if self.kl_reduction == "elementwise" else 1)
        ce_term = ce.mean()
        loss = self.alpha * self.temperature ** 2 * kl_term + (1.0 - self.alpha) * ce_term
        self._record_batch(y, logits_adv, logits_nat)
        if kappa is not None:
            self.fair.add(y, kappa)
        return loss, {"loss": loss.detach(), "kl": kl_term.detach(), "ce": ce_term.detach()}


@METHODS.register("fair-ard", help="Fair-ARD (Yue et al. 2023): ARD with Fair-ARD class weights (T = 30)")
class FairARD(FairARDReweighting, ARD):
    """Fair-ARD (Yue et al. 2023), the ARD-based variant (the ABSLD paper's CIFAR-10 Fair-ARD
    rows; NISP-official/Fair-ARD Fair-ARD.py).

    The ARD loss (alpha = 1, T = 30) with each sample's KL and CE terms multiplied by its
    class weight w_y. Kappas are counted during ARD's own CE attack exactly as Fair-RSLAD
    counts them (distillation.kappa_counting: the start and every step but the last); the
    weights come from the previous epoch's kappas (distillation.FairARDWeights: w_k =
    (kappa_bar_k + 1e-5)^(-power), rescaled to sum C, clamped to [5/6, 5/2]; all ones in
    the first epoch). The code divides the kappa sums by n/C; FairARDWeights by the real
    class counts (equal on balanced data). `weight_power` is the code's --beta (2).
    """

    name = "fair-ard"
    paper_schedule = FAIR_ARD_SCHEDULE

    def _new_kappa(self, y):
        return torch.zeros_like(y)
