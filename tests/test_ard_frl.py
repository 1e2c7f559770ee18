"""ARD, the ARD-based Fair-ARD and FRL: each loss against an independent computation written
here, Fair-ARD's per-sample weights and kappa count, FRL's multiplier updates by hand (the
clamp, the rescale, the eps multiplier's bounds, the direction), its variants, and short
runs of each through run_remediate, with a bitwise resume for FRL.

Reuses the tiny nets and the reference PGD of tests/test_remediate_methods.py and the
synthetic colour data of tests/test_remediate_train.py; seconds on one core.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robaudit.errors import UserError
from robaudit.remediate.base import batch_method_names, create_method
from robaudit.remediate.frl import frl_class_weights, frl_eps_scale, normalize_multipliers
from robaudit.remediate.train import run_remediate

from test_remediate_methods import (C, EPS, EPOCH, ConstantLogits, check_method, gaussian_start, kl_rows,
                                    make_batch, make_student, new_method, reference_pgd, uniform_start)
from test_remediate_train import CLASSES, colour_dataset, config, read_metrics, teacher_model, tiny_student


# ================================================================= ARD / Fair-ARD losses
def ard_reference(student, x, y, index, z, alpha, temperature, weights=None, reduction="mean"):
    """The ARD code's loss written out: CE-PGD from a uniform start (student in eval), then
    alpha * T^2 * KLDivLoss(log_softmax(s(x')/T), softmax(t(x)/T)) + (1 - alpha) * CE(s(x), y),
    the KL reduced as the code's nn.KLDivLoss() ("mean": over B x C) or as "batchmean"."""
    model = copy.deepcopy(student).eval()
    x_adv = reference_pgd(lambda xa: F.cross_entropy(model(xa), y, reduction="none"), x,
                          uniform_start(x, index, EPS), EPS)
    train_model = copy.deepcopy(student).train()
    log_q = F.log_softmax(train_model(x_adv) / temperature, dim=1)
    target = F.softmax(z / temperature, dim=1)
    ce = F.cross_entropy(train_model(x), y, reduction="none")
    elementwise = nn.KLDivLoss(reduction="none")(log_q, target)   # B x C
    if weights is None:
        # The code's nn.KLDivLoss() (reduction "mean"): the mean over all B x C elements.
        kl = elementwise.mean() if reduction == "mean" else nn.KLDivLoss(reduction="batchmean")(log_q, target)
        ce = ce.mean()
    else:   # Fair-ARD.py: per sample, the mean over its C outputs, times w_y, then the batch mean
        kl = torch.stack([elementwise[i].mean() * weights[i] for i in range(len(y))]).mean()
        ce = (ce * weights).mean()
    return x_adv, alpha * temperature ** 2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize("alpha, temperature", [(1.0, 30.0), (0.7, 4.0)])
def test_ard_loss_matches_the_code_formula(alpha, temperature):
    x, y, index, z = make_batch()
    student = make_student()
    x_adv, expected = ard_reference(student, x, y, index, z, alpha, temperature)
    method = new_method("ard", alpha=alpha, temperature=temperature)
    check_method(method, x_adv, expected, x, y, index, z, student)
    assert new_method("ard").options()["alpha"] == 1.0 and new_method("ard").temperature == 30.0


def test_ard_batchmean_option_is_the_literal_formula_and_t_squared_scales_the_kl():
    x, y, index, z = make_batch()
    student = make_student()
    x_adv, expected = ard_reference(student, x, y, index, z, 0.5, 3.0, reduction="batchmean")
    check_method(new_method("ard", alpha=0.5, temperature=3.0, kl_reduction="batchmean"),
                 x_adv, expected, x, y, index, z, student)
    # alpha = 1: the loss is exactly T^2 times the (reduced) KL of softened outputs.
    student = make_student()                  # check_method moved the BatchNorm statistics
    x_adv, _ = ard_reference(student, x, y, index, z, 1.0, 1.0)
    for temperature in (1.0, 5.0):
        method = new_method("ard", temperature=temperature)
        loss, stats = method.loss(copy.deepcopy(student), z, x, y, index, EPOCH)
        torch.testing.assert_close(loss, temperature ** 2 * stats["kl"])
        kl_by_hand = kl_rows(copy.deepcopy(student).train()(x_adv) / temperature,
                             F.softmax(z / temperature, 1)).mean() / C
        torch.testing.assert_close(stats["kl"], kl_by_hand, rtol=1e-5, atol=1e-8)
    with pytest.raises(UserError, match="kl_reduction"):
        create_method("ard", C, kl_reduction="sum")


def test_fair_ard_weights_multiply_each_samples_terms():
    x, y, index, z = make_batch()
    student = make_student()
    weights = torch.tensor([2.0, 5 / 6, 1.0, 2.5])
    method = new_method("fair-ard", alpha=0.6, temperature=30.0)
    method.fair.weights = weights.clone()
    x_adv, expected = ard_reference(student, x, y, index, z, 0.6, 30.0, weights=weights[y])
    check_method(method, x_adv, expected, x, y, index, z, student)
    unweighted = new_method("ard", alpha=0.6)
    assert not torch.allclose(unweighted.loss(copy.deepcopy(student), z, x, y, index, EPOCH)[0], expected)


def test_fair_ard_counts_kappa_during_the_ce_attack():
    x, y, index, z = make_batch()
    method = create_method("fair-ard", C, steps=4)
    method.configure(epochs=2, lr_milestones=())
    method.loss(ConstantLogits(), z, x, y, index, 1)
    record = method.end_epoch(1)
    # Class 0 is predicted at the start and after each of the first 3 steps (final point not counted).
    assert record["kappa_bar"] == [4.0, 0.0, 0.0, 0.0]
    # (4 + 1e-5)^-2 against (1e-5)^-2 three times, rescaled to sum 4: [~0, 4/3, 4/3, 4/3], clamped below.
    assert record["class_weights"] == pytest.approx([5 / 6, 4 / 3, 4 / 3, 4 / 3], abs=1e-6)


# ================================================================= FRL multipliers
def hand_normalize(values, bound):
    values = [max(v, 0.0) for v in values]
    total = sum(values)
    return [v * bound / total for v in values] if total > bound else values


def hand_weights(lmbda):
    # The code's loop (cost_sensitive) for C classes: 1/C + (C-1)/C * l_i - 1/C * sum_{j != i} l_j.
    n = len(lmbda)
    return [1 / n + (n - 1) / n * lmbda[i] - sum(lmbda[j] for j in range(n) if j != i) / n for i in range(n)]


def test_frl_multiplier_update_by_hand_with_clamp_and_rescale():
    method = create_method("frl", C)
    method.lambda_clean = torch.tensor([0.3, 0.2, 0.1, 0.0])
    method.lambda_boundary = torch.tensor([0.0, 0.0, 0.45, 0.1])
    clean_acc, robust_acc = [0.9, 0.8, 0.5, 0.7], [0.6, 0.5, 0.1, 0.4]
    method.update_multipliers(torch.tensor(clean_acc), torch.tensor(robust_acc), epoch=1)

    c = [1 - a for a in clean_acc]                         # [0.1, 0.2, 0.5, 0.3], mean 0.275
    b = [a - r for a, r in zip(clean_acc, robust_acc)]     # [0.3, 0.3, 0.4, 0.3], mean 0.325
    g0 = [v - sum(c) / C - 0.07 for v in c]
    g1 = [v - sum(b) / C - 0.07 for v in b]
    lam0 = hand_normalize([l + 0.05 * g for l, g in zip([0.3, 0.2, 0.1, 0.0], g0)], 0.5)
    lam1 = hand_normalize([l + 0.1 * g for l, g in zip([0.0, 0.0, 0.45, 0.1], g1)], 0.5)
    lam2 = [0.2 * g for g in g1]
    # Both clamps and both rescales are exercised: a negative entry each, sums above 0.5.
    assert lam0[3] == 0.0 and lam1[0] == 0.0 and sum(lam0) == pytest.approx(0.5) and sum(lam1) == pytest.approx(0.5)
    assert method.lambda_clean.tolist() == pytest.approx(lam0, abs=1e-6)
    assert method.lambda_boundary.tolist() == pytest.approx(lam1, abs=1e-6)
    assert method.lambda_margin.tolist() == pytest.approx(lam2, abs=1e-6)
    assert method.clean_weights().tolist() == pytest.approx(hand_weights(lam0), abs=1e-6)
    assert method.boundary_weights().tolist() == pytest.approx(hand_weights(lam1), abs=1e-6)
    assert float(method.clean_weights().sum()) == pytest.approx(1.0)
    scale = [min(max(math.exp(2 * l), 0.98), 3.0) for l in lam2]
    assert scale[0] == 0.98 and scale[2] > 1.0                          # the lower clamp binds
    assert method.eps_scale().tolist() == pytest.approx(scale, abs=1e-6)


def test_frl_eps_multiplier_bounds_and_normalize_helper():
    lam = torch.tensor([-1.0, 0.0, 0.2, 0.7, 3.0])
    torch.testing.assert_close(frl_eps_scale(lam), torch.tensor([0.98, 1.0, math.exp(0.4), 3.0, 3.0]))
    assert frl_eps_scale(lam, upper=2.5).max() == pytest.approx(2.5)
    torch.testing.assert_close(normalize_multipliers(torch.tensor([0.1, -0.2, 0.2]), 0.5),
                               torch.tensor([0.1, 0.0, 0.2]))            # under the bound: unscaled
    torch.testing.assert_close(frl_class_weights(torch.zeros(4)), torch.full((4,), 0.25))


def test_frl_harder_boundary_class_gets_more_weight_and_a_wider_margin():
    method = create_method("frl", C)
    clean = torch.tensor([0.9, 0.9, 0.9, 0.9])
    robust = torch.tensor([0.6, 0.6, 0.6, 0.1])            # class 3: boundary error 0.8 vs 0.3
    method.update_multipliers(clean, robust, epoch=1)
    w1, scale = method.boundary_weights(), method.eps_scale()
    assert int(w1.argmax()) == 3 and w1[3] > 0.25 > w1[0]
    assert int(scale.argmax()) == 3 and scale[3] > 1.0 and scale[0] == pytest.approx(0.98)
    torch.testing.assert_close(method.clean_weights(), torch.full((C,), 0.25))   # equal clean errors


def test_frl_variants_tolerance_and_rate_halving():
    clean, robust = torch.tensor([0.9, 0.9, 0.9, 0.5]), torch.tensor([0.6, 0.6, 0.6, 0.1])
    reweight = create_method("frl", C, variant="reweight")
    reweight.update_multipliers(clean, robust, epoch=1)
    assert reweight.lambda_margin.abs().sum() == 0 and reweight.lambda_boundary[3] > 0
    assert {s.key for s in reweight.class_state()} == {"clean_weight", "boundary_weight"}
    remargin = create_method("frl", C, variant="remargin")
    remargin.update_multipliers(clean, robust, epoch=1)
    assert remargin.lambda_boundary.abs().sum() == 0 and remargin.lambda_clean[3] > 0
    assert (remargin.multiplier_sum, remargin.eps_scale_max) == (0.3, 2.5)
    assert {s.key for s in remargin.class_state()} == {"clean_weight", "eps_scale"}
    # The tolerance shifts every violation: at 0.05 each gamma is 0.02 larger than at 0.07.
    loose, tight = create_method("frl", C), create_method("frl", C, tolerance=0.05)
    loose.update_multipliers(clean, robust, epoch=1)
    tight.update_multipliers(clean, robust, epoch=1)
    torch.testing.assert_close(tight.lambda_margin - loose.lambda_margin, torch.full((C,), 0.2 * 0.02))
    # (code) rate1 halves before the update of epoch 40, i.e. ours after epoch 39.
    assert loose.rate_factor(38) == 1.0 and loose.rate_factor(39) == 0.5 and loose.rate_factor(79) == 0.25
    assert create_method("frl", C, rate_halving_every=0).rate_factor(200) == 1.0
    with pytest.raises(UserError, match="variant"):
        create_method("frl", C, variant="remargin+")


def test_frl_end_epoch_needs_the_validation_callback():
    method = create_method("frl", C)
    with pytest.raises(ValueError, match="val_accuracy"):
        method.end_epoch(1, student=make_student(), val_robust=lambda m, s: torch.ones(C))
    for name in batch_method_names():   # the loop passes both callbacks to every method's end_epoch
        other = create_method(name, C, **({"averaging_start": 99} if name == "cfa" else {}))
        other.configure(epochs=3, lr_milestones=())
        if name != "frl":
            other.end_epoch(1, student=make_student(), val_robust=lambda m, s: torch.ones(C),
                            val_accuracy=lambda m, s: (torch.ones(C), torch.ones(C)))


# ================================================================= FRL loss
@pytest.mark.parametrize("loss_norm", ["joint", "separate"])
def test_frl_loss_matches_independent_computation(loss_norm):
    x, y, index, _ = make_batch()
    student = make_student()
    method = new_method("frl", loss_norm=loss_norm, beta=1.5)
    method.lambda_clean = torch.tensor([0.2, 0.0, 0.1, 0.15])
    method.lambda_boundary = torch.tensor([0.0, 0.3, 0.05, 0.1])
    method.lambda_margin = torch.tensor([0.2, 0.0, -0.1, 0.4])
    scale = torch.tensor([math.exp(0.4), 1.0, 0.98, math.exp(0.8)])
    eps_y = (EPS * scale)[y].view(-1, 1, 1, 1)
    model = copy.deepcopy(student).eval()
    with torch.no_grad():
        p_eval = F.softmax(model(x), dim=1)
    x_adv = reference_pgd(lambda xa: kl_rows(model(xa), p_eval), x, gaussian_start(x, index), eps_y)
    train_model = copy.deepcopy(student).train()
    logits_nat, logits_adv = train_model(x), train_model(x_adv)
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    kl = kl_rows(logits_adv, F.softmax(logits_nat, 1))
    w0 = torch.tensor(hand_weights([0.2, 0.0, 0.1, 0.15]))[y]
    w1 = torch.tensor(hand_weights([0.0, 0.3, 0.05, 0.1]))[y]
    if loss_norm == "joint":   # utils_frl2.py train_model
        expected = (ce * w0 + 1.5 * kl * w1).sum() / (w0 + w1).sum()
    else:
        expected = (ce * w0).sum() / w0.sum() + 1.5 * (kl * w1).sum() / w1.sum()
    check_method(method, x_adv, expected, x, y, index, None, student, max_eps=float(eps_y.max()))
    assert ((x_adv - x).abs().amax(dim=(1, 2, 3)) <= eps_y.flatten() + 1e-6).all()
    assert float(eps_y.max()) > 2 * EPS                     # the widened class really is attacked further


# ================================================================= through the loop
def test_ard_and_fair_ard_train_through_run_remediate(tmp_path):
    data = colour_dataset(per_class=12)
    for name, epochs in (("ard", 1), ("fair-ard", 2)):
        summary = run_remediate(config(tmp_path / name, method=name, epochs=epochs, milestones=(),
                                       method_options={"temperature": 4.0}),
                                teacher=teacher_model(), train_data=data, student_module=tiny_student())
        assert summary["epochs"] == epochs and summary["training"]["options"]["method"]["temperature"] == 4.0
        rows = read_metrics(tmp_path / name / "metrics.csv")
        assert len(rows) == epochs and all(math.isfinite(float(r["loss"])) for r in rows)
    weights = [[float(r[f"class_weights:{c}"]) for c in CLASSES] for r in rows]
    assert all(5 / 6 - 1e-6 <= w <= 2.5 + 1e-6 for row in weights for w in row)
    with pytest.raises(UserError, match="distils a teacher"):
        run_remediate(config(tmp_path / "none", method="ard"), teacher=None, train_data=data,
                      student_module=tiny_student())


def frl_config(out_dir, **overrides):
    # val_attack_steps = val_steps: FRL sees exactly the loop's logged validation accuracies.
    base = dict(method="frl", epochs=2, lr=0.01, milestones=(), val_per_class=3,
                method_options={"val_attack_steps": 2})
    base.update(overrides)
    return config(out_dir, **base)


def test_frl_trains_and_updates_from_the_logged_validation_accuracies(tmp_path):
    data = colour_dataset(per_class=12)
    summary = run_remediate(frl_config(tmp_path / "frl"), teacher=None, train_data=data,
                            student_module=tiny_student())
    history = summary["training"]["class_state"]
    assert {s["name"] for s in history} == {"clean_weight", "boundary_weight", "eps_scale"}
    state = torch.load(tmp_path / "frl" / "checkpoint.pt", weights_only=True)
    entries = state["history"]
    # Replay the two updates by hand from the per-class validation accuracies the loop logged.
    lam0, lam1, lam2 = [0.0] * C, [0.0] * C, [0.0] * C
    for entry in entries:
        clean, robust = entry["val_clean"], entry["val_robust"]
        c = [1 - a for a in clean]
        b = [a - r for a, r in zip(clean, robust)]
        g0 = [v - sum(c) / C - 0.07 for v in c]
        g1 = [v - sum(b) / C - 0.07 for v in b]
        lam0 = hand_normalize([l + 0.05 * g for l, g in zip(lam0, g0)], 0.5)
        lam1 = hand_normalize([l + 0.1 * g for l, g in zip(lam1, g1)], 0.5)
        lam2 = [l + 0.2 * g for l, g in zip(lam2, g1)]
        record = entry["method"]
        assert record["lambda_clean"] == pytest.approx(lam0, abs=1e-6)
        assert record["lambda_boundary"] == pytest.approx(lam1, abs=1e-6)
        assert record["lambda_margin"] == pytest.approx(lam2, abs=1e-6)
    rows = read_metrics(tmp_path / "frl" / "metrics.csv")
    assert float(rows[-1]["eps_scale:mixed"]) == pytest.approx(entries[-1]["method"]["eps_scale"][3], abs=1e-5)
    with pytest.raises(UserError, match="val-per-class"):
        run_remediate(frl_config(tmp_path / "noval", val_per_class=0), teacher=None, train_data=data,
                      student_module=tiny_student())


def test_frl_resume_is_bitwise_equal_to_a_straight_run(tmp_path):
    data = colour_dataset(per_class=12)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_remediate(frl_config(straight, epochs=3), teacher=None, train_data=data, student_module=tiny_student())
    run_remediate(frl_config(split, epochs=2), teacher=None, train_data=data, student_module=tiny_student())
    run_remediate(frl_config(split, epochs=3, resume=True), teacher=None, train_data=data,
                  student_module=tiny_student(seed=99))
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert repr(a["method"]) == repr(b["method"])
    assert a["method"]["lambda_margin"].abs().sum() > 0     # the multipliers did move

    def without_seconds(path):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(path)]

    assert without_seconds(straight / "metrics.csv") == without_seconds(split / "metrics.csv")


def test_schedule_record_says_when_an_own_schedule_method_ran_at_other_values():
    """A Python-API FRL run that keeps RemediateConfig's defaults trains at lr 0.1, not at
    FRL's own 1e-3: results.json's schedule_preset must say what ran and what was overridden."""
    from robaudit.remediate.common import RemediateConfig, resolve_schedule, schedule_description
    from robaudit.remediate.frl import FRL

    class Run:   # what schedule_description reads of a method: its class attributes and name
        name = "frl"
        paper_schedule = FRL.paper_schedule
        shared_schedule = FRL.shared_schedule

    own = FRL.paper_schedule
    defaults = schedule_description(RemediateConfig(out_dir=None, method="frl"), Run())
    assert defaults.startswith("own:") and f"lr 0.1 (its schedule: {own['lr']:g})" in defaults
    resolved = resolve_schedule(FRL, "shared")       # what the CLI does: FRL's own values
    faithful = schedule_description(RemediateConfig(out_dir=None, method="frl", **resolved), Run())
    assert "overridden" not in faithful and f"lr {own['lr']:g}" in faithful
