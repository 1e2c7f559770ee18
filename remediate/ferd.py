"""Data-free remediation: FERD (Li et al. 2025), robust distillation from the teacher alone.

For users who have the model (often as ONNX) and at most a test set, not the training
data. `run_ferd` synthesises the training images itself and distils a robust, fairer
student from them; the test set is only audited at the end (engine.run_scan), never
trained or selected on. Formulas follow the FERD section of ../shared/specs/methods.md;
where it is silent the choice is ours and marked (ours) below and in the report.

One epoch (epochs are numbered from 1; the first `warmup` epochs run steps 1-3 only):

1. Generator phase. A generator (z in R^nz -> Linear -> BN -> up x2 -> conv 2*ngf -> BN
   -> LeakyReLU(0.2) -> up x2 -> conv ngf -> BN -> LeakyReLU(0.2) -> conv 3 -> sigmoid;
   ngf 64, nz 100), re-initialised every epoch, is trained `g_steps` (200) Adam steps
   (lr 2e-3, betas (0.5, 0.999); the batch's codes z are trained too, lr 0.015) on
       L_G = 5 L_bn + L_oh - KL(t || s) + 5 L_uni
   for a batch of `synthesis_batch_size` (256, ours) labels drawn from the class
   probabilities p. The batch with the lowest L_G over the steps ("best batch") is
   appended to the bank. Generator outputs are augmented (crop pad 4 + flip, as in
   training) before the teacher and student see them when cfg.augment.
   - L_bn (DeepInversion): sum over the teacher's BatchNorm layers of
     ||mu(h) - running_mean||_2 + ||var(h) - running_var||_2, h the layer's input
     (biased variance over batch and space). It needs a PyTorch teacher whose BatchNorm
     layers are nn.BatchNorm modules robaudit can hook: weights files (state_dict /
     checkpoint / safetensors / trusted pickle) and ONNX graphs converted by onnx2torch
     that kept their BatchNormalization nodes. torch.export (.pt2) and TorchScript
     files hide their layers, and ONNX exports usually fold BatchNorm into the
     convolutions: then L_bn is off, the generator trains on the other terms, and the
     run says so (log warning + training.options.notes).
   - L_oh: cross-entropy of the teacher's logits on the sampled labels.
   - KL(t || s): batch-mean KL(softmax(t(x)) || softmax(s(x))), student in eval mode;
     subtracted, so the generator seeks images the student has not learnt yet.
   - L_uni (Fairness-Aware Examples, option `fae`): batch-mean KL(uniform ||
     softmax(W (f * m) + b)), f the teacher's penultimate features (the input of its
     last nn.Linear with C outputs, the classifier head W, b) and m the 0/1 mask of its
     non-robust feature channels. Non-robust channels (our concrete reading of the
     paper's "non-robust features"): after each generator phase the teacher is
     attacked on the best batch (PGD-20, step 3 below); a channel's fragility is the
     batch-mean |f_c(x') - f_c(x)| / (batch-mean |f_c(x)| + 1e-12), and the
     ceil(nonrobust_fraction * D) most fragile channels (0.5 of them, ties to the lower
     channel) form m for the next epoch. Epoch 1 has no measurement yet, so L_uni
     starts in epoch 2 (inside the warm-up by default). A teacher without such a head
     (no hookable nn.Linear with C outputs taking [B, D] features) runs without L_uni,
     with a note.
   The best batch is the step with the lowest L_G. metrics.csv records its terms
   (gen_loss, gen_bn, gen_oh, gen_adv, gen_uni) and gen_teacher_agree, the share of its
   images the teacher labels as their sampled class; when that share averages below
   0.5 over the run, the results carry a note saying the synthetic data is weakly
   class-specific and what to change (ours: with a small adversarially trained teacher
   the 5 L_bn term kept it near 20 % in docs/reproduction.md).
2. Bank. Best batches are stored as uint8 images (the reference implementations keep
   their pool as PNG files, i.e. 8-bit too) with their sampled labels and a unique id
   each (the key of their per-sample randomness). The bank holds at most `bank_size`
   images (50,000, ours): once full, every new batch replaces the oldest images
   (`bank_eviction="oldest"`, a ring buffer) or images drawn at random, seeded by
   (seed, epoch) (`"random"`). Memory stays flat at bank_size * C * H * W bytes.
3. Robustness-guided class reweighting (option `reweight`): the teacher is attacked on
   the best batch (PGD-`teacher_steps`=20 on cross-entropy w.r.t. the sampled labels,
   step cfg.step_size, uniform start, final iterate); r_c = mean over the batch's
   class-c samples of the negative margin max_{j != c} z_j(x') - z_c(x'); r is
   min-max normalised to [0.05, 0.2] and renormalised to sum 1: p for the next epoch's
   labels (more samples for less robust classes). A class absent from the batch takes
   the mean r of the present ones (ours); equal r gives uniform p. The per-class sums
   are float64 `class_sums` tallies, like the methods' epoch statistics.
4. Student (from epoch warmup + 1): `kd_steps` (400, ours) SGD steps per epoch on
   batches of cfg.batch_size bank images (a seeded permutation of the bank per pass;
   crop + flip when cfg.augment). Teacher soft labels p_t = softmax(t(x)) on the clean
   image; x' = PGD-cfg.steps from x + 0.001 N(0,1), student in eval, maximising
   KL(p_t || s(x')) - 10 KL(uniform || s(x')) (Uniform-Target Adversarial Examples,
   option `uta`; off: KL(p_t || s(x')) alone, RSLAD's attack). Then, student in train
   mode, L = loss_scale * ((1 - alpha) KL(p_t || s(x)) + alpha KL(p_t || s(x'))) with
   alpha = 1/6: the spec's "5/6 * KL on clean + 1/6 * KL on x'" (the reverse of
   RSLAD's 5/6 on x'); loss_scale 1 (plain batch means; the spec is silent).
   SGD lr cfg.lr (0.1), momentum, weight decay; cosine annealing over the
   epochs - warmup training epochs, stepped once per training epoch.

Defaults: 220 epochs of which 20 warm-up (the spec); a run with E != 220 epochs and no
explicit `warmup` keeps the fraction, round(20 E / 220), at most E - 1. With fae,
reweight and uta all off the run is the plain data-free robust distillation baseline.

Selection: there are no real images to hold out, so the last epoch's student is
exported and audited (the test set is only audited, never selected on).

Determinism: every random draw is a function of (seed, epoch[, step]): the generator's
initial weights (drawn under a forked RNG), z and the labels, bank eviction and
sampling (torch.Generator per epoch), augmentation and attack starts (robaudit.audit.rng
keyed by the bank id). The checkpoint (written atomically every epoch) holds the
student, optimizer, scheduler, bank, class probabilities, non-robust mask, the
generator, the history and the torch RNG state: N epochs straight equal K epochs +
--resume + N - K epochs bitwise on CPU.

Scaling out: FERD runs in one process (one GPU). Its generator phase is not
distributed, so under torchrun `run_ferd` refuses with one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from robaudit.audit import distributed
from robaudit.audit.attacks.ascent import projected_ascent
from robaudit.audit.rng import per_sample_normal, per_sample_uniform
from robaudit.errors import UserError
from robaudit.remediate.methods import DEFAULT_METHOD, TALLY_DTYPE, class_sums, eval_mode, kl_per_sample
from robaudit.remediate import train as loop

log = logging.getLogger(__name__)

METHOD_NAME = "ferd"
PAPER_EPOCHS = 220
PAPER_WARMUP = 20
GAUSSIAN_START_STD = 0.001          # the student's attack starts at x + 0.001 N(0,1) (RSLAD)
FRAGILITY_EPS = 1e-12

# robaudit.audit.rng streams. augment_batch uses stream STREAM_AUGMENT + its `epoch`
# argument: the student's batches pass round = (epoch - 1) * kd_steps + step + 1 (< 2^24),
# the generator phase GENERATOR_AUGMENT_BASE + (epoch - 1) * g_steps + step.
GENERATOR_AUGMENT_BASE = 1 << 24
STREAM_TEACHER_START = 1 << 28                      # + epoch
STREAM_STUDENT_START = (1 << 28) + (1 << 24)        # + round

# torch.Generator purposes (see _derived_seed).
PURPOSE_GENERATOR_INIT, PURPOSE_CODES, PURPOSE_EVICT, PURPOSE_BANK_ORDER = 1, 2, 3, 4


# ============================================================================ options
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
            value, default = options[f.name], getattr(out, f.name)
            setattr(out, f.name, _coerce(f.name, value, default, f.name in ("warmup", "image_shape")))
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


def _coerce(name: str, value, default, optional: bool):
    if value is None and optional:
        return None
    if isinstance(default, bool):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no"):
            return value.lower() in ("true", "on", "yes")
        raise UserError(f"ferd option {name} must be true or false, got {value!r}")
    try:
        if isinstance(default, tuple) or name == "image_shape":
            kind = int if name == "image_shape" else float
            return tuple(kind(v) for v in value)
        if isinstance(default, str):
            return str(value)
        if isinstance(default, int) or name == "warmup":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"ferd option {name}: cannot use {value!r} (default {default!r})") from None


def default_warmup(epochs: int) -> int:
    """The spec's 20 warm-up epochs of 220, at the same fraction of an `epochs`-long run (< epochs)."""
    if epochs == PAPER_EPOCHS:
        return PAPER_WARMUP
    return max(0, min(round(PAPER_WARMUP * epochs / PAPER_EPOCHS), epochs - 1))


