"""Adversarial-training methods: SAT (PGD-AT), TRADES and CFA, each a per-batch loss of the
shared loop (remediate/base.py RemediationMethod, remediate/train.py). None needs a teacher.

Formulas follow ../shared/specs/methods.md (SAT, TRADES, CFA sections); comments marked
(code) reproduce the authors' released code where the papers are silent.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.attacks.ascent import cross_entropy_pgd, projected_ascent
from robaudit.audit.modes import eval_mode
from robaudit.errors import UserError
from robaudit.remediate.base import METHODS, ClassState, RemediationMethod, kl_per_sample, tensor_list, unwrap
from robaudit.remediate.selection import worst_metric

# CFA's calibration/averaging starts are given for its 200-epoch schedule; shorter or
# longer runs scale them by epochs / 200.
CFA_REFERENCE_EPOCHS = 200

# Each method's own paper/code schedule (`--schedule paper`; milestone m: lr /10 from epoch m + 1).
SAT_SCHEDULE = {"epochs": 205, "lr": 0.1, "milestones": (102, 154), "weight_decay": 2e-4, "batch_size": 128,
                "source": "MadryLab/cifar10_challenge config.json: 80,000 steps of 128 (~205 epochs on 50,000 "
                          "images), lr 0.1 -> 0.01 -> 0.001 at steps 40,000 and 60,000, weight decay 2e-4"}
TRADES_SCHEDULE = {"epochs": 80, "lr": 0.1, "milestones": (74,), "weight_decay": 2e-4, "batch_size": 128,
                   "source": "yaodongyu/TRADES train_trades_cifar10.py: 80 epochs, lr x0.1 from epoch 75, "
                             "weight decay 2e-4"}
# FAWA's gate: the worst class >= 0.2 (CFA, CIFAR-10); with >= 50 classes the worst-10% mean >= 0.02.
FAWA_THRESHOLD, FAWA_THRESHOLD_MANY, FAWA_MANY_CLASSES = 0.2, 0.02, 50

CFA_SCHEDULE = {"epochs": 200, "lr": 0.1, "milestones": (100, 150), "weight_decay": 5e-4, "batch_size": 128,
                "source": "CFA's code (../shared/specs/methods.md, CFA): 200 epochs, lr /10 at 50% and 75%, "
                          "weight decay 5e-4"}

CFA_CLASS_EPS = ClassState("class_eps", "Class-wise calibrated perturbation budget (CFA's CCM ε_k)")
CFA_CLASS_BETA = ClassState("class_beta", "Class-wise calibrated TRADES weight (CFA's CCR β_k)")


def cfa_class_eps(train_robust_acc: torch.Tensor, eps: float, lambda1: float) -> torch.Tensor:
    """CFA class-wise calibrated margin (CCM): eps_k = (lambda1 + t_k) * eps."""
    return (lambda1 + train_robust_acc) * eps


def cfa_class_beta(train_robust_acc: torch.Tensor, beta: float, lambda2: float) -> torch.Tensor:
    """CFA class-wise calibrated regularisation (CCR): beta_k = (lambda2 + t_k) * beta."""
    return (lambda2 + train_robust_acc) * beta



@METHODS.register("sat", help="SAT / PGD-AT (Madry et al.): cross-entropy on PGD examples")
class SAT(RemediationMethod):
    """SAT / PGD-AT (Madry et al.): L = CE(s(x'), y), x' = PGD-`steps` on CE from a uniform
    start in the eps-ball (step 2/255). No teacher. The attack runs with the student in
    eval mode, as in the distillation methods (the spec does not fix SAT's attack mode)."""

    name = "sat"
    paper_schedule = SAT_SCHEDULE
    needs_teacher = False
    records_clean = False

    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        net = unwrap(student)
        with eval_mode(net):
            x_adv = cross_entropy_pgd(net, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                                      unit_noise=self._unit_noise(x, index, epoch), norm=self.norm)
        student.train()
        return x_adv

    def loss(self, student, teacher_logits, x, y, index, epoch):
        x_adv = self.attack(student, None, x, y, index, epoch)
        logits_adv = student(x_adv)
        loss = F.cross_entropy(logits_adv.float(), y)
        self._record_batch(y, logits_adv, None)
        return loss, {"loss": loss.detach()}


def trades_attack(student: nn.Module, x: torch.Tensor, x_start: torch.Tensor, eps, step_size: float,
                   steps: int, norm: str = "linf") -> torch.Tensor:
    """TRADES inner maximisation: `steps` ascent steps (sign steps under linf) on
    KL(s(x) || s(x')), student in eval."""
    net = unwrap(student)
    with eval_mode(net):
        with torch.no_grad():
            p_nat = F.softmax(net(x).float(), dim=1)
        x_adv = projected_ascent(lambda xa: kl_per_sample(net(xa), p_nat), x, eps=eps,
                                 step_size=step_size, steps=steps, x_start=x_start, norm=norm)
    student.train()
    return x_adv


@METHODS.register("trades", help="TRADES (Zhang et al. 2019): CE(x) + beta * KL(s(x) || s(x'))")
class TRADES(RemediationMethod):
    """TRADES (Zhang et al. 2019): L = CE(s(x), y) + beta * KL(s(x) || s(x')) (batch means),
    beta = 6; x' from `steps` KL sign steps starting at x + 0.001 N(0,1), student in eval.
    Gradients flow through both s(x) and s(x'), as in the TRADES code. One train-mode
    clean forward feeds both terms (the TRADES code runs it twice)."""

    name = "trades"
    paper_schedule = TRADES_SCHEDULE
    needs_teacher = False

    def __init__(self, num_classes: int, *, beta: float = 6.0, **common):
        super().__init__(num_classes, **common)
        if beta < 0:
            raise UserError(f"TRADES beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def options(self):
        return {**super().options(), "beta": self.beta}

    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        return trades_attack(student, x, self._gaussian_start(x, index, epoch), self.eps,
                              self.step_size, self.steps, self.norm)

    def loss(self, student, teacher_logits, x, y, index, epoch):
        x_adv = self.attack(student, None, x, y, index, epoch)
        logits_nat = student(x)
        logits_adv = student(x_adv)
        ce = F.cross_entropy(logits_nat.float(), y)
        kl = kl_per_sample(logits_adv, F.softmax(logits_nat.float(), dim=1)).mean()
        loss = ce + self.beta * kl
        self._record_batch(y, logits_adv, logits_nat)
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach()}


@METHODS.register("cfa", help="CFA (Wei et al. 2023): class-wise calibrated margins/regularisation + FAWA")
class CFA(RemediationMethod):
    """CFA (Wei et al., CVPR 2023) on TRADES (default; the ABSLD paper's baseline) or AT.

    t_k = class-k robust accuracy of the previous epoch's training adversarial examples
    (train-mode logits, divided by the real class counts).
    CCM: per-sample eps_y = (lambda1 + t_y) * eps (lambda1 0.3 on TRADES, 0.5 on AT); the
    step stays `step_size`. CCR (TRADES only): beta_y = (lambda2 + t_y) * beta,
    lambda2 = 0.5, per-sample loss (CE + beta_y * KL) / (1 + beta_y) (before calibration
    beta_y = beta, so the TRADES loss is normalised by 1 + beta throughout, as in the code).
    FAWA: after each epoch from `averaging_start` on, if the raw model's worst-class
    PGD-`fawa_steps` robust accuracy on the validation split is >= fawa_threshold (0.2;
    with >= 50 classes the gate reads the mean of the worst 10% of classes against 0.02, as
    ABSLD Appendix A.3 ran CFA on CIFAR-100: the single worst of 100 classes is near 0 and
    would never open it),
    theta_avg <- fawa_decay * theta_avg + (1 - fawa_decay) * theta over parameters and
    float buffers (the first accepted epoch initialises theta_avg = theta); the averaged
    model is the one validated and exported. Paper values 0.85 / 0.2; the released code
    uses 0.88 / 0.24.

    Calibration and averaging start at epochs 10 and 50 of CFA's 200-epoch schedule
    (`--schedule paper` runs that schedule); under any other length E (the shared
    schedule, or --epochs) they start after round(10 * E / 200) and round(50 * E / 200) epochs
    (epochs are 1-based: calibration is used from epoch `calibration_start`).
    """

    name = "cfa"
    paper_schedule = CFA_SCHEDULE
    needs_teacher = False
    _state_attrs = ("train_robust", "avg_state")

    def __init__(self, num_classes: int, *, base: str = "trades", beta: float = 6.0,
                 lambda1: Optional[float] = None, lambda2: float = 0.5, ccm: bool = True,
                 ccr: bool = True, fawa: bool = True, fawa_threshold: Optional[float] = None,
                 fawa_decay: float = 0.85, fawa_steps: int = 10,
                 calibration_start: Optional[int] = None, averaging_start: Optional[int] = None,
                 **common):
        super().__init__(num_classes, **common)
        if base not in ("trades", "at"):
            raise UserError(f"CFA base must be 'trades' or 'at', got {base!r}")
        if not 0.0 <= fawa_decay <= 1.0:
            raise UserError(f"fawa_decay must be in [0, 1], got {fawa_decay}")
        self.base = base
        self.beta = float(beta)
        self.lambda1 = float(lambda1) if lambda1 is not None else (0.3 if base == "trades" else 0.5)
        self.lambda2 = float(lambda2)
        self.ccm = bool(ccm)
        self.ccr = bool(ccr) and base == "trades"
        self.fawa = bool(fawa)
        many = self.num_classes >= FAWA_MANY_CLASSES
        self.fawa_threshold = float(fawa_threshold if fawa_threshold is not None
                                    else (FAWA_THRESHOLD_MANY if many else FAWA_THRESHOLD))
        self.fawa_rule = "worst-10% mean" if many else "worst class"
        self.fawa_decay = float(fawa_decay)
        self.fawa_steps = int(fawa_steps)
        self._explicit_starts = (calibration_start, averaging_start)
        self.calibration_start = int(calibration_start) if calibration_start is not None else 11
        self.averaging_start = int(averaging_start) if averaging_start is not None else 51
        self.train_robust: Optional[torch.Tensor] = None   # t_k from the previous epoch
        self.avg_state: Optional[Dict[str, torch.Tensor]] = None
        self._avg_module: Optional[nn.Module] = None
        self._avg_module_stale = True

    @property
    def records_clean(self) -> bool:  # type: ignore[override]
        return self.base == "trades"

    @property
    def needs_validation(self) -> bool:
        return self.fawa

    def class_state(self):
        return (CFA_CLASS_EPS, CFA_CLASS_BETA) if self.base == "trades" else (CFA_CLASS_EPS,)

    def configure(self, *, epochs, lr_milestones):
        super().configure(epochs=epochs, lr_milestones=lr_milestones)
        scale = self.epochs / CFA_REFERENCE_EPOCHS
        if self._explicit_starts[0] is None:
            self.calibration_start = 1 + round(10 * scale)
        if self._explicit_starts[1] is None:
            self.averaging_start = 1 + round(50 * scale)

    def options(self):
        return {**super().options(), "base": self.base, "beta": self.beta, "lambda1": self.lambda1,
                "lambda2": self.lambda2, "ccm": self.ccm, "ccr": self.ccr, "fawa": self.fawa,
                "fawa_threshold": self.fawa_threshold, "fawa_rule": self.fawa_rule, "fawa_decay": self.fawa_decay,
                "fawa_steps": self.fawa_steps, "calibration_start": self.calibration_start,
                "averaging_start": self.averaging_start}

    def _calibrated(self, epoch: int) -> bool:
        return self.train_robust is not None and int(epoch) >= self.calibration_start

    def class_eps(self, epoch: int) -> torch.Tensor:
        """eps_k used in `epoch` (CCM once calibrated, else eps for every class)."""
        if self.ccm and self._calibrated(epoch):
            return cfa_class_eps(self.train_robust, self.eps, self.lambda1)
        return torch.full((self.num_classes,), self.eps, device=self.tally.device)

    def class_beta(self, epoch: int) -> torch.Tensor:
        """beta_k used in `epoch` (CCR once calibrated, else beta for every class)."""
        if self.ccr and self._calibrated(epoch):
            return cfa_class_beta(self.train_robust, self.beta, self.lambda2)
        return torch.full((self.num_classes,), self.beta, device=self.tally.device)

    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        eps = self.class_eps(epoch)[y].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        if self.base == "trades":
            return trades_attack(student, x, self._gaussian_start(x, index, epoch), eps,
                                  self.step_size, self.steps, self.norm)
        net = unwrap(student)
        with eval_mode(net):
            x_adv = cross_entropy_pgd(net, x, y, eps=eps, step_size=self.step_size, steps=self.steps,
                                      unit_noise=self._unit_noise(x, index, epoch), norm=self.norm)
        student.train()
        return x_adv

    def loss(self, student, teacher_logits, x, y, index, epoch):
        x_adv = self.attack(student, None, x, y, index, epoch)
        if self.base == "at":
            logits_adv = student(x_adv)
            loss = F.cross_entropy(logits_adv.float(), y)
            self._record_batch(y, logits_adv, None)
            return loss, {"loss": loss.detach()}
        logits_nat = student(x)
        logits_adv = student(x_adv)
        ce = F.cross_entropy(logits_nat.float(), y, reduction="none")
        kl = kl_per_sample(logits_adv, F.softmax(logits_nat.float(), dim=1))
        beta_y = self.class_beta(epoch)[y]
        loss = ((ce + beta_y * kl) / (1.0 + beta_y)).mean()
        self._record_batch(y, logits_adv, logits_nat)
        return loss, {"loss": loss.detach(), "ce": ce.mean().detach(), "kl": kl.mean().detach()}

    def end_epoch(self, epoch, *, student=None, val_robust=None, **validation):
        record = self._tally_record()
        counts = self._class_counts()
        robust = (self.tally[:, 3] / counts.clamp_min(1.0)).float()
        # An absent class keeps its previous t_k (or 0: the widest margin is not given to a class never seen).
        previous = self.train_robust if self.train_robust is not None else torch.zeros_like(robust)
        self.train_robust = torch.where(counts > 0, robust, previous)
        self.tally.zero_()
        record["class_eps"] = tensor_list(self.class_eps(epoch + 1))
        if self.base == "trades":
            record["class_beta"] = tensor_list(self.class_beta(epoch + 1))
        record["fawa_updated"] = False
        if self.fawa and int(epoch) >= self.averaging_start:
            if student is None or val_robust is None:
                raise ValueError("CFA's weight averaging needs the student and a validation callback")
            worst = worst_metric(val_robust(student, self.fawa_steps))   # worst-10% mean for >= 50 classes
            record["fawa_val_worst"] = worst
            if worst >= self.fawa_threshold:
                self._average_into(student)
                record["fawa_updated"] = True
        return record

    def _average_into(self, student: nn.Module) -> None:
        with torch.no_grad():
            theta = {k: v.detach() for k, v in student.state_dict().items()}
            if self.avg_state is None:
                self.avg_state = {k: v.clone() for k, v in theta.items()}
            else:
                for key, value in theta.items():
                    avg = self.avg_state[key]
                    value = value.to(avg.device)
                    if value.is_floating_point():
                        avg.mul_(self.fawa_decay).add_(value, alpha=1.0 - self.fawa_decay)
                    else:  # e.g. BatchNorm's num_batches_tracked
                        avg.copy_(value)
        self._avg_module_stale = True

    def eval_model(self, student):
        if self.avg_state is None:
            return student
        if self._avg_module is None:
            self._avg_module = copy.deepcopy(student)
            self._avg_module_stale = True
        if self._avg_module_stale:
            self._avg_module.load_state_dict(self.avg_state)
            self._avg_module_stale = False
        return self._avg_module.eval()

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._avg_module_stale = True
