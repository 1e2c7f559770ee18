"""--norm on `robaudit scan`: refusals before anything runs, the norm recorded in
results.json, and every norm's projection and step (the L1 ones of ascent_l1 against
pyautoattack's box-constrained L1 projection). The attacks' per-norm invariants (eps-ball,
[0, 1], determinism) and the AutoAttack agreement for every norm are in test_attacks.py."""

from __future__ import annotations

import json

import pytest
import torch

from robaudit.audit.attacks import ATTACKS, create_attack
from robaudit.audit.attacks.ascent import NORMS, per_sample_norm, project
from robaudit.audit.attacks.ascent_l1 import l1_direction, l1_project, l1_step
from robaudit.audit.attacks.base import BALL_TOLERANCE, l1_ball_tolerance, l2_ball_tolerance
from robaudit.audit.engine import parse_eps
from robaudit.errors import UserError

from test_cli import _scan_args, files, run_cli  # noqa: F401  (files: the module fixture)


EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12 * 192 / 3072}   # CIFAR's; L1 scaled to 3x8x8 images


def slack(norm: str, dim: int, eps: float) -> float:
    """The eps-ball guard's tolerance per norm (base.py)."""
    if norm == "linf":
        return BALL_TOLERANCE
    return l2_ball_tolerance(dim, eps) if norm == "l2" else l1_ball_tolerance(dim, eps)


def test_an_unknown_norm_is_refused_in_one_line_before_loading_anything(tmp_path, capsys):
    # The model and data do not exist: the refusal must come first.
    code, stdout, stderr = run_cli(capsys, "scan", tmp_path / "missing.pt", "--dataset", tmp_path / "none.npz",
                                   "--out", tmp_path / "out", "--norm", "l7", "--attacks", "clean,pgd")
    assert code != 0 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


def test_attack_without_the_requested_norm_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ATTACKS.get("square"), "norms", ("linf",))
    code, stdout, stderr = run_cli(capsys, "scan", tmp_path / "missing.pt", "--dataset", tmp_path / "none.npz",
                                   "--out", tmp_path / "out", "--norm", "l2", "--eps", "0.5",
                                   "--attacks", "clean,pgd,square")
    assert code != 0 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "attack square has no l2 variant; attacks with one: aa, clean, cw, f" in stderr


def test_parse_eps_reads_l2_radii_as_given():
    assert parse_eps("8") == pytest.approx(8 / 255)              # linf: k/255
    assert parse_eps("3", norm="l2") == 3.0                       # l2: a radius, as given
    assert parse_eps("0.5", norm="l2") == 0.5
    assert parse_eps("128/255", norm="l2") == pytest.approx(128 / 255)
    with pytest.raises(UserError, match="L2 radius"):
        parse_eps("-1", norm="l2")
    assert parse_eps("12", norm="l1") == 12.0                     # l1: a radius, as given
    with pytest.raises(UserError, match="L1 radius"):
        parse_eps("-1", norm="l1")


def test_l1_scan_records_the_norm_and_the_loss_record(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm,pgd", "--norm", "l1",
                                                       "--eps", "2", "--attack-opt", "pgd.steps=4"))
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["norm"] == "l1" and config["eps"] == 2.0 and config["eps_255"] is None
    pgd = config["attacks"]["pgd"]
    assert pgd["norm"] == "l1" and pgd["top_fraction"] == 0.01
    assert pgd["step_size"] == pytest.approx(2.5 * 2 / 4)
    diagnostics = results["attacks"]["pgd"]["diagnostics"]
    assert len(diagnostics["loss_mean_unfooled"] or [0] * 5) == 5 and diagnostics["n_unfooled"] >= 0


@pytest.mark.parametrize("norm", NORMS)
def test_every_norms_projection_lands_in_the_ball_and_the_box(norm):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 8, 8, generator=generator)
    x[:4] = x[:4].round()                                 # pixels at the box's faces
    eps = EPS[norm]
    far = x + 3 * torch.randn(x.shape, generator=generator)
    projected = project(norm, far, x, eps)
    size = per_sample_norm(norm, projected - x).flatten()
    assert size.max().item() <= eps + slack(norm, x[0].numel(), eps)
    assert projected.min() >= 0 and projected.max() <= 1
    if norm == "l2":  # renorm, then the box clip, which only moves coordinates toward x
        assert (size > 0.5 * eps).all()
    else:  # exact projections: far points end on the sphere (the box alone cannot pull them inside)
        assert (size > eps * (1 - 1e-4)).float().mean() >= 0.9
    # points already inside stay where they are (up to the float64 round trip of l1_project)
    inside = (x + 0.2 * (projected - x))
    assert torch.allclose(project(norm, inside, x, eps), inside, atol=1e-7, rtol=0)


