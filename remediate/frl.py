"""FRL (Xu et al., ICML 2021, "To be Robust or to be Fair"): fine-tune a robust model under
per-class fairness constraints, by re-weighting its TRADES loss terms and re-margining its
attack with Lagrange multipliers updated on a validation split once per epoch.

A per-batch loss of the shared loop (remediate/base.py RemediationMethod,
remediate/train.py). Formulas follow ../shared/specs/methods.md ("FRL") and were checked
against the authors' code, hannxu123/fair_robust: utils_frl2.py + frlrmrw.py
(reweight+remargin), utils_frl.py + frlrw.py (reweight), utils_frl1.py + frlrm.py
(remargin), at commit 18d11779. Comments marked (code) reproduce that code where the paper
(or the spec) is silent.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from robaudit.errors import UserError
from robaudit.remediate.adversarial_training import trades_attack
from robaudit.remediate.base import ClassState, RemediationMethod, METHODS, kl_per_sample, tensor_list

VARIANTS = ("reweight+remargin", "reweight", "remargin")
LOSS_NORMS = ("joint", "separate")

# The code's schedule: fine-tune a pre-trained robust model with SGD lr 1e-3, momentum 0.9,
# weight decay 5e-4, batch 128 (its MultiStepLR milestones 40/80/250 never fall inside
# the spec's 40 epochs). The frl*.py scripts default to 120 epochs; the spec's 40 is used.
FRL_SCHEDULE = {"epochs": 40, "lr": 1e-3, "milestones": (), "weight_decay": 5e-4, "batch_size": 128,
                "source": "hannxu123/fair_robust frlrmrw.py: fine-tune lr 1e-3, momentum 0.9, weight decay 5e-4, "
                          "batch 128 (40 epochs: ../shared/specs/methods.md FRL)"}

# The eps multiplier's clamp: [0.98, 3] (utils_frl2.py, reweight+remargin); the remargin-only
# code (utils_frl1.py) clamps at 2.5.
EPS_SCALE_MIN = 0.98
EPS_SCALE_MAX = {"reweight+remargin": 3.0, "reweight": 3.0, "remargin": 2.5}
# The multipliers' simplex bound (`--lim`): 0.5 (frlrmrw.py, frlrw.py), 0.3 (frlrm.py).
MULTIPLIER_SUM = {"reweight+remargin": 0.5, "reweight": 0.5, "remargin": 0.3}

FRL_CLEAN_WEIGHT = ClassState("clean_weight", "FRL per-class weight of the clean cross-entropy term")
FRL_BOUNDARY_WEIGHT = ClassState("boundary_weight", "FRL per-class weight of the boundary (TRADES KL) term")
FRL_EPS_SCALE = ClassState("eps_scale", "FRL per-class perturbation-budget multiplier (remargin: ε_k / ε)")


def normalize_multipliers(lmbda: torch.Tensor, bound: float) -> torch.Tensor:
    """Clamp at 0, then rescale onto sum <= bound (code: normalize_lambda)."""
    lmbda = lmbda.clamp_min(0.0)
    total = lmbda.sum()
    return torch.where(total > bound, lmbda * (bound / total.clamp_min(1e-12)), lmbda)


def frl_class_weights(lmbda: torch.Tensor) -> torch.Tensor:
    """w_k = 1/C + lambda_k - sum(lambda) / C (code: cost_sensitive, written there for C = 10:
    0.1 + 0.9 lambda_k - 0.1 sum_{j != k} lambda_j). The weights sum to 1."""
    num_classes = lmbda.numel()
    return 1.0 / num_classes + lmbda - lmbda.sum() / num_classes


def frl_eps_scale(lmbda_margin: torch.Tensor, upper: float = 3.0, lower: float = EPS_SCALE_MIN) -> torch.Tensor:
    """Per-class eps multiplier clamp(exp(2 * lambda2), 0.98, upper) (code: cost_sensitive's diff2)."""
    return torch.exp(2.0 * lmbda_margin).clamp(lower, upper)


def frl_violations(val_clean: torch.Tensor, val_robust: torch.Tensor, tolerance: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gamma0, gamma1, clean error c, boundary error b) from per-class validation accuracies.

    c_k = 1 - clean_acc_k; b_k = clean_acc_k - robust_acc_k (robust = clean-correct and still
    correct under PGD, so b_k is the share of class k that is correct but not robust: the
    paper's boundary error; the code's adv accuracy does not require clean-correct).
    gamma0_k = c_k - mean c - tolerance, gamma1_k = b_k - mean b - tolerance; the means are
    over the present classes (the code's overall error, equal on the class-balanced split).
    An absent class (NaN) gets gamma 0: its multipliers keep their value.
    """
    present = ~(torch.isnan(val_clean) | torch.isnan(val_robust))
    clean_err = torch.where(present, 1.0 - val_clean, torch.zeros_like(val_clean))
    bndy_err = torch.where(present, val_clean - val_robust, torch.zeros_like(val_clean))
    n = present.sum().clamp_min(1)
    gamma0 = torch.where(present, clean_err - clean_err.sum() / n - tolerance, torch.zeros_like(clean_err))
    gamma1 = torch.where(present, bndy_err - bndy_err.sum() / n - tolerance, torch.zeros_like(bndy_err))
    nan = torch.full_like(val_clean, float("nan"))
    return gamma0, gamma1, torch.where(present, clean_err, nan), torch.where(present, bndy_err, nan)


@METHODS.register("frl", help="FRL (Xu et al. 2021): fine-tune with fairness-constrained reweight + remargin")
class FRL(RemediationMethod):
    """FRL (Xu et al., ICML 2021): fair robust fine-tuning of a robust model (--student-init).

    Loss (code: train_model), TRADES on per-class weights and margins, student in train mode:
        L = sum_i (w0[y_i] CE(s(x_i), y_i) + beta w1[y_i] KL(s(x_i) || s(x'_i))) / sum_i (w0[y_i] + w1[y_i])
    (w0 multiplies the clean CE, w1 the boundary KL; beta = 1 (code)). `loss_norm="separate"`:
    sum(w0 CE) / sum(w0) + beta sum(w1 KL) / sum(w1) (the other stored version of
    utils_frl2.py). x' = TRADES attack (`steps` KL sign steps from x + 0.001 N(0,1), step
    2/255, student in eval) inside the per-sample ball eps * eps_scale[y].

    Multipliers (all 0 at the start), updated at each epoch end from the student's per-class
    clean / PGD-`val_attack_steps` (20) accuracies on the validation split (see `frl_violations`):
        lambda0 <- normalize(lambda0 + rate_clean * gamma0)        (clean-error constraint)
        lambda1 <- normalize(lambda1 + rate_boundary * gamma1)     (boundary-error constraint, reweight)
        lambda2 <- lambda2 + rate_margin * gamma1                   (boundary-error constraint, remargin)
    normalize = clamp >= 0, rescale to sum <= multiplier_sum (0.5). Weights
    w0 = frl_class_weights(lambda0), w1 = frl_class_weights(lambda1) (1/C + lambda - sum/C,
    the spec's 0.1 + lambda - 0.1 sum(lambda) at C = 10); eps_scale = clamp(exp(2 lambda2),
    0.98, 3). Rates 0.05 / 0.1 / 0.2 (spec; the code's rate2 default is 0.1: pass
    rate_margin=0.1); rate_clean and rate_boundary halve every `rate_halving_every` (40)
    epochs (code: `if now_epoch % 40 == 0: rate1 /= 2`). tolerance 0.07 (the paper; the
    ABSLD paper ran FRL at 0.05; the code's --bound0/--bound1 default is 0.1).

    Variants (code): "reweight+remargin" (default, the ABSLD paper's baseline, frlrmrw.py);
    "reweight" (frlrw.py: lambda2 stays 0); "remargin" (frlrm.py: lambda1 stays 0, the clean
    term is still re-weighted, multiplier_sum 0.3, eps_scale at most 2.5).

    Timing: the code evaluates and updates before each epoch, the first update from the
    pre-trained model; the loop calls end_epoch after each epoch, so epoch 1 trains with all
    multipliers 0 (weights 1/C, eps_scale 1) and epoch e + 1 uses e updates (the code: e + 1).
    """

    name = "frl"
    needs_teacher = False
    needs_validation = True
    default_epochs = 40
    paper_schedule = FRL_SCHEDULE
    shared_schedule = False   # fine-tuning (code): the shared schedule's lr 0.1 would undo a robust model
    fine_tunes = True
    _state_attrs = ("lambda_clean", "lambda_boundary", "lambda_margin")

    def __init__(self, num_classes: int, *, variant: str = "reweight+remargin", tolerance: float = 0.07,
                 beta: float = 1.0, rate_clean: float = 0.05, rate_boundary: float = 0.1,
                 rate_margin: float = 0.2, rate_halving_every: int = 40,
                 multiplier_sum: Optional[float] = None, eps_scale_max: Optional[float] = None,
                 val_attack_steps: int = 20, loss_norm: str = "joint", **common):
        super().__init__(num_classes, **common)
        if variant not in VARIANTS:
            raise UserError(f"FRL variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if loss_norm not in LOSS_NORMS:
            raise UserError(f"loss_norm must be one of {', '.join(LOSS_NORMS)}, got {loss_norm!r}")
        if beta < 0 or min(rate_clean, rate_boundary, rate_margin) < 0:
            raise UserError("FRL's beta and multiplier rates must be >= 0")
        if val_attack_steps < 0 or rate_halving_every < 0:
            raise UserError("val_attack_steps and rate_halving_every must be >= 0")
        self.variant = variant
        self.tolerance = float(tolerance)
        self.beta = float(beta)
        self.rate_clean = float(rate_clean)
        self.rate_boundary = float(rate_boundary)
        self.rate_margin = float(rate_margin)
        self.rate_halving_every = int(rate_halving_every)
        self.multiplier_sum = float(multiplier_sum if multiplier_sum is not None else MULTIPLIER_SUM[variant])
        self.eps_scale_max = float(eps_scale_max if eps_scale_max is not None else EPS_SCALE_MAX[variant])
        if self.multiplier_sum < 0 or self.eps_scale_max < EPS_SCALE_MIN:
            raise UserError(f"multiplier_sum must be >= 0 and eps_scale_max >= {EPS_SCALE_MIN}")
        self.val_attack_steps = int(val_attack_steps)
        self.loss_norm = loss_norm
        self.lambda_clean = torch.zeros(self.num_classes)
        self.lambda_boundary = torch.zeros(self.num_classes)
        self.lambda_margin = torch.zeros(self.num_classes)

    @property
    def reweights_boundary(self) -> bool:
        return self.variant != "remargin"

    @property
    def remargins(self) -> bool:
        return self.variant != "reweight"

    def options(self) -> dict:
        return {**super().options(), "variant": self.variant, "tolerance": self.tolerance, "beta": self.beta,
                "rate_clean": self.rate_clean, "rate_boundary": self.rate_boundary,
                "rate_margin": self.rate_margin, "rate_halving_every": self.rate_halving_every,
                "multiplier_sum": self.multiplier_sum, "eps_scale_max": self.eps_scale_max,
                "val_attack_steps": self.val_attack_steps, "loss_norm": self.loss_norm}

    def class_state(self):
        states = [FRL_CLEAN_WEIGHT]
        if self.reweights_boundary:
            states.append(FRL_BOUNDARY_WEIGHT)
        if self.remargins:
            states.append(FRL_EPS_SCALE)
        return tuple(states)

    # ------------------------------------------------------------------ per-class quantities
    def clean_weights(self) -> torch.Tensor:
        return frl_class_weights(self.lambda_clean)

    def boundary_weights(self) -> torch.Tensor:
        return frl_class_weights(self.lambda_boundary)

    def eps_scale(self) -> torch.Tensor:
        return frl_eps_scale(self.lambda_margin, self.eps_scale_max)

    def rate_factor(self, epoch: int) -> float:
        """The halving of rate_clean / rate_boundary in the update after `epoch` (code: rate1
        halved before the update of each epoch n with n % 40 == 0; that update is ours after n - 1)."""
        if self.rate_halving_every <= 0:
            return 1.0
        return 0.5 ** ((int(epoch) + 1) // self.rate_halving_every)

    def update_multipliers(self, val_clean: torch.Tensor, val_robust: torch.Tensor, epoch: int
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One multiplier update from per-class validation accuracies; returns (clean error, boundary error)."""
        device = self.lambda_clean.device
        gamma0, gamma1, clean_err, bndy_err = frl_violations(val_clean.to(device).float(),
                                                             val_robust.to(device).float(), self.tolerance)
        factor = self.rate_factor(epoch)
        # (code) gamma is clamped at -1000 before the lambda0/lambda1 steps: never binding here.
        self.lambda_clean = normalize_multipliers(self.lambda_clean + factor * self.rate_clean * gamma0,
                                                  self.multiplier_sum)
        if self.reweights_boundary:
            self.lambda_boundary = normalize_multipliers(
                self.lambda_boundary + factor * self.rate_boundary * gamma1, self.multiplier_sum)
        if self.remargins:
            self.lambda_margin = self.lambda_margin + self.rate_margin * gamma1   # not clamped (code)
        return clean_err, bndy_err

    # ------------------------------------------------------------------ per-batch API
    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        eps = (self.eps * self.eps_scale())[y].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return trades_attack(student, x, self._gaussian_start(x, index, epoch), eps, self.step_size, self.steps,
                             self.norm)

    def loss(self, student, teacher_logits, x, y, index, epoch):
        x_adv = self.attack(student, None, x, y, index, epoch)
        logits_nat = student(x)
        logits_adv = student(x_adv)
        ce = F.cross_entropy(logits_nat.float(), y, reduction="none")
        kl = kl_per_sample(logits_adv, F.softmax(logits_nat.float(), dim=1))
        w0, w1 = self.clean_weights()[y], self.boundary_weights()[y]
        if self.loss_norm == "joint":
            loss = (w0 * ce + self.beta * w1 * kl).sum() / (w0 + w1).sum()
        else:
            loss = (w0 * ce).sum() / w0.sum() + self.beta * (w1 * kl).sum() / w1.sum()
        self._record_batch(y, logits_adv, logits_nat)
        return loss, {"loss": loss.detach(), "ce": ce.mean().detach(), "kl": kl.mean().detach()}

    def end_epoch(self, epoch, *, student=None, val_accuracy=None, **validation):
        if student is None or val_accuracy is None:
            raise ValueError("FRL updates its multipliers on the validation split: it needs the student "
                             "and val_accuracy(model, steps) -> (clean per class, robust per class)")
        record = super().end_epoch(epoch, student=student, val_accuracy=val_accuracy, **validation)
        val_clean, val_robust_acc = val_accuracy(student, self.val_attack_steps)
        clean_err, bndy_err = self.update_multipliers(val_clean, val_robust_acc, epoch)
        record.update({
            "val_clean_error": tensor_list(clean_err), "val_boundary_error": tensor_list(bndy_err),
            "lambda_clean": tensor_list(self.lambda_clean), "lambda_boundary": tensor_list(self.lambda_boundary),
            "lambda_margin": tensor_list(self.lambda_margin),
            "clean_weight": tensor_list(self.clean_weights()), "boundary_weight": tensor_list(self.boundary_weights()),
            "eps_scale": tensor_list(self.eps_scale()),
        })
        return record
