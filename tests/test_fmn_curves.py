"""FMN (audit/attacks/fmn.py), robustness curves (audit/curves.py) and their checks.

The reference is an affine classifier on flattened pixels, z = W x + b, whose exact minimal
perturbation is known: the distance to the boundary with class j is (z_y - z_j) / ||w_y - w_j||_dual
(dual L1 for L-inf, L2 for L2), minimised over j. The images lie in [0.3, 0.7] and every
minimal perturbation is far below 0.3 per pixel, so the [0, 1] box never binds and the formula
is the truth. Everything runs on 3x8x8 images in a few seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.audit import checks as checks_mod
from robaudit.audit.attacks import create_attack
from robaudit.audit.attacks.fmn import FMN, fmn_minimal
from robaudit.audit.curves import CURVE_DECIMALS, eps_grid, robustness_curve
from robaudit.audit.data.datasets import EvalData
from robaudit.audit.models.loading import save_export
from robaudit.errors import UserError

from conftest import assert_is_argmax
from test_cli import run_cli
from test_engine import CallCounter, load_samples, make_model, scan

C, HW, N = 4, 8, 64
CLASSES = [f"k{k}" for k in range(C)]
EPS = {"linf": 1 / 255, "l2": 0.05}   # about the median minimal norm: robust and fooled points both occur
DUAL = {"linf": 1, "l2": 2}
# How far above the exact minimum FMN may end (both norms): its loss follows the nearest wrong
# class, so a point whose two nearest wrong classes are almost tied alternates its gradient
# between them and settles on a compromise direction a few % above the optimum, whatever the
# step count (here one point at +7% under L-inf and one at +9% under L2, the same at 100 and
# 1000 steps); every other point converges to within 0.1%.
OVERSHOOT = {"linf": 1.10, "l2": 1.10}
FMN_ARGS = dict(steps=100, alpha_init=1.0, alpha_final=0.01, gamma_init=0.05, gamma_final=0.001)


class Affine(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(C, 3 * HW * HW, generator=gen) * 0.05)
        self.bias = nn.Parameter(torch.randn(C, generator=gen) * 0.01)

    def forward(self, x):
        return (x.flatten(1) - 0.5) @ self.weight.T + self.bias   # centred: classes come out balanced


def affine_data(model: Affine, n: int = N, seed: int = 1):
    """Images in [0.3, 0.7]; labels = the model's predictions, every 8th shifted (clean-wrong)."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 3, HW, HW, generator=gen)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[::8] = (y[::8] + 1) % C
    return x, y, pred


def true_min_norm(model: Affine, x, y, norm: str) -> np.ndarray:
    """Exact minimal perturbation (float64) of each point (0 where already misclassified)."""
    w, b = model.weight.detach().double(), model.bias.detach().double()
    z = (x.flatten(1).double() - 0.5) @ w.T + b
    margin = z.gather(1, y[:, None]) - z                                  # [N, C]
    scale = (w[y][:, None, :] - w[None, :, :]).norm(p=DUAL[norm], dim=2)  # ||w_y - w_j||_dual
    dist = torch.where(torch.arange(C)[None] == y[:, None], torch.tensor(math.inf, dtype=torch.float64),
                       margin / scale)
    return dist.min(dim=1).values.clamp_min(0.0).numpy()


def as_eval_data(x, y) -> EvalData:
    return EvalData(name="affine", split="test", x=x.contiguous(), y=y, index=torch.arange(len(y)),
                    classes=list(CLASSES), subset={"limit": None, "n_per_class": None, "total_in_split": len(y)},
                    source="memory")


@pytest.fixture(scope="module")
def affine():
    model = Affine().eval()
    x, y, pred = affine_data(model)
    return model, x, y, pred


