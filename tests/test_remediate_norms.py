"""`remediate --norm l2|l1`: every method's inner maximisation, the checkpoint selection and the
audits run in the chosen norm, the norm is recorded and resume never mixes norms.

Tiny synthetic data and nets (those of test_remediate_methods / test_remediate_train).
"""

from __future__ import annotations

import json

import pytest
import torch

import robaudit.audit.attacks.ascent as ascent
from robaudit.audit.attacks.base import l1_ball_tolerance, l2_ball_tolerance
from robaudit.errors import UserError
from robaudit.remediate import METHODS
from robaudit.remediate.base import batch_method_names, create_method
from robaudit.remediate.common import RemediateConfig, default_step_size
from robaudit.remediate.train import run_remediate

from test_remediate_methods import C, make_batch, make_student
from test_remediate_train import colour_dataset, config, tiny_student

EPS = {"l2": 0.5, "l1": 12 * 192 / 3072}   # CIFAR's budgets; L1's scaled to 3x8x8 images
SLACK = {"l2": l2_ball_tolerance, "l1": l1_ball_tolerance}


class StepSpy:
    """Wraps ascent.ascent_step (every inner maximisation goes through it) and records, per call,
    the norm and the per-sample excess of the new iterate over its ball."""

    def __init__(self, monkeypatch):
        self.norms, self.excess, self.box_ok, self.on_sphere = [], [], [], []
        real = ascent.ascent_step

        def spy(norm, x_adv, grad, x, eps, step_size, *args):
            out = real(norm, x_adv, grad, x, eps, step_size, *args)
            radius = torch.as_tensor(eps, dtype=torch.float64).reshape(-1).expand(len(x))
            size = ascent.per_sample_norm(norm, (out - x).double()).reshape(-1)
            self.norms.append(norm)
            self.excess.append(float((size - radius).max()))
            self.box_ok.append(bool(out.min() >= 0 and out.max() <= 1))
            self.on_sphere.append(float((size > 0.99 * radius).double().mean()))
            return out

        monkeypatch.setattr(ascent, "ascent_step", spy)


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("name", batch_method_names())
def test_every_methods_inner_examples_respect_the_norms_ball(monkeypatch, name, norm):
    spy = StepSpy(monkeypatch)
    eps = EPS[norm]
    method = create_method(name, C, eps=eps, steps=3, step_size=default_step_size(norm, eps, 3), seed=3,
                           norm=norm)
    method.configure(epochs=10, lr_milestones=(5, 8))
    x, y, index, teacher_logits = make_batch()
    loss, _ = method.loss(make_student(), teacher_logits, x, y, index, 2)
    assert torch.isfinite(loss)
    assert spy.norms and set(spy.norms) == {norm}, f"{name} took no {norm} steps: {set(spy.norms)}"
    dim = x[0].numel()
    # float32 rounding of the projected iterates (base.l2_/l1_ball_tolerance); CFA/FRL's per-class
    # eps are at most 1.x the given one, so the slack at eps covers them.
    assert max(spy.excess) <= SLACK[norm](dim, 2 * eps), (name, max(spy.excess))
    assert all(spy.box_ok)
    # The budget is used: after 3 steps of 2.5 eps / 3 a good share of points sit on the sphere
    # (an L-inf sign step of that size would leave the ball by a factor sqrt(192) or 192).
    assert spy.on_sphere[-1] >= 0.25, (name, spy.on_sphere)


def test_default_step_size_follows_the_norm():
    assert RemediateConfig(out_dir=".", eps=8 / 255).step_size == pytest.approx(2 / 255)
    assert RemediateConfig(out_dir=".", norm="l2", eps=0.5, steps=10).step_size == pytest.approx(0.125)
    assert RemediateConfig(out_dir=".", norm="l1", eps=12.0, steps=10).step_size == pytest.approx(3.0)
    assert RemediateConfig(out_dir=".", norm="l2", eps=0.5, step_size=0.1).step_size == 0.1  # given: kept


def test_ferd_and_unknown_norms_are_refused_in_one_line():
    with pytest.raises(UserError, match="ferd trains under --norm linf only") as err:
        METHODS.get("ferd").check_config(RemediateConfig(out_dir=".", method="ferd", norm="l2", eps=0.5))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown --norm 'l7'"):
        METHODS.get("sat").check_config(RemediateConfig(out_dir=".", method="sat", norm="l7"))
    with pytest.raises(UserError, match="norm is set for every method by --norm"):
        METHODS.get("sat").check_config(RemediateConfig(out_dir=".", method="sat", method_options={"norm": "l2"}))


def test_l2_run_trains_selects_and_audits_in_l2_and_records_it(tmp_path, monkeypatch):
    spy = StepSpy(monkeypatch)
    data = colour_dataset(per_class=10, size=16)
    test_data = colour_dataset(per_class=3, seed=1, size=16)
    test_data.split = "test"
    cfg = config(tmp_path, method="sat", student="smallcnn", epochs=1, norm="l2", eps=0.5,
                 export_formats=("torchscript",), audit_attacks=("clean", "pgd"),
                 audit_overrides={"pgd": {"steps": 2}}, audit_batch_size=64)
    assert cfg.step_size == pytest.approx(2.5 * 0.5 / 2)
    run_remediate(cfg, teacher=None, train_data=data, test_data=test_data)
    # training and the selection attack (the audit's PGD has its own loop in the attacks' base)
    assert set(spy.norms) == {"l2"} and max(spy.excess) <= l2_ball_tolerance(3 * 16 * 16, 1.0)
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["training"]["options"]["norm"] == "l2"
    assert results["config"]["norm"] == "l2" and results["config"]["eps"] == 0.5
    assert results["config"]["attacks"]["pgd"]["norm"] == "l2"
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["fingerprint"]["norm"] == "l2"


def test_resume_under_another_norm_is_refused_and_old_checkpoints_read_as_linf(tmp_path):
    data = colour_dataset(per_class=6, size=8)
    run_remediate(config(tmp_path, method="sat", epochs=1, export_formats=()), teacher=None,
                  train_data=data, student_module=tiny_student())
    with pytest.raises(UserError, match="checkpoint was made with norm='linf' but this run has norm='l2'"):
        # the same eps and step: only the norm differs
        run_remediate(config(tmp_path, method="sat", epochs=2, resume=True, norm="l2", step_size=2 / 255,
                             export_formats=()), teacher=None, train_data=data, student_module=tiny_student())
    # A checkpoint written before --norm existed has no norm in its fingerprint: it trained L-inf.
    path = tmp_path / "checkpoint.pt"
    saved = torch.load(path, weights_only=False)
    del saved["fingerprint"]["norm"]
    torch.save(saved, path)
    run_remediate(config(tmp_path, method="sat", epochs=2, resume=True, export_formats=()),
                  teacher=None, train_data=data, student_module=tiny_student())
    resumed = torch.load(path, weights_only=False)
    assert resumed["epoch"] == 2 and resumed["fingerprint"]["norm"] == "linf"
    with pytest.raises(UserError, match="norm='linf' but this run has norm='l1'"):
        run_remediate(config(tmp_path, method="sat", epochs=3, resume=True, norm="l1", step_size=2 / 255,
                             export_formats=()), teacher=None, train_data=data, student_module=tiny_student())
