"""Data-free remediation (FERD, remediate/ferd.py): the generator loss terms, IKL (against an
explicit double loop) and the UTAE objective against independent computations, the information
bottleneck's direction on a teacher whose head reads one channel, its layer on the registered
architectures, the class reweighting on a teacher with one fragile class,
the bounded bank, the BN-less and gradient-less teachers, the all-off baseline,
bitwise resume and one end-to-end run through export and the student audit.

Tiny generators (nz 8, ngf 4) on 3x8x8 images, a few steps per phase: seconds on one core.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robaudit.audit.data.datasets import EvalData
from robaudit.errors import UserError
from robaudit.remediate.common import RemediateConfig
from robaudit.remediate.ferd import run_ferd
from robaudit.remediate.ferd_options import FerdOptions, default_warmup
from robaudit.remediate.ferd_ib import InformationBottleneck, find_ib_layer, ib_kl, nonrobust_mask
from robaudit.remediate.ferd_synthesis import (
    FerdGenerator, SyntheticBank, TeacherTaps, class_probabilities, generator_loss, ikl_per_sample,
    negative_margin, nonrobust_channel_mask, nonrobust_logits, uta_attack_loss,
)

C = 3
CLASSES = ["red", "green", "blue"]
SHAPE = (3, 8, 8)


class BNTeacher(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU-pool-linear with non-trivial running statistics."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, C)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


class FragileBlueTeacher(nn.Module):
    """No BatchNorm. logits = 10 * mean colour + b with b = (0, 0, -7.9): the teacher barely
    ever prefers "blue" (class 2), whose margins are tiny or negative on any image, while
    red and green are decided by a large, symmetric margin."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, C)
        with torch.no_grad():
            self.head.weight.copy_(10 * torch.eye(3))
            self.head.bias.copy_(torch.tensor([0.0, 0.0, -7.9]))

    def forward(self, x):
        return self.head(x.mean(dim=(2, 3)))


def tiny_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, C))


def teacher_model(module=None, **extra):
    return SimpleNamespace(module=module if module is not None else BNTeacher(), path="tiny-teacher",
                           class_names=list(CLASSES), **extra)


TINY = dict(g_steps=3, synthesis_batch_size=12, nz=8, ngf=4, kd_steps=2, teacher_steps=2, warmup=1,
            image_shape=list(SHAPE), examples_per_class=3, ib_steps=4)


def config(out_dir, options=None, **overrides) -> RemediateConfig:
    base = dict(out_dir=Path(out_dir), method="ferd", epochs=2, batch_size=8, steps=2, export_formats=(),
                progress=False, method_options={**TINY, **(options or {})})
    base.update(overrides)
    return RemediateConfig(**base)