# ---------------------------------------------------------------------------- the attack


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_finds_the_exact_minimal_perturbation_of_an_affine_model(affine, norm):
    model, x, y, pred = affine
    right = pred == y
    found = fmn_minimal(model, x[right], y[right], norm=norm, **FMN_ARGS)
    truth = true_min_norm(model, x[right], y[right], norm)
    assert (truth > 1e-5).all() and truth.max() < 0.3 * (1 if norm == "linf" else 8)  # box never binds
    norms = found.norm.numpy()
    assert np.isfinite(norms).all()
    # A real adversarial point can never beat the exact minimum; the slack is float32 rounding of
    # the logits (~1e-7 relative) seen through a margin of >= 1e-3: well under 1e-4 relative.
    assert (norms >= truth * (1 - 1e-4)).all()
    # Convergence: 100 steps bring the typical point to within 0.1% of the optimum; every point
    # within OVERSHOOT (see there).
    ratio = norms / truth
    assert np.median(ratio) < 1.001 and ratio.max() < OVERSHOOT[norm]
    # What is reported is a real adversarial example with exactly that norm, inside [0, 1].
    with torch.no_grad():
        assert (model(found.x_best).argmax(1) != y[right]).all()
    assert_is_argmax(model(found.x_best).detach(), found.pred)
    delta = (found.x_best - x[right]).flatten(1)
    measured = delta.abs().amax(1) if norm == "linf" else delta.norm(p=2, dim=1)
    np.testing.assert_allclose(measured.double().numpy(), norms, rtol=1e-6)
    assert found.x_best.min() >= 0 and found.x_best.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("score", ["robust", "adv-only"])
def test_fmn_attack_scores_minimal_norm_against_the_audited_eps(affine, norm, score):
    model, x, y, pred = affine
    eps = EPS[norm]
    result = create_attack("fmn", eps=eps, norm=norm, score=score)(model, x, y, torch.arange(N), pred)
    min_norm = result.extras["min_norm"].numpy()
    wrong = (pred != y).numpy()
    assert (min_norm[wrong] == 0).all() and (min_norm[~wrong] > 0).all()
    # robust at the audited eps <=> clean-correct and minimal norm > eps: the curve at eps
    np.testing.assert_array_equal(result.robust.numpy(), ~wrong & (min_norm > eps))
    # every returned point lies in the eps-ball and in [0, 1]; fooled ones are the minimal point
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(p=2, dim=1)
    assert (size <= eps * (1 + 1e-6)).all() and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    fooled = ~wrong & (min_norm <= eps)
    assert fooled.sum() > 0 and (~wrong & ~fooled).sum() > 0   # both kinds occur at this eps
    np.testing.assert_allclose(size[torch.from_numpy(fooled)].double().numpy(), min_norm[fooled], rtol=1e-6)
    assert_is_argmax(model(result.x_adv).detach(), result.adv_pred)
    assert torch.equal(result.robust, result.adv_pred == y)


def test_fmn_options_are_checked_in_one_line():
    with pytest.raises(UserError, match="fmn has no l1 variant|--norm l1 is not supported"):
        create_attack("fmn", norm="l1")
    with pytest.raises(UserError, match="eps > 0"):
        create_attack("fmn", eps=0.0)
    with pytest.raises(UserError, match="cap_factor must be >= 1"):
        create_attack("fmn", cap_factor=0.5)
    with pytest.raises(UserError, match="steps must be >= 1"):
        create_attack("fmn", steps=0)
    attack = create_attack("fmn", eps=8 / 255, steps="20")
    assert attack.steps == 20 and attack.params()["cap"] == pytest.approx(32 / 255)
    assert repr(attack).startswith("FMN(eps=8/255, norm=linf, steps=20,")


# ---------------------------------------------------------------------------- curves


ROUNDING = 0.5 * 10.0 ** -CURVE_DECIMALS


def brute_curve(norms, y, grid, k):
    """Class k's robust accuracy at each grid eps, one comparison per grid point (the reference)."""
    members = norms[y == k]
    return [float((members > e).mean()) for e in grid] if len(members) else [None] * len(grid)


