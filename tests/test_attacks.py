"""Evaluation attacks: invariants for every registered attack, hand computations for
our own losses and steps, and agreement of `aa` with a direct pyautoattack run.

Everything runs on tiny seeded models and 3x8x8 inputs (seconds on one CPU core).

Exactness (docs/testing.md): an attack run twice on the same batch in this process repeats
every kernel call, so its results are compared bit for bit. Results computed from other
batch compositions (the early-stopping active set, other chunks, "any" vs "final") differ
in the last bits, which a sign step or an argmax can turn into a flipped point: those
comparisons go through conftest's assert_is_argmax / assert_flags_agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from robaudit.audit.attacks import (ATTACKS, AttackResult, create_attack, cw_margin_loss,
                                    list_attacks, tempered_ce_loss)
from robaudit.audit.rng import per_sample_uniform
from robaudit.errors import UserError

from conftest import allowed_flips, assert_flags_agree, assert_is_argmax

EPS = 8 / 255
EPS_L2 = 0.5  # the usual CIFAR L2 budget; ||x||_2 of these 3x8x8 images is ~8
# CIFAR's L1 budget of 12 over 3072 coordinates, scaled to these 192: the same per-coordinate mean.
EPS_L1 = 12 * 192 / 3072
EPS_BY_NORM = {"linf": EPS, "l2": EPS_L2, "l1": EPS_L1}
# Every (attack, norm) pair the attacks declare.
ATTACK_NORMS = [(name, norm) for name in list_attacks() for norm in ATTACKS.get(name).norms]
OUR_ATTACKS = ["fgsm", "pgd", "cw", "tpgd"]
# Reduced budgets for the third-party attacks so the file stays fast.
FAST = {"aa": {"n_iter": 5, "n_queries": 30}, "square": {"n_queries": 100}}


def make_model(num_classes: int = 4, seed: int = 0) -> nn.Module:
    """Small conv net with BatchNorm (non-trivial running stats) and Dropout, so that
    forgetting eval mode changes the logits."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, num_classes),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def make_data(model: nn.Module, n: int = 32, seed: int = 1):
    """Inputs in [0, 1]; labels = the model's predictions, with every 4th one shifted
    so that a quarter of the points are clean-wrong."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    num_classes = model[-1].out_features
    y = clean_pred.clone()
    y[::4] = (y[::4] + 1) % num_classes
    index = torch.arange(1000, 1000 + n)  # dataset indices, deliberately not 0..n-1
    return x, y, index, clean_pred


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    return (model, *make_data(model))


def run(name, model, x, y, index, clean_pred, **kw) -> AttackResult:
    overrides = {**FAST.get(name, {}), **kw}
    eps = overrides.pop("eps", EPS_BY_NORM[overrides.get("norm", "linf")])
    return create_attack(name, eps=eps, **overrides)(model, x, y, index, clean_pred)


def perturbation_norm(x_adv, x, norm) -> torch.Tensor:
    """Per-sample ||x_adv - x|| in the threat model's norm."""
    delta = (x_adv - x).flatten(1)
    if norm == "l1":
        return delta.abs().sum(dim=1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(p=2, dim=1)


def ball_slack(norm, x) -> float:
    """The eps-ball guard's tolerance (base.BALL_TOLERANCE / l2_ / l1_ball_tolerance)."""
    from robaudit.audit.attacks.base import BALL_TOLERANCE, l1_ball_tolerance, l2_ball_tolerance
    if norm == "l1":
        return l1_ball_tolerance(x[0].numel(), EPS_L1)
    return BALL_TOLERANCE if norm == "linf" else l2_ball_tolerance(x[0].numel(), EPS_L2)


# ---- registry and configuration ---------------------------------------------------------

def test_registry_lists_every_attack_and_rejects_unknown_names_and_parameters():
    assert list_attacks() == ["aa", "clean", "cw", "fgsm", "fmn", "pgd", "square", "tpgd"]
    with pytest.raises(UserError, match="unknown attack"):
        create_attack("deepfool")
    with pytest.raises(UserError, match="no parameter 'stpes'"):
        create_attack("pgd", stpes=10)
    with pytest.raises(UserError, match="iterates"):
        create_attack("pgd", iterates="best")
    with pytest.raises(UserError, match="score"):
        create_attack("pgd", score="accuracy")
    with pytest.raises(UserError, match="random_start"):
        create_attack("pgd", random_start="gaussian")
    # CLI overrides arrive as strings: they take the type of the default.
    attack = create_attack("pgd", steps="10", step_size="0.01")
    assert attack.steps == 10 and isinstance(attack.steps, int) and attack.step_size == 0.01


def test_white_box_flags():
    flags = {name: ATTACKS.get(name).white_box for name in list_attacks()}
    assert flags == {"aa": True, "clean": False, "cw": True, "fgsm": True, "fmn": True, "pgd": True,
                     "square": False, "tpgd": True}


@pytest.mark.parametrize("name", list_attacks())
def test_params_are_json_and_complete(name):
    attack = create_attack(name, eps=4 / 255, seed=3)
    params = json.loads(json.dumps(attack.params()))
    assert params["class"] == type(attack).__name__
    assert params["eps"] == pytest.approx(4 / 255) and params["seed"] == 3
    assert params["norm"] == "linf"
    assert params["repr"] == repr(attack)
    for key, default in type(attack).defaults.items():
        assert params[key] == default


def test_repr_is_the_provenance_string():
    assert repr(create_attack("pgd")) == (
        "PGD(eps=8/255, norm=linf, steps=20, step_size=2/255, random_start=uniform, loss=ce, "
        "iterates=any, score=robust)")
    assert repr(create_attack("cw", steps=20, iterates="final", score="adv-only")) == (
        "CW(eps=8/255, norm=linf, steps=20, step_size=2/255, random_start=uniform, kappa=50, "
        "loss=cw-margin, iterates=final, score=adv-only)")
    # L2 budgets are written as numbers; the L2 default step is 2.5 * eps / steps.
    assert repr(create_attack("pgd", eps=0.5, norm="l2", steps=10)) == (
        "PGD(eps=0.5, norm=l2, steps=10, step_size=0.125, random_start=uniform, loss=ce, "
        "iterates=any, score=robust)")
    assert "temperature=0.5" in repr(create_attack("tpgd", temperature=0.5))


# ---- invariants of every attack ------------------------------------------------------------

@pytest.mark.parametrize("name,norm", ATTACK_NORMS)
def test_attack_invariants(setup, name, norm):
    model, x, y, index, clean_pred = setup
    model.train()  # the attack must switch to eval itself and switch back
    rng_before = torch.get_rng_state()
    result = run(name, model, x, y, index, clean_pred, norm=norm)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG touched"
    assert all(p.grad is None for p in model.parameters()), "parameter grads computed"
    assert all(p.requires_grad for p in model.parameters())
    model.eval()

    assert result.robust.dtype == torch.bool and result.adv_pred.dtype == torch.int64
    assert result.x_adv.shape == x.shape
    eps = EPS_BY_NORM[norm]
    assert perturbation_norm(result.x_adv, x, norm).max().item() <= eps + ball_slack(norm, x)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    if name != "clean":  # the budget is really used: some point moved by more than 10% of eps
        assert perturbation_norm(result.x_adv, x, norm).max().item() > 0.1 * eps
    # The attack never raises accuracy: robust implies clean-correct.
    assert not (result.robust & (clean_pred != y)).any()
    assert torch.equal(result.robust, result.adv_pred == y)
    # adv_pred is the model's prediction on the returned x_adv (the fooling iterate); it was
    # computed on the attack's active set, this forward sees the whole batch: up to rounding.
    with torch.no_grad():
        assert_is_argmax(model(result.x_adv), result.adv_pred)
    # Points not attacked are untouched.
    wrong = clean_pred != y
    assert torch.equal(result.x_adv[wrong], x[wrong])
    assert torch.equal(result.adv_pred[wrong], clean_pred[wrong])

    again = run(name, model, x, y, index, clean_pred, norm=norm)  # same batch, same kernels: bitwise
    assert torch.equal(again.robust, result.robust)
    assert torch.equal(again.adv_pred, result.adv_pred)
    assert torch.equal(again.x_adv, result.x_adv)


def test_eval_mode_is_what_the_attack_sees(setup):
    # In train mode Dropout/BatchNorm would change the logits; results must equal
    # those of a model that was already in eval mode.
    model, x, y, index, clean_pred = setup
    eval_result = run("pgd", model, x, y, index, clean_pred)
    model.train()
    train_result = run("pgd", model, x, y, index, clean_pred)
    model.eval()
    assert torch.equal(eval_result.x_adv, train_result.x_adv)  # the same eval-mode computation


def test_pgd_fools_some_but_not_all_points(setup):
    # Keeps the other tests meaningful: the fixture has fooled and surviving points.
    model, x, y, index, clean_pred = setup
    result = run("pgd", model, x, y, index, clean_pred)
    correct = int((clean_pred == y).sum())
    assert 0 < int(result.robust.sum()) < correct
    assert int(run("clean", model, x, y, index, clean_pred).robust.sum()) == correct


def test_inputs_outside_unit_range_are_refused(setup):
    model, x, y, index, clean_pred = setup
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        run("pgd", model, x * 2 - 0.5, y, index, clean_pred)


@pytest.mark.parametrize("name", OUR_ATTACKS + ["clean"])
def test_adv_only_scoring_attacks_every_point(setup, name):
    model, x, y, index, clean_pred = setup
    result = run(name, model, x, y, index, clean_pred, score="adv-only", iterates="final")
    attack = create_attack(name, score="adv-only")
    assert bool(attack.attacked_mask(y, clean_pred).all())
    with torch.no_grad():
        final_logits = model(result.x_adv)
    # robust is adv_pred == y, and adv_pred is the final iterate's prediction (from the
    # attack's own forward, so compared as an argmax up to rounding).
    assert torch.equal(result.robust, result.adv_pred == y)
    assert_is_argmax(final_logits, result.adv_pred)
    wrong = clean_pred != y
    if name != "clean":  # clean-wrong points were perturbed too
        assert (result.x_adv[wrong] != x[wrong]).any()


# ---- our attacks: seeding, scoring rule --------------------------------------------------

OUR_CONFIGS = [("fgsm", {}), ("fgsm", {"random_start": "normal"}), ("pgd", {}), ("cw", {}),
               ("tpgd", {})]


@pytest.mark.parametrize("name,kw", OUR_CONFIGS)
def test_results_do_not_depend_on_batching(setup, name, kw):
    model, x, y, index, clean_pred = setup
    whole = run(name, model, x, y, index, clean_pred, **kw)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))
    robust = torch.empty_like(whole.robust)
    adv_pred = torch.empty_like(whole.adv_pred)
    x_adv = torch.empty_like(whole.x_adv)
    for chunk in torch.split(order, [5, 16, 11]):
        part = run(name, model, x[chunk], y[chunk], index[chunk], clean_pred[chunk], **kw)
        robust[chunk], adv_pred[chunk], x_adv[chunk] = part.robust, part.adv_pred, part.x_adv
    # Per-sample randomness makes the chunked run the same attack, but the chunks are other
    # batch compositions (other GEMM blocking on some CPUs): a stated few points may flip.
    # Randomness that depended on the batch would move nearly every x_adv.
    assert_flags_agree(robust, whole.robust, what="robust")
    assert_flags_agree(adv_pred, whole.adv_pred, what="adv_pred")
    assert_flags_agree(x_adv, whole.x_adv, atol=1e-6, what="x_adv")


