"""The method base: the registry of remediation trainers, the per-batch method base class, and
the per-class state a method declares.

Every registered method is a trainer (`Trainer`): the `remediate` command looks it up in
`METHODS`, reads its options, epochs default and data needs from it, and calls its `run`.
Most methods are per-batch losses (`RemediationMethod`) driven by the shared training loop
(remediate/train.py); FERD (remediate/ferd.py) is a trainer with its own loop, since it
synthesises its data. A per-batch method is a plain object:

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

What a method learns per class (ABSLD's temperatures, Fair-ARD's weights, CFA's margins)
it declares in `class_state()`: each `ClassState` names a per-class list of its epoch
record, and the loop and the report draw every declared one (metrics.csv columns, the
results' training.class_state trajectories, the report's charts) with no edit elsewhere.

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
authors' released code where the papers are silent. The methods live in one module per
family: remediate/distillation.py (RSLAD, Fair-RSLAD, ABSLD), remediate/
adversarial_training.py (SAT, TRADES, CFA), remediate/ard.py (ARD, Fair-ARD), remediate/frl.py
(FRL), remediate/ferd.py (data-free FERD).
"""

from __future__ import annotations

import abc
import copy
import inspect
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.rng import per_sample_normal, per_sample_uniform
from robaudit.errors import UserError
from robaudit.registry import Registry
from robaudit.remediate import common as shared_config   # below base: common never imports base
from robaudit.remediate.defaults import DEFAULT_METHOD  # noqa: F401 (re-exported)

METHODS = Registry("method")

# Epoch tallies are float64: exact counts at any dataset size and order-independent
# sums of the float32 per-sample values (see the module docstring).
TALLY_DTYPE = torch.float64

# Stream numbers for robaudit.audit.rng: stream = epoch * STREAMS_PER_EPOCH + purpose.
# The training loop keeps its own streams (augmentation, validation) far above these.
STREAMS_PER_EPOCH = 16
STREAM_RANDOM_START = 0

# The common constructor options the shared loop sets from its configuration (and where from).
LOOP_OPTIONS = {"eps": "--eps", "step_size": "the loop (2/255)", "steps": "--steps", "seed": "--seed",
                "norm": "--norm",
                "dataset": "--dataset", "student_arch": "--student"}

# Gaussian random-start scale of RSLAD/ABSLD/TRADES ("random start size 0.001").
GAUSSIAN_START_STD = 0.001



@dataclass(frozen=True)
class ClassState:
    """A per-class quantity a method learns and records once per epoch.

    key: the per-class list's key in the method's epoch record (metrics.csv columns
    "key:class"); label: the report's title for its trajectory; name: its name in
    results.json training.class_state (default: key).
    """

    key: str
    label: str
    name: Optional[str] = None

    @property
    def result_name(self) -> str:
        return self.name or self.key


class Trainer(abc.ABC):
    """What `robaudit remediate` needs from a registered method (see docs/architecture.md).

    name / needs_teacher / needs_training_data / default_epochs describe it to the CLI;
    option_names() lists the options it accepts (--method-opt KEY=VALUE); run() trains a
    student and returns the summary documented at remediate.train.run_remediate.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True        # the loop computes teacher logits only if True
    needs_training_data: ClassVar[bool] = True  # False: data-free (FERD), the test split is only audited
    default_epochs: ClassVar[int] = 300         # the paper's schedule length
    # The method's own paper's schedule (`--schedule paper`): epochs, lr, milestones (lr /10
    # after each), weight_decay, batch_size and the source it was read from. None: the shared one.
    paper_schedule: ClassVar[Optional[dict]] = None
    # False: the method trains only under its own schedule (fine-tuning, data-free): the shared
    # schedule's lr 0.1 would undo a robust model it starts from.
    shared_schedule: ClassVar[bool] = True
    fine_tunes: ClassVar[bool] = False          # True: starts from a trained model (--student-init)

    @classmethod
    @abc.abstractmethod
    def option_names(cls) -> List[str]:
        """The options it accepts (--method-opt KEY=VALUE)."""

    @classmethod
    def shortcut_options(cls) -> List[str]:
        """The options the command's shared flags (--beta, --alpha, --tau-min/--tau-max,
        --reference-compat, --reweight) may set, in those flags' meaning; the others go
        through --method-opt KEY=VALUE."""
        return cls.option_names()

    @classmethod
    @abc.abstractmethod
    def check_config(cls, cfg, world_size: int = 1) -> None:
        """Every check on a RemediateConfig that needs no model or data (run before loading them)."""

    @classmethod
    @abc.abstractmethod
    def run(cls, cfg, *, teacher, train_data=None, test_data=None, student_module: Optional[nn.Module] = None,
            dry_run: bool = False) -> Optional[dict]:
        """Train a student; the summary documented at remediate.train.run_remediate (None on a dry run)."""

    def class_state(self) -> Tuple[ClassState, ...]:
        """The per-class quantities this method's epoch records hold (drawn by metrics.csv and the report)."""
        return ()