def read_metrics(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ================================================================= loss terms on fixed tensors
def test_generator_matches_the_spec_architecture():
    gen = FerdGenerator(nz=100, ngf=64, image_shape=(3, 32, 32))
    kinds = [type(m).__name__ for m in gen.conv_blocks]
    assert kinds == ["BatchNorm2d", "Upsample", "Conv2d", "BatchNorm2d", "LeakyReLU", "Upsample", "Conv2d",
                     "BatchNorm2d", "LeakyReLU", "Conv2d", "Sigmoid"]
    assert gen.l1.in_features == 100 and gen.conv_blocks[2].out_channels == 128
    assert gen.conv_blocks[6].out_channels == 64 and gen.conv_blocks[9].out_channels == 3
    out = gen(torch.randn(4, 100))
    out = out.detach()
    assert out.shape == (4, 3, 32, 32) and float(out.min()) > 0 and float(out.max()) < 1
    with pytest.raises(UserError, match="multiples of 4"):
        FerdGenerator(image_shape=(3, 30, 30))


def _bn_term_numpy(h: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray) -> float:
    n, c = h.shape[0], h.shape[1]
    per_channel = h.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
    mean = per_channel.sum(axis=1) / per_channel.shape[1]
    var = ((per_channel - mean[:, None]) ** 2).sum(axis=1) / per_channel.shape[1]
    return math.sqrt(((running_var - var) ** 2).sum()) + math.sqrt(((running_mean - mean) ** 2).sum())


def test_bn_statistics_loss_matches_an_independent_computation():
    teacher = BNTeacher(seed=3)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    taps = TeacherTaps(teacher, C)
    try:
        with taps.record(bn=True):
            teacher(x)
            terms = list(taps.bn_terms)
        assert len(terms) == 2
        ours = float(torch.stack(terms).sum().detach())
        with torch.no_grad():                                # the BN inputs, layer by layer
            h1 = teacher.conv1(x)
            h2 = teacher.conv2(F.relu(teacher.bn1(h1)))
        expected = sum(_bn_term_numpy(h.numpy(), bn.running_mean.numpy().astype(np.float64),
                                      bn.running_var.numpy().astype(np.float64))
                       for h, bn in ((h1, teacher.bn1), (h2, teacher.bn2)))
        # float32 statistics of 320 values vs float64 on the same inputs: measured 6e-8 relative
        assert ours == pytest.approx(expected, rel=1e-5)
        # Off unless asked for; the teacher's running statistics are never touched (eval mode).
        before = teacher.bn1.running_mean.clone()
        with taps.record(bn=False):
            teacher(x)
            assert taps.bn_terms == []
        assert torch.equal(before, teacher.bn1.running_mean)
    finally:
        taps.close()
    assert not teacher.bn1._forward_hooks and not teacher.head._forward_hooks


def test_one_hot_kl_and_uniformity_terms_match_independent_computations():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(6, C, generator=g) * 3, torch.randn(6, C, generator=g) * 3
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    features, weight, bias = torch.randn(6, 4, generator=g), torch.randn(C, 4, generator=g), torch.randn(C, generator=g)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    bn_terms = [torch.tensor(0.7), torch.tensor(0.2)]
    total, parts = generator_loss(t_logits, s_logits, y, bn_terms=bn_terms,
                                  nonrobust=nonrobust_logits(features, mask, weight, bias), adv_loss="kl")

    t, s = t_logits.double().numpy(), s_logits.double().numpy()

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    oh = -np.mean([log_softmax(t)[i, y[i]] for i in range(6)])
    p_t = np.exp(log_softmax(t))
    kl = np.mean((p_t * (log_softmax(t) - log_softmax(s))).sum(axis=1))
    masked = features.double().numpy() * mask.double().numpy()
    nr = masked @ weight.double().numpy().T + bias.double().numpy()
    uni = np.mean((1.0 / C * (np.log(1.0 / C) - log_softmax(nr))).sum(axis=1))
    # float32 terms vs float64 on the same logits (rounding ~1e-7 relative)
    assert float(parts["oh"]) == pytest.approx(oh, rel=1e-5)
    assert float(parts["adv"]) == pytest.approx(kl, rel=1e-5)
    assert float(parts["uni"]) == pytest.approx(uni, rel=1e-5)
    assert float(parts["bn"]) == pytest.approx(0.9)
    assert float(total) == pytest.approx(5 * 0.9 + oh - kl + 5 * uni, rel=1e-5)
    # Terms that are off: no BN layers, no non-robust channels yet.
    total_off, parts_off = generator_loss(t_logits, s_logits, y, adv_loss="kl")
    assert parts_off["bn"] is None and parts_off["uni"] is None
    assert float(total_off) == pytest.approx(oh - kl, rel=1e-5)
    # The default L_adv is -IKL (the code's -dkl_loss), with the same other terms.
    total_ikl, parts_ikl = generator_loss(t_logits, s_logits, y)
    ikl = _ikl_double_loop(s, t)
    assert float(parts_ikl["adv"]) == pytest.approx(ikl.mean(), rel=1e-5)
    assert float(total_ikl) == pytest.approx(oh - ikl.mean(), rel=1e-5)


def _ikl_double_loop(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """losses.py dkl_loss (GI off) per sample, written out with explicit loops over i, j."""
    out = []
    for b in range(s.shape[0]):
        p = np.exp(t[b] / 100.0) / np.exp(t[b] / 100.0).sum()
        num, den = 0.0, 0.0
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                w = p[i] * p[j]
                num += w * ((t[b, i] - t[b, j]) - (s[b, i] - s[b, j])) ** 2
                den += w
        q_t = np.exp(t[b] - t[b].max()) / np.exp(t[b] - t[b].max()).sum()
        log_q_s = s[b] - s[b].max() - np.log(np.exp(s[b] - s[b].max()).sum())
        out.append(0.25 * num / den - (q_t * log_q_s).sum())
    return np.array(out)


def test_ikl_matches_an_explicit_double_loop_and_reduces_to_ce_on_equal_logits():
    g = torch.Generator().manual_seed(7)
    t_logits, s_logits = torch.randn(4, 5, generator=g) * 4, torch.randn(4, 5, generator=g) * 4
    ours = ikl_per_sample(s_logits, t_logits).double().numpy()
    np.testing.assert_allclose(ours, _ikl_double_loop(s_logits.double().numpy(), t_logits.double().numpy()),
                               rtol=1e-5)
    # IKL(z, z): the pair term vanishes, leaving the cross-entropy = the entropy of softmax(z).
    same = ikl_per_sample(t_logits, t_logits)
    p = F.softmax(t_logits, dim=1)
    assert torch.allclose(same, -(p * F.log_softmax(t_logits, dim=1)).sum(1), rtol=1e-6)
    # The code's batch form 0.25 * sum_bij w (.)^2 / sum_bij w + mean CE equals our per-sample mean.
    gap = (t_logits[:, :, None] - t_logits[:, None, :]) - (s_logits[:, :, None] - s_logits[:, None, :])
    q = F.softmax(t_logits / 100, dim=1)
    w = q[:, :, None] * q[:, None, :]
    batch_form = 0.25 * (gap ** 2 * w).sum() / w.sum() - (p * F.log_softmax(s_logits, 1)).sum(1).mean()
    assert float(ikl_per_sample(s_logits, t_logits).mean()) == pytest.approx(float(batch_form), rel=1e-5)
    # The CE target is detached (code), the pair weights are not: the teacher side still gets a gradient.
    t_req = t_logits.clone().requires_grad_(True)
    ikl_per_sample(s_logits, t_req).sum().backward()
    assert t_req.grad is not None and float(t_req.grad.abs().sum()) > 0


def test_uta_objective_with_gamma():
    g = torch.Generator().manual_seed(3)
    s_logits, t_logits = torch.randn(5, C, generator=g) * 2, torch.randn(5, C, generator=g) * 2
    p_t = F.softmax(t_logits, dim=1)
    s, pt = s_logits.double().numpy(), p_t.double().numpy()
    log_s = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    kl = (pt * (np.log(pt) - log_s)).sum(1)
    kl_u = (1.0 / C * (np.log(1.0 / C) - log_s)).sum(1)
    for gamma in (0.3, 0.5):
        np.testing.assert_allclose(uta_attack_loss(s_logits, p_t, gamma).double().numpy(), kl - gamma * kl_u,
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(uta_attack_loss(s_logits, p_t, 0.0).double().numpy(), kl, rtol=1e-5, atol=1e-6)
    assert FerdOptions().uta_gamma == 0.3 and FerdOptions().attack_gamma() == 0.3
    assert FerdOptions(uta=False).attack_gamma() == 0.0      # uta off = the code's gamma 0


def test_class_probabilities_margins_and_nonrobust_channels():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.5, 0.5]])
    y = torch.tensor([0, 1, 2])
    assert negative_margin(logits, y).tolist() == pytest.approx([-2.0, 3.0, 1.0])
    # r = (-2, 3, 1) -> min-max to [0.05, 0.2] -> (0.05, 0.2, 0.14) -> renormalised.
    p = class_probabilities(torch.tensor([-2.0, 3.0, 1.0]), torch.ones(3))
    raw = np.array([0.05, 0.2, 0.05 + 0.15 * 3 / 5])
    assert p.tolist() == pytest.approx((raw / raw.sum()).tolist())
    # Per-class means of several samples; an absent class takes the mean of the present ones.
    p = class_probabilities(torch.tensor([-4.0, 0.0, 6.0]), torch.tensor([2.0, 0.0, 3.0]))
    raw = np.array([0.05, 0.05 + 0.15 * 2 / 4, 0.2])                # r = (-2, 0, 2)
    assert p.tolist() == pytest.approx((raw / raw.sum()).tolist())
    assert class_probabilities(torch.ones(3), torch.ones(3)).tolist() == pytest.approx([1 / 3] * 3)
    assert class_probabilities(torch.zeros(3), torch.zeros(3)).tolist() == pytest.approx([1 / 3] * 3)
    # Channel 2 moves by 100%, channel 0 by 10%, channels 1 and 3 not at all.
    clean = torch.tensor([[1.0, 2.0, 1.0, 3.0], [1.0, 2.0, 1.0, 3.0]])
    adv = torch.tensor([[1.1, 2.0, 2.0, 3.0], [0.9, 2.0, 0.0, 3.0]])
    assert nonrobust_channel_mask(clean, adv, 0.5).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert nonrobust_channel_mask(clean, adv, 0.25).tolist() == [0.0, 0.0, 1.0, 0.0]