def test_random_start_depends_on_seed_and_dataset_index(setup):
    model, x, y, index, clean_pred = setup
    base = run("pgd", model, x, y, index, clean_pred, steps=0, score="adv-only")
    other_seed = create_attack("pgd", steps=0, score="adv-only", seed=1)(
        model, x, y, index, clean_pred)
    other_index = run("pgd", model, x, y, index + 1, clean_pred, steps=0, score="adv-only")
    assert not torch.equal(base.x_adv, other_seed.x_adv)
    assert not torch.equal(base.x_adv, other_index.x_adv)


@pytest.mark.parametrize("name,kw", OUR_CONFIGS)
def test_any_iterate_is_at_least_as_strong_as_final(setup, name, kw):
    model, x, y, index, clean_pred = setup
    any_result = run(name, model, x, y, index, clean_pred, iterates="any", **kw)
    final_result = run(name, model, x, y, index, clean_pred, iterates="final", **kw)
    # Trajectories coincide until a point is fooled, so robust under "any" implies
    # robust under "final", point by point, up to rounding: early stopping shrinks the
    # batch under "any", so the two runs' forwards see other batch compositions.
    violations = int((any_result.robust & ~final_result.robust).sum())
    assert violations <= allowed_flips(len(y)), violations
    assert int(any_result.robust.sum()) <= int(final_result.robust.sum()) + violations