# ============================================================================ generator
class FerdGenerator(nn.Module):
    """z [B, nz] -> images [B, C, H, W] in (0, 1) (H, W multiples of 4): the spec's generator."""

    def __init__(self, nz: int = 100, ngf: int = 64, image_shape: Sequence[int] = (3, 32, 32)):
        super().__init__()
        channels, height, width = (int(s) for s in image_shape)
        if height % 4 or width % 4:
            raise UserError(f"the generator upsamples x4: image height and width must be multiples of 4, "
                            f"got {height}x{width}")
        self.init_hw = (height // 4, width // 4)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_hw[0] * self.init_hw[1])
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], -1, *self.init_hw)
        return self.conv_blocks(out)


# ============================================================================ loss terms
def bn_stat_term(h: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's term for one BatchNorm input h [B, C, ...]:
    ||mean(h) - running_mean||_2 + ||var(h) - running_var||_2 (biased variance over batch and space)."""
    h = h.float()
    channels = h.shape[1]
    flat = h.transpose(0, 1).reshape(channels, -1)
    mean = flat.mean(dim=1)
    var = flat.var(dim=1, unbiased=False)
    return torch.norm(running_var.float() - var, 2) + torch.norm(running_mean.float() - mean, 2)


def one_hot_loss(teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_oh: batch-mean cross-entropy of the teacher on the sampled labels."""
    return F.cross_entropy(teacher_logits.float(), y)


def teacher_student_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(softmax(t) || softmax(s)) (enters L_G with a minus sign)."""
    return kl_per_sample(student_logits, F.softmax(teacher_logits.float(), dim=1)).mean()


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(uniform || softmax(logits)) = -log C - mean_c log softmax_c."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return -math.log(logits.shape[1]) - log_q.mean(dim=1)


def uniformity_loss(nonrobust_logits: torch.Tensor) -> torch.Tensor:
    """L_uni: batch-mean KL(uniform || softmax(teacher head on the non-robust channels))."""
    return kl_uniform(nonrobust_logits).mean()


def nonrobust_logits(features: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The teacher's head applied to its non-robust channels only: W (f * m) + b."""
    return F.linear(features.float() * mask.to(features.device, torch.float32), weight.float(),
                    None if bias is None else bias.float())


def generator_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor, *,
                   bn_terms: Sequence[torch.Tensor] = (), nonrobust: Optional[torch.Tensor] = None,
                   bn_weight: float = 5.0, oh_weight: float = 1.0, adv_weight: float = 1.0,
                   uni_weight: float = 5.0) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """L_G = bn_weight * L_bn + oh_weight * L_oh - adv_weight * KL(t || s) + uni_weight * L_uni.

    L_bn is the sum of `bn_terms` (none: the term is off); L_uni needs the head's logits on
    the non-robust channels (None: off). Returns (L_G, {"bn", "oh", "adv", "uni"}: the
    detached unweighted terms, None for a term that is off).
    """
    oh = one_hot_loss(teacher_logits, y)
    adv = teacher_student_kl(teacher_logits, student_logits)
    total = oh_weight * oh - adv_weight * adv
    parts: Dict[str, Optional[torch.Tensor]] = {"bn": None, "oh": oh.detach(), "adv": adv.detach(), "uni": None}
    if len(bn_terms):
        bn = torch.stack([t.float() for t in bn_terms]).sum()
        total = total + bn_weight * bn
        parts["bn"] = bn.detach()
    if nonrobust is not None:
        uni = uniformity_loss(nonrobust)
        total = total + uni_weight * uni
        parts["uni"] = uni.detach()
    return total, parts