class ChannelTeacher(nn.Module):
    """Layer l = `features` (a 1x1 conv, 4 channels); the head reads channel 0 only (red - 0.5),
    so channel 0 decides the class and channels 1-3 are ignored."""

    def __init__(self):
        super().__init__()
        self.features, self.head = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            self.features.weight[0, 0], self.features.bias[0] = 1.0, -0.5
            for k in (1, 2, 3):
                self.features.weight[k, k % 3] = 0.5
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[0, 0], self.head.weight[1, 0] = 10.0, -10.0
        self.eval()

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _fit(teacher, x, beta):
    name, module, _ = find_ib_layer(teacher, x)
    ib = InformationBottleneck(module, name, steps=50, lr=0.1, beta=beta)
    try:
        y = teacher(x).argmax(1)
        with ib.recording():
            teacher(x)
        z = ib.recorded
        scale = ib.fit_noise(teacher, x, z, y, torch.Generator().manual_seed(0))
        logits, mask = ib.nonrobust_logits(teacher, x, y, torch.Generator().manual_seed(0))
    finally:
        ib.close()
    assert not module._forward_hooks
    return name, z, scale, mask, logits


def test_information_bottleneck_keeps_the_deciding_channel_low_noise():
    teacher = ChannelTeacher()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # Without the KL term (beta 0) only CE moves the noise: the ignored channels get no gradient and
    # keep softplus(0)^2 = 0.48, above every feature variance (~0.1) -> robust (mask 0); the channel
    # that decides the class has its noise pushed down -> non-robust (mask 1), in every sample.
    name, z, scale, mask, logits = _fit(teacher, x, beta=0.0)
    assert name == "features"
    variance = z.var(dim=(2, 3))
    assert float(variance.max()) < math.log(2) ** 2
    assert torch.allclose(scale[:, 1:], torch.full_like(scale[:, 1:], math.log(2)))
    assert float(scale[:, 0].square().max()) < float(variance.max())
    assert mask[:, 0].tolist() == [1.0] * 16 and mask[:, 1:].sum() == 0
    # f_{l+} ran on Z * m: only channel 0 kept, which the head reads, so the logits are the teacher's.
    assert torch.allclose(logits, teacher(x), atol=1e-5)
    # With the code's beta 0.3 the KL term draws each channel's noise variance to its own feature
    # variance v_bc; CE pushes the deciding channel's further below it. Every noise then stays under
    # the batch's largest variance: the code's rule calls all channels non-robust here.
    _, z, scale, mask, _ = _fit(teacher, x, beta=0.3)
    variance = z.var(dim=(2, 3))
    ratio = scale.square() / variance
    assert float(ratio[:, 0].mean()) < 0.5 * float(ratio[:, 1:].mean())
    assert float(ratio[:, 1:].mean()) == pytest.approx(1.0, abs=0.35)
    assert mask.sum() == mask.numel()