def test_any_iterate_catches_points_the_final_iterate_misses(setup):
    # With steps as large as eps PGD overshoots: on this fixture it fools points at an
    # intermediate iterate and ends on correct ones. "any" must count them, "final" not.
    model, x, y, index, clean_pred = setup
    kw = {"step_size": EPS, "seed": 1}
    any_result = run("pgd", model, x, y, index, clean_pred, iterates="any", **kw)
    final_result = run("pgd", model, x, y, index, clean_pred, iterates="final", **kw)
    caught = final_result.robust & ~any_result.robust
    assert caught.any()
    assert (any_result.adv_pred[caught] != y[caught]).all()


# ---- hand computations -------------------------------------------------------------------

def _linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model.double().eval()


def _linear_problem(seed: int):
    """A float64 3-class linear model on 3x4x4 images and a 6-image batch (generator left for more draws)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes, shape = 3, (3, 4, 4)
    dim = int(np.prod(shape))
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=gen, dtype=torch.float64)
    x = torch.rand(6, *shape, generator=gen, dtype=torch.float64)
    return gen, shape, weight, bias, _linear_model(weight, bias), x, torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("random_start", ["none", "uniform"])
def test_pgd_one_step_on_linear_model_matches_hand_computation(random_start):
    gen, shape, weight, bias, model, x, y = _linear_problem(7)
    index = torch.arange(40, 46)
    eps, step = 8 / 255, 3 / 255
    attack = create_attack("pgd", eps=eps, seed=2, steps=1, step_size=step,
                           random_start=random_start, iterates="final", score="adv-only")
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    result = attack(model, x, y, index, clean_pred)

    # By hand, in numpy: z = W x + b, dCE/dx = W^T (softmax(z) - onehot(y)).
    W, b = weight.numpy(), bias.numpy()
    x_np = x.reshape(6, -1).numpy()
    start = x_np.copy()
    if random_start == "uniform":
        u = per_sample_uniform(2, index, shape, stream=0, dtype=torch.float64).reshape(6, -1)
        start = np.clip(x_np + eps * (2 * u.numpy() - 1), 0, 1)
    z = start @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(weight.shape[0])[y.numpy()]) @ W
    expected = np.clip(np.clip(start + step * np.sign(grad), x_np - eps, x_np + eps), 0, 1)
    # float64 throughout: the smallest gradient component here is 2.5e-4 (of up to 3.7), far
    # from float64 rounding, so the signs agree and x_adv matches to rounding of the clips.
    assert np.allclose(result.x_adv.reshape(6, -1).numpy(), expected, atol=1e-12, rtol=0)
    assert np.array_equal(result.adv_pred.numpy(), (expected @ W.T + b).argmax(1))


def test_cw_margin_loss_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0],      # wrong by 2: 3 - 1
                           [10.0, -50.0, 0.0],   # correct by 10: 0 - 10
                           [0.0, 100.0, 0.0],    # wrong by 100: clamped at kappa
                           [5.0, 5.0, 5.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0, 1])
    loss = cw_margin_loss(logits, y, kappa=50.0)
    assert loss.detach().tolist() == [2.0, -10.0, 50.0, 0.0]
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert grad[0].tolist() == [-1.0, 1.0, 0.0]   # + best other, - true
    assert grad[1].tolist() == [-1.0, 0.0, 1.0]
    assert grad[2].tolist() == [0.0, 0.0, 0.0]    # fooled by more than kappa: no push
    assert create_attack("cw").kappa == 50.0
    assert create_attack("cw", kappa=5).loss(logits.detach(), y)[2].item() == 5.0


def test_tempered_ce_divides_logits_by_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 2])
    expected = [-np.log(np.exp(1.0) / (np.exp(1.0) + 1 + np.exp(-0.5))),
                -np.log(1 / (np.exp(0.25) + np.exp(0.75) + 1))]
    # float32 vs float64 on losses of ~1: float32 rounding is 1e-7
    assert torch.allclose(tempered_ce_loss(logits, y, 2.0),
                          torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert create_attack("tpgd").temperature == 2.0


def test_tpgd_at_temperature_one_is_pgd(setup):
    model, x, y, index, clean_pred = setup
    pgd = run("pgd", model, x, y, index, clean_pred)
    tpgd = run("tpgd", model, x, y, index, clean_pred, temperature=1.0)
    # Exact: logits / 1.0 is the identity in IEEE arithmetic (and so is its backward), the
    # rest is the same cross_entropy on the same batches.
    assert torch.equal(pgd.robust, tpgd.robust)
    assert torch.equal(pgd.adv_pred, tpgd.adv_pred)
    assert torch.equal(pgd.x_adv, tpgd.x_adv)
    # ... and the temperature is really used: another T takes other steps.
    hot = run("tpgd", model, x, y, index, clean_pred, temperature=5.0, iterates="final")
    cold = run("pgd", model, x, y, index, clean_pred, iterates="final")
    assert not torch.equal(hot.x_adv, cold.x_adv)


def test_white_box_attack_on_gradient_free_model_says_to_use_square(setup):
    model, x, y, index, clean_pred = setup
    with pytest.raises(UserError, match="square"):
        run("pgd", ForwardOnly(model), x, y, index, clean_pred)


# ---- AutoAttack through pyautoattack ------------------------------------------------------

def reference_autoattack(model, x, y, *, eps, seed, n_iter, n_queries, n_targets, norm="Linf"):
    """pyautoattack used directly, budgets set by hand (what its __init__ derives)."""
    from pyautoattack import AutoAttack as ReferenceAutoAttack

    adversary = ReferenceAutoAttack(model, norm=norm, eps=eps, version="standard",
                                    seed=seed, device="cpu")
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter = apgd.n_iter_orig = n_iter
        apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
        apgd.n_iter_min = max(int(0.06 * n_iter), 1)
        apgd.size_decr = max(int(0.03 * n_iter), 1)
    adversary.fab.n_iter = n_iter
    adversary.square.n_queries = n_queries
    adversary.apgd_targeted.n_target_classes = n_targets
    adversary.fab.n_target_classes = n_targets
    with torch.random.fork_rng(devices=[]):
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    return y_adv


@pytest.mark.parametrize("norm,package_norm", [("linf", "Linf"), ("l2", "L2"), ("l1", "L1")])
def test_aa_matches_a_direct_pyautoattack_run(setup, norm, package_norm):
    model, x, y, index, clean_pred = setup
    eps = EPS_BY_NORM[norm]
    attack = create_attack("aa", eps=eps, seed=4, norm=norm, **FAST["aa"])
    ours = attack(model, x, y, index, clean_pred)
    y_adv = reference_autoattack(model, x, y, eps=eps, seed=4, n_targets=3, norm=package_norm,
                                 **FAST["aa"])
    reference_robust = (y_adv == y) & (clean_pred == y)
    # Exact: pyautoattack seeds per call and attacks, in one batch, the points its clean pass
    # finds correct; both runs hand it the same points (its clean pass on our subset or on the
    # whole batch agrees: every clean margin is far above rounding), so it repeats the same
    # kernel calls on the same batches.
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e3 * 6e-8 * float(top2.abs().max())
    assert torch.equal(ours.robust, reference_robust)
    fooled = ~ours.robust & (clean_pred == y)
    assert torch.equal(ours.adv_pred[fooled], y_adv[fooled])
    # Meaningful only if AA fooled some points and left others robust.
    assert 0 < int(ours.robust.sum()) < int((clean_pred == y).sum())
    assert attack.last_run["n_target_classes"] == 3
    assert attack.last_run["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_aa_runs_on_non_contiguous_nhwc_input(setup):
    model, x, y, index, clean_pred = setup
    x_permuted = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NHWC storage
    assert not x_permuted.is_contiguous() and torch.equal(x_permuted, x)
    # pyautoattack itself fails on such a batch (its APGD-T grad buffer copies strides).
    with pytest.raises(RuntimeError, match="view"):
        reference_autoattack(model, x_permuted[clean_pred == y], y[clean_pred == y],
                             eps=EPS, seed=0, n_targets=3, **FAST["aa"])
    result = run("aa", model, x_permuted, y, index, clean_pred, score="adv-only")
    contiguous = run("aa", model, x, y, index, clean_pred, score="adv-only")
    assert torch.equal(result.robust, contiguous.robust)  # exact: the attack makes its input contiguous


@pytest.mark.parametrize("num_classes", [3, 5])
def test_aa_uses_c_minus_1_targets_with_fewer_than_10_classes(num_classes):
    model = make_model(num_classes=num_classes, seed=2)
    x, y, index, clean_pred = make_data(model, n=16, seed=3)
    attack = create_attack("aa", eps=EPS, **FAST["aa"])
    result = attack(model, x, y, index, clean_pred)
    assert (result.x_adv - x).abs().max().item() <= EPS + 1e-6
    assert attack.last_run["n_target_classes"] == num_classes - 1
    # With 3 classes the targeted DLR loss is undefined (needs a 4th logit): skipped.
    assert ("apgd-t" in attack.last_run["attacks"]) == (num_classes >= 4)
    assert not any("target classes" in w for w in attack.last_run["warnings"])
    if num_classes >= 4:
        # The package's hard-coded 9 targets cannot run on this model at all.
        with pytest.raises(IndexError):
            reference_autoattack(model, x[clean_pred == y], y[clean_pred == y], eps=EPS,
                                 seed=0, n_targets=9, **FAST["aa"])


# ---- Square on a model without gradients --------------------------------------------------

class ForwardOnly(nn.Module):
    """Logits computed in numpy from a frozen copy of the weights: no autograd at all,
    like an onnxruntime-backed model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x.detach().cpu().numpy()))
        return torch.from_numpy(logits.numpy().copy())


