"""Remediation methods: the ABSLD update by hand, reference_compat against the paper
form, every method's loss against an independent torch.nn.functional computation,
Fair-ARD / CFA class quantities, and exact state round trips.

Tiny seeded conv nets with BatchNorm and 3x8x8 inputs; each test takes well under a second.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robaudit.audit.rng import per_sample_normal, per_sample_uniform
from robaudit.errors import UserError
from robaudit.remediate.adversarial_training import cfa_class_beta, cfa_class_eps
from robaudit.remediate.base import batch_method_names, create_method, list_methods
from robaudit.remediate.distillation import ABSLD, absld_temperature_update, default_tau_bounds, fair_ard_weights

C = 4
EPS = 8 / 255
STEP = 2 / 255
STEPS = 2
SEED = 3
EPOCH = 2


def make_student(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm (train/eval mode matters) + linear head; starts in train mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, C))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.train()


def make_batch(n: int = 12):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 8, 8, generator=generator)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 0, 3, 1, 0])[:n]
    index = torch.arange(100, 100 + n)
    teacher_logits = 3 * torch.randn(n, C, generator=generator)
    return x, y, index, teacher_logits


def new_method(name: str, **options):
    method = create_method(name, C, eps=EPS, step_size=STEP, steps=STEPS, seed=SEED, **options)
    method.configure(epochs=10, lr_milestones=(5, 8))
    return method


# ---------------------------------------------------------------- independent reference pieces
def reference_pgd(loss_fn, x, start, eps, steps=STEPS, step=STEP):
    """Plain sign-gradient PGD written out here, independent of audit/attacks/ascent.py.

    Independent code, not other arithmetic: the same torch ops in the same order (kl_div or
    cross_entropy, sign, max/min, clamp) on the same batch of the same weights, so its
    x_adv equals the methods' bit for bit on any CPU (a sign step would turn any
    last-bit difference into a 2/255 one, which atol 1e-6 in check_method does not hide)."""
    x_adv = torch.min(torch.max(start, x - eps), x + eps).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv).sum(), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def gaussian_start(x, index, epoch=EPOCH):
    # Documented stream: epoch * 16 + 0 for the random start.
    return x + 0.001 * per_sample_normal(SEED, index, x.shape[1:], stream=epoch * 16)


def uniform_start(x, index, eps, epoch=EPOCH):
    return x + (2 * per_sample_uniform(SEED, index, x.shape[1:], stream=epoch * 16) - 1) * eps


def kl_rows(student_logits, target_probs):
    """KL(target || softmax(student)) per row, via nn.KLDivLoss."""
    return nn.KLDivLoss(reduction="none")(F.log_softmax(student_logits, dim=1), target_probs).sum(1)


def distillation_attack(model, target, x, index):
    model.eval()
    x_adv = reference_pgd(lambda xa: kl_rows(model(xa), target), x, gaussian_start(x, index), EPS)
    model.train()
    return x_adv


# ================================================================= ABSLD temperature update
def test_temperature_update_by_hand_with_clamp():
    tau = torch.tensor([0.55, 4.95, 1.0, 2.0])
    risk = torch.tensor([4.0, 0.0, 2.0, 2.0])     # mean 2 -> gap [2, -2, 0, 0], max |gap| 2
    new = absld_temperature_update(tau, risk, beta=0.1, tau_min=0.5, tau_max=5.0)
    # 0.55 - 0.1 = 0.45 -> clamped to 0.5; 4.95 + 0.1 = 5.05 -> clamped to 5; others unchanged.
    torch.testing.assert_close(new, torch.tensor([0.5, 5.0, 1.0, 2.0]))
    risk = torch.tensor([3.0, 1.0, 1.5, 0.5])     # mean 1.5 -> gap [1.5, -0.5, 0, -1], max 1.5
    new = absld_temperature_update(torch.ones(4), risk, beta=0.1, tau_min=0.5, tau_max=5.0)
    torch.testing.assert_close(new, torch.tensor([1 - 0.1, 1 + 0.1 / 3, 1.0, 1 + 0.1 / 1.5]))


def test_temperature_update_zero_gap_skips_and_absent_class_is_ignored():
    tau = torch.tensor([0.7, 1.3, 2.0])
    same = absld_temperature_update(tau, torch.full((3,), 0.8), beta=0.1, tau_min=0.5, tau_max=5.0)
    assert torch.equal(same, tau)                  # no division by zero, no NaN
    present = torch.tensor([True, True, False])
    risk = torch.tensor([2.0, 1.0, 0.0])           # class 2 absent: mean over present = 1.5
    new = absld_temperature_update(tau, risk, beta=0.1, tau_min=0.5, tau_max=5.0, present=present)
    torch.testing.assert_close(new, torch.tensor([0.6, 1.4, 2.0]))


def set_epoch_risks(method, counts, risk_adv_sums, risk_nat_sums):
    """Put hand-made per-class risk sums into the epoch tallies (as the batches would)."""
    method.tally.zero_()
    method.tally[:, 0] = torch.tensor(counts, dtype=torch.float32)
    method.tally[:, 1] = torch.tensor(risk_adv_sums, dtype=torch.float32)
    method.tally[:, 2] = torch.tensor(risk_nat_sums, dtype=torch.float32)


def spec_update(tau, risk, beta, lo, hi):
    mean = sum(risk) / len(risk)
    gap = [r - mean for r in risk]
    scale = max(abs(g) for g in gap)
    if scale == 0:
        return list(tau)
    return [min(max(t - beta * g / scale, lo), hi) for t, g in zip(tau, gap)]


def test_absld_end_epoch_follows_spec_with_beta_decay_at_milestones():
    method = create_method("absld", C)
    method.configure(epochs=6, lr_milestones=(2, 4))
    tau_adv, tau_nat = [1.0] * C, [1.0] * C
    risks_adv = [[2.0, 1.0, 0.5, 0.5], [1.0, 3.0, 0.0, 1.0], [0.2, 0.1, 0.4, 0.3], [5.0, 1.0, 1.0, 1.0]]
    risks_nat = [[0.5, 1.0, 1.0, 1.5], [2.0, 2.0, 2.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]
    expected_beta = [0.1, 0.01, 0.01, 0.001]      # decay at milestone m happens before epoch m's update
    for epoch, (r_adv, r_nat, beta) in enumerate(zip(risks_adv, risks_nat, expected_beta), start=1):
        counts = [2, 2, 2, 2]
        set_epoch_risks(method, counts, [2 * r for r in r_adv], [2 * r for r in r_nat])
        record = method.end_epoch(epoch)
        tau_adv = spec_update(tau_adv, r_adv, beta, 0.5, 5.0)
        tau_nat = spec_update(tau_nat, r_nat, beta, 0.5, 5.0)
        assert record["beta"] == pytest.approx(beta)
        assert record["tau_adv"] == pytest.approx(tau_adv, abs=1e-6)
        assert record["tau_nat"] == pytest.approx(tau_nat, abs=1e-6)
        assert record["train_risk_adv"] == pytest.approx(r_adv, abs=1e-6)
    assert method.tally.abs().sum() == 0           # tallies reset for the next epoch


def test_absld_adapt_adv_only_keeps_tau_nat():
    method = create_method("absld", C, adapt="adv")
    method.configure(epochs=3, lr_milestones=())
    set_epoch_risks(method, [1, 1, 1, 1], [2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 2.0])
    record = method.end_epoch(1)
    assert record["tau_nat"] == [1.0] * C
    assert record["tau_adv"] == pytest.approx([0.9, 1.0, 1.0, 1.1])


def test_mean_risks_versus_summed_risks_with_unequal_class_counts():
    # Class 0 has 1 sample of risk 2, class 1 has 3 samples of risk 1 each (sum 3):
    # the mean calls class 0 harder, the sum (Alg. 1 / the code) calls class 1 harder.
    mean_method, sum_method = create_method("absld", 2), create_method("absld", 2, risk="sum")
    for method in (mean_method, sum_method):
        method.configure(epochs=3, lr_milestones=())
        set_epoch_risks(method, [1, 3], [2.0, 3.0], [2.0, 3.0])
    assert mean_method.end_epoch(1)["tau_adv"] == pytest.approx([0.9, 1.1])
    assert sum_method.end_epoch(1)["tau_adv"] == pytest.approx([1.1, 0.9])
    assert create_method("absld", 2, reference_compat=True).risk == "sum"


def test_default_tau_bounds_table():
    assert default_tau_bounds("cifar10", "resnet18") == (0.5, 5.0)
    assert default_tau_bounds("cifar10", "mobilenetv2") == (0.5, 5.0)
    assert default_tau_bounds("cifar100", "resnet18") == (0.8, 3.0)
    assert default_tau_bounds("cifar100", "mobilenetv2") == (0.5, 5.0)
    assert default_tau_bounds("tiny-imagenet", "preactresnet18") == (0.9, 1.1)
    method = create_method("absld", C, dataset="CIFAR-100", student_arch="ResNet-18")
    assert (method.tau_min, method.tau_max) == (0.8, 3.0)
    assert create_method("absld", C, tau_bounds=(0.25, 2)).options()["tau_bounds"] == [0.25, 2.0]


# ================================================================= paper vs reference_compat
def with_temperatures(method, tau_adv, tau_nat):
    method.tau_adv = torch.tensor(tau_adv)
    method.tau_nat = torch.tensor(tau_nat)
    return method


def test_reference_compat_aliases_the_two_temperatures():
    _, y, _, z = make_batch()
    tau_adv, tau_nat = [0.5, 2.0, 1.0, 3.0], [4.0, 0.8, 1.0, 1.5]
    paper = with_temperatures(new_method("absld"), tau_adv, tau_nat)
    compat = with_temperatures(new_method("absld", reference_compat=True), tau_adv, tau_nat)
    t_adv, t_nat = torch.tensor(tau_adv)[y], torch.tensor(tau_nat)[y]
    p_adv, p_nat = paper.soft_labels(z, y)
    torch.testing.assert_close(p_adv, F.softmax(z / t_adv[:, None], dim=1))
    torch.testing.assert_close(p_nat, F.softmax(z / t_nat[:, None], dim=1))
    c_adv, c_nat = compat.soft_labels(z, y)
    aliased = F.softmax(z / (t_adv * t_nat)[:, None], dim=1)   # effective range [0.25, 25]
    torch.testing.assert_close(c_adv, aliased)
    torch.testing.assert_close(c_nat, aliased)
    assert not torch.allclose(c_adv, p_adv)


def test_reference_compat_changes_the_loss_value_not_its_gradient():
    x, y, index, z = make_batch()
    tau_adv, tau_nat = [0.5, 2.0, 1.0, 3.0], [4.0, 0.8, 1.0, 1.5]
    aliased = [a * b for a, b in zip(tau_adv, tau_nat)]
    # The paper form at the compat run's effective temperatures isolates the log(...) change.
    paper = with_temperatures(new_method("absld"), aliased, aliased)
    compat = with_temperatures(new_method("absld", reference_compat=True), tau_adv, tau_nat)
    student_a, student_b = make_student(), make_student()
    loss_paper, _ = paper.loss(student_a, z, x, y, index, EPOCH)
    loss_compat, _ = compat.loss(student_b, z, x, y, index, EPOCH)
    p = F.softmax(z / torch.tensor(aliased)[y][:, None], dim=1)
    # Per sample the compat KL adds sum p * (log(p + 1e-5) - log p); both terms share p here.
    offset = (p * (torch.log(p + 1e-5) - torch.log(p))).sum(1).mean()
    # The attack is bitwise the same in both (the same kl_div on the same p); the losses are
    # two formulas and their small difference is compared: float32 rounding of the losses
    # (~1e-7) is the atol.
    torch.testing.assert_close(loss_compat - loss_paper, 0.1 * offset, rtol=1e-4, atol=1e-7)
    assert abs(float(offset)) > 1e-6
    loss_paper.backward()
    loss_compat.backward()
    for pa, pb in zip(student_a.parameters(), student_b.parameters()):  # log(softmax) vs log_softmax
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7)


# ================================================================= losses vs independent computations
def rslad_reference(model, target_adv, target_nat, x, y, index, weights=None, alpha=5 / 6, scale=0.1):
    x_adv = distillation_attack(model, target_adv, x, index)
    kl_adv, kl_nat = kl_rows(model(x_adv), target_adv), kl_rows(model(x), target_nat)
    if weights is not None:
        kl_adv, kl_nat = weights * kl_adv, weights * kl_nat
    return x_adv, scale * (alpha * kl_adv.mean() + (1 - alpha) * kl_nat.mean())


def check_method(method, reference_x_adv, reference_loss, x, y, index, z, student, max_eps=EPS):
    x_adv = method.attack(copy.deepcopy(student), z, x, y, index, EPOCH)
    torch.testing.assert_close(x_adv, reference_x_adv, rtol=0, atol=1e-6)  # bitwise: see reference_pgd
    assert (x_adv - x).abs().max() <= max_eps + 1e-6
    loss, stats = method.loss(student, z, x, y, index, EPOCH)
    assert student.training
    # The same x_adv, other reductions (per-sample sums and means in another order): float32
    # rounding, ~1e-7 relative; a wrong weight, temperature or term is O(1e-2) or more.
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(stats["loss"])


def test_rslad_loss_matches_independent_computation():
    x, y, index, z = make_batch()
    student = make_student()
    p = F.softmax(z, dim=1)
    # The code's loss: the B x C elementwise mean of the KL terms = batch-mean KL / C.
    x_adv = distillation_attack(copy.deepcopy(student), p, x, index)
    ref_model = copy.deepcopy(student)

    def code_loss(log_q, target):
        return nn.KLDivLoss(reduction="none")(log_q, target).mean()

    expected = (5 / 6 * code_loss(F.log_softmax(ref_model(x_adv), 1), p)
                + 1 / 6 * code_loss(F.log_softmax(ref_model(x), 1), p))
    check_method(new_method("rslad"), x_adv, expected * C / 10, x, y, index, z, student)
    # For C = 10 the default scale is exactly the code's elementwise mean.
    assert new_method("rslad").loss_scale == pytest.approx(0.1)


def test_absld_loss_matches_independent_computation():
    x, y, index, z = make_batch()
    tau_adv, tau_nat = [0.6, 2.5, 1.0, 4.0], [1.2, 0.7, 3.0, 1.0]
    student = make_student()
    p_adv = F.softmax(z / torch.tensor(tau_adv)[y][:, None], dim=1)
    p_nat = F.softmax(z / torch.tensor(tau_nat)[y][:, None], dim=1)
    x_adv, expected = rslad_reference(copy.deepcopy(student), p_adv, p_nat, x, y, index)
    method = with_temperatures(new_method("absld"), tau_adv, tau_nat)
    check_method(method, x_adv, expected, x, y, index, z, student)
    # The tallied risks are the CE of the train-mode logits of the loss's forward passes.
    ce_adv = F.cross_entropy(make_student()(x_adv), y, reduction="none")   # same weights, train mode
    counts = torch.bincount(y, minlength=C).float()
    risk_adv, _, _ = method.class_risks()
    torch.testing.assert_close(risk_adv, torch.zeros(C).index_add(0, y, ce_adv.detach()) / counts,
                               rtol=1e-5, atol=1e-6)


def test_absld_classwise_mean_and_plain_batch_mean_options():
    x, y, index, z = make_batch()
    student = make_student()
    p = F.softmax(z, dim=1)
    ref = copy.deepcopy(student)
    x_adv = distillation_attack(copy.deepcopy(student), p, x, index)
    kl_adv, kl_nat = kl_rows(ref(x_adv), p), kl_rows(ref(x), p)

    def classwise(values):
        return torch.stack([values[y == k].mean() for k in y.unique()]).mean()

    expected = 5 / 6 * classwise(kl_adv) + 1 / 6 * classwise(kl_nat)   # loss_scale 1 = plain batch mean
    method = new_method("absld", classwise_mean=True, loss_scale=1.0)
    check_method(method, x_adv, expected, x, y, index, z, student)


def test_fair_rslad_loss_uses_class_weights():
    x, y, index, z = make_batch()
    student = make_student()
    weights = torch.tensor([2.0, 5 / 6, 1.0, 2.5])
    method = new_method("fair-rslad")
    method.fair.weights = weights.clone()
    p = F.softmax(z, dim=1)
    x_adv, expected = rslad_reference(copy.deepcopy(student), p, p, x, y, index, weights=weights[y])
    check_method(method, x_adv, expected, x, y, index, z, student)


def test_absld_with_fair_ard_reweighting_multiplies_both_terms():
    x, y, index, z = make_batch()
    student = make_student()
    weights = torch.tensor([1.5, 0.9, 1.0, 2.0])
    method = with_temperatures(new_method("absld", reweight="fair-ard"), [0.5, 1, 2, 1], [1, 1, 3, 1])
    method.fair.weights = weights.clone()
    p_adv = F.softmax(z / torch.tensor([0.5, 1, 2, 1.0])[y][:, None], dim=1)
    p_nat = F.softmax(z / torch.tensor([1, 1, 3, 1.0])[y][:, None], dim=1)
    x_adv, expected = rslad_reference(copy.deepcopy(student), p_adv, p_nat, x, y, index, weights=weights[y])
    check_method(method, x_adv, expected, x, y, index, z, student)
    assert "own construction" in ABSLD.__doc__


def test_sat_loss_matches_independent_computation():
    x, y, index, _ = make_batch()
    student = make_student()
    model = copy.deepcopy(student).eval()
    x_adv = reference_pgd(lambda xa: F.cross_entropy(model(xa), y, reduction="none"), x,
                          uniform_start(x, index, EPS), EPS)
    expected = F.cross_entropy(copy.deepcopy(student).train()(x_adv), y)
    check_method(new_method("sat"), x_adv, expected, x, y, index, None, student)


def trades_reference(student, x, y, index, eps, beta_per_sample=None, beta=6.0, normalised=False):
    model = copy.deepcopy(student).eval()
    with torch.no_grad():
        p_eval = F.softmax(model(x), dim=1)
    x_adv = reference_pgd(lambda xa: kl_rows(model(xa), p_eval), x, gaussian_start(x, index), eps)
    train_model = copy.deepcopy(student).train()
    logits_nat = train_model(x)
    logits_adv = train_model(x_adv)
    if not normalised:
        batchmean = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1))
        return x_adv, F.cross_entropy(logits_nat, y) + beta * batchmean
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    kl = kl_rows(logits_adv, F.softmax(logits_nat, 1))
    return x_adv, ((ce + beta_per_sample * kl) / (1 + beta_per_sample)).mean()


def test_trades_loss_matches_independent_computation():
    x, y, index, _ = make_batch()
    student = make_student()
    x_adv, expected = trades_reference(student, x, y, index, EPS)
    check_method(new_method("trades"), x_adv, expected, x, y, index, None, student)


def test_cfa_trades_loss_with_calibrated_eps_and_beta():
    x, y, index, _ = make_batch()
    student = make_student()
    method = new_method("cfa", calibration_start=1)
    robust = torch.tensor([0.1, 0.5, 0.9, 0.3])
    method.train_robust = robust.clone()
    eps_y = ((0.3 + robust) * EPS)[y].view(-1, 1, 1, 1)
    beta_y = ((0.5 + robust) * 6.0)[y]
    x_adv, expected = trades_reference(student, x, y, index, eps_y, beta_per_sample=beta_y, normalised=True)
    check_method(method, x_adv, expected, x, y, index, None, student, max_eps=float(eps_y.max()))
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) <= eps_y.flatten() + 1e-6).all()


def test_cfa_at_base_uses_calibrated_uniform_start_and_ce():
    x, y, index, _ = make_batch()
    student = make_student()
    method = new_method("cfa", base="at", calibration_start=1)
    robust = torch.tensor([0.2, 0.4, 0.6, 0.8])
    method.train_robust = robust.clone()
    eps_y = ((0.5 + robust) * EPS)[y].view(-1, 1, 1, 1)      # lambda1 = 0.5 on AT
    model = copy.deepcopy(student).eval()
    x_adv = reference_pgd(lambda xa: F.cross_entropy(model(xa), y, reduction="none"), x,
                          uniform_start(x, index, eps_y), eps_y)
    expected = F.cross_entropy(copy.deepcopy(student).train()(x_adv), y)
    check_method(method, x_adv, expected, x, y, index, None, student, max_eps=float(eps_y.max()))


# ================================================================= Fair-ARD and CFA quantities
def test_fair_ard_weights_from_given_kappas():
    kappa_bar = [10.0, 5.0, 2.0, 0.5]
    raw = [(k + 1e-5) ** -2 for k in kappa_bar]
    scaled = [r * 4 / sum(raw) for r in raw]
    expected = [min(max(s, 5 / 6), 5 / 2) for s in scaled]
    torch.testing.assert_close(fair_ard_weights(torch.tensor(kappa_bar)), torch.tensor(expected))
    assert expected[0] == pytest.approx(5 / 6) and expected[-1] == pytest.approx(5 / 2)   # both clamps hit


class ConstantLogits(nn.Module):
    """Predicts class 0 whatever the input (input kept in the graph for the attack's gradient)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([3.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(x.shape[0], C) + 0.0 * x.mean(dim=(1, 2, 3))[:, None]


def test_fair_rslad_counts_kappa_over_attack_iterations():
    x, y, index, z = make_batch()
    method = create_method("fair-rslad", C, steps=3)
    method.configure(epochs=2, lr_milestones=())
    method.loss(ConstantLogits(), z, x, y, index, 1)
    record = method.end_epoch(1)
    # Class 0 samples are correct at all 3 counted iterations (start + 2 steps; the final
    # point is not counted), the others at none.
    assert record["kappa_bar"] == [3.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(method.fair.weights, fair_ard_weights(torch.tensor([3.0, 0, 0, 0])))


def test_cfa_class_eps_and_beta():
    robust = torch.tensor([0.2, 0.5, 0.8])
    torch.testing.assert_close(cfa_class_eps(robust, 8 / 255, 0.3), torch.tensor([0.5, 0.8, 1.1]) * 8 / 255)
    torch.testing.assert_close(cfa_class_beta(robust, 6.0, 0.5), torch.tensor([4.2, 6.0, 7.8]))


def test_cfa_calibration_starts_from_measured_train_robustness():
    method = create_method("cfa", C)
    method.configure(epochs=200, lr_milestones=(100, 150))
    assert (method.calibration_start, method.averaging_start) == (11, 51)
    method.configure(epochs=40, lr_milestones=(20, 30))
    assert (method.calibration_start, method.averaging_start) == (3, 11)
    method.tally[:, 0] = torch.tensor([10.0, 10, 5, 4])
    method.tally[:, 3] = torch.tensor([5.0, 2, 5, 1])            # robust-correct counts
    record = method.end_epoch(2)                                  # epoch 3 is calibrated
    robust = torch.tensor([0.5, 0.2, 1.0, 0.25])
    assert record["class_eps"] == pytest.approx(((0.3 + robust) * 8 / 255).tolist())
    assert record["class_beta"] == pytest.approx(((0.5 + robust) * 6).tolist())
    torch.testing.assert_close(method.class_eps(2), torch.full((C,), 8 / 255))   # before the start


def test_cfa_fawa_averages_only_when_worst_validation_class_passes():
    method = create_method("cfa", C, averaging_start=1)
    method.configure(epochs=10, lr_milestones=())
    student = nn.Linear(2, C)
    with torch.no_grad():
        student.weight.fill_(1.0)
    worst = {"value": 0.3}
    val = lambda model, steps: torch.tensor([0.9, worst["value"], 0.5, 0.6])   # noqa: E731
    assert method.eval_model(student) is student
    assert method.end_epoch(1, student=student, val_robust=val)["fawa_updated"]
    with torch.no_grad():
        student.weight.fill_(3.0)
    method.end_epoch(2, student=student, val_robust=val)
    torch.testing.assert_close(method.eval_model(student).weight, torch.full((C, 2), 0.85 * 1 + 0.15 * 3))
    worst["value"] = 0.1                                          # below delta = 0.2: skipped
    with torch.no_grad():
        student.weight.fill_(10.0)
    assert not method.end_epoch(3, student=student, val_robust=val)["fawa_updated"]
    torch.testing.assert_close(method.eval_model(student).weight, torch.full((C, 2), 1.3))


# ================================================================= registry and state
def test_registry_lists_all_methods_and_rejects_unknown_input():
    assert set(list_methods()) == {"absld", "rslad", "sat", "trades", "fair-rslad", "cfa", "ferd",
                                   "ard", "fair-ard", "frl"}
    assert set(batch_method_names()) == set(list_methods()) - {"ferd"}   # ferd trains with its own loop
    with pytest.raises(UserError, match="its own loop"):
        create_method("ferd", C)
    with pytest.raises(UserError, match="unknown method"):
        create_method("distill-magic", C)
    with pytest.raises(UserError, match="no option 'temperature'"):
        create_method("absld", C, temperature=2)
    with pytest.raises(UserError, match="adapt"):
        create_method("absld", C, adapt="nat")


def val_accuracy(model, steps):
    """A validation callback's (clean, robust) per class with unequal classes (FRL's multipliers move)."""
    return torch.tensor([0.9, 0.8, 0.6, 0.7]), torch.tensor([0.5, 0.3, 0.2, 0.45])


@pytest.mark.parametrize("name", batch_method_names())
def test_state_dict_round_trip_is_exact(name):
    x, y, index, z = make_batch()
    options = {"averaging_start": 1} if name == "cfa" else {}
    method = new_method(name, **options)
    student = make_student()
    val = lambda model, steps: torch.full((C,), 0.5)   # noqa: E731
    extra = {"val_accuracy": val_accuracy}   # FRL's clean + robust callback; the loop passes it to all
    method.loss(student, z, x, y, index, 1)
    method.end_epoch(1, student=student, val_robust=val, **extra)
    method.loss(student, z, x, y, index, 2)            # a half-finished epoch's tallies too
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = new_method(name, **options)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    student_a, student_b = copy.deepcopy(student), copy.deepcopy(student)
    loss_a, _ = method.loss(student_a, z, x, y, index, 2)
    loss_b, _ = restored.loss(student_b, z, x, y, index, 2)
    assert torch.equal(loss_a, loss_b)   # same state, same calls on the same batch: bitwise
    record_a = method.end_epoch(2, student=student_a, val_robust=val, **extra)
    record_b = restored.end_epoch(2, student=student_b, val_robust=val, **extra)
    assert record_a == record_b
    with pytest.raises(UserError):
        create_method("rslad" if name != "rslad" else "sat", C).load_state_dict(method.state_dict())


def test_attack_leaves_student_in_train_mode_and_inside_the_ball():
    x, y, index, z = make_batch()
    for name in batch_method_names():
        student = make_student()
        method = new_method(name)
        x_adv = method.attack(student, z, x, y, index, 1)
        assert student.training
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert not math.isnan(float(method.loss(student, z, x, y, index, 1)[0].detach()))


EXPECTED_CLASS_STATE = {"absld": {"tau_adv", "tau_nat"}, "fair-rslad": {"class_weights"},
                        "cfa": {"class_eps", "class_beta"}, "rslad": set(), "sat": set(), "trades": set(),
                        "ard": set(), "fair-ard": {"class_weights"},
                        "frl": {"clean_weight", "boundary_weight", "eps_scale"}}


@pytest.mark.parametrize("name", batch_method_names())
def test_declared_class_state_is_in_every_epoch_record(name):
    """What a method declares is what its records hold (one value per class): train.py and the
    report draw exactly the declared keys, so a declared key missing from the record would vanish."""
    x, y, index, z = make_batch()
    method = new_method(name, **({"averaging_start": 1} if name == "cfa" else {}))
    method.loss(make_student(), z, x, y, index, 1)
    record = method.end_epoch(1, student=make_student(), val_robust=lambda model, steps: torch.full((C,), 0.5),
                              val_accuracy=val_accuracy)
    declared = {state.key for state in method.class_state()}
    assert declared == EXPECTED_CLASS_STATE[name]
    for key in declared:
        assert len(record[key]) == C and all(v is None or math.isfinite(v) for v in record[key])


# ================================================================= CFA's gate with many classes
@pytest.mark.parametrize("num_classes, robust_worst_ten_percent, opens", [(60, 0.03, True), (60, 0.01, False)])
def test_cfa_gate_reads_the_worst_ten_percent_with_many_classes(num_classes, robust_worst_ten_percent, opens):
    """ABSLD A.3: on CIFAR-100 the gate is the worst-10% mean >= 0.02; the single worst class (0
    here) would never open it. 6 of 60 classes form the worst 10%: one at 0, five at 1.2 x value."""
    method = create_method("cfa", num_classes, averaging_start=1)
    method.configure(epochs=10, lr_milestones=())
    robust = torch.full((num_classes,), 0.5)
    robust[0] = 0.0
    robust[1:6] = robust_worst_ten_percent * 6 / 5
    assert method.options()["fawa_threshold"] == 0.02 and method.options()["fawa_rule"] == "worst-10% mean"
    student = nn.Linear(2, num_classes)
    record = method.end_epoch(1, student=student, val_robust=lambda model, steps: robust)
    assert record["fawa_val_worst"] == pytest.approx(robust_worst_ten_percent)
    assert record["fawa_updated"] is opens


def test_cfa_gate_reads_the_worst_class_with_few_classes():
    method = create_method("cfa", C, averaging_start=1)
    method.configure(epochs=10, lr_milestones=())
    assert method.options()["fawa_threshold"] == 0.2 and method.options()["fawa_rule"] == "worst class"
    robust = torch.tensor([0.19, 0.9, 0.9, 0.9])
    record = method.end_epoch(1, student=nn.Linear(2, C), val_robust=lambda model, steps: robust)
    assert record["fawa_val_worst"] == pytest.approx(0.19) and record["fawa_updated"] is False