def test_ib_kl_and_mask_follow_the_code():
    v = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    s = torch.tensor([[1.0, 1.0], [0.5, 2.0]])
    expected = np.mean([0.5 * (vi / si ** 2 + math.log(si ** 2 / vi) - 1)
                        for vi, si in zip(v.flatten().tolist(), s.flatten().tolist())])
    assert float(ib_kl(v, s)) == pytest.approx(expected, rel=1e-5)
    assert float(ib_kl(v, v.sqrt())) == pytest.approx(0.0, abs=1e-6)
    # robust: noise variance above the batch's largest feature variance (2.0): only s = 2 (4.0 > 2).
    assert nonrobust_mask(s, v).tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_ib_layer_of_the_registered_architectures_and_hidden_layers():
    from robaudit.audit.models.architectures import (MobileNetV2, PreActResNet, SmallCNN, WideResNet,
                                              create_architecture)

    cifar, tiny = torch.rand(2, 3, 32, 32), torch.rand(2, *SHAPE)
    # WideResNet: bn1 (the BatchNorm under the final ReLU module, the code's pop 3); the others: the
    # last spatial map, or the BatchNorm whose output a parameter-free activation module takes.
    cases = [(WideResNet(depth=10, widen_factor=1), cifar, "bn1"), (create_architecture("resnet18", 10), cifar,
             "layer4"), (PreActResNet([1, 1, 1, 1]), cifar, "bn"), (MobileNetV2(), cifar, "bn2"),
             (SmallCNN(), cifar, "features"), (BNTeacher(), tiny, "bn2")]
    for model, x, expected in cases:
        name, _, _ = find_ib_layer(model.eval(), x)
        assert name == expected, (type(model).__name__, name)
    assert find_ib_layer(FragileBlueTeacher(), torch.rand(2, *SHAPE))[1] is None      # no spatial map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(BNTeacher())
    assert find_ib_layer(scripted, torch.rand(2, *SHAPE))[1] is None                   # hidden layers
    with pytest.raises(UserError, match="ib_layer 'head'"):
        find_ib_layer(BNTeacher(), torch.rand(2, *SHAPE), "head")
    assert find_ib_layer(BNTeacher(), torch.rand(2, *SHAPE), "conv1")[0] == "conv1"


