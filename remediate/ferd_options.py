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
from robaudit.remediate.base import DEFAULT_METHOD
from robaudit.remediate.common import check_config
from robaudit.options import coerce_option

METHOD_NAME = "ferd"
PAPER_EPOCHS = 220
PAPER_WARMUP = 20
# Examples of the types of the options whose default is None (for coerce_option).
OPTIONAL_TYPE_EXAMPLES = {"warmup": 0, "image_shape": (3, 32, 32)}


@dataclass
class FerdOptions:
    """FERD's options (RemediateConfig.method_options); defaults from the spec, (ours) where silent."""

    fae: bool = True                      # Fairness-Aware Examples: L_uni in the generator loss
    reweight: bool = True                 # robustness-guided class reweighting of the labels
    uta: bool = True                      # Uniform-Target Adversarial Examples for the student
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
    nonrobust_fraction: float = 0.5       # share of the penultimate channels called non-robust (ours)
    teacher_steps: int = 20               # PGD steps of the teacher attack on each best batch
    prob_bounds: Tuple[float, float] = (0.05, 0.2)
    uta_weight: float = 10.0
    alpha: float = 1 / 6                  # weight of the adversarial KL term (spec: 1/6 on x')
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
        need(min(self.bn_weight, self.oh_weight, self.adv_weight, self.uni_weight, self.uta_weight) >= 0,
             "loss weights must be >= 0")
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
