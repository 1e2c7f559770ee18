"""Remediation methods: ABSLD (default) and the baselines it is compared against.

Every method is a plain object driven by the training loop (remediate/train.py):

    method = create_method("absld", num_classes, dataset="cifar10", student_arch="resnet18")
    method.configure(epochs=300, lr_milestones=(215, 260, 285))
    for epoch in 1..epochs:                          # epochs are numbered from 1
        for x, y, index in batches:
            loss, stats = method.loss(student, teacher_logits, x, y, index, epoch)
            loss.backward(); optimizer.step()
        record = method.end_epoch(epoch, student=student, val_robust=val_robust)

`loss` runs the inner maximisation with the student in eval mode (the authors' code)
through `robaudit.audit.attacks.ascent.projected_ascent`, then puts the student in
train mode for the forward passes that feed the loss. It also adds the batch to
per-class tallies (error risks, training accuracies, Fair-ARD kappas) with one-hot
matrix products on the batch's device: no per-sample Python loops, and unlike
`index_add_` on CUDA the sums are deterministic. `end_epoch` turns the tallies into
the per-class updates (temperatures, class weights, calibrated eps/beta, weight
averaging) and returns a JSON-able record of the method's state for metrics.csv and
the report. `state_dict()` holds everything needed to resume exactly.

Random starts come from `robaudit.audit.rng` keyed by (seed, epoch-derived stream,
dataset index), so a sample's start does not depend on batching.

Under torchrun the loop passes the DistributedDataParallel-wrapped student: the inner
maximisation runs on the unwrapped module (`unwrap`; it needs input gradients only, and
a DDP forward without a parameter backward would leave DDP's reducer waiting), the
train-mode forwards that feed the loss go through the wrapper. The tallies are kept in
float64 so that a sum over ranks (`reduce_tallies`) equals the one-process sum: counts
exactly, and sums of float32 per-sample values exactly whenever they span fewer than
~2^29 in magnitude (then no partial sum rounds, whatever the order).

Formulas follow ../shared/specs/methods.md; comments marked (code) reproduce the
authors' released code where the papers are silent.
"""

from __future__ import annotations

import copy
import inspect
import math
from contextlib import contextmanager
from typing import Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.attacks.ascent import projected_ascent
from robaudit.audit.rng import per_sample_normal, per_sample_uniform
from robaudit.errors import UserError
from robaudit.registry import Registry

METHODS = Registry("method")

# Epoch tallies are float64: exact counts at any dataset size and order-independent
# sums of the float32 per-sample values (see the module docstring).
TALLY_DTYPE = torch.float64

DEFAULT_METHOD = "absld"

# Stream numbers for robaudit.audit.rng: stream = epoch * STREAMS_PER_EPOCH + purpose.
# The training loop keeps its own streams (augmentation, validation) far above these.
STREAMS_PER_EPOCH = 16
STREAM_RANDOM_START = 0

# Gaussian random-start scale of RSLAD/ABSLD/TRADES ("random start size 0.001").
GAUSSIAN_START_STD = 0.001
# Added to the teacher probabilities inside the log in the ABSLD code's KL (reference_compat).
REFERENCE_COMPAT_LOG_OFFSET = 1e-5
# Fair-ARD: w_k = (kappa_bar_k + 1e-5)^(-power), rescaled to sum C, clamped.
FAIR_ARD_EPS = 1e-5
FAIR_ARD_CLAMP = (5.0 / 6.0, 5.0 / 2.0)
# CFA's calibration/averaging starts are given for its 200-epoch schedule; shorter or
# longer runs scale them by epochs / 200.
CFA_REFERENCE_EPOCHS = 200


def list_methods() -> List[str]:
    """Registered remediation method names."""
    return METHODS.names()


def create_method(name: str, num_classes: int, **options) -> "RemediationMethod":
    """Instantiate a registered method; unknown names or options raise a one-line UserError."""
    cls = METHODS.get(name)
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"method {cls.name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}"
        )
    return cls(num_classes, **options)


def random_start_stream(epoch: int) -> int:
    """The rng stream of the inner attack's random start in `epoch` (1-based)."""
    return int(epoch) * STREAMS_PER_EPOCH + STREAM_RANDOM_START


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


def cfa_class_eps(train_robust_acc: torch.Tensor, eps: float, lambda1: float) -> torch.Tensor:
    """CFA class-wise calibrated margin (CCM): eps_k = (lambda1 + t_k) * eps."""
    return (lambda1 + train_robust_acc) * eps