def list_methods() -> List[str]:
    """Registered remediation method names (every trainer, data-free ones included)."""
    return METHODS.names()


def batch_method_names() -> List[str]:
    """The registered methods that are per-batch losses of the shared loop (RemediationMethod)."""
    return [name for name in METHODS.names() if issubclass(METHODS.get(name), RemediationMethod)]


def create_method(name: str, num_classes: int, **options) -> "RemediationMethod":
    """Instantiate a registered per-batch method; unknown names or options raise a one-line UserError."""
    cls = METHODS.get(name)
    if not issubclass(cls, RemediationMethod):
        raise UserError(f"method {cls.name!r} trains with its own loop ({cls.__module__}), "
                        f"not per batch in the shared one; run it with METHODS.get({cls.name!r}).run(...)")
    allowed = cls.constructor_options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"method {cls.name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}"
        )
    return cls(num_classes, **options)


def random_start_stream(epoch: int) -> int:
    """The rng stream of the inner attack's random start in `epoch` (1-based)."""
    return int(epoch) * STREAMS_PER_EPOCH + STREAM_RANDOM_START



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



def tensor_list(t: torch.Tensor) -> List[Optional[float]]:
    """JSON-able list of a per-class tensor; NaN (a class absent this epoch) -> None."""
    return [None if math.isnan(v) else float(v) for v in t.detach().cpu().tolist()]


