"""The iterative attacks' loss record (SignGradientAttack stats -> diagnostics) and the
`<attack>_loss_not_converged` check built on it (checks.loss_convergence_flags)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robaudit.audit.attacks import create_attack
from robaudit.audit.checks import LOSS_LATE_GAIN, loss_convergence_flags, loss_late_gain

EPS = 8 / 255


@pytest.fixture(scope="module")
def setup():
    """A linear classifier on 3x8x8 inputs whose margins straddle what eps can undo, so that
    PGD fools some points early (early stopping matters) and leaves others robust."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4)).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8, generator=generator)
    with torch.no_grad():
        model[1].weight.mul_(3.0)
        y = model(x).argmax(dim=1)                       # every point clean-correct
    return model, x, y, torch.arange(64)


def diagnostics_of(attack, model, x, y, index):
    result = attack(model, x, y, index, y)
    return result, attack.diagnostics({k: v.cpu().numpy() for k, v in result.stats.items()})


def test_the_record_is_the_per_iterate_mean_loss_of_the_points_left_unfooled(setup):
    model, x, y, index = setup
    steps = 6
    result, diagnostics = diagnostics_of(create_attack("pgd", eps=EPS, steps=steps), model, x, y, index)
    unfooled = result.robust
    assert 0 < int(unfooled.sum()) < len(y), "need fooled (early-stopped) and unfooled points"
    assert diagnostics["n_unfooled"] == int(unfooled.sum())
    curve = diagnostics["loss_mean_unfooled"]
    assert len(curve) == steps + 1
    # Iterate k of that run, recomputed independently: PGD with k steps, last iterate scored.
    # Early stopping removed only fooled points, so the unfooled ones took the same k steps.
    for k in range(steps + 1):
        iterate = create_attack("pgd", eps=EPS, steps=k, iterates="final", score="adv-only")(
            model, x, y, index, y).x_adv
        with torch.no_grad():
            expected = F.cross_entropy(model(iterate[unfooled]), y[unfooled], reduction="none").mean().item()
        # float32 losses averaged in float64; the batches differ (early stopping), so up to rounding
        assert curve[k] == pytest.approx(expected, rel=1e-5, abs=1e-6), k


def test_a_converged_attack_is_not_flagged_and_a_starved_one_is(setup):
    model, x, y, index = setup
    # 20 steps of 2/255 at 8/255: a linear model's sign steps saturate the box within ~4 steps.
    _, converged = diagnostics_of(create_attack("pgd", eps=EPS, steps=20), model, x, y, index)
    gain = loss_late_gain(converged["loss_mean_unfooled"])
    assert gain is not None and gain < 0.01
    assert loss_convergence_flags({"pgd": {"diagnostics": converged}}) == []
    # 20 steps of 0.1/255 travel 2/255 in all: the loss still climbs at the end.
    _, starved = diagnostics_of(create_attack("pgd", eps=EPS, steps=20, step_size=0.1 / 255), model, x, y, index)
    assert loss_late_gain(starved["loss_mean_unfooled"]) > LOSS_LATE_GAIN
    flags = loss_convergence_flags({"pgd": {"diagnostics": starved}})
    assert [f["id"] for f in flags] == ["pgd_loss_not_converged"]
    assert "pgd.steps=40" in flags[0]["message"] and "overestimate" in flags[0]["why"]


def test_late_gain_is_the_share_of_the_best_so_far_rise_in_the_last_tenth():
    linear = list(range(21))                          # 20 steps, window 2: 2 / 20 of the rise
    assert loss_late_gain(linear) == pytest.approx(0.1)
    # an oscillating end counts by its best so far: the dip and recovery add nothing
    assert loss_late_gain([0, 5, 9, 10, 10, 8, 10]) == pytest.approx(0.0)
    assert loss_late_gain([1.0, 1.0, 1.0]) is None    # never improved: nothing to judge
    assert loss_late_gain([0.0, 1.0]) is None         # one step (FGSM): off by design
    few = {"pgd": {"diagnostics": {"n_unfooled": 3, "loss_mean_unfooled": linear}}}
    assert loss_convergence_flags(few) == []          # too few unfooled points to judge