def test_curve_of_hand_made_norms_matches_a_direct_count():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [7, 6, 1, 0])   # class 3 is empty
    norms = rng.uniform(0, 0.15, size=len(y))
    norms[[0, 8]] = 0.0                          # clean-wrong
    norms[[1, 2, 9]] = np.inf                    # never fooled
    norms[3] = 0.05                              # exactly on the audited eps: not robust there
    block = robustness_curve(norms, y, ["a", "b", "c", "d"], audited_eps=0.05, cap=0.2, norm="linf",
                             description="FMN(...)")
    grid = np.asarray(block["eps"])
    assert grid[0] == 0 and grid[-1] == 0.2 and 0.05 in block["eps"] and (np.diff(grid) > 0).all()
    assert 90 <= len(grid) <= 110
    for k in range(3):
        expected = brute_curve(norms, y, grid, k)
        # results.json rounds curve values to CURVE_DECIMALS places: half a unit of the last one
        assert block["per_class"][k]["accuracy"] == pytest.approx(expected, abs=ROUNDING)
        assert np.all(np.diff(block["per_class"][k]["accuracy"]) <= 0)
        assert block["per_class"][k]["accuracy"][0] == pytest.approx(float((norms[y == k] > 0).mean()),
                                                                     abs=ROUNDING)
        lo, hi = np.asarray(block["per_class"][k]["low"]), np.asarray(block["per_class"][k]["high"])
        assert (lo <= np.asarray(expected) + ROUNDING).all() and (hi >= np.asarray(expected) - ROUNDING).all()
    assert block["per_class"][3] == {"class": "d", "n": 0, "accuracy": [None] * len(grid),
                                     "low": [None] * len(grid), "high": [None] * len(grid)}
    assert block["overall"]["accuracy"] == pytest.approx([float((norms > e).mean()) for e in grid], abs=ROUNDING)
    # medians: class a has 7 values, 2 of them inf -> the 4th smallest is finite; class b has 6 values,
    # one inf; class c's only value is finite; class d is empty
    for k in range(3):
        assert block["median_eps"][k] == pytest.approx(float(np.median(norms[y == k])))
    assert block["median_eps"][3] is None
    assert block["not_found"] == [2, 1, 0, 0]
    json.dumps(block, allow_nan=False)
    report_curves = pytest.importorskip("robaudit.audit.report.curves")
    assert report_curves.curves_problem(block, ["a", "b", "c", "d"]) is None


def test_median_is_null_when_more_than_half_are_never_fooled_and_grid_edges():
    block = robustness_curve([np.inf, np.inf, 0.1], [0, 0, 0], ["a"], audited_eps=0.1, cap=0.1,
                             norm="l2", description="x")
    assert block["median_eps"] == [None] and block["eps"][-1] == 0.1 == block["audited_eps"]
    assert block["per_class"][0]["accuracy"][-1] == pytest.approx(2 / 3, abs=ROUNDING)  # 0.1 is not > 0.1
    grid = eps_grid(8 / 255, 32 / 255)
    assert grid[25] == 8 / 255 and (np.diff(grid) > 0).all()
    with pytest.raises(ValueError):
        eps_grid(0.2, 0.1)
    with pytest.raises(ValueError):
        robustness_curve([np.nan], [0], ["a"], audited_eps=0.1, cap=0.2, norm="linf", description="x")


# ---------------------------------------------------------------------------- through the engine