def test_options_are_validated_with_one_line():
    assert FerdOptions.from_mapping({"fae": "false", "bank_eviction": "random"}).fae is False
    with pytest.raises(UserError, match="uta_weight.*replaced by uta_gamma"):
        FerdOptions.from_mapping({"uta_weight": 10})
    for name in ("student_loss", "generator_adv_loss", "nonrobust"):
        with pytest.raises(UserError, match=name):
            FerdOptions.from_mapping({name: "magic"})
    opts = FerdOptions.from_mapping({"uta_gamma": "0.5", "student_loss": "kl", "generator_adv_loss": "kl",
                                     "nonrobust": "fragility", "ib_layer": "block3"})
    assert FerdOptions.from_mapping(opts.as_dict()) == opts                            # round trip
    defaults = FerdOptions().as_dict()
    assert (defaults["uta_gamma"], defaults["student_loss"], defaults["generator_adv_loss"],
            defaults["nonrobust"]) == (0.3, "ikl", "ikl", "ib")
    from robaudit.remediate.ferd import FERD
    from robaudit.remediate.common import resolve_schedule
    for preset in ("shared", "paper"):   # FERD has one schedule, the authors' code's
        schedule = resolve_schedule(FERD, preset)
        assert (schedule["schedule"], schedule["weight_decay"], schedule["batch_size"], schedule["epochs"],
                schedule["milestones"]) == ("own", 5e-4, 256, 220, None)
    with pytest.raises(UserError, match="no option 'magic'"):
        FerdOptions.from_mapping({"magic": 1})
    with pytest.raises(UserError, match="bank_eviction"):
        FerdOptions.from_mapping({"bank_eviction": "lru"})
    with pytest.raises(UserError, match="true or false"):
        FerdOptions.from_mapping({"uta": "maybe"})
    assert default_warmup(220) == 20 and default_warmup(22) == 2 and default_warmup(1) == 0


# ================================================================= the bank
@pytest.mark.parametrize("eviction", ["oldest", "random"])
def test_bank_never_grows_past_its_cap(eviction):
    bank = SyntheticBank(capacity=20, eviction=eviction)
    sizes, storage = [], []
    for epoch in range(1, 7):
        ids = (epoch - 1) * 8 + torch.arange(8)
        bank.add(torch.rand(8, *SHAPE), torch.arange(8) % C, ids, epoch,
                 generator=torch.Generator().manual_seed(epoch))
        sizes.append(len(bank))
        storage.append(bank.nbytes())
    assert sizes == [8, 16, 20, 20, 20, 20]
    assert storage[2:] == [20 * 3 * 8 * 8] * 4 and bank.images.dtype == torch.uint8
    assert len(set(bank.ids.tolist())) == 20
    assert set(range(40, 48)) <= set(bank.ids.tolist())           # the newest batch is always kept
    if eviction == "oldest":
        assert sorted(bank.ids.tolist()) == list(range(28, 48))
    big = SyntheticBank(capacity=5)
    big.add(torch.rand(9, *SHAPE), torch.zeros(9, dtype=torch.long), torch.arange(9), 1)
    assert len(big) == 5 and big.ids.tolist() == [4, 5, 6, 7, 8]


def test_bank_growth_is_bounded_over_a_run(tmp_path):
    summary = run_ferd(config(tmp_path, {"bank_size": 20, "synthesis_batch_size": 8, "warmup": 1}, epochs=4),
                       teacher=teacher_model(), student_module=tiny_student())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert [h["method"]["bank_size"] for h in state["history"]] == [8, 16, 20, 20]
    assert summary["bank_size"] == 20
    assert state["bank"]["images"].shape == (20, *SHAPE)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["bank_size"]) for r in rows] == [8, 16, 20, 20]


