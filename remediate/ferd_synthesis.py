"""FERD's synthesis side: the generator, the terms of its loss, the teacher hooks they read,
the bank of synthetic images, and the two phases that fill it (generator training; the
teacher attack that sets next epoch's class probabilities and non-robust channels).

The run that drives them, with the student's distillation phase, is remediate/ferd.py;
its module docstring states every formula, and ../shared/specs/methods.md (FERD) is the spec.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.audit.attacks.ascent import cross_entropy_pgd
from robaudit.audit.io import png_base64
from robaudit.audit.modes import eval_mode
from robaudit.audit.rng import per_sample_uniform
from robaudit.errors import UserError
from robaudit.remediate.base import TALLY_DTYPE, class_sums, kl_per_sample
from robaudit.remediate.common import augment_batch
from robaudit.remediate.ferd_options import FerdOptions
from robaudit.remediate.loss_window import loss_check_interval

FRAGILITY_EPS = 1e-12
IKL_WEIGHT_TEMPERATURE = 100.0      # losses.py dkl_loss: T2 = 100 (the pair weights' softmax temperature)

# robaudit.audit.rng streams. augment_batch uses stream STREAM_AUGMENT + its `epoch`
# argument: the student's batches pass round = (epoch - 1) * kd_steps + step + 1 (< 2^24),
# the generator phase GENERATOR_AUGMENT_BASE + (epoch - 1) * g_steps + step.
GENERATOR_AUGMENT_BASE = 1 << 24
STREAM_TEACHER_START = 1 << 28                      # + epoch

# torch.Generator purposes (see derived_seed).
PURPOSE_GENERATOR_INIT, PURPOSE_CODES, PURPOSE_EVICT, PURPOSE_BANK_ORDER, PURPOSE_IB_NOISE = 1, 2, 3, 4, 5


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


def ikl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   weight_temperature: float = IKL_WEIGHT_TEMPERATURE) -> torch.Tensor:
    """The decoupled (IKL) distillation loss per sample [B] (losses.py dkl_loss, GI off, gamma 1):

        0.25 * sum_ij w_ij ((t_i - t_j) - (s_i - s_j))^2 / sum_ij w_ij + CE(softmax(t), log_softmax(s)),
        w = p p^T, p = softmax(t / 100).

    As in the code the CE target softmax(t) is detached while the pair term keeps the teacher's
    gradient (the generator's L_adv differentiates through both logits). The code normalises by
    the batch's sum of w (each sample's sum is (sum_i p_i)^2 = 1), we by each sample's: the batch
    mean of this equals dkl_loss up to rounding. Vectorised: the pair term is [B, C, C].
    """
    t, s = teacher_logits.float(), student_logits.float()
    gap = (t[:, :, None] - t[:, None, :]) - (s[:, :, None] - s[:, None, :])          # [B, C, C]
    p = F.softmax(t / weight_temperature, dim=1)
    w = p[:, :, None] * p[:, None, :]
    pair = 0.25 * (gap.square() * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2))
    ce = -(F.softmax(t, dim=1).detach() * F.log_softmax(s, dim=1)).sum(dim=1)
    return pair + ce


def distillation_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample divergence of the student from the teacher: "ikl" (ikl_per_sample) or "kl"."""
    if kind == "ikl":
        return ikl_per_sample(student_logits, teacher_logits)
    return kl_per_sample(student_logits, F.softmax(teacher_logits.float(), dim=1))


def generator_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, y: torch.Tensor, *,
                   bn_terms: Sequence[torch.Tensor] = (), nonrobust: Optional[torch.Tensor] = None,
                   bn_weight: float = 5.0, oh_weight: float = 1.0, adv_weight: float = 1.0,
                   uni_weight: float = 5.0, adv_loss: str = "ikl") -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """L_G = bn_weight * L_bn + oh_weight * L_oh - adv_weight * D(s, t) + uni_weight * L_uni,
    D the batch-mean IKL (adv_loss "ikl", the code) or KL(t || s) ("kl").

    L_bn is the sum of `bn_terms` (none: the term is off); L_uni needs the teacher's logits on
    its non-robust features (None: off). Returns (L_G, {"bn", "oh", "adv", "uni"}: the
    detached unweighted terms, "adv" = D >= 0, None for a term that is off).
    """
    oh = one_hot_loss(teacher_logits, y)
    if adv_loss == "ikl":
        adv = ikl_per_sample(student_logits, teacher_logits).mean()
    else:
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