def uta_attack_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                    uta_weight: float = 10.0) -> torch.Tensor:
    """Per-sample objective of the Uniform-Target attack: KL(p_t || s(x')) - w * KL(uniform || s(x'))."""
    return kl_per_sample(student_logits, teacher_probs) - uta_weight * kl_uniform(student_logits)


def negative_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per sample (> 0: misclassified)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(dim=1).values
    return other - true


def class_probabilities(neg_margin_sum: torch.Tensor, counts: torch.Tensor,
                        bounds: Tuple[float, float] = (0.05, 0.2)) -> torch.Tensor:
    """FERD's label distribution from per-class sums of negative margins and sample counts.

    r_c = mean negative margin of class c (a class without samples takes the mean of the
    present ones); min-max normalised to [low, high], renormalised to sum 1 (float32).
    Equal r (or no sample at all) gives the uniform distribution.
    """
    num_classes = counts.numel()
    counts = counts.double()
    present = counts > 0
    uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32, device=counts.device)
    if not bool(present.any()):
        return uniform
    r = neg_margin_sum.double() / counts.clamp_min(1.0)
    r = torch.where(present, r, r[present].mean())
    low, high = float(bounds[0]), float(bounds[1])
    spread = r.max() - r.min()
    if not bool(spread > 0):
        return uniform
    scaled = low + (r - r.min()) / spread * (high - low)
    return (scaled / scaled.sum()).float()


def nonrobust_channel_mask(features_clean: torch.Tensor, features_adv: torch.Tensor,
                           fraction: float) -> torch.Tensor:
    """0/1 float mask [D] of the ceil(fraction * D) channels whose features move most under attack.

    Fragility_c = mean_i |f_ic(x') - f_ic(x)| / (mean_i |f_ic(x)| + 1e-12); ties go to the
    lower channel index.
    """
    clean, adv = features_clean.detach().double(), features_adv.detach().double()
    fragility = (adv - clean).abs().mean(dim=0) / (clean.abs().mean(dim=0) + FRAGILITY_EPS)
    k = max(1, math.ceil(fraction * fragility.numel() - 1e-9))
    order = torch.sort(-fragility, stable=True).indices[:k]
    mask = torch.zeros(fragility.numel(), dtype=torch.float32, device=fragility.device)
    mask[order] = 1.0
    return mask