# ================================================================= reweighting, teachers, switches
def test_class_probabilities_move_to_the_fragile_class_and_bn_loss_is_off_without_batchnorm(tmp_path, caplog):
    caplog.set_level("WARNING")
    summary = run_ferd(config(tmp_path, {"warmup": 1}, epochs=3), teacher=teacher_model(FragileBlueTeacher()),
                       student_module=tiny_student())
    probs = summary["training"]["class_probabilities"]
    assert probs[0] == pytest.approx([1 / 3] * 3)                 # epoch 1 samples uniformly
    for p in probs[1:]:
        assert max(range(C), key=lambda k: p[k]) == 2 and p[2] > 0.5   # blue: the least robust class
        assert sum(p) == pytest.approx(1.0) and min(p) >= 0.05 / (0.05 + 2 * 0.2) - 1e-6
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [float(r["class_probs:blue"]) for r in rows] == pytest.approx([p[2] for p in probs], abs=1e-6)
    margins = [float(rows[0][f"teacher_neg_margin:{c}"]) for c in CLASSES]
    assert margins[2] > max(margins[:2])
    # No BatchNorm in this teacher: the BN term is off, said in the log and in the results, and the run trained.
    options = summary["training"]["options"]
    assert options["method"]["bn_loss_active"] is False
    assert any("BN-statistics loss off" in n for n in options["notes"])
    assert "BN-statistics loss off" in caplog.text
    assert all(r["gen_bn"] == "" for r in rows) and all(r["gen_oh"] != "" for r in rows)
    assert rows[0]["phase"] == "warmup" and rows[1]["phase"] == "distill" and rows[1]["loss"] != ""
    # No spatial layer for the information bottleneck: FAE falls back to the fragility substitute on the
    # head (an nn.Linear with C outputs), says so, and L_uni starts in epoch 2 (after the first measurement).
    assert options["method"]["fae_active"] is True and rows[0]["gen_uni"] == "" and rows[1]["gen_uni"] != ""
    assert options["method"]["nonrobust"] == "ib" and options["method"]["nonrobust_active"] == "fragility"
    assert any("fell back to nonrobust=fragility" in n and "robaudit's substitute" in n for n in options["notes"])
    # Cosine over all 3 epochs, stepped every epoch, warm-up included (test.py): epoch 2 trains at step 1.
    history = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    assert history[0]["lr"] is None
    assert [h["lr"] for h in history[1:]] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2)])
    assert "cosine over all epochs" in options["schedule"]


def test_default_run_uses_the_information_bottleneck_and_records_the_choices(tmp_path):
    teacher = BNTeacher()
    summary = run_ferd(config(tmp_path, {"warmup": 1}), teacher=teacher_model(teacher), student_module=tiny_student())
    assert all(not m._forward_hooks for m in teacher.modules())          # BN taps and the IB hook removed
    options = summary["training"]["options"]
    method = options["method"]
    assert (method["uta_gamma"], method["student_loss"], method["generator_adv_loss"], method["nonrobust"]) == \
        (0.3, "ikl", "ikl", "ib")
    assert method["nonrobust_active"] == "ib" and method["ib_layer_active"] == "bn2"
    assert method["uta_gamma_active"] == 0.3
    assert not any("substitute" in n for n in options["notes"])
    rows = read_metrics(tmp_path / "metrics.csv")
    # The IB runs on every generator step: L_uni from epoch 1.
    assert all(r["gen_uni"] != "" and 0.0 <= float(r["gen_nonrobust_share"]) <= 1.0 for r in rows)
    assert rows[1]["student_loss_adv:red"] != "" or rows[1]["student_loss_adv:green"] != "" or \
        rows[1]["student_loss_adv:blue"] != ""
    # nonrobust=fragility (robaudit's substitute) with the plain-KL losses and gamma 0: labelled in the notes.
    frag = run_ferd(config(tmp_path / "frag", {"warmup": 1, "nonrobust": "fragility", "student_loss": "kl",
                                               "generator_adv_loss": "kl", "uta_gamma": 0.0}),
                    teacher=teacher_model(), student_module=tiny_student())
    options = frag["training"]["options"]
    assert options["method"]["nonrobust_active"] == "fragility" and options["method"]["ib_layer_active"] is None
    assert any(n.startswith("Non-robust channels from robaudit's substitute") for n in options["notes"])
    rows = read_metrics(tmp_path / "frag" / "metrics.csv")
    assert rows[0]["gen_uni"] == "" and rows[1]["gen_uni"] != ""


