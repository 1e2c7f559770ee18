"""FERD's options (RemediateConfig.method_options for `--method ferd`): defaults from the spec
(../shared/specs/methods.md, FERD), marked (ours) where it is silent; validated with one line,
with the checks of a data-free request (schedule, teacher, image shape, class names) that
run before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

from robaudit.audit import distributed
from robaudit.errors import UserError
from robaudit.remediate.defaults import DEFAULT_METHOD
from robaudit.remediate.common import check_config
from robaudit.options import coerce_option

METHOD_NAME = "ferd"
PAPER_EPOCHS = 220
PAPER_WARMUP = 20
# Examples of the types of the options whose default is None (for coerce_option).
OPTIONAL_TYPE_EXAMPLES = {"warmup": 0, "image_shape": (3, 32, 32), "ib_layer": "layer"}
# Options that were renamed: the one-line error says what to pass instead.
RENAMED_OPTIONS = {"uta_weight": "uta_gamma (the UTAE weight gamma, default 0.3; the spec's earlier 10 was wrong)"}
CHOICES = {"student_loss": ("ikl", "kl"), "generator_adv_loss": ("ikl", "kl"), "nonrobust": ("ib", "fragility")}
# RemediateConfig fields whose FERD value differs from the shared default (the code's test.sh / test.py).
CONFIG_DEFAULTS = {"weight_decay": 5e-4, "batch_size": 256}


@dataclass
class FerdOptions:
    """FERD's options (RemediateConfig.method_options); defaults from the spec, (ours) where silent."""

    fae: bool = True                      # Fairness-Aware Examples: L_uni in the generator loss
    reweight: bool = True                 # robustness-guided class reweighting of the labels
    uta: bool = True                      # Uniform-Target Adversarial Examples (off = uta_gamma 0)
    warmup: Optional[int] = None          # generator-only epochs; None: round(20 * epochs / 220)
    g_steps: int = 200                    # generator Adam steps per epoch
    g_lr: float = 2e-3
    z_lr: float = 0.015
    g_betas: Tuple[float, float] = (0.5, 0.999)
    nz: int = 100
    ngf: int = 64
    reset_generator: bool = True          # a fresh generator every epoch (the spec)
    synthesis_batch_size: int = 256       # images per generator phase (ours, the CMI/Fast-DFKD value)
    bn_weight: float = 5.0
    oh_weight: float = 1.0
    adv_weight: float = 1.0
    uni_weight: float = 5.0
    nonrobust: str = "ib"                 # "ib" (paper/code: information bottleneck) | "fragility" (ours)
    ib_layer: Optional[str] = None        # the teacher module whose output is layer l; None: automatic
    ib_steps: int = 50                    # Adam steps fitting the noise scales (code: IFD_iter 50)
    ib_lr: float = 0.1                    # (code: IFD_lr 0.1)
    ib_beta: float = 0.3                  # weight of the KL term (code: beta 0.3)
    nonrobust_fraction: float = 0.5       # fragility only: share of penultimate channels called non-robust
    teacher_steps: int = 20               # PGD steps of the teacher attack on each best batch
    prob_bounds: Tuple[float, float] = (0.05, 0.2)
    uta_gamma: float = 0.3                # UTAE: ascend KL(t||s) - gamma KL(u||s) (ours in the paper's 0.1-0.5)
    student_loss: str = "ikl"             # "ikl" (paper: decoupled loss, losses.py dkl_loss) | "kl"
    generator_adv_loss: str = "ikl"       # L_adv = -IKL (code: IBD_module_cmi.py) | "kl": -KL
    alpha: float = 1 / 6                  # weight of the adversarial term (spec: 1/6 on x')
    loss_scale: float = 1.0
    kd_steps: int = 400                   # student SGD steps per training epoch (ours)
    bank_size: int = 50_000               # images kept in the bank (ours)
    bank_eviction: str = "oldest"         # "oldest" | "random"
    image_shape: Optional[Tuple[int, int, int]] = None   # None: the test set's, else (3, 32, 32)
    examples_per_class: int = 8           # synthetic images per class in the report grid

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, object]]) -> "FerdOptions":
        """Validated options; unknown names or bad values raise a one-line UserError."""
        options = dict(options or {})
        for old, new in RENAMED_OPTIONS.items():
            if old in options:
                raise UserError(f"ferd option {old!r} was replaced by {new}")
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise UserError(f"data-free remediation (ferd) has no option {unknown[0]!r}; its options are: "
                            f"{', '.join(sorted(cls.names()))}")
        out = cls()
        for f in dataclasses.fields(cls):
            if f.name not in options:
                continue
            optional = f.name in OPTIONAL_TYPE_EXAMPLES
            default = OPTIONAL_TYPE_EXAMPLES[f.name] if optional else getattr(out, f.name)
            setattr(out, f.name, coerce_option("method 'ferd'", f.name, options[f.name], default,
                                               optional=optional))
        out._check()
        return out

    def _check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(f"ferd option {message}")

        need(self.g_steps >= 1, f"g_steps must be >= 1, got {self.g_steps}")
        need(self.kd_steps >= 1, f"kd_steps must be >= 1, got {self.kd_steps}")
        need(self.synthesis_batch_size >= 2, f"synthesis_batch_size must be >= 2 (the generator has "
                                             f"BatchNorm), got {self.synthesis_batch_size}")
        need(self.nz >= 1 and self.ngf >= 1, "nz and ngf must be >= 1")
        need(self.g_lr > 0 and self.z_lr >= 0, "g_lr must be > 0 and z_lr >= 0")
        need(len(self.g_betas) == 2 and all(0 <= b < 1 for b in self.g_betas), "g_betas must be two numbers in [0, 1)")
        need(min(self.bn_weight, self.oh_weight, self.adv_weight, self.uni_weight, self.uta_gamma) >= 0,
             "loss weights (and uta_gamma) must be >= 0")
        for name, allowed in CHOICES.items():
            need(getattr(self, name) in allowed, f"{name} must be one of {', '.join(allowed)}, "
                                                 f"got {getattr(self, name)!r}")
        need(self.ib_steps >= 1 and self.ib_lr > 0 and self.ib_beta >= 0,
             "ib_steps must be >= 1, ib_lr > 0 and ib_beta >= 0")
        need(0 < self.nonrobust_fraction <= 1, f"nonrobust_fraction must be in (0, 1], got {self.nonrobust_fraction}")
        need(self.teacher_steps >= 0, "teacher_steps must be >= 0")
        need(len(self.prob_bounds) == 2 and 0 < self.prob_bounds[0] <= self.prob_bounds[1],
             "prob_bounds must be (low, high) with 0 < low <= high")
        need(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        need(self.loss_scale > 0, "loss_scale must be > 0")
        need(self.bank_size >= 1, f"bank_size must be >= 1, got {self.bank_size}")
        need(self.bank_eviction in ("oldest", "random"), f"bank_eviction must be 'oldest' or 'random', "
                                                         f"got {self.bank_eviction!r}")
        need(self.warmup is None or self.warmup >= 0, "warmup must be >= 0")
        need(self.examples_per_class >= 0, "examples_per_class must be >= 0")
        if self.image_shape is not None:
            need(len(self.image_shape) == 3 and all(int(s) >= 1 for s in self.image_shape),
                 f"image_shape must be (channels, height, width), got {self.image_shape}")
            need(self.image_shape[1] % 4 == 0 and self.image_shape[2] % 4 == 0,
                 f"image_shape height and width must be multiples of 4 (the generator upsamples x4), "
                 f"got {tuple(self.image_shape)}")

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("g_betas", "prob_bounds", "image_shape"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    def attack_gamma(self) -> float:
        """The UTAE weight the student attack uses: uta_gamma, or 0 (plain KL attack) with uta off."""
        return float(self.uta_gamma) if self.uta else 0.0


def config_default_notes(cfg) -> List[str]:
    """A note for each RemediateConfig field that differs from FERD's own default (CONFIG_DEFAULTS):
    the CLI applies those when the user sets nothing, a programmatic RemediateConfig keeps the shared ones."""
    return [f"{key} {getattr(cfg, key)} differs from FERD's {value} (the authors' code)"
            for key, value in CONFIG_DEFAULTS.items() if getattr(cfg, key) != value]


def default_warmup(epochs: int) -> int:
    """The spec's 20 warm-up epochs of 220, at the same fraction of an `epochs`-long run (< epochs)."""
    if epochs == PAPER_EPOCHS:
        return PAPER_WARMUP
    return max(0, min(round(PAPER_WARMUP * epochs / PAPER_EPOCHS), epochs - 1))


def checked_options(cfg, teacher) -> Tuple[FerdOptions, int]:
    """(options, warm-up epochs), or one line saying what cannot run data-free."""
    opts = FerdOptions.from_mapping(cfg.method_options)
    warmup = checked_schedule(cfg, opts)
    if teacher is None:
        raise UserError("data-free remediation distils a teacher: pass --teacher MODEL")
    if not getattr(teacher, "white_box", True):
        reason = getattr(teacher, "refusal", None) or "it has no usable gradients"
        raise UserError(f"data-free remediation trains its generator by back-propagating through the teacher, "
                        f"but {getattr(teacher, 'path', 'the teacher')} cannot be differentiated ({reason}); "
                        f"pass the teacher as PyTorch weights (state_dict / checkpoint / safetensors with "
                        f"--arch), a torch.export .pt2 or a TorchScript file")
    return opts, warmup


def checked_schedule(cfg, opts: FerdOptions) -> int:
    """The warm-up epochs, after the checks that need neither a model nor data."""
    if distributed.current().enabled:
        raise UserError("data-free remediation (FERD) runs in one process: its generator phase is not "
                        "distributed; run it without torchrun, on one GPU")
    if cfg.method not in (METHOD_NAME, DEFAULT_METHOD):
        raise UserError(f"--method {cfg.method} needs training images; data-free remediation trains with ferd")
    if cfg.milestones is not None:
        raise UserError("--milestones does not apply to data-free remediation: its schedule is cosine annealing")
    check_config(cfg, 1)
    warmup = opts.warmup if opts.warmup is not None else default_warmup(cfg.epochs)
    if warmup >= cfg.epochs:
        raise UserError(f"data-free remediation needs more epochs ({cfg.epochs}) than warm-up epochs ({warmup}): "
                        f"the student trains only after the warm-up")
    return warmup


def checked_image_shape(opts: FerdOptions, test_data) -> Tuple[int, int, int]:
    if opts.image_shape is not None:
        image_shape = tuple(int(s) for s in opts.image_shape)
    elif test_data is not None:
        image_shape = tuple(int(s) for s in test_data.x.shape[1:])
    else:
        image_shape = (3, 32, 32)
    if len(image_shape) != 3 or image_shape[1] % 4 or image_shape[2] % 4:
        raise UserError(f"data-free remediation needs images whose height and width are multiples of 4 "
                        f"(the generator upsamples x4), got {image_shape}; pass image_shape")
    if test_data is not None and tuple(test_data.x.shape[1:]) != image_shape:
        raise UserError(f"ferd option image_shape {list(image_shape)} differs from the test images' "
                        f"{list(test_data.x.shape[1:])}: the student is audited on the test images")
    return image_shape


def checked_class_names(classes, test_data, teacher, num_classes: int) -> List[str]:
    if classes is None:
        classes = (test_data.classes if test_data is not None else getattr(teacher, "class_names", None))
    classes = list(classes) if classes is not None else [str(k) for k in range(num_classes)]
    if len(classes) != num_classes:
        raise UserError(f"the teacher predicts {num_classes} classes but {len(classes)} class names were given "
                        f"(the test set's); pass the teacher trained on this dataset")
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    return classes