class RemediationMethod(Trainer):
    """Base class of the per-batch methods: per-class epoch tallies, state handling and the common options.

    Subclasses implement `attack` (the inner maximisation) and `loss`; override
    `end_epoch` for their per-class updates. Common options: eps (radius in `norm`), step_size,
    steps (inner PGD iterations), seed (random starts), norm (the inner maximisation's threat
    model, "linf" | "l2" | "l1": ascent.ascent_step / project), and the training context
    `dataset` / `student_arch` (used for dataset-dependent defaults).
    """

    records_clean: ClassVar[bool] = True      # whether the loss has a train-mode clean forward
    needs_validation: ClassVar[bool] = False  # whether end_epoch needs val_robust

    # Names of attributes that make up the method's state (tensors or plain values).
    _state_attrs: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, num_classes: int, *, eps: float = 8 / 255, step_size: float = 2 / 255,
                 steps: int = 10, seed: int = 0, dataset: Optional[str] = None,
                 student_arch: Optional[str] = None, norm: str = "linf"):
        from robaudit.audit.attacks.ascent import NORMS

        if norm not in NORMS:
            raise UserError(f"unknown norm {norm!r}; choose from: {', '.join(NORMS)}")
        if int(num_classes) < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        if steps < 0 or eps < 0 or step_size < 0:
            raise UserError("eps, step size and inner steps must be non-negative")
        self.num_classes = int(num_classes)
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.seed = int(seed)
        self.norm = norm
        self.dataset = dataset
        self.student_arch = student_arch
        self.epochs: Optional[int] = None
        self.lr_milestones: Tuple[int, ...] = ()
        # Per-class tallies of the current epoch: count, CE on x', CE on x, correct on x', correct on x.
        self.tally = torch.zeros(self.num_classes, 5, dtype=TALLY_DTYPE)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def option_names(cls) -> List[str]:
        """The method's own options (--method-opt); the loop sets the common ones from its config."""
        return [name for name in cls.constructor_options() if name not in LOOP_OPTIONS]

    @classmethod
    def constructor_options(cls) -> List[str]:
        """Keyword options accepted by the constructor (own and inherited, common ones included)."""
        names: List[str] = []
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.kind is param.KEYWORD_ONLY and param.name not in names:
                    names.append(param.name)
        return sorted(names)

    @classmethod
    def check_config(cls, cfg, world_size: int = 1) -> None:
        shared_config.check_config(cfg, world_size)
        common = sorted(set(cfg.method_options) & set(LOOP_OPTIONS))
        if common:
            raise UserError(f"{common[0]} is set for every method by {LOOP_OPTIONS[common[0]]}, "
                            f"not by --method-opt")
        unknown = sorted(set(cfg.method_options) - set(cls.option_names()))
        if unknown:
            raise UserError(f"method {cls.name!r} has no option {unknown[0]!r}; its options are: "
                            f"{', '.join(cls.option_names())}")
        from robaudit.remediate.option_checks import checked_method_options

        cfg.method_options = checked_method_options(cls, cfg)   # typed, and built once (wrong values end here)

    @classmethod
    def run(cls, cfg, *, teacher, train_data=None, test_data=None, student_module=None, dry_run=False):
        """The shared training loop (remediate/train.py) with this method's loss."""
        from robaudit.remediate.train import run_remediate

        return run_remediate(cfg, teacher=teacher, train_data=train_data, test_data=test_data,
                             student_module=student_module, dry_run=dry_run)

    def configure(self, *, epochs: int, lr_milestones: Sequence[int]) -> None:
        """Tell the method the training schedule (some updates follow the lr milestones)."""
        self.epochs = int(epochs)
        self.lr_milestones = tuple(int(m) for m in lr_milestones)

    def options(self) -> dict:
        """JSON-able resolved options, for results.json "training.options"."""
        return {"eps": self.eps, "step_size": self.step_size, "steps": self.steps, "seed": self.seed}

    # ------------------------------------------------------------------ per-batch API
    @abc.abstractmethod
    def attack(self, student: nn.Module, teacher_logits: Optional[torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """The inner maximisation's x' (detached); the student is left in train mode."""

    @abc.abstractmethod
    def loss(self, student: nn.Module, teacher_logits: Optional[torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, index: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(scalar training loss, detached per-batch stats); adds the batch to the epoch tallies."""

    def reduce_tallies(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every epoch tally t by reduce(t) before `end_epoch`.

        Under torchrun the loop passes a sum over ranks (robaudit.audit.distributed.
        sum_over_ranks), so each rank's `end_epoch` sees the whole epoch's per-class
        statistics and every rank computes the same temperatures / weights / margins.
        """
        self.tally = reduce(self.tally)

    def end_epoch(self, epoch: int, *, student: Optional[nn.Module] = None,
                  val_robust: Optional[Callable[[nn.Module, int], torch.Tensor]] = None,
                  val_accuracy: Optional[Callable[[nn.Module, int], Tuple[torch.Tensor, torch.Tensor]]] = None
                  ) -> dict:
        """Per-class updates after `epoch`; returns this epoch's record (and resets the tallies).

        `val_robust(model, steps)` returns per-class PGD robust accuracy on the validation
        split (CFA's weight averaging uses it); `val_accuracy(model, steps)` returns
        (per-class clean accuracy, per-class PGD robust accuracy) there (FRL uses it). The
        loop passes both; an override takes the ones it uses by name and passes the rest on
        with `**validation` (see tests/toy_method.py).
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
        """x + 0.001 N(0, 1); the inner ascent projects it into the ball of its norm."""
        noise = per_sample_normal(self.seed, index, x.shape[1:], stream=random_start_stream(epoch),
                                  device=x.device, dtype=x.dtype)
        return x + GAUSSIAN_START_STD * noise

    def _unit_noise(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Per-sample u in [0, 1) for a uniform start in the eps-ball (ascent.cross_entropy_pgd)."""
        return per_sample_uniform(self.seed, index, x.shape[1:], stream=random_start_stream(epoch),
                                  device=x.device, dtype=x.dtype)

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
        record = {"train_risk_adv": tensor_list(self._class_means(1)),
                  "train_acc_adv": tensor_list(self._class_means(3))}
        if self.records_clean:
            record["train_risk_nat"] = tensor_list(self._class_means(2))
            record["train_acc_nat"] = tensor_list(self._class_means(4))
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


def class_mean_reduce(per_sample: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over the classes present in the batch of each class's mean (differentiable)."""
    per_class = class_sums(y, per_sample, num_classes)          # [C], keeps the autograd graph
    counts = class_sums(y, torch.ones_like(per_sample), num_classes).detach()
    present = (counts > 0).to(per_class.dtype)
    return (per_class / counts.clamp_min(1.0)).sum() / present.sum()