def test_teacher_without_gradients_is_refused_with_one_line(tmp_path):
    teacher = teacher_model(white_box=False, refusal="this ONNX model runs in onnxruntime without gradients")
    with pytest.raises(UserError, match=r"back-propagating through the teacher.*onnxruntime.*pass the teacher as"):
        run_ferd(config(tmp_path), teacher=teacher, student_module=tiny_student())
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="more epochs"):
        run_ferd(config(tmp_path, {"warmup": 2}), teacher=teacher_model(), student_module=tiny_student())
    with pytest.raises(UserError, match="cosine"):
        run_ferd(config(tmp_path, milestones=(1,)), teacher=teacher_model(), student_module=tiny_student())


def test_all_switches_off_runs_the_plain_data_free_baseline(tmp_path):
    summary = run_ferd(config(tmp_path, {"fae": False, "reweight": False, "uta": False}),
                       teacher=teacher_model(), student_module=tiny_student())
    records = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    assert all(p == pytest.approx([1 / 3] * 3) for p in summary["training"]["class_probabilities"])
    assert all("teacher_neg_margin" not in r["method"] for r in records)      # no teacher attack at all
    assert all(r["method"]["gen_uni"] is None for r in records)
    assert all(r["method"]["gen_bn"] is not None for r in records)             # BNTeacher: L_bn on
    assert records[-1]["loss"] is not None and math.isfinite(records[-1]["loss"])
    assert summary["training"]["options"]["method"]["fae"] is False


# ================================================================= resume
@pytest.mark.parametrize("reset_generator,nonrobust", [(True, "ib"), (False, "fragility")])
def test_resume_is_bitwise_equal_to_a_straight_run(tmp_path, monkeypatch, reset_generator, nonrobust):
    import robaudit.remediate.ferd as ferd

    options = {"warmup": 0, "bank_size": 20, "reset_generator": reset_generator, "nonrobust": nonrobust}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ferd(config(straight, options, epochs=2), teacher=teacher_model(), student_module=tiny_student())
    # 1 epoch + resume + 1: the cosine schedule depends on the total, so the first run is a
    # 2-epoch run interrupted in epoch 2 (after its checkpoint of epoch 1).
    real = ferd._student_epoch

    class Interrupted(Exception):
        pass

    def interrupt_epoch_2(*args, **kwargs):
        if args[6] == 2:      # (student, teacher, bank, optimizer, opts, cfg, epoch, ...)
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(ferd, "_student_epoch", interrupt_epoch_2)
    with pytest.raises(Interrupted):
        run_ferd(config(split, options, epochs=2), teacher=teacher_model(), student_module=tiny_student())
    monkeypatch.setattr(ferd, "_student_epoch", real)
    assert torch.load(split / "checkpoint.pt", weights_only=True)["epoch"] == 1
    torch.manual_seed(1234)          # the global RNG state comes from the checkpoint
    run_ferd(config(split, options, epochs=2, resume=True), teacher=teacher_model(),
             student_module=tiny_student(seed=99))
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    # Bitwise: the resumed run repeats the straight run's kernel calls on the same batches
    # from the same saved state (RNG included), in this process.
    assert a["epoch"] == b["epoch"] == 2
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    for key in ("images", "labels", "ids", "epochs"):
        assert torch.equal(a["bank"][key], b["bank"][key]), key
    assert torch.equal(a["class_probs"], b["class_probs"])
    if nonrobust == "ib":          # the mask is re-fitted on every generator step, nothing to carry over
        assert a["nonrobust_mask"] is None and b["nonrobust_mask"] is None
    else:
        assert torch.equal(a["nonrobust_mask"], b["nonrobust_mask"])
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    def without_seconds(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(path)]

    assert without_seconds(straight / "metrics.csv") == without_seconds(split / "metrics.csv")
    with pytest.raises(UserError, match="cannot resume.*bank_size"):
        run_ferd(config(split, {**options, "bank_size": 30}, epochs=2, resume=True), teacher=teacher_model(),
                 student_module=tiny_student())