# ============================================================================ teacher taps
class TeacherTaps:
    """Forward hooks on the teacher: the inputs of its BatchNorm layers (for L_bn) and the
    input of its classifier head (the last nn.Linear with `num_classes` outputs, for L_uni).

    Hooks record only while switched on (`record(bn=..., head=...)`), so the teacher's
    other forwards cost nothing extra. `close()` removes them.
    """

    def __init__(self, module: nn.Module, num_classes: int):
        self.bn_layers = [m for m in module.modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm)
                          and m.running_mean is not None and m.running_var is not None]
        heads = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        self.head: Optional[nn.Linear] = heads[-1] if heads else None
        self._bn_on = False
        self._head_on = False
        self.bn_terms: List[torch.Tensor] = []
        self.features: Optional[torch.Tensor] = None
        self._handles = [m.register_forward_hook(self._bn_hook) for m in self.bn_layers]
        if self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._head_hook))

    def _bn_hook(self, module, inputs, output) -> None:
        if self._bn_on:
            self.bn_terms.append(bn_stat_term(inputs[0], module.running_mean, module.running_var))

    def _head_hook(self, module, inputs, output) -> None:
        if self._head_on:
            self.features = inputs[0]

    def record(self, *, bn: bool = False, head: bool = False) -> "TeacherTaps":
        self._bn_on, self._head_on = bn, head
        self.bn_terms, self.features = [], None
        return self

    def __enter__(self) -> "TeacherTaps":
        return self

    def __exit__(self, *exc) -> None:
        self._bn_on = self._head_on = False

    def probe(self, teacher: nn.Module, example: torch.Tensor) -> Tuple[bool, bool]:
        """(BN loss available, head features available) on a real forward of `example`."""
        with torch.no_grad(), self.record(bn=True, head=True):
            teacher(example)
            bn_ok = len(self.bn_terms) > 0
            feats = self.features
        head_ok = (self.head is not None and feats is not None and feats.dim() == 2
                   and feats.shape[1] == self.head.in_features)
        self.bn_terms, self.features = [], None
        return bn_ok, head_ok

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ============================================================================ bank
class SyntheticBank:
    """A bounded store of synthetic images (uint8), their sampled labels, ids and epochs.

    Grows by whole batches until `capacity`; then each new image replaces the oldest one
    (eviction "oldest": a ring buffer) or a slot drawn at random (eviction "random",
    seeded by the torch.Generator the caller passes). Never holds more than `capacity`.
    """

    def __init__(self, capacity: int, eviction: str = "oldest"):
        if capacity < 1:
            raise UserError(f"the synthetic bank needs a capacity >= 1, got {capacity}")
        if eviction not in ("oldest", "random"):
            raise UserError(f"bank eviction must be 'oldest' or 'random', got {eviction!r}")
        self.capacity = int(capacity)
        self.eviction = eviction
        self.images: Optional[torch.Tensor] = None     # uint8 [N, C, H, W]
        self.labels = torch.zeros(0, dtype=torch.int64)
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.epochs = torch.zeros(0, dtype=torch.int64)
        self.next_slot = 0                             # the oldest slot once full (ring order)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @staticmethod
    def quantise(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)

    def add(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int,
            generator: Optional[torch.Generator] = None) -> None:
        """Store a batch (x in [0, 1] or uint8); evicts as described when over capacity."""
        images = x if x.dtype == torch.uint8 else self.quantise(x)
        images, y, ids = images.cpu(), y.cpu().long(), ids.cpu().long()
        if len(y) > self.capacity:                     # only the newest `capacity` can stay
            images, y, ids = images[-self.capacity:], y[-self.capacity:], ids[-self.capacity:]
        epochs = torch.full_like(y, int(epoch))
        if self.images is None:
            self.images = images[:0].clone()
        free = self.capacity - len(self)
        take = min(free, len(y))
        if take:
            self.images = torch.cat([self.images, images[:take]])
            self.labels = torch.cat([self.labels, y[:take]])
            self.ids = torch.cat([self.ids, ids[:take]])
            self.epochs = torch.cat([self.epochs, epochs[:take]])
        rest = len(y) - take
        if rest:
            if self.eviction == "oldest":
                slots = (self.next_slot + torch.arange(rest)) % self.capacity
                self.next_slot = int((self.next_slot + rest) % self.capacity)
            else:
                slots = torch.randperm(self.capacity, generator=generator)[:rest]
            self.images[slots] = images[take:]
            self.labels[slots] = y[take:]
            self.ids[slots] = ids[take:]
            self.epochs[slots] = epochs[take:]

    def get(self, positions: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float images in [0, 1], labels, ids) at `positions`, on `device`."""
        positions = positions.cpu()
        x = self.images[positions].to(device).float().div_(255.0)
        return x, self.labels[positions].to(device), self.ids[positions].to(device)

    def nbytes(self) -> int:
        return 0 if self.images is None else self.images.numel()

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "eviction": self.eviction, "next_slot": self.next_slot,
                "images": self.images.clone() if self.images is not None else None,
                "labels": self.labels.clone(), "ids": self.ids.clone(), "epochs": self.epochs.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.eviction = int(state["capacity"]), str(state["eviction"])
        self.next_slot = int(state["next_slot"])
        self.images = state["images"].clone() if state["images"] is not None else None
        self.labels, self.ids, self.epochs = (state[k].clone() for k in ("labels", "ids", "epochs"))


# ============================================================================ helpers
def _derived_seed(seed: int, epoch: int, purpose: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(purpose) * 104_729 + 17) % (2 ** 63)


def _torch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_derived_seed(seed, epoch, purpose))
    return generator


def _new_generator(opts: FerdOptions, image_shape, seed: int, epoch: int, device) -> FerdGenerator:
    """A generator initialised from (seed, epoch) without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derived_seed(seed, epoch, PURPOSE_GENERATOR_INIT))
        generator = FerdGenerator(opts.nz, opts.ngf, image_shape)
    return generator.to(device)


def _tensor_list(t: torch.Tensor) -> List[Optional[float]]:
    return [None if math.isnan(v) else float(v) for v in t.detach().double().cpu().tolist()]


def _class_means(sums: torch.Tensor, counts: torch.Tensor) -> List[Optional[float]]:
    nan = torch.full_like(counts, float("nan"))
    return _tensor_list(torch.where(counts > 0, sums / counts.clamp_min(1.0), nan))


def synthetic_example_grid(bank: SyntheticBank, classes: Sequence[str], per_class: int) -> List[dict]:
    """[{"class", "png"}]: per class, its `per_class` newest bank images in one row (1 px white gaps)."""
    from robaudit.audit.engine import _png_b64

    if bank.images is None or len(bank) == 0 or per_class <= 0:
        return []
    examples = []
    for k, name in enumerate(classes):
        positions = (bank.labels == k).nonzero().flatten()
        if positions.numel() == 0:
            continue
        newest = positions[torch.argsort(bank.ids[positions], descending=True, stable=True)][:per_class]
        images = bank.images[newest]                                   # uint8 [n, C, H, W]
        n, c, h, w = images.shape
        row = torch.full((c, h, n * w + (n - 1)), 255, dtype=torch.uint8)
        for i in range(n):
            row[:, :, i * (w + 1):i * (w + 1) + w] = images[i]
        examples.append({"class": name, "png": _png_b64(row.permute(1, 2, 0).numpy())})
    return examples