def test_square_runs_on_a_gradient_free_model(setup):
    model, x, y, index, clean_pred = setup
    black_box = ForwardOnly(model)
    result = run("square", black_box, x, y, index, clean_pred, n_queries=300)
    assert (result.x_adv - x).abs().max().item() <= EPS + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert not (result.robust & (clean_pred != y)).any()
    correct = int((clean_pred == y).sum())
    assert 0 < int(result.robust.sum()) < correct
    with torch.no_grad():  # Square predicted on its own batches: an argmax up to rounding
        assert_is_argmax(model(result.x_adv), result.adv_pred)


# ---- threat models: L2 -------------------------------------------------------------------

def test_every_attack_declares_its_norms():
    norms = {name: ATTACKS.get(name).norms for name in list_attacks()}
    every = ("linf", "l2", "l1")
    assert norms == {"aa": every, "clean": every, "cw": every, "fgsm": every, "fmn": ("linf", "l2"),
                     "pgd": every, "square": every, "tpgd": every}
    for name in list_attacks():
        attack = create_attack(name, eps=EPS_L2, norm="l2")
        assert attack.norm == "l2" and attack.params()["norm"] == "l2"
        if name != "clean":
            assert "norm=l2" in repr(attack)


def test_unknown_and_undeclared_norms_are_refused_in_one_line(monkeypatch):
    assert create_attack("pgd", eps=12.0, norm="l1").norm == "l1"
    with pytest.raises(UserError, match="unknown norm 'l7'; choose from: linf, l2, l1") as err:
        create_attack("pgd", norm="l7")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(ATTACKS.get("cw"), "norms", ("linf",))
    with pytest.raises(UserError, match="attack cw has no l2 variant; attacks with one: aa, clean, fgsm"):
        create_attack("cw", eps=EPS_L2, norm="l2")
    # eps: [0, 1] under linf, any finite radius >= 0 under l2 (the cube's diameter is sqrt(d))
    with pytest.raises(UserError, match="eps must lie in"):
        create_attack("pgd", eps=1.5)
    assert create_attack("pgd", eps=3.0, norm="l2").eps == 3.0
    with pytest.raises(UserError, match="eps must be a finite number"):
        create_attack("pgd", eps=float("inf"), norm="l2")