def uta_attack_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, gamma: float = 0.3) -> torch.Tensor:
    """Per-sample objective of the Uniform-Target attack (UTAE):
    KL(p_t || s(x')) - gamma * KL(uniform || s(x')); gamma 0 is plain PGD on the KL (the code)."""
    kl = kl_per_sample(student_logits, teacher_probs)
    return kl - gamma * kl_uniform(student_logits) if gamma else kl


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



def derived_seed(seed: int, epoch: int, purpose: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(purpose) * 104_729 + 17) % (2 ** 63)


def torch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derived_seed(seed, epoch, purpose))
    return generator


def new_generator(opts: FerdOptions, image_shape, seed: int, epoch: int, device) -> FerdGenerator:
    """A generator initialised from (seed, epoch) without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, epoch, PURPOSE_GENERATOR_INIT))
        generator = FerdGenerator(opts.nz, opts.ngf, image_shape)
    return generator.to(device)


def synthetic_example_grid(bank: SyntheticBank, classes: Sequence[str], per_class: int) -> List[dict]:
    """[{"class", "png"}]: per class, its `per_class` newest bank images in one row (1 px white gaps)."""
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
        examples.append({"class": name, "png": png_base64(row.permute(1, 2, 0).numpy())})
    return examples



def generator_phase(generator: FerdGenerator, teacher: nn.Module, student: nn.Module, taps: TeacherTaps,
                     probs: torch.Tensor, mask: Optional[torch.Tensor], opts: FerdOptions, cfg, epoch: int,
                     image_shape, device, autocast, use_bn: bool, use_fae: bool, ib=None):
    """Train `generator` (and the batch's codes z) `g_steps` steps on L_G; return the lowest-L_G batch
    (x [B, C, H, W] detached, its labels, {"total", "bn", "oh", "adv", "uni", "teacher_agree",
    "nonrobust_share"} floats or None). L_uni reads the information bottleneck `ib` (an
    ferd_ib.InformationBottleneck, on every step) when given, else the fragility `mask` (when set)."""
    batch = opts.synthesis_batch_size
    codes = torch_generator(cfg.seed, epoch, PURPOSE_CODES)
    z = torch.randn(batch, opts.nz, generator=codes).to(device).requires_grad_(True)
    y = torch.multinomial(probs.double().cpu(), batch, replacement=True, generator=codes).to(device)
    ib_noise = torch_generator(cfg.seed, epoch, PURPOSE_IB_NOISE)
    params = list(generator.parameters())
    optimizer = torch.optim.Adam([{"params": params}, {"params": [z], "lr": opts.z_lr}], lr=opts.g_lr,
                                 betas=tuple(opts.g_betas))
    slots = torch.arange(batch, device=device)
    best = _BestBatch(loss_check_interval(device))
    generator.train()
    with eval_mode(student), eval_mode(teacher):
        for step in range(opts.g_steps):
            with autocast():
                x = generator(z)
            x = x.float()
            x_in = x
            if cfg.augment:
                x_in = augment_batch(x, slots, cfg.seed, GENERATOR_AUGMENT_BASE + (epoch - 1) * opts.g_steps + step)
            t_logits, bn_terms, nonrobust, share = _teacher_terms(teacher, taps, x_in, y, mask, ib, ib_noise,
                                                                  autocast, use_bn, use_fae)
            with torch.enable_grad(), autocast():
                s_logits = student(x_in)
            loss, parts = generator_loss(t_logits, s_logits, y, bn_terms=bn_terms, nonrobust=nonrobust,
                                         bn_weight=opts.bn_weight, oh_weight=opts.oh_weight,
                                         adv_weight=opts.adv_weight, uni_weight=opts.uni_weight,
                                         adv_loss=opts.generator_adv_loss)
            # How class-specific the batch is: the share the teacher labels as sampled.
            agree = (t_logits.detach().argmax(1) == y).float().mean()
            best.offer(loss.detach(), x.detach(), parts, agree, share)
            best.check_finite(step, last=step == opts.g_steps - 1, epoch=epoch)
            grads = torch.autograd.grad(loss, params + [z])
            for tensor, grad in zip(params + [z], grads):
                tensor.grad = grad
            optimizer.step()
    generator.eval()
    best_x, best_parts = best.result()
    return best_x, y.detach(), best_parts


class _BestBatch:
    """The lowest-L_G batch of the generator steps, tracked on the device (torch.where), so a
    step does not wait for the GPU; a non-finite L_G is noticed every `every` steps (1 on the
    CPU: at the step itself, as before) and at the last step."""

    def __init__(self, every: int):
        self.every, self.values, self.bad, self.first = max(1, every), None, None, 0

    def offer(self, cost: torch.Tensor, x: torch.Tensor, parts: dict, agree: torch.Tensor, share) -> None:
        candidate = {"total": cost, "x": x, "teacher_agree": agree,
                     **{k: v for k, v in parts.items() if v is not None}}
        if share is not None:
            candidate["nonrobust_share"] = torch.as_tensor(share, device=cost.device)
        bad = ~torch.isfinite(cost)
        if self.values is None:
            self.values = {k: v.clone() for k, v in candidate.items()}
            self.none = [k for k, v in parts.items() if v is None] + ([] if share is not None else ["nonrobust_share"])
        else:
            better = cost < self.values["total"]
            self.values = {k: torch.where(better, candidate[k], v) for k, v in self.values.items()}
        self.bad = bad if self.bad is None else (self.bad | bad)

    def check_finite(self, step: int, last: bool, epoch: int) -> None:
        if (step + 1 - self.first) < self.every and not last:
            return
        steps = f"step {step + 1}" if step == self.first else f"steps {self.first + 1}-{step + 1}"
        self.first = step + 1
        if bool(self.bad):
            raise UserError(f"the generator loss became non-finite at epoch {epoch}, {steps}; "
                            f"try a lower g_lr (ferd option)")

    def result(self):
        values = dict(self.values)
        x = values.pop("x")
        parts = {k: float(v) for k, v in values.items()}
        parts.update({k: None for k in self.none})
        return x, parts


def _teacher_terms(teacher: nn.Module, taps: TeacherTaps, x_in: torch.Tensor, y: torch.Tensor,
                   mask: Optional[torch.Tensor], ib, ib_noise: torch.Generator, autocast, use_bn: bool,
                   use_fae: bool):
    """One generator step's teacher side: (logits, BN terms, logits on the non-robust features or
    None, the share of non-robust channels or None)."""
    use_ib = use_fae and ib is not None
    use_mask = use_fae and ib is None and mask is not None and taps.head is not None
    recording = ib.recording() if use_ib else contextlib.nullcontext()
    with torch.enable_grad(), taps.record(bn=use_bn, head=use_mask), recording, autocast():
        t_logits = teacher(x_in)
        bn_terms = list(taps.bn_terms)
        features = taps.features
    if use_ib:
        nonrobust, channels = ib.nonrobust_logits(teacher, x_in, y, ib_noise, autocast)
        return t_logits, bn_terms, nonrobust, channels.mean()
    if use_mask:
        head = taps.head
        return t_logits, bn_terms, nonrobust_logits(features, mask, head.weight, head.bias), mask.float().mean()
    return t_logits, bn_terms, None, None


def teacher_robustness(teacher: nn.Module, taps: TeacherTaps, x: torch.Tensor, y: torch.Tensor,
                        ids: torch.Tensor, opts: FerdOptions, cfg, epoch: int, num_classes: int, autocast,
                        use_fae: bool) -> dict:
    """PGD-`teacher_steps` on the teacher (CE w.r.t. the sampled labels, uniform start keyed by the
    bank ids, final iterate): per-class float64 tallies [C, 3] (count, negative margin sum, robust
    count) and the non-robust channel mask measured on (x, x')."""
    u = per_sample_uniform(cfg.seed, ids, x.shape[1:], stream=STREAM_TEACHER_START + epoch, device=x.device,
                           dtype=x.dtype)
    with eval_mode(teacher):
        def logits_fn(xa):
            with autocast():
                return teacher(xa)

        x_adv = cross_entropy_pgd(logits_fn, x, y, eps=cfg.eps, step_size=cfg.step_size,
                                  steps=opts.teacher_steps, unit_noise=u)
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