def cfa_class_beta(train_robust_acc: torch.Tensor, beta: float, lambda2: float) -> torch.Tensor:
    """CFA class-wise calibrated regularisation (CCR): beta_k = (lambda2 + t_k) * beta."""
    return (lambda2 + train_robust_acc) * beta


def class_sums(y: torch.Tensor, values: torch.Tensor, num_classes: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-class sums of per-sample `values` [B] or [B, K] -> [C] or [C, K], in `dtype`.

    A one-hot matrix product: vectorised, on the batch's device, deterministic on CUDA
    (index_add_ uses atomics there), and kept out of autocast so bf16 never rounds counts.
    """
    squeeze = values.dim() == 1
    values = values.reshape(values.shape[0], -1).to(dtype)
    with torch.autocast(device_type=y.device.type, enabled=False):
        onehot = F.one_hot(y, num_classes).to(dtype)
        sums = onehot.t() @ values
    return sums.squeeze(1) if squeeze else sums


def kl_per_sample(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(student_logits)) per sample, summed over classes (0 log 0 = 0)."""
    log_q = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_q, target_probs, reduction="none").sum(dim=1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (else `model` itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with `module` in eval mode and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _tensor_list(t: torch.Tensor) -> List[Optional[float]]:
    """JSON-able list of a per-class tensor; NaN (a class absent this epoch) -> None."""
    return [None if math.isnan(v) else float(v) for v in t.detach().cpu().tolist()]


class RemediationMethod:
    """Base class: per-class epoch tallies, state handling and the common options.

    Subclasses implement `attack` (the inner maximisation) and `loss`; override
    `end_epoch` for their per-class updates. Common options: eps (L-inf radius), step_size,
    steps (inner PGD iterations), seed (random starts), and the training context
    `dataset` / `student_arch` (used for dataset-dependent defaults).
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True      # the loop computes teacher logits only if True
    records_clean: ClassVar[bool] = True      # whether the loss has a train-mode clean forward
    needs_validation: ClassVar[bool] = False  # whether end_epoch needs val_robust

    # Names of attributes that make up the method's state (tensors or plain values).
    _state_attrs: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, num_classes: int, *, eps: float = 8 / 255, step_size: float = 2 / 255,
                 steps: int = 10, seed: int = 0, dataset: Optional[str] = None,
                 student_arch: Optional[str] = None):
        if int(num_classes) < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        if steps < 0 or eps < 0 or step_size < 0:
            raise UserError("eps, step size and inner steps must be non-negative")
        self.num_classes = int(num_classes)
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.seed = int(seed)
        self.dataset = dataset
        self.student_arch = student_arch
        self.epochs: Optional[int] = None
        self.lr_milestones: Tuple[int, ...] = ()
        # Per-class tallies of the current epoch: count, CE on x', CE on x, correct on x', correct on x.
        self.tally = torch.zeros(self.num_classes, 5, dtype=TALLY_DTYPE)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def option_names(cls) -> List[str]:
        """Keyword options accepted by the constructor (own and inherited)."""
        names: List[str] = []
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.kind is param.KEYWORD_ONLY and param.name not in names:
                    names.append(param.name)
        return sorted(names)

    def configure(self, *, epochs: int, lr_milestones: Sequence[int]) -> None:
        """Tell the method the training schedule (some updates follow the lr milestones)."""
        self.epochs = int(epochs)
        self.lr_milestones = tuple(int(m) for m in lr_milestones)

    def options(self) -> dict:
        """JSON-able resolved options, for results.json "training.options"."""
        return {"eps": self.eps, "step_size": self.step_size, "steps": self.steps, "seed": self.seed}

    # ------------------------------------------------------------------ per-batch API
    def attack(self, student: nn.Module, teacher_logits: Optional[torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """The inner maximisation's x' (detached); the student is left in train mode."""
        raise NotImplementedError

    def loss(self, student: nn.Module, teacher_logits: Optional[torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, index: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(scalar training loss, detached per-batch stats); adds the batch to the epoch tallies."""
        raise NotImplementedError

    def reduce_tallies(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every epoch tally t by reduce(t) before `end_epoch`.

        Under torchrun the loop passes a sum over ranks (robaudit.audit.distributed.
        sum_over_ranks), so each rank's `end_epoch` sees the whole epoch's per-class
        statistics and every rank computes the same temperatures / weights / margins.
        """
        self.tally = reduce(self.tally)

    def end_epoch(self, epoch: int, *, student: Optional[nn.Module] = None,
                  val_robust: Optional[Callable[[nn.Module, int], torch.Tensor]] = None) -> dict:
        """Per-class updates after `epoch`; returns this epoch's record (and resets the tallies).

        `val_robust(model, steps)` returns per-class PGD robust accuracy on the validation
        split (only CFA's weight averaging uses it).
        """
        record = self._tally_record()
        self.tally.zero_()
        return record

    def eval_model(self, student: nn.Module) -> nn.Module:
        """The model to validate and export (CFA: its weight average once there is one)."""
        return student

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"name": self.name, "num_classes": self.num_classes, "tally": self.tally.detach().cpu().clone()}
        for attr in self._state_attrs:
            state[attr] = _clone_state(getattr(self, attr))
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name or state.get("num_classes") != self.num_classes:
            raise UserError(
                f"saved method state is for {state.get('name')!r} with {state.get('num_classes')} classes, "
                f"not {self.name!r} with {self.num_classes}"
            )
        device = self.tally.device
        self.tally = state["tally"].to(device=device, dtype=TALLY_DTYPE).clone()
        for attr in self._state_attrs:
            setattr(self, attr, _clone_state(state[attr], device))

    def to(self, device) -> "RemediationMethod":
        """Move the state tensors to `device` (done automatically on the first batch)."""
        device = torch.device(device)
        self.tally = self.tally.to(device)
        for attr in self._state_attrs:
            setattr(self, attr, _move_state(getattr(self, attr), device))
        return self

    # ------------------------------------------------------------------ helpers
    def _ensure_device(self, device: torch.device) -> None:
        if self.tally.device != device:
            self.to(device)

    def _gaussian_start(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        noise = per_sample_normal(self.seed, index, x.shape[1:], stream=random_start_stream(epoch),
                                  device=x.device, dtype=x.dtype)
        return x + GAUSSIAN_START_STD * noise

    def _uniform_start(self, x: torch.Tensor, index: torch.Tensor, epoch: int, eps) -> torch.Tensor:
        u = per_sample_uniform(self.seed, index, x.shape[1:], stream=random_start_stream(epoch),
                               device=x.device, dtype=x.dtype)
        return x + (2.0 * u - 1.0) * eps

    def _record_batch(self, y: torch.Tensor, logits_adv: torch.Tensor,
                      logits_nat: Optional[torch.Tensor]) -> None:
        """Add CE risks and correctness of the detached train-mode logits to the tallies."""
        with torch.no_grad():
            logits_adv = logits_adv.detach().float()
            columns = [torch.ones_like(y, dtype=torch.float32),
                       F.cross_entropy(logits_adv, y, reduction="none"),
                       torch.zeros_like(y, dtype=torch.float32),
                       (logits_adv.argmax(1) == y).float(),
                       torch.zeros_like(y, dtype=torch.float32)]
            if logits_nat is not None:
                logits_nat = logits_nat.detach().float()
                columns[2] = F.cross_entropy(logits_nat, y, reduction="none")
                columns[4] = (logits_nat.argmax(1) == y).float()
            self.tally += class_sums(y, torch.stack(columns, dim=1), self.num_classes, dtype=self.tally.dtype)

    def _class_counts(self) -> torch.Tensor:
        return self.tally[:, 0]

    def _class_means(self, column: int) -> torch.Tensor:
        """Per-class mean of a tally column (float32; NaN for a class absent this epoch)."""
        counts = self._class_counts()
        return torch.where(counts > 0, self.tally[:, column] / counts.clamp_min(1.0),
                           torch.full_like(counts, float("nan"))).float()

    def _tally_record(self) -> dict:
        record = {"train_risk_adv": _tensor_list(self._class_means(1)),
                  "train_acc_adv": _tensor_list(self._class_means(3))}
        if self.records_clean:
            record["train_risk_nat"] = _tensor_list(self._class_means(2))
            record["train_acc_nat"] = _tensor_list(self._class_means(4))
        return record


def _clone_state(value, device=None):
    if isinstance(value, torch.Tensor):
        return value.detach().clone() if device is None else value.detach().to(device).clone()
    if isinstance(value, dict):
        return {k: _clone_state(v, device) for k, v in value.items()}
    return copy.deepcopy(value)


def _move_state(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move_state(v, device) for k, v in value.items()}
    return value


def _class_mean_reduce(per_sample: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over the classes present in the batch of each class's mean (differentiable)."""
    per_class = class_sums(y, per_sample, num_classes)          # [C], keeps the autograd graph
    counts = class_sums(y, torch.ones_like(per_sample), num_classes).detach()
    present = (counts > 0).to(per_class.dtype)
    return (per_class / counts.clamp_min(1.0)).sum() / present.sum()


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


# ====================================================================== distillation
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

    def _counts_kappa(self) -> bool:
        return False

    def _inner(self, student, p_adv, x, y, index, epoch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        kappa = torch.zeros_like(y) if self._counts_kappa() else None
        net = unwrap(student)

        def attack_kl(x_adv: torch.Tensor) -> torch.Tensor:
            logits = net(x_adv)
            if kappa is not None:
                # Called at the start and after each of the first steps-1 steps: exactly the
                # Fair-ARD count (random start included, final point not).
                kappa.add_((logits.detach().argmax(1) == y).to(kappa.dtype))
            return kl_per_sample(logits, p_adv)

        with eval_mode(net):
            x_adv = projected_ascent(attack_kl, x, eps=self.eps, step_size=self.step_size,
                                     steps=self.steps, x_start=self._gaussian_start(x, index, epoch))
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
            return _class_mean_reduce(per_sample, y, self.num_classes)
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
            self._fair_weights().add(y, kappa)
        return loss, {"loss": loss.detach(), "kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach()}

    def _fair_weights(self) -> FairARDWeights:
        raise NotImplementedError


@METHODS.register("fair-rslad", help="Fair-RSLAD (Yue et al. 2023): RSLAD with Fair-ARD class weights")
class FairRSLAD(RSLAD):
    """Fair-RSLAD (Yue et al. 2023): the RSLAD loss with per-sample weight w_y.

    w comes from the previous epoch's kappas (see FairARDWeights); all ones in the first
    epoch. `weight_power` is the exponent (2 in the paper's code, its --beta).
    """

    name = "fair-rslad"

    def __init__(self, num_classes: int, *, weight_power: float = 2.0, **rslad_options):
        super().__init__(num_classes, **rslad_options)
        self.fair = FairARDWeights(self.num_classes, weight_power)

    def options(self) -> dict:
        return {**super().options(), "weight_power": self.fair.power}

    def _counts_kappa(self) -> bool:
        return True

    def _fair_weights(self) -> FairARDWeights:
        return self.fair

    def sample_weights(self, y):
        return self.fair.weights[y]

    def reduce_tallies(self, reduce):
        super().reduce_tallies(reduce)
        self.fair.reduce_tally(reduce)

    def end_epoch(self, epoch, *, student=None, val_robust=None):
        record = super().end_epoch(epoch, student=student, val_robust=val_robust)
        record["kappa_bar"] = _tensor_list(self.fair.update())
        record["class_weights"] = _tensor_list(self.fair.weights)
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

    def _counts_kappa(self) -> bool:
        return self.fair is not None

    def _fair_weights(self) -> FairARDWeights:
        return self.fair

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

    def end_epoch(self, epoch, *, student=None, val_robust=None):
        if self.beta_milestones and int(epoch) in self.beta_milestones:
            self.beta *= 0.1   # before this epoch's update, as the code does
        risk_adv, risk_nat, present = self.class_risks()
        self.tau_adv = absld_temperature_update(self.tau_adv, risk_adv, self.beta, self.tau_min,
                                                self.tau_max, present)
        if self.adapt == "both":
            self.tau_nat = absld_temperature_update(self.tau_nat, risk_nat, self.beta, self.tau_min,
                                                    self.tau_max, present)
        record = super().end_epoch(epoch, student=student, val_robust=val_robust)
        record.update({"beta": self.beta, "tau_adv": _tensor_list(self.tau_adv),
                       "tau_nat": _tensor_list(self.tau_nat)})
        if self.fair is not None:
            record["kappa_bar"] = _tensor_list(self.fair.update())
            record["class_weights"] = _tensor_list(self.fair.weights)
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


# ====================================================================== adversarial training
@METHODS.register("sat", help="SAT / PGD-AT (Madry et al.): cross-entropy on PGD examples")
class SAT(RemediationMethod):
    """SAT / PGD-AT (Madry et al.): L = CE(s(x'), y), x' = PGD-`steps` on CE from a uniform
    start in the eps-ball (step 2/255). No teacher. The attack runs with the student in
    eval mode, as in the distillation methods (the spec does not fix SAT's attack mode)."""

    name = "sat"
    needs_teacher = False
    records_clean = False

    def attack(self, student, teacher_logits, x, y, index, epoch):
        self._ensure_device(x.device)
        net = unwrap(student)
        with eval_mode(net):
            x_adv = projected_ascent(
                lambda xa: F.cross_entropy(net(xa).float(), y, reduction="none"), x,
                eps=self.eps, step_size=self.step_size, steps=self.steps,
                x_start=self._uniform_start(x, index, epoch, self.eps))
        student.train()
        return x_adv

    def loss(self, student, teacher_logits, x, y, index, epoch):
        x_adv = self.attack(student, None, x, y, index, epoch)
        logits_adv = student(x_adv)
        loss = F.cross_entropy(logits_adv.float(), y)
        self._record_batch(y, logits_adv, None)
        return loss, {"loss": loss.detach()}


def _trades_attack(student: nn.Module, x: torch.Tensor, x_start: torch.Tensor, eps, step_size: float,
                   steps: int) -> torch.Tensor:
    """TRADES inner maximisation: `steps` sign steps on KL(s(x) || s(x')), student in eval."""
    net = unwrap(student)
    with eval_mode(net):
        with torch.no_grad():
            p_nat = F.softmax(net(x).float(), dim=1)
        x_adv = projected_ascent(lambda xa: kl_per_sample(net(xa), p_nat), x, eps=eps,
                                 step_size=step_size, steps=steps, x_start=x_start)
    student.train()
    return x_adv


@METHODS.register("trades", help="TRADES (Zhang et al. 2019): CE(x) + beta * KL(s(x) || s(x'))")
class TRADES(RemediationMethod):
    """TRADES (Zhang et al. 2019): L = CE(s(x), y) + beta * KL(s(x) || s(x')) (batch means),
    beta = 6; x' from `steps` KL sign steps starting at x + 0.001 N(0,1), student in eval.
    Gradients flow through both s(x) and s(x'), as in the TRADES code. One train-mode
    clean forward feeds both terms (the TRADES code runs it twice)."""

    name = "trades"
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
        return _trades_attack(student, x, self._gaussian_start(x, index, epoch), self.eps,
                              self.step_size, self.steps)

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
    PGD-`fawa_steps` robust accuracy on the validation split is >= fawa_threshold (0.2),
    theta_avg <- fawa_decay * theta_avg + (1 - fawa_decay) * theta over parameters and
    float buffers (the first accepted epoch initialises theta_avg = theta); the averaged
    model is the one validated and exported. Paper values 0.85 / 0.2; the released code
    uses 0.88 / 0.24.

    Calibration and averaging start at epochs 10 and 50 of CFA's 200-epoch schedule;
    robaudit trains every method under the same schedule, so by default they start
    after round(10 * E / 200) and round(50 * E / 200) epochs of an E-epoch run
    (epochs are 1-based: calibration is used from epoch `calibration_start`).
    """

    name = "cfa"
    needs_teacher = False
    _state_attrs = ("train_robust", "avg_state")

    def __init__(self, num_classes: int, *, base: str = "trades", beta: float = 6.0,
                 lambda1: Optional[float] = None, lambda2: float = 0.5, ccm: bool = True,
                 ccr: bool = True, fawa: bool = True, fawa_threshold: float = 0.2,
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
        self.fawa_threshold = float(fawa_threshold)
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
                "fawa_threshold": self.fawa_threshold, "fawa_decay": self.fawa_decay,
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
            return _trades_attack(student, x, self._gaussian_start(x, index, epoch), eps,
                                  self.step_size, self.steps)
        net = unwrap(student)
        with eval_mode(net):
            x_adv = projected_ascent(
                lambda xa: F.cross_entropy(net(xa).float(), y, reduction="none"), x, eps=eps,
                step_size=self.step_size, steps=self.steps,
                x_start=self._uniform_start(x, index, epoch, eps))
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

    def end_epoch(self, epoch, *, student=None, val_robust=None):
        record = self._tally_record()
        counts = self._class_counts()
        robust = (self.tally[:, 3] / counts.clamp_min(1.0)).float()
        # An absent class keeps its previous t_k (or 0: the widest margin is not given to a class never seen).
        previous = self.train_robust if self.train_robust is not None else torch.zeros_like(robust)
        self.train_robust = torch.where(counts > 0, robust, previous)
        self.tally.zero_()
        record["class_eps"] = _tensor_list(self.class_eps(epoch + 1))
        if self.base == "trades":
            record["class_beta"] = _tensor_list(self.class_beta(epoch + 1))
        record["fawa_updated"] = False
        if self.fawa and int(epoch) >= self.averaging_start:
            if student is None or val_robust is None:
                raise ValueError("CFA's weight averaging needs the student and a validation callback")
            worst = float(val_robust(student, self.fawa_steps).min())
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
