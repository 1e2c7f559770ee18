"""Distillation methods: RSLAD, Fair-RSLAD and ABSLD (the default), with their per-class updates.

Each is a per-batch loss of the shared loop (remediate/base.py RemediationMethod,
remediate/train.py). Formulas follow ../shared/specs/methods.md (RSLAD, Fair-ARD, ABSLD
sections); comments marked (code) reproduce the authors' released code where the papers
are silent.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from robaudit.audit.attacks.ascent import projected_ascent
from robaudit.audit.modes import eval_mode
from robaudit.errors import UserError
from robaudit.remediate.base import (METHODS, TALLY_DTYPE, ClassState, RemediationMethod,
                                     class_mean_reduce, class_sums, kl_per_sample, tensor_list, unwrap)

# Added to the teacher probabilities inside the log in the ABSLD code's KL (reference_compat).
REFERENCE_COMPAT_LOG_OFFSET = 1e-5
# Fair-ARD: w_k = (kappa_bar_k + 1e-5)^(-power), rescaled to sum C, clamped.
FAIR_ARD_EPS = 1e-5
FAIR_ARD_CLAMP = (5.0 / 6.0, 5.0 / 2.0)

# RSLAD's schedule (zibojia/RSLAD rslad_train.py), which ABSLD and Fair-RSLAD train under too.
RSLAD_SCHEDULE = {"epochs": 300, "lr": 0.1, "milestones": (215, 260, 285), "weight_decay": 2e-4,
                  "batch_size": 128, "source": "RSLAD's code (rslad_train.py), used by the ABSLD paper"}

CLASS_WEIGHTS = ClassState("class_weights", "Per-class loss weights")
TEMPERATURES = (ClassState("tau_adv", "Teacher temperature per class on adversarial inputs (τ_adv)"),
                ClassState("tau_nat", "Teacher temperature per class on clean inputs (τ_nat)"))


def default_tau_bounds(dataset: Optional[str], student_arch: Optional[str]) -> Tuple[float, float]:
    """ABSLD's temperature bounds (paper A.3/A.5): [0.9, 1.1] on Tiny-ImageNet, [0.8, 3] for
    ResNet-18 on CIFAR-100, [0.5, 5] for every other setting."""
    data_key = "".join(ch for ch in (dataset or "").lower() if ch.isalnum())
    arch_key = "".join(ch for ch in (student_arch or "").lower() if ch.isalnum())
    if data_key.startswith("tinyimagenet"):
        return (0.9, 1.1)
    if data_key == "cifar100" and arch_key == "resnet18":
        return (0.8, 3.0)
    return (0.5, 5.0)


def absld_temperature_update(tau: torch.Tensor, risk: torch.Tensor, beta: float,
                             tau_min: float, tau_max: float,
                             present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ABSLD Eq. 10 for all classes at once.

    gap_k = R_k - mean_k R;  tau_k <- clamp(tau_k - beta * gap_k / max_k |gap_k|, tau_min, tau_max).
    A harder class (risk above the mean) gets a lower temperature, i.e. a sharper soft
    label. When max |gap| is 0 the update is skipped (the authors' code would divide by
    zero). Classes not `present` in the epoch (no training sample; only possible on tiny
    subsets) are left out of the mean and keep their temperature.
    """
    if present is None:
        present = torch.ones_like(tau, dtype=torch.bool)
    present_f = present.to(risk.dtype)
    mean = (risk * present_f).sum() / present_f.sum().clamp_min(1.0)
    gap = torch.where(present, risk - mean, torch.zeros_like(risk))
    scale = gap.abs().max()
    # Branch-free skip (no host sync): with scale == 0 every gap is 0, so dividing by 1 is a no-op.
    step = beta * gap / torch.where(scale > 0, scale, torch.ones_like(scale))
    updated = (tau - step).clamp(tau_min, tau_max)
    return torch.where(present & (scale > 0), updated, tau)


def fair_ard_weights(kappa_bar: torch.Tensor, power: float = 2.0,
                     bounds: Tuple[float, float] = FAIR_ARD_CLAMP) -> torch.Tensor:
    """Fair-ARD class weights: (kappa_bar + 1e-5)^(-power), rescaled to sum C, clamped to `bounds`."""
    raw = (kappa_bar.to(torch.float32) + FAIR_ARD_EPS).pow(-power)
    scaled = raw * (kappa_bar.numel() / raw.sum())
    return scaled.clamp(bounds[0], bounds[1])