# ============================================================================ the run
def run_ferd(cfg: "loop.RemediateConfig", *, teacher, test_data=None,
             student_module: Optional[nn.Module] = None,
             classes: Optional[Sequence[str]] = None, dry_run: bool = False) -> Optional[dict]:
    """Distil a robust student from `teacher` (a LoadedModel) alone, with FERD; export it and,
    given `test_data` (an EvalData), audit it with engine.run_scan into out_dir/student/.

    cfg is a RemediateConfig: its method_options are FerdOptions (fae, reweight, uta, ...;
    see FerdOptions), cfg.method must be "ferd" (or the default, which is ignored);
    epochs, lr, momentum, weight_decay, batch_size (student), eps, steps, step_size
    (student attack; the teacher attack uses step_size too), augment, seed, device,
    precision, resume, export_formats and the audit_* fields mean what they mean for
    run_remediate. There is no validation split (val_* are ignored) and the schedule is
    cosine (cfg.milestones must be None). `classes` names the classes (default: the test
    set's, else the teacher's, else "0".."C-1"). Returns the same summary as
    run_remediate (best / best_score None: the last epoch is selected). dry_run=True: every
    check on the options, the models and an existing checkpoint, nothing written, None returned.
    """
    opts = FerdOptions.from_mapping(cfg.method_options)
    ctx = distributed.current()
    if ctx.enabled:
        raise UserError("data-free remediation (FERD) runs in one process: its generator phase is not "
                        "distributed; run it without torchrun, on one GPU")
    if cfg.method not in (METHOD_NAME, DEFAULT_METHOD):
        raise UserError(f"--method {cfg.method} needs training images; data-free remediation trains with ferd")
    if cfg.milestones is not None:
        raise UserError("--milestones does not apply to data-free remediation: its schedule is cosine annealing")
    loop.check_config(cfg, 1)
    warmup = opts.warmup if opts.warmup is not None else default_warmup(cfg.epochs)
    if warmup >= cfg.epochs:
        raise UserError(f"data-free remediation needs more epochs ({cfg.epochs}) than warm-up epochs ({warmup}): "
                        f"the student trains only after the warm-up")
    if teacher is None:
        raise UserError("data-free remediation distils a teacher: pass --teacher MODEL")
    if not getattr(teacher, "white_box", True):
        reason = getattr(teacher, "refusal", None) or "it has no usable gradients"
        raise UserError(f"data-free remediation trains its generator by back-propagating through the teacher, "
                        f"but {getattr(teacher, 'path', 'the teacher')} cannot be differentiated ({reason}); "
                        f"pass the teacher as PyTorch weights (state_dict / checkpoint / safetensors with "
                        f"--arch), a torch.export .pt2 or a TorchScript file")

    runtime = loop.resolve_runtime(cfg, ctx)
    device = runtime.device
    out_dir = Path(cfg.out_dir)

    # ---------------------------------------------------------------- shapes, classes, models
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
    teacher_module = teacher.module
    teacher_module.eval()
    example = torch.zeros(2, *image_shape, device=device)
    num_classes = loop._output_classes(teacher_module, example)
    if classes is None:
        classes = (test_data.classes if test_data is not None else getattr(teacher, "class_names", None))
    classes = list(classes) if classes is not None else [str(k) for k in range(num_classes)]
    if len(classes) != num_classes:
        raise UserError(f"the teacher predicts {num_classes} classes but {len(classes)} class names were given "
                        f"(the test set's); pass the teacher trained on this dataset")
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")

    if student_module is not None:
        student, student_desc = student_module, type(student_module).__name__
    else:
        student, student_desc = loop._build_student(cfg, num_classes, device)
    student = student.to(device)
    if runtime.channels_last:
        student = student.to(memory_format=torch.channels_last)
    if loop._output_classes(student, example) != num_classes:
        raise UserError(f"the student predicts {loop._output_classes(student, example)} classes but the teacher "
                        f"{num_classes}")

    if dry_run:
        fingerprint = _fingerprint(cfg, opts, warmup, num_classes, student_desc, image_shape, teacher)
        _resume_state(cfg, out_dir, fingerprint, create=False)
        return None
    taps = TeacherTaps(teacher_module, num_classes)
    try:
        return _train(cfg, opts, warmup, teacher, teacher_module, taps, student, student_desc, classes,
                      image_shape, runtime, out_dir, test_data)
    finally:
        taps.close()


def _resume_state(cfg, out_dir: Path, fingerprint: dict, *, create: bool) -> Optional[dict]:
    """The checkpoint to resume from (or None); refuses a data-based one. create=False writes nothing."""
    checkpoint_path = out_dir / "checkpoint.pt"
    state = loop.prepare_out_dir_for_resume(out_dir, checkpoint_path, cfg.resume, fingerprint, create=create)
    if state is not None and not state.get("data_free"):
        raise UserError(f"{checkpoint_path} is a data-based remediation checkpoint; resume it without "
                        f"--data-free, or choose another --out")
    return state