def affine_scan(out, norm="linf", attacks=("clean", "pgd", "fmn"), **kw):
    model = Affine().eval()
    x, y, _ = affine_data(model)
    results = scan(out, attacks=list(attacks), model=make_model(model, sha=f"affine-{norm}"),
                   data=as_eval_data(x, y), eps=EPS[norm], norm=norm, attack_overrides={}, **kw)
    return results, model, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_scan_curves_follow_the_consistency_rules(tmp_path, norm):
    results, model, x, y = affine_scan(tmp_path, norm, attacks=("clean", "pgd", "cw", "fmn"))
    block = results["curves"]["fmn"]
    samples = load_samples(tmp_path)
    eps = EPS[norm]
    at = block["eps"].index(eps)
    assert block["norm"] == norm and block["audited_eps"] == eps and block["cap"] == pytest.approx(4 * eps)
    assert block["description"] == results["attacks"]["fmn"]["description"]
    min_norm = samples["min_norm_fmn"]
    assert min_norm.dtype == np.float64 and min_norm.shape == (N,)
    np.testing.assert_array_equal(samples["robust_fmn"], (samples["clean_pred"] == samples["y"]) & (min_norm > eps))
    truth = true_min_norm(model, x, y, norm)
    # never below the truth (float32 slack as in the attack test), at most OVERSHOOT above it
    right = samples["clean_pred"] == samples["y"]
    assert (min_norm[right] >= truth[right] * (1 - 1e-4)).all()
    assert (min_norm[right] <= truth[right] * OVERSHOOT[norm]).all()
    clean, pgd, cw, fmn = (results["attacks"][a]["per_class"] for a in ("clean", "pgd", "cw", "fmn"))
    y_np = samples["y"]
    # On an affine model the margin loss's gradient is the optimal direction against the nearest
    # wrong class, so CW (PGD on the margin) is exact here: its robust points are the truth's
    # (checked). PGD on cross-entropy mixes the wrong classes' directions and is weaker. fmn's
    # curve at eps can sit above the truth only through points whose true distance is <= eps but
    # whose fmn norm overshoots it: true distance within a factor OVERSHOOT below eps.
    right_truth = right & (truth > eps)
    np.testing.assert_array_equal(samples["robust_cw"], right_truth)
    near = (truth <= eps) & (truth * OVERSHOOT[norm] > eps)
    for k in range(C):
        curve = block["per_class"][k]
        assert curve["n"] == clean[k]["n"]
        assert curve["accuracy"][0] == pytest.approx(clean[k]["accuracy"], abs=ROUNDING)      # clean accuracy at 0
        assert np.all(np.diff(curve["accuracy"]) <= 0)                          # non-increasing
        assert curve["accuracy"][at] == pytest.approx(fmn[k]["accuracy"], abs=ROUNDING)       # = the fixed-eps block
        slack = near[y_np == k].sum() / curve["n"]
        # ROUNDING: curve values are stored to CURVE_DECIMALS places, the blocks' are not
        assert cw[k]["accuracy"] - ROUNDING <= curve["accuracy"][at] <= cw[k]["accuracy"] + slack + ROUNDING
        assert curve["accuracy"][at] <= pgd[k]["accuracy"] + slack + ROUNDING   # at least PGD's strength
        assert block["median_eps"][k] == pytest.approx(float(np.median(np.where(right, min_norm, 0)[y_np == k])))
    assert block["overall"]["accuracy"][-1] <= block["overall"]["accuracy"][at]
    assert sum(block["not_found"]) == 0
    assert results["ensemble"]["avg"] == pytest.approx(results["attacks"]["cw"]["avg"])  # cw is exact
    assert not [f for f in results["checks"] if f["id"] == "curve_not_reaching_zero"]
    report_curves = pytest.importorskip("robaudit.audit.report.curves")
    report_curves.validate_curves(json.loads((tmp_path / "results.json").read_text()))


def test_no_minimal_norm_attack_no_curves(tmp_path):
    results, *_ = affine_scan(tmp_path, attacks=("clean", "pgd"))
    assert "curves" not in results and "min_norm_fmn" not in load_samples(tmp_path)


def test_interrupted_fmn_scan_resumes_with_identical_extras(tmp_path, monkeypatch):
    reference, *_ = affine_scan(tmp_path / "reference", attacks=("clean", "fmn"))
    out = tmp_path / "resumed"
    CallCounter(monkeypatch, FMN, interrupt_on=3)   # 4 chunks of 16: dies in the 3rd
    with pytest.raises(KeyboardInterrupt):
        affine_scan(out, attacks=("clean", "fmn"))
    counter = CallCounter(monkeypatch, FMN)
    resumed, *_ = affine_scan(out, attacks=("clean", "fmn"))
    assert counter.calls == 2                       # chunks 1-2 came from the state folder
    a, b = load_samples(tmp_path / "reference"), load_samples(out)
    np.testing.assert_array_equal(a["min_norm_fmn"], b["min_norm_fmn"])
    np.testing.assert_array_equal(a["robust_fmn"], b["robust_fmn"])
    assert resumed["curves"] == reference["curves"]


class Quantised(nn.Module):
    """An affine model on inputs rounded to 1/4 steps: rounding has zero gradient, so every
    gradient attack is blind (masking), though the model is easy to fool."""

    def __init__(self):
        super().__init__()
        self.inner = Affine()

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_masked_gradients_flag_a_curve_not_reaching_zero(tmp_path):
    model = Quantised().eval()
    x, y, _ = affine_data(model.inner)
    results = scan(tmp_path, attacks=["clean", "fmn"], model=make_model(model, sha="quantised"),
                   data=as_eval_data(x, y), eps=EPS["linf"], attack_overrides={"fmn": {"steps": 10}})
    ids = {f["id"] for f in results["checks"]}
    assert "curve_not_reaching_zero" in ids
    samples = load_samples(tmp_path)   # blind gradients: no clean-correct point is ever fooled
    assert sum(results["curves"]["fmn"]["not_found"]) == int((samples["clean_pred"] == samples["y"]).sum()) > 0