def kappa_counting(net: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor,
                   kappa: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`net` for an inner attack that also counts Fair-ARD's kappas into `kappa` ([B], in place).

    Every forward adds 1 for each sample still predicted as y. projected_ascent (and
    cross_entropy_pgd on it) calls its loss at the start and after each of the first
    steps-1 steps: exactly the Fair-ARD count (random start included, final point not).
    With kappa None it is `net` itself. Shared by Fair-RSLAD / ABSLD+Fair-ARD (KL attack)
    and the ARD-based Fair-ARD (remediate/ard.py, CE attack).
    """
    if kappa is None:
        return net

    def forward(x_adv: torch.Tensor) -> torch.Tensor:
        logits = net(x_adv)
        kappa.add_((logits.detach().argmax(1) == y).to(kappa.dtype))
        return logits

    return forward


class FairARDWeights:
    """Fair-ARD class re-weighting state (Yue et al. 2023).

    kappa_i = number of the inner PGD iterations at which the student still predicts y
    (random start counted, final point not); kappa_bar_k = class mean over the epoch;
    next epoch's weights w_k = (kappa_bar_k + 1e-5)^(-power), rescaled to sum C, clamped to
    [5/6, 5/2]. The code divides by n/C (balanced data); we divide by the real class
    counts. A class absent from the epoch takes the mean kappa of the present classes.
    """

    def __init__(self, num_classes: int, power: float = 2.0):
        self.num_classes = num_classes
        self.power = float(power)
        self.weights = torch.ones(num_classes)
        self.kappa_tally = torch.zeros(num_classes, 2, dtype=TALLY_DTYPE)   # (kappa sum, count)

    def add(self, y: torch.Tensor, kappa: torch.Tensor) -> None:
        columns = torch.stack([kappa.float(), torch.ones_like(kappa, dtype=torch.float32)], dim=1)
        self.kappa_tally += class_sums(y, columns, self.num_classes, dtype=self.kappa_tally.dtype)

    def reduce_tally(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.kappa_tally = reduce(self.kappa_tally)

    def update(self) -> torch.Tensor:
        counts = self.kappa_tally[:, 1]
        present = counts > 0
        kappa_bar = self.kappa_tally[:, 0] / counts.clamp_min(1.0)
        fill = (kappa_bar * present).sum() / present.sum().clamp_min(1)
        kappa_bar = torch.where(present, kappa_bar, fill).float()
        self.weights = fair_ard_weights(kappa_bar, self.power)
        self.kappa_tally.zero_()
        return kappa_bar

    def state_dict(self) -> dict:
        return {"weights": self.weights.detach().cpu().clone(),
                "kappa_tally": self.kappa_tally.detach().cpu().clone(), "power": self.power}

    def load_state_dict(self, state: dict, device) -> None:
        self.weights = state["weights"].to(device).clone()
        self.kappa_tally = state["kappa_tally"].to(device=device, dtype=TALLY_DTYPE).clone()
        self.power = float(state["power"])

    def to(self, device) -> None:
        self.weights = self.weights.to(device)
        self.kappa_tally = self.kappa_tally.to(device)


@METHODS.register("rslad", help="RSLAD (Zi et al. 2021): robust soft-label adversarial distillation")
class RSLAD(RemediationMethod):
    """RSLAD (Zi et al. 2021): distil the teacher's clean soft labels on x and x'.

    x' = PGD-`steps` from x + 0.001 N(0,1) maximising KL(p_t || s(x')) with the student in
    eval mode (code); then, student in train mode,
    L = loss_scale * (alpha * KL(p_t || s(x')) + (1 - alpha) * KL(p_t || s(x))).
    alpha = 5/6 (code). loss_scale = 0.1 reproduces the code's optimised loss, the
    elementwise B x C mean of the KL (= batch-mean KL / 10 on CIFAR-10, and on CIFAR-100
    after its x10); loss_scale = 1 is the plain batch mean. `classwise_mean` averages each
    class's mean KL over the classes present in the batch instead of all samples.
    """

    name = "rslad"
    fair: Optional[FairARDWeights] = None    # Fair-ARD class weights, for the methods that use them
    paper_schedule = RSLAD_SCHEDULE

    def __init__(self, num_classes: int, *, alpha: float = 5 / 6, loss_scale: float = 0.1,
                 classwise_mean: bool = False, **common):
        super().__init__(num_classes, **common)
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        if loss_scale <= 0:
            raise UserError(f"loss_scale must be positive, got {loss_scale}")
        self.alpha = float(alpha)
        self.loss_scale = float(loss_scale)
        self.classwise_mean = bool(classwise_mean)

    def options(self) -> dict:
        return {**super().options(), "alpha": self.alpha, "loss_scale": self.loss_scale,
                "classwise_mean": self.classwise_mean}

    # Overridden by ABSLD (temperatures) and the Fair-ARD variants (weights).
    def soft_labels(self, teacher_logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(p_adv, p_nat): the teacher's soft labels for the x' term (and attack) and the x term."""
        p = F.softmax(teacher_logits.float(), dim=1)
        return p, p

    def sample_weights(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def distill_kl(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample KL of a loss term (ABSLD's reference_compat changes its form)."""
        return kl_per_sample(student_logits, target)

    def _inner(self, student, p_adv, x, y, index, epoch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Methods with Fair-ARD weights (self.fair) count the kappas during this attack.
        kappa = torch.zeros_like(y) if self.fair is not None else None
        net = unwrap(student)
        forward = kappa_counting(net, y, kappa)

        def attack_kl(x_adv: torch.Tensor) -> torch.Tensor:
            return kl_per_sample(forward(x_adv), p_adv)

        with eval_mode(net):
            x_adv = projected_ascent(attack_kl, x, eps=self.eps, step_size=self.step_size,
                                     steps=self.steps, x_start=self._gaussian_start(x, index, epoch),
                                     norm=self.norm)
        student.train()
        return x_adv, kappa

    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        p_adv, _ = self.soft_labels(teacher_logits, y)
        return self._inner(student, p_adv, x, y, index, epoch)[0]

    def _reduce(self, per_sample: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        if weights is not None:
            per_sample = per_sample * weights
        if self.classwise_mean:
            return class_mean_reduce(per_sample, y, self.num_classes)
        return per_sample.mean()

    def loss(self, student, teacher_logits, x, y, index, epoch):
        if teacher_logits is None:
            raise ValueError(f"{self.name} distils a teacher: teacher_logits are required")
        self._ensure_device(x.device)
        p_adv, p_nat = self.soft_labels(teacher_logits, y)
        x_adv, kappa = self._inner(student, p_adv, x, y, index, epoch)
        # Two train-mode passes, x' first, as the authors' code (BN statistics see both).
        logits_adv = student(x_adv)
        logits_nat = student(x)
        weights = self.sample_weights(y)
        kl_adv = self._reduce(self.distill_kl(logits_adv, p_adv), y, weights)
        kl_nat = self._reduce(self.distill_kl(logits_nat, p_nat), y, weights)
        loss = self.loss_scale * (self.alpha * kl_adv + (1.0 - self.alpha) * kl_nat)
        self._record_batch(y, logits_adv, logits_nat)
        if kappa is not None:
            self.fair.add(y, kappa)
        return loss, {"loss": loss.detach(), "kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach()}

class FairARDReweighting:
    """The Fair-ARD class re-weighting a method gets by listing this class first in its bases
    (Fair-RSLAD here, Fair-ARD in remediate/ard.py): the `weight_power` option, the weights
    w_y as sample_weights, their tallies reduced over ranks, their update at each epoch end
    (recorded as kappa_bar / class_weights, declared as class state) and their state."""

    def __init__(self, num_classes: int, *, weight_power: float = 2.0, **options):
        super().__init__(num_classes, **options)
        self.fair = FairARDWeights(self.num_classes, weight_power)

    def options(self) -> dict:
        return {**super().options(), "weight_power": self.fair.power}

    def class_state(self):
        return (CLASS_WEIGHTS,)

    def sample_weights(self, y):
        return self.fair.weights[y]

    def reduce_tallies(self, reduce):
        super().reduce_tallies(reduce)
        self.fair.reduce_tally(reduce)

    def end_epoch(self, epoch, *, student=None, **validation):
        record = super().end_epoch(epoch, student=student, **validation)
        record["kappa_bar"] = tensor_list(self.fair.update())
        record["class_weights"] = tensor_list(self.fair.weights)
        return record

    def state_dict(self):
        return {**super().state_dict(), "fair_ard": self.fair.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.fair.load_state_dict(state["fair_ard"], self.tally.device)

    def to(self, device):
        super().to(device)
        self.fair.to(device)
        return self


@METHODS.register("fair-rslad", help="Fair-RSLAD (Yue et al. 2023): RSLAD with Fair-ARD class weights")
class FairRSLAD(FairARDReweighting, RSLAD):
    """Fair-RSLAD (Yue et al. 2023): the RSLAD loss with per-sample weight w_y.

    w comes from the previous epoch's kappas (see FairARDWeights); all ones in the first
    epoch. `weight_power` is the exponent (2 in the paper's code, its --beta).
    """

    name = "fair-rslad"


@METHODS.register("absld", help="ABSLD (Zhao et al. 2024): anti-bias soft label distillation (default)")
class ABSLD(RSLAD):
    """ABSLD (Zhao et al., NeurIPS 2024): RSLAD with per-class teacher temperatures.

    Two vectors tau_adv, tau_nat (initially 1). Each sample uses its true class's
    temperatures: p_adv = softmax(z_t / tau_adv[y]) for the x' term and the inner attack,
    p_nat = softmax(z_t / tau_nat[y]) for the x term; student temperature 1.
    Per-class error risks R_adv[k] = CE(s(x'), y), R_nat[k] = CE(s(x), y) over the
    epoch's class-k samples, from the detached train-mode logits of the loss's forward
    passes (code), as means (`risk="sum"`: Alg. 1's sums). At each epoch end both vectors
    follow `absld_temperature_update` (Eq. 10) with rate beta (0.1), starting after
    epoch 1. beta is multiplied by 0.1 at the lr milestones; as in the authors' code the
    decay at milestone m happens before the update at the end of epoch m.

    Options: alpha (5/6, code), beta, tau_bounds (default: `default_tau_bounds(dataset,
    student_arch)`), loss_scale / classwise_mean as RSLAD, risk "mean" | "sum",
    adapt "both" | "adv" (ablation: tau_nat stays 1), beta_milestones (default: the lr
    milestones given to `configure`).

    reference_compat=True reproduces the released code's deviations: (1) both scaled
    teacher tensors alias one storage, so both terms and the attack use
    z_t / (tau_adv[y] * tau_nat[y]); (2) the loss terms use log(softmax(z_s)) and
    log(p_t + 1e-5) (a different loss value, the same gradient); (3) summed risks.

    reweight="fair-ard" multiplies each sample's two KL terms by the Fair-ARD class weight
    w_y, with kappas counted during ABSLD's own inner attack. The ABSLD journal version
    says only that ABSLD "can be integrated with the sample-based methods"; this
    combination is robaudit's own construction, not the authors'.
    """

    name = "absld"
    _state_attrs = ("tau_adv", "tau_nat", "beta")

    def __init__(self, num_classes: int, *, beta: float = 0.1,
                 tau_bounds: Optional[Sequence[float]] = None, risk: Optional[str] = None,
                 adapt: str = "both", reference_compat: bool = False, reweight: Optional[str] = None,
                 weight_power: float = 2.0, beta_milestones: Optional[Sequence[int]] = None,
                 **rslad_options):
        super().__init__(num_classes, **rslad_options)
        if tau_bounds is None:
            tau_bounds = default_tau_bounds(self.dataset, self.student_arch)
        tau_min, tau_max = (float(v) for v in tau_bounds)
        if not 0 < tau_min <= tau_max:
            raise UserError(f"tau bounds must satisfy 0 < min <= max, got [{tau_min}, {tau_max}]")
        if adapt not in ("both", "adv"):
            raise UserError(f"adapt must be 'both' or 'adv', got {adapt!r}")
        risk = risk or ("sum" if reference_compat else "mean")
        if risk not in ("mean", "sum"):
            raise UserError(f"risk must be 'mean' or 'sum', got {risk!r}")
        if reweight not in (None, "none", "fair-ard"):
            raise UserError(f"reweight must be 'fair-ard' or none, got {reweight!r}")
        if beta < 0:
            raise UserError(f"beta (temperature learning rate) must be >= 0, got {beta}")
        self.tau_min, self.tau_max = tau_min, tau_max
        self.risk = risk
        self.adapt = adapt
        self.reference_compat = bool(reference_compat)
        self.reweight = None if reweight in (None, "none") else reweight
        self.initial_beta = float(beta)
        self.beta = float(beta)
        self.beta_milestones = tuple(int(m) for m in beta_milestones) if beta_milestones is not None else None
        self.tau_adv = torch.ones(self.num_classes)
        self.tau_nat = torch.ones(self.num_classes)
        self.fair = FairARDWeights(self.num_classes, weight_power) if self.reweight else None

    def configure(self, *, epochs, lr_milestones):
        super().configure(epochs=epochs, lr_milestones=lr_milestones)
        if self.beta_milestones is None:
            self.beta_milestones = self.lr_milestones

    def options(self) -> dict:
        opts = {**super().options(), "beta": self.initial_beta, "tau_bounds": [self.tau_min, self.tau_max],
                "risk": self.risk, "adapt": self.adapt, "reference_compat": self.reference_compat,
                "reweight": self.reweight,
                "beta_milestones": list(self.beta_milestones) if self.beta_milestones is not None else None}
        if self.fair is not None:
            opts["weight_power"] = self.fair.power
        return opts

    def effective_temperatures(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample teacher temperatures (adv term, nat term) actually applied to z_t."""
        tau_adv = self.tau_adv.to(y.device)[y]
        tau_nat = self.tau_nat.to(y.device)[y]
        if self.reference_compat:
            aliased = tau_adv * tau_nat
            return aliased, aliased
        return tau_adv, tau_nat

    def soft_labels(self, teacher_logits, y):
        tau_adv, tau_nat = self.effective_temperatures(y)
        z_t = teacher_logits.float()
        return (F.softmax(z_t / tau_adv.unsqueeze(1), dim=1),
                F.softmax(z_t / tau_nat.unsqueeze(1), dim=1))

    def distill_kl(self, student_logits, target):
        if not self.reference_compat:
            return kl_per_sample(student_logits, target)
        log_q = torch.log(F.softmax(student_logits.float(), dim=1))
        return (-log_q * target + torch.log(target + REFERENCE_COMPAT_LOG_OFFSET) * target).sum(dim=1)

    def class_state(self):
        return TEMPERATURES + ((CLASS_WEIGHTS,) if self.fair is not None else ())

    def sample_weights(self, y):
        return self.fair.weights[y] if self.fair is not None else None

    def class_risks(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R_adv, R_nat, present) of the epoch so far, as means or sums per `risk` (float32)."""
        counts = self._class_counts()
        present = counts > 0
        if self.risk == "sum":
            return self.tally[:, 1].float(), self.tally[:, 2].float(), present
        return ((self.tally[:, 1] / counts.clamp_min(1.0)).float(),
                (self.tally[:, 2] / counts.clamp_min(1.0)).float(), present)

    def reduce_tallies(self, reduce):
        super().reduce_tallies(reduce)
        if self.fair is not None:
            self.fair.reduce_tally(reduce)

    def end_epoch(self, epoch, *, student=None, **validation):
        if self.beta_milestones and int(epoch) in self.beta_milestones:
            self.beta *= 0.1   # before this epoch's update, as the code does
        risk_adv, risk_nat, present = self.class_risks()
        self.tau_adv = absld_temperature_update(self.tau_adv, risk_adv, self.beta, self.tau_min,
                                                self.tau_max, present)
        if self.adapt == "both":
            self.tau_nat = absld_temperature_update(self.tau_nat, risk_nat, self.beta, self.tau_min,
                                                    self.tau_max, present)
        record = super().end_epoch(epoch, student=student, **validation)
        record.update({"beta": self.beta, "tau_adv": tensor_list(self.tau_adv),
                       "tau_nat": tensor_list(self.tau_nat)})
        if self.fair is not None:
            record["kappa_bar"] = tensor_list(self.fair.update())
            record["class_weights"] = tensor_list(self.fair.weights)
        return record

    def state_dict(self):
        state = super().state_dict()
        if self.fair is not None:
            state["fair_ard"] = self.fair.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.fair is not None:
            self.fair.load_state_dict(state["fair_ard"], self.tally.device)

    def to(self, device):
        super().to(device)
        if self.fair is not None:
            self.fair.to(device)
        return self