def test_l2_default_step_size_is_2_5_eps_over_steps():
    assert create_attack("pgd", eps=0.5, norm="l2").step_size == pytest.approx(2.5 * 0.5 / 20)
    assert create_attack("cw", eps=0.5, norm="l2").step_size == pytest.approx(2.5 * 0.5 / 30)
    assert create_attack("pgd", eps=0.5, norm="l2", steps="5").step_size == pytest.approx(0.25)
    assert create_attack("pgd", eps=0.5, norm="l2", step_size=0.1).step_size == 0.1  # given: kept
    assert create_attack("pgd", eps=0.5, norm="l2", steps=0).step_size == pytest.approx(1.25)
    assert create_attack("pgd", eps=EPS).step_size == 2 / 255  # linf defaults untouched


def test_fgm_on_linear_model_matches_hand_computation():
    gen, shape, weight, bias, model, x, y = _linear_problem(11)
    eps = 0.5
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    result = create_attack("fgsm", eps=eps, norm="l2", iterates="final", score="adv-only")(
        model, x, y, torch.arange(6), clean_pred)

    # By hand: g = W^T (softmax(Wx + b) - onehot(y)); x_adv = clip(x + eps g / ||g||_2, 0, 1).
    # The model's own weights: _linear_model rounds them through a float32 Linear first.
    W, b = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    x_np = x.reshape(6, -1).numpy()
    z = x_np @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(weight.shape[0])[y.numpy()]) @ W
    expected = np.clip(x_np + eps * grad / np.linalg.norm(grad, axis=1, keepdims=True), 0, 1)
    # float64 throughout; the step has norm exactly eps, so the renorm is a no-op up to rounding.
    assert np.allclose(result.x_adv.reshape(6, -1).numpy(), expected, atol=1e-12, rtol=0)
    assert np.array_equal(result.adv_pred.numpy(), (expected @ W.T + b).argmax(1))
    assert (np.abs(expected - x_np) > 0).any() and ((expected == 0) | (expected == 1)).any()  # the clip acts