def _results_with(curve_acc, fixed_acc, n=40, not_found=0, clean_correct=40):
    """A minimal results dict: one class, a curve with `curve_acc` at the audited eps, pgd at `fixed_acc`."""
    grid = [0.0, 0.1, 0.2]
    curve = {"class": "a", "n": n, "accuracy": [clean_correct / n, curve_acc, 0.0], "low": [0] * 3, "high": [1] * 3}
    return {"dataset": {"num_classes": 1, "classes": ["a"]}, "config": {"eps": 0.1},
            "attacks": {"pgd": {"avg": fixed_acc, "n_attacked": n, "per_class": [{"class": "a", "n": n, "accuracy": fixed_acc}]},
                        "fmn": {"avg": curve_acc, "n_attacked": n, "per_class": [{"class": "a", "n": n, "accuracy": curve_acc}]}},
            "curves": {"fmn": {"norm": "linf", "audited_eps": 0.1, "cap": 0.2, "eps": grid,
                               "per_class": [curve], "overall": dict(curve, n=n),
                               "median_eps": [0.1], "not_found": [not_found]}}}


def _ids(results):
    return [f["id"] for f in checks_mod.curve_checks(results)]


def test_curve_checks_fire_at_their_thresholds():
    n = 40
    assert _ids(_results_with(20 / n, 24 / n)) == []                       # 4 points below: attack noise
    assert _ids(_results_with(20 / n, 25 / n)) == ["curve_below_fixed_eps"]  # 5 points: p <= 0.031
    assert _ids(_results_with(24 / n, 20 / n)) == []                       # above by 10%, 4 points
    assert _ids(_results_with(25 / n, 20 / n)) == ["curve_far_above_fixed_eps"]
    assert _ids(_results_with(30 / n, 26 / n)) == []                       # 10% but only 4 points
    assert _ids(_results_with(20 / n, 20 / n, not_found=0)) == []
    assert _ids(_results_with(20 / n, 20 / n, not_found=1, clean_correct=40)) == ["curve_not_reaching_zero"]
    flags = checks_mod.curve_checks(_results_with(20 / n, 25 / n))
    assert "pgd" in flags[0]["message"] and flags[0]["why"]
    assert checks_mod.curve_checks({"attacks": {}, "dataset": {"classes": []}}) == []


# ---------------------------------------------------------------------------- the command line


def test_cli_scan_with_fmn_writes_curves(tmp_path, capsys):
    model = Affine().eval()
    x, y, _ = affine_data(model)
    np.savez(tmp_path / "affine.npz", x_test=x.numpy(), y_test=y.numpy(), class_names=np.array(CLASSES))
    save_export(model, str(tmp_path / "affine.pt2"), x[:2])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "scan", tmp_path / "affine.pt2", "--dataset", tmp_path / "affine.npz",
                           "--out", out, "--device", "cpu", "--batch-size", "16", "--eps", "1/255",
                           "--attacks", "clean,pgd,fmn", "--attack-opt", "fmn.steps=30")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    block = results["curves"]["fmn"]
    report_curves = pytest.importorskip("robaudit.audit.report.curves")
    report_curves.validate_curves(results)
    samples = load_samples(out)
    np.testing.assert_array_equal(samples["robust_fmn"],
                                  (samples["clean_pred"] == samples["y"]) & (samples["min_norm_fmn"] > 1 / 255))
    at = block["eps"].index(1 / 255)
    for k in range(C):
        assert block["per_class"][k]["accuracy"][0] == pytest.approx(results["attacks"]["clean"]["per_class"][k]["accuracy"])
        assert block["per_class"][k]["accuracy"][at] == pytest.approx(results["attacks"]["fmn"]["per_class"][k]["accuracy"])
    assert results["config"]["attacks"]["fmn"]["steps"] == 30