def _train(cfg, opts: FerdOptions, warmup: int, teacher, teacher_module: nn.Module, taps: TeacherTaps,
           student: nn.Module, student_desc: str, classes: List[str], image_shape, runtime,
           out_dir: Path, test_data) -> dict:
    device, memory_format, autocast = runtime.device, runtime.memory_format, runtime.autocast
    num_classes = len(classes)
    notes: List[str] = []
    bn_available, head_available = taps.probe(teacher_module, torch.rand(
        2, *image_shape, generator=torch.Generator().manual_seed(int(cfg.seed))).to(device))
    use_bn = bn_available and opts.bn_weight > 0
    if not bn_available:
        notes.append("DeepInversion BN-statistics loss off: the teacher has no BatchNorm layer robaudit can hook "
                     "(torch.export .pt2 and TorchScript files hide their layers; ONNX exports usually fold "
                     "BatchNorm into the convolutions); the generator trains on the one-hot, adversarial and "
                     "uniformity terms only. Pass the teacher's PyTorch weights (state_dict/checkpoint with "
                     "--arch) to use it.")
    use_fae = opts.fae and opts.uni_weight > 0 and head_available
    if opts.fae and not head_available:
        notes.append(f"Fairness-Aware Examples (L_uni) off: robaudit found no classifier head to split into "
                     f"robust and non-robust channels (a hookable nn.Linear with {num_classes} outputs taking "
                     f"[batch, features] inputs).")
    for note in notes:
        log.warning("ferd: %s", note)
    attack_teacher = opts.reweight or use_fae

    # ---------------------------------------------------------------- optimisation state
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - warmup))
    bank = SyntheticBank(opts.bank_size, opts.bank_eviction)
    probs = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32)
    mask: Optional[torch.Tensor] = None
    persistent_generator: Optional[FerdGenerator] = None
    fingerprint = _fingerprint(cfg, opts, warmup, num_classes, student_desc, image_shape, teacher)
    checkpoint_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.csv"
    history: List[dict] = []
    start_epoch = 1

    state = _resume_state(cfg, out_dir, fingerprint, create=True)
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        bank.load_state_dict(state["bank"])
        probs = state["class_probs"].float().clone()
        mask = state["nonrobust_mask"].float().clone() if state["nonrobust_mask"] is not None else None
        if not opts.reset_generator and state.get("generator") is not None:
            persistent_generator = _new_generator(opts, image_shape, cfg.seed, 0, device)
            persistent_generator.load_state_dict(state["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        loop._set_cuda_rng(state["rng"].get("cuda"), device)
        history = state["history"]
        start_epoch = int(state["epoch"]) + 1
        log.info("resuming %s from epoch %d", out_dir, start_epoch)
        # checkpoint.pt is renamed into place before metrics.csv: a kill in between leaves
        # metrics.csv an epoch short, which no later epoch rewrites if it was the last one.
        loop.write_metrics_csv(metrics_path, history, classes)
        del state

    last_generator: Optional[FerdGenerator] = persistent_generator
    epoch_bar = tqdm(total=cfg.epochs, initial=start_epoch - 1, desc="ferd", unit="epoch", file=sys.stderr,
                     disable=not cfg.progress or None, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            record: Dict[str, object] = {"phase": "warmup" if epoch <= warmup else "distill",
                                         "class_probs": _tensor_list(probs)}
            # 1. generator phase -> best batch
            if opts.reset_generator or last_generator is None:
                generator = _new_generator(opts, image_shape, cfg.seed, epoch if opts.reset_generator else 0,
                                           device)
            else:
                generator = last_generator
            x_best, y_best, parts = _generator_phase(
                generator, teacher_module, student, taps, probs, mask if use_fae else None, opts, cfg, epoch,
                image_shape, device, autocast, use_bn, use_fae)
            last_generator = generator
            record.update({"gen_loss": parts["total"], "gen_bn": parts["bn"], "gen_oh": parts["oh"],
                           "gen_adv": parts["adv"], "gen_uni": parts["uni"],
                           "gen_teacher_agree": parts["teacher_agree"]})
            # 2. bank
            ids = (epoch - 1) * opts.synthesis_batch_size + torch.arange(len(y_best))
            bank.add(x_best, y_best, ids, epoch, generator=_torch_generator(cfg.seed, epoch, PURPOSE_EVICT))
            record["bank_size"] = len(bank)
            record["synthetic_count"] = [float(v) for v in torch.bincount(y_best.cpu(), minlength=num_classes)]
            # 3. teacher attack -> next class probabilities and non-robust channels
            if attack_teacher:
                x_q = SyntheticBank.quantise(x_best).to(device).float().div_(255.0)
                stats = _teacher_robustness(teacher_module, taps, x_q, y_best.to(device), ids.to(device), opts,
                                            cfg, epoch, num_classes, autocast, use_fae)
                record["teacher_neg_margin"] = _class_means(stats["tally"][:, 1], stats["tally"][:, 0])
                record["teacher_syn_robust"] = _class_means(stats["tally"][:, 2], stats["tally"][:, 0])
                if opts.reweight:
                    probs = class_probabilities(stats["tally"][:, 1], stats["tally"][:, 0],
                                                opts.prob_bounds).cpu()
                if use_fae and stats["mask"] is not None:
                    mask = stats["mask"].cpu()
                    record["nonrobust_channels"] = int(mask.sum())
            # 4. student
            entry = {"epoch": epoch, "lr": None, "loss": None}
            if epoch > warmup:
                entry["lr"] = optimizer.param_groups[0]["lr"]
                loss_mean, tally = _student_epoch(student, teacher_module, bank, optimizer, opts, cfg, epoch,
                                                  num_classes, device, memory_format, autocast, history)
                scheduler.step()
                entry["loss"] = loss_mean
                counts = tally[:, 0]
                record.update({"student_kl_adv": _class_means(tally[:, 1], counts),
                               "student_kl_nat": _class_means(tally[:, 2], counts),
                               "student_agree_adv": _class_means(tally[:, 3], counts),
                               "student_agree_nat": _class_means(tally[:, 4], counts)})
            record["next_class_probs"] = _tensor_list(probs)
            entry["world_size"] = 1
            entry["seconds"] = time.perf_counter() - t_epoch
            entry["method"] = record
            history.append(entry)
            loop.save_atomic({
                "kind": loop.CHECKPOINT_KIND, "version": loop.CHECKPOINT_VERSION, "data_free": True,
                "epoch": epoch, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "bank": bank.state_dict(), "class_probs": probs.clone(),
                "nonrobust_mask": mask.clone() if mask is not None else None,
                "generator": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "best": {"epoch": None, "score": None}, "history": history, "fingerprint": fingerprint,
                "classes": classes,
            }, checkpoint_path)
            loop.write_metrics_csv(metrics_path, history, classes)
            epoch_bar.update(1)
            if entry["loss"] is not None:
                epoch_bar.set_postfix(loss=f"{entry['loss']:.4f}", bank=len(bank))
    finally:
        epoch_bar.close()

    student.eval()
    exports = loop._export(student, torch.zeros(1, *image_shape), out_dir, cfg.export_formats) \
        if cfg.export_formats else {}
    selected_epoch = history[-1]["epoch"] if history else None
    specificity = class_specificity_note(history, num_classes)
    if specificity is not None:
        log.warning("ferd: %s", specificity)
        notes.append(specificity)
    training = ferd_training_block(cfg, opts, warmup, teacher, history, selected_epoch, bank, classes, notes,
                                   use_bn=use_bn, use_fae=use_fae)
    summary = {
        "out_dir": str(out_dir), "method": METHOD_NAME, "epochs": len(history),
        "selected_epoch": selected_epoch, "best_score": None, "checkpoint": str(checkpoint_path), "best": None,
        "metrics": str(metrics_path), "exports": exports, "training": training, "student_results": None,
        "bank_size": len(bank),
    }
    if test_data is not None:
        summary["student_results"] = loop._audit_student(cfg, exports, test_data, training, out_dir)
    return summary


def _generator_phase(generator: FerdGenerator, teacher: nn.Module, student: nn.Module, taps: TeacherTaps,
                     probs: torch.Tensor, mask: Optional[torch.Tensor], opts: FerdOptions, cfg, epoch: int,
                     image_shape, device, autocast, use_bn: bool, use_fae: bool):
    """Train `generator` (and the batch's codes z) `g_steps` steps on L_G; return the lowest-L_G batch
    (x [B, C, H, W] detached, its labels, {"total", "bn", "oh", "adv", "uni"} floats or None)."""
    from robaudit.remediate.train import augment_batch

    batch = opts.synthesis_batch_size
    codes = _torch_generator(cfg.seed, epoch, PURPOSE_CODES)
    z = torch.randn(batch, opts.nz, generator=codes).to(device).requires_grad_(True)
    y = torch.multinomial(probs.double().cpu(), batch, replacement=True, generator=codes).to(device)
    params = list(generator.parameters())
    optimizer = torch.optim.Adam([{"params": params}, {"params": [z], "lr": opts.z_lr}], lr=opts.g_lr,
                                 betas=tuple(opts.g_betas))
    slots = torch.arange(batch, device=device)
    fae_now = use_fae and mask is not None
    head = taps.head
    best_cost, best_x, best_parts = math.inf, None, None
    generator.train()
    with eval_mode(student), eval_mode(teacher):
        for step in range(opts.g_steps):
            with autocast():
                x = generator(z)
            x = x.float()
            x_in = x
            if cfg.augment:
                x_in = augment_batch(x, slots, cfg.seed, GENERATOR_AUGMENT_BASE + (epoch - 1) * opts.g_steps + step)
            with torch.enable_grad(), taps.record(bn=use_bn, head=fae_now), autocast():
                t_logits = teacher(x_in)
                bn_terms = list(taps.bn_terms)
                features = taps.features
            with torch.enable_grad(), autocast():
                s_logits = student(x_in)
            nonrobust = nonrobust_logits(features, mask, head.weight, head.bias) if fae_now else None
            loss, parts = generator_loss(t_logits, s_logits, y, bn_terms=bn_terms, nonrobust=nonrobust,
                                         bn_weight=opts.bn_weight, oh_weight=opts.oh_weight,
                                         adv_weight=opts.adv_weight, uni_weight=opts.uni_weight)
            cost = float(loss.detach())
            if not math.isfinite(cost):
                raise UserError(f"the generator loss became {cost} at epoch {epoch}, step {step + 1}; "
                                f"try a lower g_lr (ferd option)")
            if best_x is None or cost < best_cost:
                best_cost, best_x = cost, x.detach().clone()
                best_parts = {k: (None if v is None else float(v)) for k, v in parts.items()}
                best_parts["total"] = cost
                # How class-specific the batch is: the share the teacher labels as sampled.
                best_parts["teacher_agree"] = float((t_logits.detach().argmax(1) == y).float().mean())
            grads = torch.autograd.grad(loss, params + [z])
            for tensor, grad in zip(params + [z], grads):
                tensor.grad = grad
            optimizer.step()
    generator.eval()
    return best_x, y.detach(), best_parts


def _teacher_robustness(teacher: nn.Module, taps: TeacherTaps, x: torch.Tensor, y: torch.Tensor,
                        ids: torch.Tensor, opts: FerdOptions, cfg, epoch: int, num_classes: int, autocast,
                        use_fae: bool) -> dict:
    """PGD-`teacher_steps` on the teacher (CE w.r.t. the sampled labels, uniform start keyed by the
    bank ids, final iterate): per-class float64 tallies [C, 3] (count, negative margin sum, robust
    count) and the non-robust channel mask measured on (x, x')."""
    u = per_sample_uniform(cfg.seed, ids, x.shape[1:], stream=STREAM_TEACHER_START + epoch, device=x.device,
                           dtype=x.dtype)
    with eval_mode(teacher):
        def ce(xa):
            with autocast():
                logits = teacher(xa)
            return F.cross_entropy(logits.float(), y, reduction="none")

        x_adv = projected_ascent(ce, x, eps=cfg.eps, step_size=cfg.step_size, steps=opts.teacher_steps,
                                 x_start=x + (2 * u - 1) * cfg.eps)
        with torch.no_grad(), taps.record(head=use_fae), autocast():
            logits_adv = teacher(x_adv).float()
            f_adv = taps.features
        f_clean = None
        if use_fae:
            with torch.no_grad(), taps.record(head=True), autocast():
                teacher(x)
                f_clean = taps.features
    neg = negative_margin(logits_adv, y)
    robust = (logits_adv.argmax(1) == y).float()
    columns = torch.stack([torch.ones_like(neg), neg, robust], dim=1)
    tally = class_sums(y, columns, num_classes, dtype=TALLY_DTYPE)
    mask = None
    if use_fae and f_clean is not None and f_adv is not None:
        mask = nonrobust_channel_mask(f_clean.float(), f_adv.float(), opts.nonrobust_fraction)
    return {"tally": tally, "mask": mask}


def _student_epoch(student: nn.Module, teacher: nn.Module, bank: SyntheticBank, optimizer, opts: FerdOptions,
                   cfg, epoch: int, num_classes: int, device, memory_format, autocast,
                   history: List[dict]) -> Tuple[float, torch.Tensor]:
    """`kd_steps` distillation steps on bank batches; (mean loss, per-class tallies [C, 5] keyed by the
    teacher's clean prediction: count, KL on x', KL on x, student agrees on x', agrees on x)."""
    from robaudit.remediate.train import augment_batch

    order_rng = _torch_generator(cfg.seed, epoch, PURPOSE_BANK_ORDER)
    n = len(bank)
    order, position = torch.randperm(n, generator=order_rng), 0
    tally = torch.zeros(num_classes, 5, dtype=TALLY_DTYPE, device=device)
    loss_sum, seen = 0.0, 0
    student.train()
    for step in range(opts.kd_steps):
        if n <= cfg.batch_size:
            positions = order
        else:
            if position + cfg.batch_size > n:       # a new pass; the short tail of the last one is dropped
                order, position = torch.randperm(n, generator=order_rng), 0
            positions = order[position:position + cfg.batch_size]
            position += cfg.batch_size
        x, _, ids = bank.get(positions, device)
        draw = (epoch - 1) * opts.kd_steps + step + 1
        if cfg.augment:
            x = augment_batch(x, ids, cfg.seed, draw)
        x = x.contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast():
            t_logits = teacher(x)
        t_logits = t_logits.float().clone()
        p_t = F.softmax(t_logits, dim=1)
        start = x + GAUSSIAN_START_STD * per_sample_normal(cfg.seed, ids, x.shape[1:],
                                                           stream=STREAM_STUDENT_START + draw, device=device,
                                                           dtype=x.dtype)
        with eval_mode(student):
            def objective(xa):
                with autocast():
                    logits = student(xa)
                if opts.uta:
                    return uta_attack_loss(logits, p_t, opts.uta_weight)
                return kl_per_sample(logits, p_t)

            x_adv = projected_ascent(objective, x, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                                     x_start=start)
        student.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits_adv = student(x_adv.contiguous(memory_format=memory_format))
            logits_nat = student(x)
        kl_adv = kl_per_sample(logits_adv, p_t)
        kl_nat = kl_per_sample(logits_nat, p_t)
        loss = opts.loss_scale * (opts.alpha * kl_adv.mean() + (1.0 - opts.alpha) * kl_nat.mean())
        value = float(loss.detach())
        if not math.isfinite(value):
            kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept"
                    if history else "no checkpoint had been written yet")
            raise UserError(f"training stopped: the loss became {value} at epoch {epoch}, step {step + 1}; "
                            f"{kept}; try a lower --lr or --precision fp32")
        loss.backward()
        optimizer.step()
        loss_sum += value * len(positions)
        seen += len(positions)
        with torch.no_grad():
            teacher_pred = t_logits.argmax(1)
            columns = torch.stack([torch.ones_like(kl_adv), kl_adv.detach(), kl_nat.detach(),
                                   (logits_adv.detach().argmax(1) == teacher_pred).float(),
                                   (logits_nat.detach().argmax(1) == teacher_pred).float()], dim=1)
            tally += class_sums(teacher_pred, columns, num_classes, dtype=tally.dtype)
    return loss_sum / max(seen, 1), tally.cpu()


def _fingerprint(cfg, opts: FerdOptions, warmup: int, num_classes: int, student_desc: str, image_shape,
                 teacher) -> dict:
    """What a resumed data-free run must share with its checkpoint."""
    return {
        "method": METHOD_NAME, "method_options": json.loads(json.dumps(opts.as_dict(), default=str)),
        "warmup": warmup, "epochs": cfg.epochs, "student": student_desc, "num_classes": num_classes,
        "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
        "eps": cfg.eps, "steps": cfg.steps, "step_size": cfg.step_size, "augment": cfg.augment, "seed": cfg.seed,
        "precision": cfg.precision, "image_shape": list(image_shape),
        "teacher_sha256": getattr(teacher, "sha256", None),
    }


class _FerdMethodInfo:
    """What loop.training_block reads from a method object."""

    name = METHOD_NAME
    needs_teacher = True
    lr_milestones: Tuple[int, ...] = ()

    def __init__(self, options: dict):
        self._options = options

    def options(self) -> dict:
        return self._options


LOW_TEACHER_AGREEMENT = 0.5   # below this mean share the synthetic images are called weakly class-specific


def class_specificity_note(history: Sequence[dict], num_classes: int,
                           threshold: float = LOW_TEACHER_AGREEMENT) -> Optional[str]:
    """A note when the teacher labels fewer than `threshold` of the synthetic images (mean over
    the epochs' best batches) as the class they were generated for; None otherwise."""
    shares = [h["method"].get("gen_teacher_agree") for h in history]
    shares = [s for s in shares if s is not None]
    if not shares:
        return None
    mean = sum(shares) / len(shares)
    if mean >= threshold:
        return None
    return (f"The teacher labels only {100 * mean:.0f}% of the synthetic images as the class they were "
            f"generated for (mean over {len(shares)} epochs; chance is {100 / num_classes:.0f}%): the "
            f"synthetic data is weakly class-specific, so the student mostly learns the teacher's outputs on "
            f"ambiguous images. More generator steps (ferd option g_steps) or a smaller bn_weight make the "
            f"images more class-specific: the BN-statistics term can dominate the generator loss for "
            f"low-confidence teachers such as small adversarially trained ones (docs/reproduction.md, FERD).")


def ferd_training_block(cfg, opts: FerdOptions, warmup: int, teacher, history: List[dict], selected_epoch,
                        bank: SyntheticBank, classes: Sequence[str], notes: Sequence[str], *,
                        use_bn: bool, use_fae: bool) -> dict:
    """results.json "training" for a data-free run: run_remediate's block plus
    "class_probabilities" ([[p_c] per epoch], the distribution the epoch's labels were drawn
    from) and "synthetic_examples" ([{"class", "png"}]: the newest bank images per class)."""
    method_options = {**opts.as_dict(), "warmup": warmup, "bn_loss_active": use_bn, "fae_active": use_fae}
    block = loop.training_block(cfg, _FerdMethodInfo(method_options), teacher, history, selected_epoch, False)
    options = block["options"]
    for key in ("val_per_class", "val_steps", "milestones", "sync_bn"):
        options.pop(key, None)
    options.update({"data_free": True, "schedule": f"cosine over {cfg.epochs - warmup} epochs after "
                                                   f"{warmup} generator-only warm-up epochs",
                    "notes": list(notes)})
    block["selection"] = ("last epoch (data-free: there are no real training images to hold out; the test set "
                          "is only audited)")
    block["class_probabilities"] = [h["method"]["class_probs"] for h in history]
    block["synthetic_examples"] = synthetic_example_grid(bank, classes, opts.examples_per_class)
    return block