def test_l2_projection_keeps_the_ball_and_the_box():
    from robaudit.audit.attacks.ascent import l2_project, l2_step
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 8, 8, generator=gen)
    far = x + 3.0 * torch.randn(64, 3, 8, 8, generator=gen)  # ||delta|| ~ 42, far outside
    projected = l2_project(far, x, EPS_L2)
    norms = perturbation_norm(projected, x, "l2")
    assert norms.max().item() <= EPS_L2 + ball_slack("l2", x)
    assert projected.min() >= 0 and projected.max() <= 1
    # points inside the ball are left alone
    inside = x + 0.01 * torch.randn(64, 3, 8, 8, generator=gen) / 8
    inside = inside.clamp(0, 1)
    assert torch.equal(l2_project(inside, x, EPS_L2), inside)
    # a step from x in direction g moves by step_size in L2 (before the box clip)
    centre = torch.full((4, 3, 8, 8), 0.5)
    grad = torch.randn(4, 3, 8, 8, generator=gen)
    stepped = l2_step(centre, grad, centre, eps=1.0, step_size=0.2)
    assert torch.allclose(perturbation_norm(stepped, centre, "l2"), torch.full((4,), 0.2), atol=1e-6)
    assert torch.equal(l2_step(centre, torch.zeros_like(grad), centre, 1.0, 0.2), centre)  # g = 0: no step