# ================================================================= end to end
def test_end_to_end_exports_audits_and_reports_synthetic_examples(tmp_path):
    g = torch.Generator().manual_seed(5)
    y = torch.arange(C).repeat_interleave(4)
    test_data = EvalData(name="synthetic", split="test", x=torch.rand(len(y), *SHAPE, generator=g), y=y,
                         index=torch.arange(len(y)), classes=list(CLASSES),
                         subset={"limit": None, "n_per_class": 4, "total_in_split": len(y)}, source="tests")
    cfg = config(tmp_path, {"image_shape": None}, export_formats=("pt2",), audit_attacks=("clean", "pgd"),
                 audit_overrides={"pgd": {"steps": 2}}, audit_batch_size=64)
    summary = run_ferd(cfg, teacher=teacher_model(), test_data=test_data, student_module=tiny_student())
    assert summary["exports"]["pt2"]["ok"] and summary["selected_epoch"] == 2 and summary["best"] is None
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    training = results["training"]
    assert training["method"] == "ferd" and training["teacher"] == "tiny-teacher"
    assert training["options"]["data_free"] is True and training["epochs"] == 2
    for key, value in (("uta_gamma", 0.3), ("student_loss", "ikl"), ("generator_adv_loss", "ikl"),
                       ("nonrobust", "ib")):
        assert training["options"]["method"][key] == value
    assert len(training["class_probabilities"]) == 2 and all(len(p) == C for p in training["class_probabilities"])
    examples = training["synthetic_examples"]
    assert {e["class"] for e in examples} <= set(CLASSES) and examples
    from PIL import Image
    import io

    image = Image.open(io.BytesIO(base64.b64decode(examples[0]["png"])))
    assert image.size[1] == 8 and image.size[0] in (8, 17, 26)       # up to 3 images, 1 px gaps
    assert set(results["attacks"]) == {"clean", "pgd"}
    assert (tmp_path / "student" / "report.html").exists()


def test_onnx_teacher_distills_and_says_whether_the_bn_loss_ran(tmp_path):
    """The issue's user: an ONNX teacher and no data. robaudit converts it (onnx2torch) and
    FERD runs; the BN-statistics loss runs exactly when the converted graph still has
    BatchNorm modules to hook, and the results say which."""
    from robaudit.audit.models.loading import load_model

    path = tmp_path / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(BNTeacher(), (torch.rand(2, *SHAPE),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    teacher = load_model(str(path), num_classes=C, input_shape=SHAPE, dataset_classes=list(CLASSES))
    assert teacher.white_box
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.module.modules())
    summary = run_ferd(config(tmp_path / "run"), teacher=teacher, student_module=tiny_student())
    options = summary["training"]["options"]
    assert options["method"]["bn_loss_active"] is has_bn
    assert any("BN-statistics loss off" in n for n in options["notes"]) is (not has_bn)
    # The converted graph keeps hookable modules: the IB runs on it, else the fallback is said.
    active = options["method"]["nonrobust_active"]
    assert active == "ib" or any("fell back to nonrobust=fragility" in n for n in options["notes"])
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 2 and all((r["gen_bn"] != "") is has_bn for r in rows)
    assert rows[-1]["loss"] != "" and math.isfinite(float(rows[-1]["loss"]))


def test_class_specificity_note_follows_the_teacher_agreement():
    from robaudit.remediate.ferd import class_specificity_note

    def history(shares):
        return [{"method": {"gen_teacher_agree": s}} for s in shares]

    note = class_specificity_note(history([0.19, 0.23, 0.20]), num_classes=10)
    assert note is not None and "only 21%" in note and "3 epochs" in note and "chance is 10%" in note
    assert "g_steps" in note and "bn_weight" in note
    assert class_specificity_note(history([0.4, 0.7]), num_classes=10) is None        # mean 0.55
    assert class_specificity_note(history([0.5]), num_classes=10) is None               # the threshold itself
    assert class_specificity_note(history([None, None]), num_classes=10) is None        # older checkpoints
    assert class_specificity_note(history([0.6]), num_classes=10, threshold=0.7) is not None


def test_teacher_agreement_is_recorded_per_epoch_and_drives_the_note(tmp_path):
    summary = run_ferd(config(tmp_path), teacher=teacher_model(), student_module=tiny_student())
    rows = read_metrics(tmp_path / "metrics.csv")
    shares = [float(r["gen_teacher_agree"]) for r in rows]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
    # 12 images per batch: each share is a multiple of 1/12.
    assert all(abs(s * 12 - round(s * 12)) < 1e-6 for s in shares)
    notes = summary["training"]["options"]["notes"]
    low = sum(shares) / len(shares) < 0.5
    assert any("weakly class-specific" in n for n in notes) is low
