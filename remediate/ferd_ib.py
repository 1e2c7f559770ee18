"""FERD's non-robust channels: an information bottleneck (IB) on an intermediate teacher layer.

Followed (read, not copied) from github mayaobuduyao/FERD: models/IFP.py
(InformativeFeaturePackage: find_features, kl_div, sample_latent,
sample_robust_and_non_robust_latent), IBD_module_cmi.py (Train_Gen_Module.train: find_features
on every generator step's augmented batch, pop = 3, L_uni on the non-robust logits) and
models/wideresnet_ifd.py (pop 3 = the output of the final BatchNorm, before ReLU, pooling and fc).

Per generator step, with Z = f_l(x) [B, C, H, W] the (detached) output of layer l and v_bc its
spatial variance (unbiased, as Tensor.var in the code):

    lambda = 0 [B, C] (code: zeros, so the noise starts at softplus(0) = log 2);
    `ib_steps` (50) Adam steps (lr `ib_lr` 0.1) on
        CE(f_{l+}(Z + softplus(lambda) * N), y) + beta * 0.5 * mean_bc(v_bc / s_bc^2
                                                      + log(s_bc^2 / v_bc) - 1),   s = softplus(lambda)
    (the spec writes beta * sum_c(...); the code takes 0.5 * the mean over samples and channels
    with 1e-10 in each ratio, and beta = 0.3 is tuned to that form: we follow the code).
    N is one N(0, 1) draw per (sample, channel), shared by the H x W positions (the code draws
    it in lambda's shape [B, C, 1, 1]); the draws come from a torch.Generator seeded by
    (seed, epoch), consumed in a fixed order, so a resumed run repeats them.
    robust_bc = s_bc^2 > max_{b', c'} v_b'c' (code: the noise variance exceeds every feature
    variance of the batch: the teacher tolerates noise larger than the signal), and the
    non-robust mask m = 1 - robust: the channels whose noise stays small. Per sample, as in
    the code.

L_uni then reads the teacher's logits f_{l+}(Z * m) (a second forward whose layer-l output is
masked, differentiable w.r.t. the images: code non_robust_outputs).

Splitting a generic teacher into f_l and f_{l+}: a forward hook on the module of layer l returns
the replaced output (a forward hook's return value replaces the module's output), so the rest of
the teacher runs unchanged on the noised or masked features; any nn.Module works, the prefix is
recomputed (its output discarded) on each IB step. Layer l (ours, generalising the code's pop 3):
the last module, in the order modules finish, that runs once per forward and outputs a spatial
map [B, C, H, W] with H * W > 1 (the last feature map before pooling); when that module is a
parameter-free activation applied directly to a BatchNorm's output, the BatchNorm (the code's
WRN pop 3 is bn1, before its ReLU). Examples: WideResNet bn1, PreAct ResNet bn, MobileNetV2
bn2, ResNet-18 layer4, SmallCNN features. Option `ib_layer` names the module instead
(named_modules() names). A teacher whose modules run without Python hooks (TorchScript,
torch.export graphs) or that has no such map has no layer l: the run falls back to the
fragility mask and says so (remediate/ferd.py).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.errors import UserError

IB_DELTA = 1e-10          # models/IFP.py kl_div: delta in both ratios
log = logging.getLogger(__name__)

FRAGILITY_NOTE = ("Non-robust channels from robaudit's substitute, not the paper's information bottleneck: "
                  "the ceil(nonrobust_fraction * D) penultimate-feature channels that move most under a "
                  "PGD attack on the teacher (ferd option nonrobust=fragility).")


def _is_map(value, batch: int) -> bool:
    return (torch.is_tensor(value) and value.is_floating_point() and value.dim() == 4
            and value.shape[0] == batch and value.shape[2] * value.shape[3] > 1)


def _probe_calls(teacher: nn.Module, example: torch.Tensor) -> Optional[List[tuple]]:
    """[(name, module, input0, output)] in the order modules finish on one forward, or None
    when hooks cannot be attached or never fire (scripted / exported graphs)."""
    calls: List[tuple] = []
    handles = []

    def make(name):
        def hook(module, inputs, output):
            calls.append((name, module, inputs[0] if inputs else None, output))
        return hook

    try:
        for name, module in teacher.named_modules():
            if name and not isinstance(module, torch.jit.ScriptModule):
                handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            teacher(example)
    except Exception:          # a module that refuses hooks: no layer l (the caller falls back)
        return None
    finally:
        for handle in handles:
            handle.remove()
    return calls or None


def find_ib_layer(teacher: nn.Module, example: torch.Tensor,
                  name: Optional[str] = None) -> Tuple[Optional[str], Optional[nn.Module], str]:
    """(name, module, why) of layer l (see the module doc); (None, None, why) when there is none.
    An explicit `name` that is not a usable layer raises a one-line UserError."""
    calls = _probe_calls(teacher, example)
    if calls is None:
        return None, None, "the teacher's layers cannot be hooked (TorchScript runs compiled code without Python hooks: convert it to .pt2 with torch.export, or pass its state_dict with --arch)"
    batch = example.shape[0]
    counts = {}
    for call in calls:
        counts[call[0]] = counts.get(call[0], 0) + 1
    maps = [i for i, call in enumerate(calls) if counts[call[0]] == 1 and _is_map(call[3], batch)]
    if name is not None:
        chosen = [i for i in maps if calls[i][0] == name]
        if not chosen:
            usable = ", ".join(calls[i][0] for i in maps[-5:]) or "none"
            raise UserError(f"ferd option ib_layer {name!r} is not a teacher module that runs once per forward "
                            f"and outputs a [batch, channels, H, W] map; the last usable ones: {usable}")
        return name, calls[chosen[0]][1], "named by ib_layer"
    if not maps:
        return None, None, "the teacher has no hookable module with a spatial [batch, channels, H, W] output"
    index = maps[-1]
    _, module, inp, _ = calls[index]
    parameter_free = next(iter(module.parameters(recurse=True)), None) is None and \
        next(iter(module.buffers(recurse=True)), None) is None
    if parameter_free and index > 0:
        prev_name, prev_module, _, prev_out = calls[index - 1]
        if isinstance(prev_module, nn.modules.batchnorm._BatchNorm) and inp is prev_out and counts[prev_name] == 1:
            return prev_name, prev_module, "the BatchNorm before the last feature map's activation"
    return calls[index][0], module, "the last feature map before pooling"


class InformationBottleneck:
    """Layer l of the teacher, hooked: records its output or replaces it (see the module doc)."""

    def __init__(self, module: nn.Module, name: str, *, steps: int = 50, lr: float = 0.1, beta: float = 0.3):
        self.name, self.steps, self.lr, self.beta = name, int(steps), float(lr), float(beta)
        self._replace: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._recording = False
        self.recorded: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self._recording:
            self.recorded = output.detach().float().clone()   # cloned: an in-place activation may follow
        if self._replace is not None:
            return self._replace(output)
        return None

    @contextlib.contextmanager
    def recording(self):
        self._recording, self.recorded = True, None
        try:
            yield self
        finally:
            self._recording = False

    @contextlib.contextmanager
    def replaced(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self._replace = fn
        try:
            yield self
        finally:
            self._replace = None

    def close(self) -> None:
        self._handle.remove()

    def fit_noise(self, teacher: nn.Module, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                  noise: torch.Generator, autocast=contextlib.nullcontext) -> torch.Tensor:
        """The fitted noise scales softplus(lambda) [B, C] on Z = `z` (layer l's output on `x`)."""
        z = z.detach().float()
        batch, channels = z.shape[:2]
        variance = z.var(dim=(2, 3))
        raw = torch.zeros(batch, channels, 1, 1, device=z.device, requires_grad=True)
        optimizer = torch.optim.Adam([raw], lr=self.lr)
        x = x.detach()
        for _ in range(self.steps):
            scale = F.softplus(raw)
            draw = torch.randn(batch, channels, 1, 1, generator=noise).to(z.device)
            noised = z + scale * draw
            with torch.enable_grad(), self.replaced(lambda out: noised.to(out.dtype)), autocast():
                logits = teacher(x)
            loss = F.cross_entropy(logits.float(), y) + self.beta * ib_kl(variance, scale.flatten(1))
            (raw.grad,) = torch.autograd.grad(loss, [raw])
            optimizer.step()
        return F.softplus(raw.detach()).flatten(1)

    def nonrobust_logits(self, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Generator,
                         autocast=contextlib.nullcontext) -> Tuple[torch.Tensor, torch.Tensor]:
        """(f_{l+}(Z * m) logits, differentiable w.r.t. x; the mask m [B, C]). Needs self.recorded,
        layer l's output on `x` from the caller's forward (under `recording()`)."""
        if self.recorded is None:
            raise RuntimeError("InformationBottleneck.nonrobust_logits needs a recorded forward of x")
        z = self.recorded
        scale = self.fit_noise(teacher, x, z, y, noise, autocast)
        mask = nonrobust_mask(scale, z.var(dim=(2, 3)))
        with torch.enable_grad(), self.replaced(lambda out: out * mask[:, :, None, None].to(out.dtype)), autocast():
            logits = teacher(x)
        return logits.float(), mask


def ib_kl(variance: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """models/IFP.py kl_div: 0.5 * mean(v / (s^2 + d) + log((s^2 + d) / (v + d)) - 1), d = 1e-10
    (KL(N(0, v) || N(0, s^2)) per sample and channel, averaged)."""
    noise_var = scale.square()
    return 0.5 * (variance / (noise_var + IB_DELTA) + torch.log((noise_var + IB_DELTA) / (variance + IB_DELTA))
                  - 1).mean()


def nonrobust_mask(scale: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """1 where the channel is non-robust: noise variance s^2 <= the batch's largest feature variance
    (models/IFP.py: robust = s^2 > max v; non-robust = 1 - robust). Float [B, C]."""
    return (scale.square() <= variance.max()).float()


def nonrobust_source(opts, teacher: nn.Module, probe: torch.Tensor, head_available: bool,
                     num_classes: int) -> Tuple[Optional[str], Optional[InformationBottleneck], List[str]]:
    """Where L_uni's non-robust features come from: ("ib", the hooked layer l, notes),
    ("fragility", None, notes: chosen, or the fallback when the teacher has no layer l), or
    (None, None, notes) when neither is available (L_uni off). `opts` are FerdOptions."""
    no_head = (f"no classifier head for the fragility substitute (a hookable nn.Linear with {num_classes} "
               f"outputs taking [batch, features] inputs)")
    if opts.nonrobust == "ib":
        name, module, why = find_ib_layer(teacher, probe, opts.ib_layer)
        if module is not None:
            log.info("ferd: information bottleneck on teacher layer %r (%s)", name, why)
            return "ib", InformationBottleneck(module, name, steps=opts.ib_steps, lr=opts.ib_lr,
                                               beta=opts.ib_beta), []
        if not head_available:
            return None, None, [f"Fairness-Aware Examples (L_uni) off: no information-bottleneck layer ({why}) "
                                f"and {no_head}."]
        return "fragility", None, [f"Information bottleneck unavailable ({why}): fell back to "
                                   f"nonrobust=fragility. " + FRAGILITY_NOTE]
    if not head_available:
        return None, None, [f"Fairness-Aware Examples (L_uni) off: {no_head}."]
    return "fragility", None, [FRAGILITY_NOTE]