def test_pgd_l2_keeps_every_iterate_in_the_ball_and_reaches_its_boundary(setup):
    model, x, y, index, clean_pred = setup
    result = run("pgd", model, x, y, index, clean_pred, norm="l2", iterates="final", score="adv-only")
    norms = perturbation_norm(result.x_adv, x, "l2")
    assert norms.max().item() <= EPS_L2 + ball_slack("l2", x)
    # 20 steps of 2.5 eps / 20 push most points onto the sphere (the renorm is active)
    assert int((norms > EPS_L2 - 1e-3).sum()) >= len(x) // 2
    # and it is a different attack from L-inf PGD: the L-inf distance is well under 8/255 * ...
    linf = run("pgd", model, x, y, index, clean_pred, iterates="final", score="adv-only")
    assert not torch.equal(result.x_adv, linf.x_adv)


def test_l2_ball_guard_refuses_points_outside_the_l2_ball(setup, monkeypatch):
    model, x, y, index, clean_pred = setup
    attack = create_attack("pgd", eps=EPS_L2, norm="l2", steps=1)
    # each coordinate within eps in L-inf, far outside the L2 ball
    monkeypatch.setattr(type(attack), "_attack",
                        lambda self, m, xs, ys, i, p: ((xs + 0.4).clamp(0, 1), p))
    with pytest.raises(RuntimeError, match="L2 excess"):
        attack(model, x, y, index, clean_pred)