def test_l1_projection_is_the_exact_box_constrained_one():
    from pyautoattack.autopgd_base import L1_projection   # Croce & Hein's implementation (float32)

    generator = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=generator)
    z = 0.5 * torch.randn(x.shape, generator=generator)
    for eps in (0.5, 3.0, 12.0):
        ours = l1_project(x + z, x, eps)
        reference = (x + z + L1_projection(x, z, eps)).clamp(0, 1)
        # theirs runs in float32 (sort + cumsum over 2d = 384 terms): ~1e-5 at the smallest radius
        assert torch.allclose(ours, reference, atol=3e-5, rtol=0), (ours - reference).abs().max()
        # optimal: no feasible point nearer; random feasible points (projections of nearby
        # targets, and shrinks of ours toward x) are all at least as far from the target
        target = (x + z).flatten(1)
        mine = (ours.flatten(1) - target).norm(dim=1)
        for t in (0.5, 0.9):
            shrunk = (x + t * (ours - x)).flatten(1)
            assert ((shrunk - target).norm(dim=1) >= mine - 1e-6).all()
    # per-sample radii (CFA's class-wise eps)
    radii = torch.linspace(0.5, 5.0, 16)
    sizes = per_sample_norm("l1", l1_project(x + z, x, radii.view(-1, 1, 1, 1)) - x).flatten()
    assert (sizes <= radii + l1_ball_tolerance(192, 5.0)).all()


def test_l1_step_moves_the_top_gradient_coordinates_the_box_does_not_block():
    x = torch.full((2, 1, 10, 10), 0.5)
    x[0, 0, 0, 0] = 1.0                                   # at the top face
    grad = torch.linspace(1, 100, 100).flip(0).reshape(1, 1, 10, 10).repeat(2, 1, 1, 1)
    direction = l1_direction(grad, x, top_fraction=0.05)  # 5 coordinates of 100
    moved = direction.flatten(1) != 0
    assert moved.sum(dim=1).tolist() == [5, 5]
    assert torch.allclose(direction.abs().flatten(1).sum(dim=1), torch.ones(2))
    # sample 0: the largest-|g| coordinate is at 1 with g > 0 (blocked): the next 5 move instead
    assert not moved[0, 0] and moved[0, 1:6].all() and moved[1, :5].all()
    stepped = l1_step(x, grad, x, eps=10.0, step_size=0.25, top_fraction=0.05)
    assert torch.allclose((stepped - x).abs().flatten(1).sum(dim=1), torch.full((2,), 0.25))
    assert torch.equal(l1_step(x, torch.zeros_like(grad), x, 10.0, 0.25), x)   # g = 0: no step


def test_l1_ball_guard_refuses_points_outside_the_l1_ball(monkeypatch):
    attack = create_attack("pgd", eps=1.0, norm="l1", steps=1)
    x = torch.full((2, 3, 4, 4), 0.5)
    outside = x.clone()
    outside[0, 0, :2, :] += 0.2                         # L1 1.6 > 1
    with pytest.raises(RuntimeError, match="L1 excess"):
        attack._check_ball(x, outside)
    attack._check_ball(x, l1_project(outside, x, 1.0))
    with pytest.raises(UserError, match="top_fraction must lie in"):
        create_attack("pgd", eps=1.0, norm="l1", top_fraction=0.0)
    with pytest.raises(UserError, match="has no parameter 'top_fraction'"):
        create_attack("pgd", top_fraction=0.1)            # an L1-only parameter


def test_l2_scan_records_the_norm_everywhere(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *_scan_args(files, out, "--attacks", "clean,fgsm,pgd", "--norm", "l2",
                                                       "--eps", "0.5", "--attack-opt", "pgd.steps=3"))
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["norm"] == "l2" and config["eps"] == 0.5
    for name in ("clean", "fgsm", "pgd"):
        assert config["attacks"][name]["norm"] == "l2"
    pgd = config["attacks"]["pgd"]
    assert pgd["steps"] == 3 and pgd["step_size"] == pytest.approx(2.5 * 0.5 / 3)
    assert pgd["repr"].startswith("PGD(eps=0.5, norm=l2, steps=3,")


def test_report_quotes_the_budget_in_its_norm_and_old_results_read_as_linf():
    from robaudit.audit.report.comparison import like_for_like
    from robaudit.audit.report.formatting import budget_text

    assert budget_text({"eps": 8 / 255, "eps_255": 8.0}) == "8/255"            # results without a norm: L-inf
    assert budget_text({"eps": 0.5, "eps_255": 127.5, "norm": "l2"}) == "0.5 (L2)"
    assert budget_text({"eps": 12.0, "eps_255": None, "norm": "l1"}) == "12 (L1)"
    old = {"dataset": {"name": "d", "split": "test", "n": 3}, "model": {},
           "config": {"eps": 0.03, "attacks": {"pgd": {"steps": 10}}}, "ensemble": None}
    new = {**old, "config": {"eps": 0.03, "norm": "linf", "attacks": {"pgd": {"steps": 10, "norm": "linf"}}}}
    assert like_for_like(new, old, "pgd") == []
    l2 = {**old, "config": {"eps": 0.03, "norm": "l2", "attacks": {"pgd": {"steps": 10, "norm": "l2"}}}}
    notes = like_for_like(l2, old, "pgd")
    assert any("budget differs" in n and "(L2)" in n for n in notes) and any("pgd attack" in n for n in notes)
